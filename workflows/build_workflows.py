"""Writes the example workflows in this folder (ComfyUI's UI workflow format, version 0.4).

    python workflows/build_workflows.py

Edit here, not in the JSON: node positions, links and widget order are derived from one list.
tests/test_workflows.py checks every node, input and value against ComfyUI's /object_info, and each
Icarus node's n_blocks_remote against its family (FAMILIES).
"""

from __future__ import annotations

import json
import uuid
from pathlib import Path

HERE = Path(__file__).resolve().parent
ICARUS_DEFAULTS = {"host": "127.0.0.1", "port": 7777, "codec": "raw"}


class Workflow:
    """Nodes and links with the bookkeeping ComfyUI's frontend expects."""

    def __init__(self, name: str):
        self.name = name
        self.nodes: list[dict] = []
        self.links: list[list] = []

    def node(self, type_: str, pos: tuple[int, int], widgets: list | None = None, *, inputs=(), outputs=(),
             size=(320, 120), title: str | None = None, color: str | None = None) -> int:  # fmt: skip
        nid = len(self.nodes) + 1
        n = {
            "id": nid,
            "type": type_,
            "pos": list(pos),
            "size": list(size),
            "flags": {},
            "order": nid - 1,
            "mode": 0,
            "inputs": [{"name": name, "type": t, "link": None} for name, t in inputs],
            "outputs": [{"name": name, "type": t, "links": [], "slot_index": i} for i, (name, t) in enumerate(outputs)],
            "properties": {"Node name for S&R": type_},
            "widgets_values": list(widgets or []),
        }
        if title:
            n["title"] = title
        if color:
            n["color"], n["bgcolor"] = color, color
        self.nodes.append(n)
        return nid

    def link(self, src: int, out_slot: int, dst: int, input_name: str) -> None:
        lid = len(self.links) + 1
        s, d = self.nodes[src - 1], self.nodes[dst - 1]
        slot = next(i for i, x in enumerate(d["inputs"]) if x["name"] == input_name)
        t = s["outputs"][out_slot]["type"]
        s["outputs"][out_slot]["links"].append(lid)
        d["inputs"][slot]["link"] = lid
        self.links.append([lid, src, out_slot, dst, slot, t])

    def to_json(self) -> dict:
        return {
            "id": str(uuid.uuid5(uuid.NAMESPACE_URL, "comfyui-mesh/" + self.name)),
            "revision": 0,
            "last_node_id": len(self.nodes),
            "last_link_id": len(self.links),
            "nodes": self.nodes,
            "links": self.links,
            "groups": [],
            "config": {},
            "extra": {"ds": {"scale": 0.75, "offset": [40, 60]}},
            "version": 0.4,
        }


def icarus_ltx(w: Workflow, pos: tuple[int, int], n_blocks: int) -> int:
    d = ICARUS_DEFAULTS
    # n_blocks_remote, remote_host, remote_port, codec_mode, forward_client_loras (MeshSplitLTX's input order)
    return w.node("MeshSplitLTX", pos, [n_blocks, d["host"], d["port"], d["codec"], False],
                  inputs=[("model", "MODEL")], outputs=[("MODEL", "MODEL")], size=(420, 250),
                  title="ComfyUI Mesh : Icarus LTX", color="#233")  # fmt: skip


def icarus(w: Workflow, pos: tuple[int, int], n_blocks: int) -> int:
    d = ICARUS_DEFAULTS
    # n_blocks_remote, remote_host, remote_port, codec_mode, codec_qp, codec_lossless, codec_tile_dim,
    # forward_client_loras (the node's input order)
    return w.node("MeshSplitFlux", pos, [n_blocks, d["host"], d["port"], d["codec"], 18, False, 8, True],
                  inputs=[("model", "MODEL")], outputs=[("MODEL", "MODEL")], size=(420, 330),
                  title="ComfyUI Mesh : Icarus", color="#233")  # fmt: skip


