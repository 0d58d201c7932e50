"""Tiny LTX-AV models and sampling for tests with a real ComfyUI (COMFYUI_PATH); see comfy_support.

Two styles, both built with ComfyUI's own LTXAVModel and saved with the metadata "config"
ComfyUI's detection needs: "ltx2" (LTX-2: plain attention, 6 AdaLN rows, caption projection
after the connectors) and "ltx23" (LTX-2.3: gated attention, prompt AdaLN with 9 rows,
projection before the connectors).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from comfy_support import COMFY, HAVE_COMFY, SKIP_REASON, import_comfy


def _ltxav_problem() -> str | None:
    """Why this ComfyUI cannot build LTX-AV models (with the fix), or None. Checked by file, before
    importing ComfyUI: releases before 0.8.0 have no comfy/ldm/lightricks/av_model.py."""
    if not HAVE_COMFY:
        return SKIP_REASON
    if not (Path(COMFY) / "comfy" / "ldm" / "lightricks" / "av_model.py").is_file():
        return (
            f"the ComfyUI at COMFYUI_PATH={COMFY} has no LTX-AV model (comfy/ldm/lightricks/av_model.py): "
            "LTX-AV needs ComfyUI 0.8.0 or newer; point COMFYUI_PATH at a newer release to run these tests"
        )
    return None


LTXAV_SKIP_REASON = _ltxav_problem()
HAVE_LTXAV = LTXAV_SKIP_REASON is None
needs_ltxav = pytest.mark.skipif(not HAVE_LTXAV, reason=LTXAV_SKIP_REASON or "")


def _styles() -> tuple[str, ...]:
    """The styles the installed ComfyUI builds: LTXAVModel takes unknown options silently, so an
    LTX-2.3 config that yields the LTX-2 tensors means this ComfyUI predates LTX-2.3."""
    if not HAVE_LTXAV:
        return ("ltx2", "ltx23")
    import_comfy()
    from comfyui_mesh.tiny import LTXAV2_TINY, LTXAV23_TINY, ltxav_shapes

    return ("ltx2",) if set(ltxav_shapes(LTXAV23_TINY)) == set(ltxav_shapes(LTXAV2_TINY)) else ("ltx2", "ltx23")


def _raw_text_context() -> bool:
    """Does LTXAVModel run raw text features through its connectors itself (newer ComfyUI)? Older
    releases take the processed (video | audio) context, caption_channels x 2 wide."""
    if not HAVE_LTXAV:
        return True
    import_comfy()
    import comfy.ldm.lightricks.av_model as av

    return hasattr(av.LTXAVModel, "preprocess_text_embeds")


STYLES = _styles()
RAW_TEXT_CONTEXT = _raw_text_context()
needs_ltx23 = pytest.mark.skipif(
    "ltx23" not in STYLES,
    reason="this ComfyUI builds no LTX-2.3 model (gated attention, prompt AdaLN): LTX-2.3 needs a newer ComfyUI",
)


def style_config(style: str) -> tuple[dict, int, dict]:
    """(transformer config, text-context width, conditioning options) of a tiny style."""
    from comfyui_mesh.tiny import LTXAV2_TINY, LTXAV23_TINY

    if style == "ltx2":
        return dict(LTXAV2_TINY), 64 if RAW_TEXT_CONTEXT else 2 * LTXAV2_TINY["caption_channels"], {}
    # 2.3: the context is the (video | audio) text features; run it through the connectors
    return dict(LTXAV23_TINY), 96, {"unprocessed_ltxav_embeds": True}


def make_ltx(
    path: Path, style: str = "ltx2", seed: int = 0, massive: int = 0, massive_gain: float = 100.0, **overrides
) -> Path:
    from comfyui_mesh.tiny import make_ltxav

    import_comfy()
    cfg, _, _ = style_config(style)
    return make_ltxav(path, seed=seed, config={**cfg, **overrides}, massive=massive, massive_gain=massive_gain)


def ltx_sample(
    comfy,
    model,
    style: str,
    audio: int = 5,
    cfg: float = 2.5,
    steps: int = 2,
    extra_cond: dict | None = None,
    video: tuple[int, int, int] = (2, 2, 3),
    noise_mask: torch.Tensor | None = None,
) -> list[torch.Tensor]:
    """Sample the tiny model (CFG > 1: cond and uncond batched); returns [video] or [video, audio].

    Under ``torch.inference_mode`` as ComfyUI runs every node (execution.py) and Daedalus every
    step: fp8 weights take a different (equally deterministic) path outside it."""
    from comfyui_mesh.tiny import ltxav_inputs

    _, ctx, cond = style_config(style)
    f, h, w = video
    i = ltxav_inputs(ctx=ctx, cond={**cond, **(extra_cond or {})}, audio=audio, frames=f, h=h, w=w)
    with torch.inference_mode():
        out = comfy.sample.sample(
            model, i["noise"], steps, cfg, "euler", "simple", i["positive"], i["negative"], i["latent_image"],
            seed=0, disable_pbar=True, noise_mask=noise_mask,
        )  # fmt: skip
    return list(out.unbind()) if getattr(out, "is_nested", False) else [out]


def make_ltx_fp8(path: Path, style: str = "ltx2", seed: int = 0, prefix: str = "") -> Path:
    """A tiny LTX-AV whose block linears are fp8 (e4m3, per-tensor scale) named in the file's
    ``_quantization_metadata``, the layout of ComfyUI's fp8 checkpoints. ``prefix``: key prefix of a
    full checkpoint ("model.diffusion_model.")."""
    import json

    from safetensors import safe_open
    from safetensors.torch import save_file

    src = make_ltx(path.with_suffix(".bf.safetensors"), style=style, seed=seed)
    with safe_open(str(src), framework="pt") as f:
        meta = dict(f.metadata())
        sd = {k: f.get_tensor(k) for k in f.keys()}
    layers = {}
    for k in list(sd):
        if k.startswith("transformer_blocks.") and k.endswith(".weight") and sd[k].ndim == 2:
            w = sd[k].float()
            scale = w.abs().max() / 448.0
            sd[k] = (w / scale).to(torch.float8_e4m3fn)
            sd[k[: -len("weight")] + "weight_scale"] = scale.reshape(())
            layers[prefix + k[: -len(".weight")]] = {"format": "float8_e4m3fn"}
    meta["_quantization_metadata"] = json.dumps({"format_version": "1.0", "layers": layers})
    save_file({prefix + k: v for k, v in sd.items()}, str(path), metadata=meta)
    return path


def load(comfy, path: Path):
    """comfy.sd.load_diffusion_model as a loader node runs it: under torch.inference_mode."""
    with torch.inference_mode():
        return comfy.sd.load_diffusion_model(str(path))
