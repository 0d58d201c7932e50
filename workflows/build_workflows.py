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


def main() -> None:
    for w, name in ((klein_9b(), "flux2-klein-9b.json"), (dev_two_sided_lora(), "flux2-dev-lora-two-sided.json")):
        (HERE / name).write_text(json.dumps(w.to_json(), indent=1) + "\n")
        print(f"wrote {HERE / name}: {len(w.nodes)} nodes, {len(w.links)} links")


if __name__ == "__main__":
    main()