def sampling(w: Workflow, model: int, positive: int, negative: int | None, vae: int, steps: int, cfg: float,
             prefix: str, x: int = 1080) -> None:  # fmt: skip
    """RandomNoise + KSamplerSelect + Flux2Scheduler + (CFG|Basic)Guider -> SamplerCustomAdvanced -> decode, save."""
    latent = w.node("EmptyFlux2LatentImage", (x - 300, 800), [1024, 1024, 1], outputs=[("LATENT", "LATENT")])
    noise = w.node("RandomNoise", (x, 40), [42, "fixed"], outputs=[("NOISE", "NOISE")], size=(300, 90))
    sampler = w.node("KSamplerSelect", (x, 170), ["euler"], outputs=[("SAMPLER", "SAMPLER")], size=(300, 60))
    sigmas = w.node("Flux2Scheduler", (x, 270), [steps, 1024, 1024], outputs=[("SIGMAS", "SIGMAS")], size=(300, 110))
    if negative is None:
        guider = w.node("BasicGuider", (x, 420), [], inputs=[("model", "MODEL"), ("conditioning", "CONDITIONING")],
                        outputs=[("GUIDER", "GUIDER")], size=(300, 50))  # fmt: skip
        w.link(model, 0, guider, "model")
        w.link(positive, 0, guider, "conditioning")
    else:
        guider = w.node("CFGGuider", (x, 420), [cfg], outputs=[("GUIDER", "GUIDER")], size=(300, 100),
                        inputs=[("model", "MODEL"), ("positive", "CONDITIONING"), ("negative", "CONDITIONING")])  # fmt: skip
        w.link(model, 0, guider, "model")
        w.link(positive, 0, guider, "positive")
        w.link(negative, 0, guider, "negative")
    sca = w.node("SamplerCustomAdvanced", (x + 340, 40), [], size=(280, 130),
                 inputs=[("noise", "NOISE"), ("guider", "GUIDER"), ("sampler", "SAMPLER"), ("sigmas", "SIGMAS"),
                         ("latent_image", "LATENT")],
                 outputs=[("output", "LATENT"), ("denoised_output", "LATENT")])  # fmt: skip
    for src, name in ((noise, "noise"), (guider, "guider"), (sampler, "sampler"), (sigmas, "sigmas"),
                      (latent, "latent_image")):  # fmt: skip
        w.link(src, 0, sca, name)
    dec = w.node("VAEDecode", (x + 340, 220), [], inputs=[("samples", "LATENT"), ("vae", "VAE")],
                 outputs=[("IMAGE", "IMAGE")], size=(220, 50))  # fmt: skip
    w.link(sca, 0, dec, "samples")
    w.link(vae, 0, dec, "vae")
    save = w.node("SaveImage", (x + 340, 320), [prefix], inputs=[("images", "IMAGE")], size=(420, 460))
    w.link(dec, 0, save, "images")


def loaders(w: Workflow, unet: str, text_encoder: str, vae: str) -> tuple[int, int, int]:
    m = w.node("UNETLoader", (20, 40), [unet, "default"], outputs=[("MODEL", "MODEL")], size=(340, 90))
    c = w.node("CLIPLoader", (20, 400), [text_encoder, "flux2", "default"], outputs=[("CLIP", "CLIP")], size=(340, 110))
    v = w.node("VAELoader", (20, 560), [vae], outputs=[("VAE", "VAE")], size=(340, 60))
    return m, c, v


def klein_9b() -> Workflow:
    w = Workflow("flux2-klein-9b")
    model, clip, vae = loaders(w, "flux-2-klein-9b-fp8.safetensors", "qwen_3_8b_fp8mixed.safetensors",
                               "flux2-vae.safetensors")  # fmt: skip
    split = icarus(w, (400, 40), 8)
    w.link(model, 0, split, "model")
    pos = w.node("CLIPTextEncode", (400, 500), ["a red fox in fresh snow at dawn, soft light, 35mm photo"],
                 inputs=[("clip", "CLIP")], outputs=[("CONDITIONING", "CONDITIONING")], size=(380, 150))  # fmt: skip
    w.link(clip, 0, pos, "clip")
    neg = w.node("ConditioningZeroOut", (400, 680), [], inputs=[("conditioning", "CONDITIONING")],
                 outputs=[("CONDITIONING", "CONDITIONING")], size=(240, 30))  # fmt: skip
    w.link(pos, 0, neg, "conditioning")
    w.node("MarkdownNote", (20, 960), [
        "## FLUX.2 Klein 9B through ComfyUI-Mesh\n\n"
        "Icarus runs the first blocks here; **Daedalus** runs the last `n_blocks_remote` (8 of 32) on the other GPU "
        "or PC. Start Daedalus with the **same model file**: `scripts/daedalus_gui` (choose the file, n_blocks 8, "
        "Start) or `MESH_WEIGHTS=.../flux-2-klein-9b-fp8.safetensors MESH_N_BLOCKS=8 scripts/daedalus.sh`.\n\n"
        "Paste the token Daedalus shows with the node's **Token…** button. The light turns green when the server "
        "is reachable; if the server holds another n_blocks, press **Confirm** on the node.\n\n"
        "Models: `diffusion_models/flux-2-klein-9b-fp8.safetensors`, `text_encoders/qwen_3_8b_fp8mixed.safetensors`, "
        "`vae/flux2-vae.safetensors`. Distilled: 4 steps, cfg 1.",
    ], size=(620, 260))  # fmt: skip
    sampling(w, split, pos, neg, vae, steps=4, cfg=1.0, prefix="mesh/flux2-klein-9b")
    return w


