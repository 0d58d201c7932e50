"""FLUX.1 (dev, schnell, Kontext, Fill, Depth/Canny): ComfyUI's ``Flux`` class without global modulation.

The same ``Flux`` class as FLUX.2 (``arch.flux2``) with FLUX.1's parameters: every block holds its own
modulation layers and takes the time vector ``vec`` = time + guidance (dev) + pooled CLIP ``y``
embeddings, [B, H]; ``final_layer`` takes it too. Execution order is double_blocks (19) then
single_blocks (38), then final_layer. The server holds the last N blocks plus final_layer and returns
the model output for the main image tokens only, [B, L_img, 64].

Per call the client sends:
  coded  the seam state: ``img`` + ``txt`` (seam in the doubles) or ``x`` = cat(txt, img)
  exact  ``vec`` ([B, H]: the only per-call value the remote blocks and the head need; a few KB)
  consts ``pe`` (RoPE) and ``attn_mask``: once per generation
Kontext's reference images are extra image tokens (``ref_latents``), as FLUX.2's: they cross with the
seam state and the server returns the main image tokens only (``pad_head_tokens``).

Refused: the ``index_timestep_zero`` reference method (the batch of ``vec`` is twice the image's).
"""

from __future__ import annotations

from typing import Any

import torch

from ..errors import LocalError, RemoteProtocolError
from ..payload import SeamPayload
from . import Adapter, Capture, SeamCall, SplitPlan, register
from .flux2 import DOUBLE, SINGLE, run_blocks, seam_consts, seam_state

DISPLAY = "FLUX.1"


def detect_keys(keys: set[str]) -> bool:
    """FLUX.1 keys: per-block modulation (``img_mod``), an image projection, no FLUX.2 global modulation
    and no Chroma approximator (both share these block names)."""
    return (
        "img_in.weight" in keys
        and "double_blocks.0.img_mod.lin.weight" in keys
        and "double_stream_modulation_img.lin.weight" not in keys
        and not any(k.startswith("distilled_guidance_layer.") for k in keys)
    )


def detect_model(dm: Any) -> bool:
    p = getattr(dm, "params", None)
    return (
        type(dm).__name__ == "Flux"
        and p is not None
        and not bool(getattr(p, "global_modulation", False))
        and hasattr(dm, "double_blocks")
        and hasattr(dm, "final_layer")
    )


def client_payload(args: dict[str, Any], sc: SeamCall) -> SeamPayload:
    """One block-hook call at the seam -> (coded, exact, consts, scalars): the seam state and ``vec``."""
    vec = args["vec"]
    if not isinstance(vec, torch.Tensor) or vec.ndim != 2:
        raise LocalError(f"{DISPLAY} split: the blocks' time vector is not a [B, H] tensor (unexpected model code)")
    if vec.shape[0] != args["img"].shape[0]:
        raise LocalError(
            f"{DISPLAY} split: reference images in 'index_timestep_zero' mode are not supported across the "
            "split; use the default reference method or run without Icarus"
        )
    coded, txt_len, img_len = seam_state(args, sc, DISPLAY)
    scalars = {"seam": sc.seam, "txt_len": txt_len, "img_len": img_len}
    return SeamPayload(coded, {"vec": vec}, seam_consts(args), scalars)


def server_forward(dm: Any, plan: SplitPlan, t: dict[str, torch.Tensor], s: dict[str, Any]) -> dict[str, torch.Tensor]:
    """Run the slim model's blocks and final_layer; mirrors the tail of Flux.forward_orig."""
    vec = t.get("vec")
    if vec is not None:
        x = t.get("img" if plan.remote[DOUBLE] else "x")
        if vec.ndim != 2 or (x is not None and vec.shape[0] != x.shape[0]):
            raise RemoteProtocolError(f"{DISPLAY} request: vec {list(vec.shape)} is not [B, H] for the seam state")
    img, img_len = run_blocks(dm, plan, t, s, DISPLAY, ["vec"], lambda i: vec, lambda i: vec)
    out = dm.final_layer(img, vec)
    return {"out": out[:, :img_len]}


ADAPTER = register(
    Adapter(
        family="flux1",
        display=DISPLAY,
        block_groups=(DOUBLE, SINGLE),
        hook_names={DOUBLE: "double_block", SINGLE: "single_block"},
        config_keys={DOUBLE: "depth", SINGLE: "depth_single_blocks"},
        heads=("final_layer",),
        server_drops=("img_in", "txt_in", "time_in", "guidance_in", "vector_in", "txt_norm"),
        detect_keys=detect_keys,
        detect_model=detect_model,
        server_forward=server_forward,
        client_payload=client_payload,
        notes="dev / schnell / Kontext / Fill: 19+38 blocks, 3072 wide",
        captures={"txt": Capture("txt_in", "out", 0)},  # the text length on releases without img_slice
        control_keys={DOUBLE: "input", SINGLE: "output"},  # ControlNet residual lists
        hook_returns=("img", "txt"),  # double blocks return both streams, single blocks "img"
        pad_head_tokens=True,  # Kontext reference-image tokens: the server returns the main image tokens only
        request_names=r"img|txt|x|vec|pe|attn_mask",
        request_widths={"img": "hidden_size", "txt": "hidden_size", "x": "hidden_size", "vec": "hidden_size"},
    )
)
