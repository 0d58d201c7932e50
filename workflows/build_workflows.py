"""Writes the example workflows in this folder (ComfyUI's UI workflow format, version 0.4).

    python workflows/build_workflows.py

Edit here, not in the JSON: node positions, links and widget order are derived from one list.
tests/test_comfyui_ui.py checks every node, input and value against a real ComfyUI's /object_info.
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


def main() -> None:
    for w, name in ((klein_9b(), "flux2-klein-9b.json"), (dev_two_sided_lora(), "flux2-dev-lora-two-sided.json"),
                    (ltx23_t2v(), "ltx-2.3-t2v-audio.json")):  # fmt: skip
        (HERE / name).write_text(json.dumps(w.to_json(), indent=1) + "\n")
        print(f"wrote {HERE / name}: {len(w.nodes)} nodes, {len(w.links)} links")


if __name__ == "__main__":
    main()