def dev_two_sided_lora() -> Workflow:
    w = Workflow("flux2-dev-lora")
    model, clip, vae = loaders(w, "flux2_dev_fp8mixed.safetensors", "mistral_3_small_flux2_bf16.safetensors",
                               "flux2-vae.safetensors")  # fmt: skip
    split = icarus(w, (400, 40), 24)
    w.link(model, 0, split, "model")
    lora = w.node("LoraLoaderModelOnly", (400, 500), ["Flux_2-Turbo-LoRA_comfyui.safetensors", 1.0],
                  inputs=[("model", "MODEL")], outputs=[("MODEL", "MODEL")], size=(380, 90),
                  title="LoRA after Icarus: front half only")  # fmt: skip
    w.link(split, 0, lora, "model")
    text = w.node("CLIPTextEncode", (400, 630), ["a lighthouse on a cliff in a storm, dramatic light, film photo"],
                  inputs=[("clip", "CLIP")], outputs=[("CONDITIONING", "CONDITIONING")], size=(380, 150))  # fmt: skip
    w.link(clip, 0, text, "clip")
    guidance = w.node("FluxGuidance", (400, 810), [4.0], inputs=[("conditioning", "CONDITIONING")],
                      outputs=[("CONDITIONING", "CONDITIONING")], size=(300, 60))  # fmt: skip
    w.link(text, 0, guidance, "conditioning")
    w.node("MarkdownNote", (20, 960), [
        "## FLUX.2 Dev with a large LoRA, loaded on both sides\n\n"
        "The Turbo LoRA is ~2.5 GB. Forwarding it (a LoraLoader *before* Icarus) would send its back-half weights "
        "to Daedalus; for big LoRAs load it **twice** instead, so only activations cross the wire:\n\n"
        "1. **Server:** in the Daedalus window add `Flux_2-Turbo-LoRA_comfyui.safetensors` to *Server LoRAs* "
        "(strength 1.0), n_blocks 24, model `flux2_dev_fp8mixed.safetensors`, then Start (or Restart).\n"
        "2. **Here:** the LoraLoader sits *after* Icarus, so it patches only the front half.\n\n"
        "Keep both strengths equal. LoRAs under ~500 MB can simply go before Icarus with "
        "`forward_client_loras` on. Turbo: 8 steps, guidance 4.",
    ], size=(620, 300))  # fmt: skip
    sampling(w, lora, guidance, None, vae, steps=8, cfg=1.0, prefix="mesh/flux2-dev-turbo")
    return w


LTX_CKPT = "ltx-2.3-22b-distilled-fp8.safetensors"
# ComfyUI's LTX-2.3 blueprints: the distilled first stage (8 steps, cfg 1) as its manual sigma schedule
LTX_SIGMAS = "1.0, 0.99375, 0.9875, 0.98125, 0.975, 0.909375, 0.725, 0.421875, 0.0"


