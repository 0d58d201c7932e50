"""Z-Image (Turbo, Base) and Lumina 2: ComfyUI's ``NextDiT`` (comfy/ldm/lumina/model.py, model_base.Lumina2).

ComfyUI detects both as ``image_model: lumina2``; the width tells them apart (Z-Image 3840, 30 heads
of 128, Qwen3-4B text; Lumina 2 2304, 24 heads with 8 KV heads, Gemma-2 text). One block list runs
the joint sequence [caption (+ SigLIP) | image]: ``layers`` (30 in Z-Image, 26 in Lumina 2). The
noise and context refiners run BEFORE it, on the client; only ``layers`` are cut. The server holds
the last N layers and ``final_layer`` and returns final_layer's output for the whole sequence,
[B, L, p*p*C]; ComfyUI's own unpatchify picks the image tokens on the client.

ComfyUI calls these layers directly (no ``patches_replace`` hook), so the remote layers are swapped
for hooking stubs (``Adapter.object_hooks``). Per call the client sends:
  coded  ``x``, the joint sequence at the seam
  exact  ``adaln`` (the time embedding the layers and final_layer modulate with, [B, 256 | 1024])
  consts ``freqs_cis`` (RoPE) and ``x_mask`` when the model uses one: once per generation
  scalars the "timestep zero" spans of Z-Image Omni (reference images), or none

Model patches that ComfyUI runs after every layer (``transformer_options["patches"]["double_block"]``,
e.g. Z-Image Fun ControlNet) would act on remote layers: refused.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch

from ..errors import LocalError, RemoteProtocolError
from ..payload import SeamPayload
from . import Adapter, SeamCall, SplitPlan, register

LAYERS = "layers"


def detect_keys(keys: set[str]) -> bool:
    return "cap_embedder.1.weight" in keys and "noise_refiner.0.attention.k_norm.weight" in keys


def detect_model(dm: Any) -> bool:
    return type(dm).__name__ == "NextDiT" and all(
        hasattr(dm, a) for a in (LAYERS, "final_layer", "noise_refiner", "context_refiner")
    )


def call_info(args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, Any]:
    topts = kwargs.get("transformer_options") or {}
    if (topts.get("patches") or {}).get("double_block"):
        raise LocalError(
            "a model patch runs after every Z-Image / Lumina 2 layer (e.g. a Z-Image Fun ControlNet), and the "
            "last layers run on Daedalus: such patches cannot cross the split; run this workflow without Icarus"
        )
    return {}


def _spans(v: Any) -> list[list[int]] | None:
    if v is None:
        return None
    if not isinstance(v, (list, tuple)) or not all(isinstance(d, (list, tuple)) and len(d) == 2 for d in v):
        raise LocalError(f"Z-Image split: unexpected timestep_zero_index {v!r}")
    return [[int(a), int(b)] for a, b in v]


def client_payload(args: dict[str, Any], sc: SeamCall) -> SeamPayload:
    x = args["x"]
    adaln = args.get("adaln_input")
    if not isinstance(adaln, torch.Tensor):
        raise LocalError("Z-Image / Lumina 2 split: the layers got no time embedding (unexpected model code path)")
    consts = {"freqs_cis": args["freqs_cis"]}
    if args.get("x_mask") is not None:
        consts["x_mask"] = args["x_mask"]
    scalars = {"tzi": _spans(args.get("timestep_zero_index"))}
    return SeamPayload({"x": x}, {"adaln": adaln}, consts, scalars)


def _accepts(fn: Any, name: str) -> bool:
    try:
        return name in inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False


def server_forward(dm: Any, plan: SplitPlan, t: dict[str, torch.Tensor], s: dict[str, Any]) -> dict[str, torch.Tensor]:
    """Run the slim model's layers and final_layer; mirrors the tail of NextDiT._forward."""
    x, adaln, freqs = t.get("x"), t.get("adaln"), t.get("freqs_cis")
    if x is None or adaln is None or freqs is None:
        raise RemoteProtocolError("Z-Image / Lumina 2 request lacks x, adaln or freqs_cis")
    if x.ndim != 3 or x.shape[-1] != dm.dim or adaln.ndim != 2 or adaln.shape[0] not in (x.shape[0], 2 * x.shape[0]):
        raise RemoteProtocolError(
            f"Z-Image / Lumina 2 request: x {list(x.shape)}, time embedding {list(adaln.shape)} for width {dm.dim}"
        )
    tzi = s.get("tzi")
    kw: dict[str, Any] = {}
    if tzi is not None:
        ok = isinstance(tzi, list) and len(tzi) <= 16
        ok = ok and all(
            isinstance(d, list) and len(d) == 2 and all(isinstance(v, int) and 0 <= v <= x.shape[1] for v in d)
            for d in tzi
        )
        if not ok:
            raise RemoteProtocolError(f"Z-Image request: bad timestep-zero spans {tzi!r}")
        kw["timestep_zero_index"] = [tuple(d) for d in tzi]
        if len(dm.layers) and not _accepts(type(dm.layers[0]).forward, "timestep_zero_index"):
            raise RemoteProtocolError(
                "request uses Z-Image Omni reference images, which this server's ComfyUI does not have: run the same "
                "ComfyUI release on both machines"
            )
    mask = t.get("x_mask")
    topts: dict[str, Any] = {"total_blocks": plan.counts[LAYERS], "block_type": "double"}
    first = plan.first_remote(LAYERS)
    for i, layer in enumerate(dm.layers):
        topts["block_index"] = first + i
        x = layer(x, mask, freqs, adaln, transformer_options=topts, **kw)
    return {"out": dm.final_layer(x, adaln, **kw)}


ADAPTER = register(
    Adapter(
        family="lumina2",
        display="Z-Image / Lumina 2",
        block_groups=(LAYERS,),
        hook_names={},
        config_keys={LAYERS: "n_layers"},
        heads=("final_layer",),
        server_drops=(
            "x_embedder",
            "noise_refiner",
            "context_refiner",
            "t_embedder",
            "cap_embedder",
            "clip_text_pooled_proj",
            "time_text_embed",
            "siglip_embedder",
            "siglip_refiner",
        ),
        detect_keys=detect_keys,
        detect_model=detect_model,
        server_forward=server_forward,
        client_payload=client_payload,
        notes="Z-Image Turbo / Base (6B): 30 layers of 3840; Lumina 2 (2.6B): 26 layers of 2304",
        call_info=call_info,
        hook_returns=("x",),
        object_hooks=(LAYERS,),
        request_names=r"x|adaln|freqs_cis|x_mask",
        request_widths={"x": "dim"},
    )
)
