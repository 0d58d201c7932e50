"""Tiny random-weight models built with ComfyUI's own classes (tests, demo, benchmarks).

Imports ComfyUI lazily: call ``import_comfy(path)`` first (it puts the checkout on
sys.path and selects the CPU when asked).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import torch

# Tiny FLUX.2: width 256 (2 heads of 128), 2 double + 3 single blocks, text width 64.
FLUX2_TINY: dict[str, Any] = dict(
    in_channels=128,
    out_channels=128,
    vec_in_dim=None,
    context_in_dim=64,
    hidden_size=256,
    mlp_ratio=3.0,
    num_heads=2,
    depth=2,
    depth_single_blocks=3,
    axes_dim=[32, 32, 32, 32],
    theta=2000,
    patch_size=1,
    qkv_bias=False,
    guidance_embed=False,
    txt_ids_dims=[3],
    global_modulation=True,
    mlp_silu_act=True,
    ops_bias=False,
    default_ref_method="index",
    ref_index_scale=10.0,
)

# FLUX.2 Klein 9B / Dev shapes (for full-size random-weight speed runs).
FLUX2_KLEIN_9B = {
    **FLUX2_TINY,
    "context_in_dim": 12288,
    "hidden_size": 4096,
    "num_heads": 32,
    "depth": 8,
    "depth_single_blocks": 24,
}
FLUX2_DEV = {
    **FLUX2_TINY,
    "context_in_dim": 15360,
    "hidden_size": 6144,
    "num_heads": 48,
    "depth": 8,
    "depth_single_blocks": 48,
    "guidance_embed": True,
}


def import_comfy(path: str | Path, cpu: bool = True) -> Any:
    """Import ComfyUI from ``path`` (once per process); ``cpu`` forces ComfyUI's --cpu mode."""
    p = str(Path(path).resolve())
    if p not in sys.path:
        sys.path.insert(0, p)
    import comfy.cli_args

    if cpu:
        comfy.cli_args.args.cpu = True
    import comfy.model_management
    import comfy.sample
    import comfy.sd

    return comfy


def make_flux2(
    path: str | Path,
    seed: int = 0,
    config: dict[str, Any] | None = None,
    dtype: torch.dtype = torch.float32,
    device: str = "cpu",
) -> Path:
    """Save a random FLUX.2 checkpoint with ComfyUI key names (ComfyUI must be importable).

    ``device`` is where the random numbers are drawn (a GPU makes full-size models fast)."""
    import comfy.ldm.flux.model
    import comfy.ops
    from safetensors.torch import save_file

    cfg = dict(config or FLUX2_TINY)
    g = torch.Generator(device=device).manual_seed(seed)
    with torch.device("meta"):
        model = comfy.ldm.flux.model.Flux(dtype=dtype, device="meta", operations=comfy.ops.disable_weight_init, **cfg)
    sd = {}
    for k, v in model.state_dict().items():
        if v.ndim > 1:  # ~unit-variance activations through the residual stream
            t = torch.randn(v.shape, generator=g, device=device) * (1.0 / v.shape[-1] ** 0.5)
        else:
            t = 1.0 + 0.1 * torch.randn(v.shape, generator=g, device=device)
        sd[k] = t.to(dtype).cpu().contiguous()
    save_file(sd, str(path))
    return Path(path)


def flux2_inputs(batch: int = 1, h: int = 4, w: int = 6, txt: int = 7, ctx: int = 64, seed: int = 1) -> dict[str, Any]:
    """Noise, positive/negative conditioning and an empty latent for comfy.sample.sample."""

    def rnd(*shape: int, s: int) -> torch.Tensor:
        return torch.randn(*shape, generator=torch.Generator().manual_seed(s))

    return {
        "noise": rnd(batch, 128, h, w, s=seed),
        "positive": [[rnd(1, txt, ctx, s=seed + 1), {}]],
        "negative": [[rnd(1, txt, ctx, s=seed + 2), {}]],
        "latent_image": torch.zeros(batch, 128, h, w),
    }