def ltx23_t2v() -> Workflow:
    """ComfyUI's LTX-2.3 text-to-video+audio graph (its blueprint's first stage, distilled checkpoint)."""
    w = Workflow("ltx-2.3-t2v")
    ckpt = w.node("CheckpointLoaderSimple", (20, 40), [LTX_CKPT], size=(340, 100),
                  outputs=[("MODEL", "MODEL"), ("CLIP", "CLIP"), ("VAE", "VAE")])  # fmt: skip
    te = w.node("LTXAVTextEncoderLoader", (20, 400), ["gemma_3_12B_it_fp4_mixed.safetensors", LTX_CKPT, "default"],
                outputs=[("CLIP", "CLIP")], size=(340, 110))  # fmt: skip
    avae = w.node("LTXVAudioVAELoader", (20, 560), [LTX_CKPT], outputs=[("Audio VAE", "VAE")], size=(340, 60))
    split = icarus_ltx(w, (400, 40), 8)
    w.link(ckpt, 0, split, "model")
    pos = w.node("CLIPTextEncode", (400, 330), [
        "a street musician plays an acoustic guitar and sings on a rainy evening, neon reflections on wet "
        "cobblestones, handheld camera, the guitar and his voice clearly audible over the rain"],
        inputs=[("clip", "CLIP")], outputs=[("CONDITIONING", "CONDITIONING")], size=(380, 150))  # fmt: skip
    neg = w.node("CLIPTextEncode", (400, 510), ["blurry, low quality, still frame, watermark, distorted audio"],
                 inputs=[("clip", "CLIP")], outputs=[("CONDITIONING", "CONDITIONING")], size=(380, 120))  # fmt: skip
    for n in (pos, neg):
        w.link(te, 0, n, "clip")
    cond = w.node("LTXVConditioning", (400, 670), [25.0], size=(300, 80),
                  inputs=[("positive", "CONDITIONING"), ("negative", "CONDITIONING")],
                  outputs=[("positive", "CONDITIONING"), ("negative", "CONDITIONING")])  # fmt: skip
    w.link(pos, 0, cond, "positive")
    w.link(neg, 0, cond, "negative")
    video = w.node("EmptyLTXVLatentVideo", (400, 790), [768, 512, 97, 1], outputs=[("LATENT", "LATENT")],
                   size=(300, 130))  # fmt: skip
    audio = w.node("LTXVEmptyLatentAudio", (400, 950), [97, 25, 1], inputs=[("audio_vae", "VAE")],
                   outputs=[("Latent", "LATENT")], size=(300, 110))  # fmt: skip
    w.link(avae, 0, audio, "audio_vae")
    av = w.node("LTXVConcatAVLatent", (740, 800), [], inputs=[("video_latent", "LATENT"), ("audio_latent", "LATENT")],
                outputs=[("latent", "LATENT")], size=(260, 50))  # fmt: skip
    w.link(video, 0, av, "video_latent")
    w.link(audio, 0, av, "audio_latent")
    x = 1080
    noise = w.node("RandomNoise", (x, 40), [42, "fixed"], outputs=[("NOISE", "NOISE")], size=(300, 90))
    sampler = w.node("KSamplerSelect", (x, 170), ["euler_ancestral_cfg_pp"], outputs=[("SAMPLER", "SAMPLER")],
                     size=(300, 60))  # fmt: skip
    sigmas = w.node("ManualSigmas", (x, 270), [LTX_SIGMAS], outputs=[("SIGMAS", "SIGMAS")], size=(300, 60))
    guider = w.node("CFGGuider", (x, 370), [1.0], outputs=[("GUIDER", "GUIDER")], size=(300, 100),
                    inputs=[("model", "MODEL"), ("positive", "CONDITIONING"), ("negative", "CONDITIONING")])  # fmt: skip
    w.link(split, 0, guider, "model")
    w.link(cond, 0, guider, "positive")
    w.link(cond, 1, guider, "negative")
    sca = w.node("SamplerCustomAdvanced", (x + 340, 40), [], size=(280, 130),
                 inputs=[("noise", "NOISE"), ("guider", "GUIDER"), ("sampler", "SAMPLER"), ("sigmas", "SIGMAS"),
                         ("latent_image", "LATENT")],
                 outputs=[("output", "LATENT"), ("denoised_output", "LATENT")])  # fmt: skip
    for src, name in ((noise, "noise"), (guider, "guider"), (sampler, "sampler"), (sigmas, "sigmas"),
                      (av, "latent_image")):  # fmt: skip
        w.link(src, 0, sca, name)
    sep = w.node("LTXVSeparateAVLatent", (x + 340, 220), [], inputs=[("av_latent", "LATENT")],
                 outputs=[("video_latent", "LATENT"), ("audio_latent", "LATENT")], size=(260, 70))  # fmt: skip
    w.link(sca, 0, sep, "av_latent")
    dec = w.node("VAEDecodeTiled", (x + 340, 330), [768, 64, 4096, 4], inputs=[("samples", "LATENT"), ("vae", "VAE")],
                 outputs=[("IMAGE", "IMAGE")], size=(280, 150))  # fmt: skip
    w.link(sep, 0, dec, "samples")
    w.link(ckpt, 2, dec, "vae")
    adec = w.node("LTXVAudioVAEDecode", (x + 340, 520), [], inputs=[("samples", "LATENT"), ("audio_vae", "VAE")],
                  outputs=[("Audio", "AUDIO")], size=(280, 50))  # fmt: skip
    w.link(sep, 1, adec, "samples")
    w.link(avae, 0, adec, "audio_vae")
    vid = w.node("CreateVideo", (x + 340, 610), [25.0], inputs=[("images", "IMAGE"), ("audio", "AUDIO")],
                 outputs=[("VIDEO", "VIDEO")], size=(280, 80))  # fmt: skip
    w.link(dec, 0, vid, "images")
    w.link(adec, 0, vid, "audio")
    save = w.node("SaveVideo", (x + 660, 40), ["mesh/ltx-2.3", "auto", "auto"], inputs=[("video", "VIDEO")],
                  size=(480, 520))  # fmt: skip
    w.link(vid, 0, save, "video")
    w.node("MarkdownNote", (20, 700), [
        "## LTX-2.3 text to video + audio through ComfyUI-Mesh\n\n"
        "Icarus LTX runs the first LTX-AV blocks here; **Daedalus** runs the last `n_blocks_remote` (8 of 48) and "
        "both output heads on the other GPU or PC. Start Daedalus with the **same checkpoint**: "
        "`scripts/daedalus_gui` (choose the file, n_blocks 8, Start) or "
        "`MESH_WEIGHTS=.../ltx-2.3-22b-distilled-fp8.safetensors MESH_N_BLOCKS=8 scripts/daedalus.sh`.\n\n"
        "Paste the token Daedalus shows with the node's **Token…** button; press **Confirm** on the node if the "
        "server holds another n_blocks.\n\n"
        "Models: `checkpoints/ltx-2.3-22b-distilled-fp8.safetensors` (video model, video VAE and audio VAE), "
        "`text_encoders/gemma_3_12B_it_fp4_mixed.safetensors`. Distilled: 8 steps, cfg 1, 97 frames at 25 fps. "
        "LTX LoRAs are large: load them on the server and put a LoraLoaderModelOnly for the same file after "
        "Icarus LTX.",
    ], size=(340, 420))  # fmt: skip
    return w


# ---------------------------------------------------------------- one example per further family
# Each follows ComfyUI's own template for the family (comfyui_workflow_templates: flux_dev_full_text_to_image,
# image_chroma_text_to_image, image_qwen_image, video_hunyuan_video_1.5_720p_t2v, image_z_image_turbo,
# video_wan2_2_14B_t2v) with Icarus between the model loader and the rest; n_blocks_remote is the family's
# default (tiny.BENCH), named with the bench config in FAMILIES for tests/test_workflows.py.


