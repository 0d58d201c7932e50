"""Helpers for tests that need a real ComfyUI checkout (COMFYUI_PATH); skipped without it.

Builds tiny random-weight models with ComfyUI's own classes and saves them as safetensors.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

COMFY = os.environ.get("COMFYUI_PATH", "")
HAVE_COMFY = bool(COMFY) and (Path(COMFY) / "comfy" / "sd.py").is_file()
needs_comfy = pytest.mark.skipif(
    not HAVE_COMFY, reason="needs a ComfyUI checkout: set COMFYUI_PATH (see README, 'Tests with ComfyUI')"
)

# Tiny FLUX.2: width 256 (2 heads of 128), 2 double + 3 single blocks, text width 64.
FLUX2_TINY = dict(
    image_model="flux2",
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


def import_comfy():
    """Import ComfyUI on the CPU (once per process)."""
    if COMFY not in sys.path:
        sys.path.insert(0, COMFY)
    import comfy.cli_args

    comfy.cli_args.args.cpu = True
    import comfy.model_management
    import comfy.sd

    return comfy


def make_flux2(path: Path, seed: int = 0, **overrides) -> Path:
    """Save a tiny random FLUX.2 checkpoint (ComfyUI key names) to ``path``."""
    import_comfy()
    import comfy.ldm.flux.model
    import comfy.ops
    from safetensors.torch import save_file

    cfg = {**FLUX2_TINY, **overrides}
    cfg.pop("image_model")
    torch.manual_seed(seed)
    model = comfy.ldm.flux.model.Flux(
        dtype=torch.float32, device="cpu", operations=comfy.ops.disable_weight_init, **cfg
    )
    sd = {}
    for k, v in model.state_dict().items():
        std = 0.02 if v.ndim > 1 else 0.1
        sd[k] = (torch.randn_like(v) * std + (1.0 if v.ndim == 1 else 0.0)).contiguous()
    save_file(sd, str(path))
    return path