def daedalus_note(w: Workflow, pos: tuple[int, int], title: str, weights: list[str], n_blocks: int, total: int,
                  models: str, extra: str = "", size=(620, 300)) -> int:  # fmt: skip
    """The Markdown note that says which Daedalus to start for this workflow."""
    names = " ".join(f"--weights .../{x}" for x in weights)
    same = "the **same model file**" if len(weights) == 1 else "the **same model files** (both, in one Daedalus)"
    text = (
        f"## {title} through ComfyUI-Mesh\n\n"
        f"Icarus runs the first blocks here; **Daedalus** runs the last `n_blocks_remote` ({n_blocks} of {total}) "
        f"on the other GPU or PC. Start Daedalus there with {same}:\n\n"
        f"`python -m comfyui_mesh.server {names} --n-blocks {n_blocks}`\n\n"
        "(add `--bind 0.0.0.0` for another PC), or `scripts/daedalus_gui` (choose the file, n_blocks "
        f"{n_blocks}, Start). Paste the token Daedalus shows with the node's **Token…** button; press **Confirm** "
        "on the node if the server holds another n_blocks.\n\n"
        f"Models: {models}. {extra}"
    )
    return w.node("MarkdownNote", pos, [text.strip()], size=size)


def text_encode(w: Workflow, clip: int, pos: tuple[int, int], text: str, height: int = 150) -> int:
    n = w.node("CLIPTextEncode", pos, [text], inputs=[("clip", "CLIP")], outputs=[("CONDITIONING", "CONDITIONING")],
               size=(380, height))  # fmt: skip
    w.link(clip, 0, n, "clip")
    return n


def model_chain(w: Workflow, unet: str, pos: tuple[int, int], n_blocks: int, sampling: tuple[str, float] | None,
                weight_dtype: str = "default", title: str | None = None) -> int:  # fmt: skip
    """UNETLoader -> Icarus -> (ModelSampling*) ; returns the node the sampler takes its model from."""
    x, y = pos
    m = w.node("UNETLoader", (x, y), [unet, weight_dtype], outputs=[("MODEL", "MODEL")], size=(340, 90), title=title)
    split = icarus(w, (x + 380, y), n_blocks)
    w.link(m, 0, split, "model")
    if sampling is None:
        return split
    kind, shift = sampling
    ms = w.node(kind, (x + 840, y), [shift], inputs=[("model", "MODEL")], outputs=[("MODEL", "MODEL")], size=(300, 60))
    w.link(split, 0, ms, "model")
    return ms


def clip_loader(w: Workflow, pos: tuple[int, int], names: list[str], type_: str) -> int:
    if len(names) == 1:
        return w.node("CLIPLoader", pos, [names[0], type_, "default"], outputs=[("CLIP", "CLIP")], size=(340, 110))
    return w.node("DualCLIPLoader", pos, [*names, type_, "default"], outputs=[("CLIP", "CLIP")], size=(340, 130))


def ksampler(w: Workflow, pos: tuple[int, int], model: int, positive: int, negative: int, latent: int, steps: int,
             cfg: float, sampler: str = "euler", scheduler: str = "simple") -> int:  # fmt: skip
    k = w.node("KSampler", pos, [42, "fixed", steps, cfg, sampler, scheduler, 1.0], size=(320, 270),
               inputs=[("model", "MODEL"), ("positive", "CONDITIONING"), ("negative", "CONDITIONING"),
                       ("latent_image", "LATENT")],
               outputs=[("LATENT", "LATENT")])  # fmt: skip
    for src, name in ((model, "model"), (positive, "positive"), (negative, "negative"), (latent, "latent_image")):
        w.link(src, 0, k, name)
    return k


def decode_save_image(w: Workflow, pos: tuple[int, int], samples: int, vae: int, prefix: str) -> None:
    x, y = pos
    dec = w.node("VAEDecode", (x, y), [], inputs=[("samples", "LATENT"), ("vae", "VAE")], outputs=[("IMAGE", "IMAGE")],
                 size=(220, 50))  # fmt: skip
    w.link(samples, 0, dec, "samples")
    w.link(vae, 0, dec, "vae")
    save = w.node("SaveImage", (x, y + 100), [prefix], inputs=[("images", "IMAGE")], size=(420, 460))
    w.link(dec, 0, save, "images")


def decode_save_video(w: Workflow, pos: tuple[int, int], samples: int, vae: int, fps: float, prefix: str) -> None:
    x, y = pos
    dec = w.node("VAEDecode", (x, y), [], inputs=[("samples", "LATENT"), ("vae", "VAE")], outputs=[("IMAGE", "IMAGE")],
                 size=(220, 50))  # fmt: skip
    w.link(samples, 0, dec, "samples")
    w.link(vae, 0, dec, "vae")
    vid = w.node("CreateVideo", (x, y + 100), [fps], inputs=[("images", "IMAGE")], outputs=[("VIDEO", "VIDEO")],
                 size=(280, 80))  # fmt: skip
    w.link(dec, 0, vid, "images")
    save = w.node("SaveVideo", (x, y + 220), [prefix, "auto", "auto"], inputs=[("video", "VIDEO")], size=(480, 520))
    w.link(vid, 0, save, "video")


def custom_sampling(w: Workflow, pos: tuple[int, int], model: int, positive: int, negative: int, latent: int,
                    steps: int, cfg: float, scheduler: str) -> int:  # fmt: skip
    """RandomNoise + KSamplerSelect + BasicScheduler + CFGGuider -> SamplerCustomAdvanced; returns it."""
    x, y = pos
    noise = w.node("RandomNoise", (x, y), [42, "fixed"], outputs=[("NOISE", "NOISE")], size=(300, 90))
    sampler = w.node("KSamplerSelect", (x, y + 130), ["euler"], outputs=[("SAMPLER", "SAMPLER")], size=(300, 60))
    sigmas = w.node("BasicScheduler", (x, y + 230), [scheduler, steps, 1.0], inputs=[("model", "MODEL")],
                    outputs=[("SIGMAS", "SIGMAS")], size=(300, 110))  # fmt: skip
    w.link(model, 0, sigmas, "model")
    guider = w.node("CFGGuider", (x, y + 380), [cfg], outputs=[("GUIDER", "GUIDER")], size=(300, 100),
                    inputs=[("model", "MODEL"), ("positive", "CONDITIONING"), ("negative", "CONDITIONING")])  # fmt: skip
    w.link(model, 0, guider, "model")
    w.link(positive, 0, guider, "positive")
    w.link(negative, 0, guider, "negative")
    sca = w.node("SamplerCustomAdvanced", (x + 340, y), [], size=(280, 130),
                 inputs=[("noise", "NOISE"), ("guider", "GUIDER"), ("sampler", "SAMPLER"), ("sigmas", "SIGMAS"),
                         ("latent_image", "LATENT")],
                 outputs=[("output", "LATENT"), ("denoised_output", "LATENT")])  # fmt: skip
    for src, name in ((noise, "noise"), (guider, "guider"), (sampler, "sampler"), (sigmas, "sigmas"),
                      (latent, "latent_image")):  # fmt: skip
        w.link(src, 0, sca, name)
    return sca


def flux1_dev() -> Workflow:
    w = Workflow("flux1-dev")
    model = model_chain(w, "flux1-dev.safetensors", (20, 40), 28, None)
    clip = clip_loader(w, (20, 400), ["clip_l.safetensors", "t5xxl_fp16.safetensors"], "flux")
    vae = w.node("VAELoader", (20, 580), ["ae.safetensors"], outputs=[("VAE", "VAE")], size=(340, 60))
    pos = text_encode(w, clip, (400, 400), "a glass greenhouse full of orchids at golden hour, 50mm photo")
    neg = w.node("ConditioningZeroOut", (400, 580), [], inputs=[("conditioning", "CONDITIONING")],
                 outputs=[("CONDITIONING", "CONDITIONING")], size=(240, 30))  # fmt: skip
    w.link(pos, 0, neg, "conditioning")
    latent = w.node("EmptySD3LatentImage", (400, 660), [1024, 1024, 1], outputs=[("LATENT", "LATENT")])
    k = ksampler(w, (860, 40), model, pos, neg, latent, steps=20, cfg=1.0)
    decode_save_image(w, (1220, 40), k, vae, "mesh/flux1-dev")
    daedalus_note(w, (20, 860), "FLUX.1 Dev", ["flux1-dev.safetensors"], 28, 57,
                  "`diffusion_models/flux1-dev.safetensors`, `text_encoders/clip_l.safetensors` + "
                  "`text_encoders/t5xxl_fp16.safetensors`, `vae/ae.safetensors`",
                  "20 steps, cfg 1 (the guidance is in the model).")  # fmt: skip
    return w


def chroma1_hd() -> Workflow:
    w = Workflow("chroma1-hd")
    model = model_chain(w, "Chroma1-HD-fp8mixed.safetensors", (20, 40), 28, ("ModelSamplingAuraFlow", 1.0))
    te = clip_loader(w, (20, 400), ["t5xxl_fp8_e4m3fn_scaled.safetensors"], "chroma")
    clip = w.node("T5TokenizerOptions", (20, 560), [1, 0], inputs=[("clip", "CLIP")], outputs=[("CLIP", "CLIP")],
                  size=(340, 90))  # fmt: skip
    w.link(te, 0, clip, "clip")
    vae = w.node("VAELoader", (20, 700), ["ae.safetensors"], outputs=[("VAE", "VAE")], size=(340, 60))
    pos = text_encode(w, clip, (400, 400), "a close-up of a tiger's eye, detailed fur, natural light")
    neg = text_encode(w, clip, (400, 580), "low quality, blurry, oversaturated, flat colors, artifacts", 120)
    latent = w.node("EmptySD3LatentImage", (400, 730), [1024, 1024, 1], outputs=[("LATENT", "LATENT")])
    sca = custom_sampling(w, (1180, 160), model, pos, neg, latent, steps=26, cfg=3.5, scheduler="beta")
    decode_save_image(w, (1520, 340), sca, vae, "mesh/chroma1-hd")
    daedalus_note(w, (20, 900), "Chroma1-HD", ["Chroma1-HD-fp8mixed.safetensors"], 28, 57,
                  "`diffusion_models/Chroma1-HD-fp8mixed.safetensors`, "
                  "`text_encoders/t5xxl_fp8_e4m3fn_scaled.safetensors`, `vae/ae.safetensors`",
                  "26 steps, cfg 3.5, flow shift 1.")  # fmt: skip
    return w


def qwen_image() -> Workflow:
    w = Workflow("qwen-image")
    model = model_chain(w, "qwen_image_fp8_e4m3fn.safetensors", (20, 40), 30, ("ModelSamplingAuraFlow", 3.1))
    clip = clip_loader(w, (20, 400), ["qwen_2.5_vl_7b_fp8_scaled.safetensors"], "qwen_image")
    vae = w.node("VAELoader", (20, 560), ["qwen_image_vae.safetensors"], outputs=[("VAE", "VAE")], size=(340, 60))
    pos = text_encode(w, clip, (400, 400), 'a neon-lit Hong Kong street in the rain, shop signs reading "MESH CAFE"')
    neg = text_encode(w, clip, (400, 580), "", 120)
    latent = w.node("EmptySD3LatentImage", (400, 730), [1328, 1328, 1], outputs=[("LATENT", "LATENT")])
    k = ksampler(w, (1180, 40), model, pos, neg, latent, steps=20, cfg=2.5)
    decode_save_image(w, (1540, 40), k, vae, "mesh/qwen-image")
    daedalus_note(w, (20, 900), "Qwen-Image", ["qwen_image_fp8_e4m3fn.safetensors"], 30, 60,
                  "`diffusion_models/qwen_image_fp8_e4m3fn.safetensors`, "
                  "`text_encoders/qwen_2.5_vl_7b_fp8_scaled.safetensors`, `vae/qwen_image_vae.safetensors`",
                  "20 steps, cfg 2.5, shift 3.1.")  # fmt: skip
    return w


def hunyuan_video15_t2v() -> Workflow:
    w = Workflow("hunyuan-video-1.5-t2v")
    model = model_chain(w, "hunyuanvideo1.5_720p_t2v_fp16.safetensors", (20, 40), 27, ("ModelSamplingSD3", 7.0))
    clip = clip_loader(w, (20, 400), ["qwen_2.5_vl_7b_fp8_scaled.safetensors", "byt5_small_glyphxl_fp16.safetensors"],
                       "hunyuan_video_15")  # fmt: skip
    vae = w.node("VAELoader", (20, 580), ["hunyuanvideo15_vae_fp16.safetensors"], outputs=[("VAE", "VAE")],
                 size=(340, 60))  # fmt: skip
    pos = text_encode(w, clip, (400, 400), "a paper airplane glides between skyscrapers toward the sunset, "
                      "first-person camera following it, golden light")  # fmt: skip
    neg = text_encode(w, clip, (400, 580), "", 120)
    latent = w.node("EmptyHunyuanVideo15Latent", (400, 730), [1280, 720, 121, 1], outputs=[("LATENT", "LATENT")],
                    size=(320, 150))  # fmt: skip
    sca = custom_sampling(w, (1180, 160), model, pos, neg, latent, steps=20, cfg=6.0, scheduler="simple")
    decode_save_video(w, (1520, 340), sca, vae, 24.0, "mesh/hunyuan-video-1.5")
    daedalus_note(w, (20, 920), "HunyuanVideo 1.5 720p text to video", ["hunyuanvideo1.5_720p_t2v_fp16.safetensors"],
                  27, 54, "`diffusion_models/hunyuanvideo1.5_720p_t2v_fp16.safetensors`, "
                  "`text_encoders/qwen_2.5_vl_7b_fp8_scaled.safetensors` + "
                  "`text_encoders/byt5_small_glyphxl_fp16.safetensors`, `vae/hunyuanvideo15_vae_fp16.safetensors`",
                  "20 steps, cfg 6, shift 7, 121 frames at 24 fps.")  # fmt: skip
    return w


def z_image_turbo() -> Workflow:
    w = Workflow("z-image-turbo")
    model = model_chain(w, "z_image_turbo_bf16.safetensors", (20, 40), 15, ("ModelSamplingAuraFlow", 3.0))
    clip = clip_loader(w, (20, 400), ["qwen_3_4b.safetensors"], "lumina2")
    vae = w.node("VAELoader", (20, 560), ["ae.safetensors"], outputs=[("VAE", "VAE")], size=(340, 60))
    pos = text_encode(w, clip, (400, 400), "a harbor town with pastel houses and fishing boats, breezy seaside light")
    neg = w.node("ConditioningZeroOut", (400, 580), [], inputs=[("conditioning", "CONDITIONING")],
                 outputs=[("CONDITIONING", "CONDITIONING")], size=(240, 30))  # fmt: skip
    w.link(pos, 0, neg, "conditioning")
    latent = w.node("EmptySD3LatentImage", (400, 660), [1024, 1024, 1], outputs=[("LATENT", "LATENT")])
    k = ksampler(w, (1180, 40), model, pos, neg, latent, steps=8, cfg=1.0, sampler="res_multistep")
    decode_save_image(w, (1540, 40), k, vae, "mesh/z-image-turbo")
    daedalus_note(w, (20, 860), "Z-Image Turbo", ["z_image_turbo_bf16.safetensors"], 15, 30,
                  "`diffusion_models/z_image_turbo_bf16.safetensors`, `text_encoders/qwen_3_4b.safetensors`, "
                  "`vae/ae.safetensors`", "Distilled: 8 steps, cfg 1, res_multistep.")  # fmt: skip
    return w


WAN_HIGH = "wan2.2_t2v_high_noise_14B_fp8_scaled.safetensors"
WAN_LOW = "wan2.2_t2v_low_noise_14B_fp8_scaled.safetensors"
# Wan's stock negative prompt (ComfyUI's Wan 2.2 template)
WAN_NEGATIVE = (
    "色调艳丽，过曝，静态，细节模糊不清，字幕，风格，作品，画作，画面，静止，整体发灰，最差质量，低质量，JPEG压缩残留，丑陋的，残缺的，"
    "多余的手指，画得不好的手部，画得不好的脸部，畸形的，毁容的，形态畸形的肢体，手指融合，静止不动的画面，杂乱的背景，三条腿，"
    "背景人很多，倒着走"
)


def wan22_t2v_14b() -> Workflow:
    """Wan 2.2's two 14B experts, each split by its own Icarus against ONE Daedalus holding both."""
    w = Workflow("wan2.2-t2v-14b")
    high = model_chain(w, WAN_HIGH, (20, 40), 20, ("ModelSamplingSD3", 8.0), title="high-noise expert")
    low = model_chain(w, WAN_LOW, (20, 420), 20, ("ModelSamplingSD3", 8.0), title="low-noise expert")
    clip = clip_loader(w, (20, 800), ["umt5_xxl_fp8_e4m3fn_scaled.safetensors"], "wan")
    vae = w.node("VAELoader", (20, 960), ["wan_2.1_vae.safetensors"], outputs=[("VAE", "VAE")], size=(340, 60))
    pos = text_encode(w, clip, (400, 800), "a red kite rises over a windy beach, the camera tracks it upward, "
                      "slow motion, cinematic light")  # fmt: skip
    neg = text_encode(w, clip, (400, 980), WAN_NEGATIVE, 160)
    latent = w.node("EmptyHunyuanLatentVideo", (400, 1170), [640, 640, 81, 1], outputs=[("LATENT", "LATENT")],
                    size=(320, 150))  # fmt: skip
    cond = (("positive", "CONDITIONING"), ("negative", "CONDITIONING"), ("latent_image", "LATENT"))
    # add_noise, noise_seed, control, steps, cfg, sampler, scheduler, start_at_step, end_at_step, leftover noise
    k1 = w.node("KSamplerAdvanced", (1220, 40), ["enable", 42, "fixed", 20, 3.5, "euler", "simple", 0, 10, "enable"],
                inputs=[("model", "MODEL"), *cond], outputs=[("LATENT", "LATENT")], size=(320, 330),
                title="high-noise steps 0-10")  # fmt: skip
    k2 = w.node("KSamplerAdvanced", (1220, 420),
                ["disable", 0, "fixed", 20, 3.5, "euler", "simple", 10, 10000, "disable"],
                inputs=[("model", "MODEL"), *cond], outputs=[("LATENT", "LATENT")], size=(320, 330),
                title="low-noise steps 10-20")  # fmt: skip
    w.link(high, 0, k1, "model")
    w.link(low, 0, k2, "model")
    for k in (k1, k2):
        w.link(pos, 0, k, "positive")
        w.link(neg, 0, k, "negative")
    w.link(latent, 0, k1, "latent_image")
    w.link(k1, 0, k2, "latent_image")
    decode_save_video(w, (1580, 40), k2, vae, 16.0, "mesh/wan2.2-t2v")
    daedalus_note(w, (760, 1170), "Wan 2.2 text to video, 14B high- and low-noise experts", [WAN_HIGH, WAN_LOW], 20,
                  40, f"`diffusion_models/{WAN_HIGH}` and `diffusion_models/{WAN_LOW}`, "
                  "`text_encoders/umt5_xxl_fp8_e4m3fn_scaled.safetensors`, `vae/wan_2.1_vae.safetensors`",
                  "Both Icarus nodes point at the same Daedalus (port 7777), which holds the back halves of both experts. "
                  "20 steps (10 per expert), cfg 3.5, shift 8, 81 frames at 16 fps.")  # fmt: skip
    return w


# file -> (builder, tiny.BENCH entry, its config) of the model the workflow's Icarus nodes split
FAMILIES = {
    "flux2-klein-9b.json": (klein_9b, "flux2", "klein9b"),
    "flux2-dev-lora-two-sided.json": (dev_two_sided_lora, "flux2", "dev"),
    "ltx-2.3-t2v-audio.json": (ltx23_t2v, "ltxav", "full"),
    "flux1-dev.json": (flux1_dev, "flux1", "dev"),
    "chroma1-hd.json": (chroma1_hd, "chroma", "full"),
    "qwen-image.json": (qwen_image, "qwen_image", "full"),
    "hunyuan-video-1.5-t2v.json": (hunyuan_video15_t2v, "hunyuan_video", "full"),
    "z-image-turbo.json": (z_image_turbo, "zimage", "turbo"),
    "wan2.2-t2v-14b-two-experts.json": (wan22_t2v_14b, "wan", "14b"),
}


def main() -> None:
    for name, (build, _, _) in FAMILIES.items():
        w = build()
        (HERE / name).write_text(json.dumps(w.to_json(), indent=1) + "\n")
        print(f"wrote {HERE / name}: {len(w.nodes)} nodes, {len(w.links)} links")


if __name__ == "__main__":
    main()
