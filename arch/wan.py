"""Wan 2.1 / 2.2 (T2V 1.3B/14B, I2V 14B, Wan 2.2 A14B experts, TI2V 5B): ComfyUI's ``WanModel``.

One block list, ``blocks`` (30 or 40 in the released models; counted from the checkpoint),
each block taking the hidden tokens ``x``, the per-block modulation input ``e0``, the RoPE
table and the embedded text (+ CLIP image) context. The server holds the last N blocks and
``head`` and returns the head's output, still patchified: [B, L, out_dim * 4]. The client's
``head`` is a stub returning it, so ComfyUI's own token slicing (reference / in-context
latents) and unpatchify run locally as usual.

Per call the client sends:
  coded  ``x`` [B, L, dim], the seam state
  exact  ``e0`` (the block modulation input, [B, T, 6, dim]: T = 1, or the number of latent
         frames when Wan 2.2 TI2V gives every frame its own timestep) and ``e`` (the time
         embedding the head modulates with, [B, T, dim]); a few KB
  consts ``context`` (text, with the CLIP image tokens first for I2V) and ``freqs`` (RoPE):
         once per generation
  scalar ``context_img_len`` (CLIP image tokens at the front of ``context``; null without
         ``clip_fea``), which the I2V cross-attention splits the context at
The server never loads the patch / text / time embeddings or the CLIP image projection.

Variants built on other block code or feeding remote blocks per step (VACE, Camera, S2V,
HuMo, Animate, SCAIL, WanDancer, causal AR) are refused with a clear message; so are
attention patches (MultiTalk) that would have to run inside remote blocks.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch

from ..errors import LocalError, RemoteProtocolError
from ..payload import SeamPayload
from . import Adapter, Capture, SeamCall, SplitPlan, register

BLOCKS = "blocks"

SUPPORTED = "plain Wan 2.1 / 2.2 checkpoints (T2V, I2V, FLF2V, Fun-Control, the A14B experts, TI2V 5B)"

# Checkpoint keys of the Wan variants ComfyUI builds with other model classes -> their names.
VARIANT_KEYS = {
    "vace_patch_embedding.weight": "VACE",
    "control_adapter.conv.weight": "Camera",
    "casual_audio_encoder.encoder.final_linear.weight": "S2V",
    "audio_proj.audio_proj_glob_1.layer.bias": "HuMo",
    "face_adapter.fuser_blocks.0.k_norm.weight": "Animate",
    "patch_embedding_mask.weight": "SCAIL 2",
    "patch_embedding_pose.weight": "SCAIL",
    "patch_embedding_global.weight": "WanDancer",
}


def _refuse(variant: str) -> LocalError:
    return LocalError(
        f"this is a Wan {variant} model; ComfyUI-Mesh splits {SUPPORTED} only: load a plain Wan "
        "checkpoint, or run this model without Icarus"
    )


def detect_keys(keys: set[str]) -> bool:
    if "head.modulation" not in keys or "blocks.0.self_attn.q.weight" not in keys:
        return False
    for key, variant in VARIANT_KEYS.items():
        if key in keys:
            raise _refuse(variant)
    return True


def detect_model(dm: Any) -> bool:
    cls = type(dm)
    if not any(c.__name__ == "WanModel" for c in cls.__mro__):
        return False
    if cls.__name__ != "WanModel":  # a subclass: VaceWanModel, CameraWanModel, CausalWanModel, ...
        raise _refuse(cls.__name__)
    if not (hasattr(dm, BLOCKS) and hasattr(dm, "head") and hasattr(dm, "time_projection")):
        return False
    check_release(dm)
    return True


MIN_COMFYUI = "0.3.75"  # the oldest release the Wan split is tested with (tests/test_wan_split.py)
BLOCK_PARAMS = ("x", "e", "freqs", "context", "context_img_len", "transformer_options")


def check_release(dm: Any) -> None:
    """The block call this adapter makes (both sides) must be the one this ComfyUI's blocks take."""
    blocks = getattr(dm, BLOCKS)
    if not len(blocks):
        return
    try:
        params = inspect.signature(type(blocks[0]).forward).parameters
    except (TypeError, ValueError):
        return
    missing = [p for p in BLOCK_PARAMS if p not in params]
    if missing:
        raise LocalError(
            f"this ComfyUI's Wan blocks take no {', '.join(missing)}: the Wan split needs ComfyUI {MIN_COMFYUI} or "
            "newer on both machines"
        )


def call_info(args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, Any]:
    """From ``WanModel.forward(x, timestep, context, clip_fea, ...)``: how many CLIP image tokens
    lead the blocks' context (the model passes ``clip_fea.shape[-2]`` to every block)."""
    clip_fea = args[3] if len(args) > 3 else kwargs.get("clip_fea")
    return {"context_img_len": int(clip_fea.shape[-2]) if isinstance(clip_fea, torch.Tensor) else None}


# transformer_options["patches"] entries that Wan's blocks call (inside remote blocks they cannot run)
BLOCK_PATCHES = ("attn1_patch", "attn2_patch")


def client_payload(args: dict[str, Any], sc: SeamCall) -> SeamPayload:
    e = sc.values.get("e")
    if not isinstance(e, torch.Tensor):
        raise LocalError("Wan split: the time embedding was not captured (unexpected model code path)")
    topts = args.get("transformer_options") or {}
    patches = [k for k in BLOCK_PATCHES if (topts.get("patches") or {}).get(k)]
    if patches:
        raise LocalError(
            f"a node patched Wan's attention ({', '.join(patches)}, e.g. MultiTalk), which would have to run in "
            "the blocks on Daedalus; attention patches across the split are not supported: run this workflow "
            "without Icarus"
        )
    freqs = args["pe"]
    if not isinstance(freqs, torch.Tensor):
        raise LocalError(f"Wan split: RoPE is a {type(freqs).__name__}, expected a tensor (unexpected model code)")
    consts = {"context": args["txt"], "freqs": freqs}
    scalars = {"context_img_len": sc.values.get("context_img_len")}
    return SeamPayload({"x": args["img"]}, {"e0": args["vec"], "e": e}, consts, scalars)


def _check(t: dict[str, torch.Tensor], s: dict[str, Any], dim: int) -> int | None:
    missing = [k for k in ("x", "e0", "e", "context", "freqs") if k not in t]
    if missing:
        raise RemoteProtocolError(f"Wan request lacks tensors {missing}")
    x, e0, e, ctx, freqs = t["x"], t["e0"], t["e"], t["context"], t["freqs"]
    b, n = (x.shape[0], x.shape[1]) if x.ndim == 3 else (-1, -1)
    if x.ndim != 3 or x.shape[2] != dim:
        raise RemoteProtocolError(f"Wan request: x {list(x.shape)}, this model's width is {dim}")
    # e0: [B, T, 6, dim] (or [B, 6, dim] from older model code), e: [B, T, dim] (or [B, dim])
    if e0.shape[0] != b or e0.shape[-1] != dim or e0.shape[-2] != 6 or e0.ndim not in (3, 4):
        raise RemoteProtocolError(f"Wan request: modulation e0 {list(e0.shape)} for x {list(x.shape)}")
    if e.shape[0] != b or e.shape[-1] != dim or e.ndim != e0.ndim - 1:
        raise RemoteProtocolError(f"Wan request: time embedding e {list(e.shape)} for e0 {list(e0.shape)}")
    if ctx.ndim != 3 or ctx.shape[0] != b or ctx.shape[2] != dim:
        raise RemoteProtocolError(f"Wan request: context {list(ctx.shape)} for x {list(x.shape)}")
    if freqs.ndim < 2 or freqs.shape[0] not in (1, b) or freqs.shape[1] != n:
        raise RemoteProtocolError(f"Wan request: RoPE {list(freqs.shape)} for {n} tokens")
    cil = s.get("context_img_len")
    if cil is not None and (not isinstance(cil, int) or isinstance(cil, bool) or not 0 <= cil <= ctx.shape[1]):
        raise RemoteProtocolError(f"Wan request: context_img_len {cil!r} for a context of {ctx.shape[1]} tokens")
    return cil


def server_forward(dm: Any, plan: SplitPlan, t: dict[str, torch.Tensor], s: dict[str, Any]) -> dict[str, torch.Tensor]:
    """Run the slim model's blocks and ``head``; mirrors the tail of ``WanModel.forward_orig``."""
    cil = _check(t, s, int(dm.dim))
    x, e0, freqs, ctx = t["x"], t["e0"], t["freqs"], t["context"]
    topts: dict[str, Any] = {"total_blocks": plan.counts[BLOCKS], "block_type": "double"}
    first = plan.first_remote(BLOCKS)
    for i, block in enumerate(dm.blocks):
        topts["block_index"] = first + i
        x = block(x, e=e0, freqs=freqs, context=ctx, context_img_len=cil, transformer_options=topts)
    return {"out": dm.head(x, t["e"])}


ADAPTER = register(
    Adapter(
        family="wan",
        display="Wan",
        block_groups=(BLOCKS,),
        hook_names={BLOCKS: "double_block"},
        config_keys={BLOCKS: "num_layers"},
        heads=("head",),
        server_drops=("patch_embedding", "text_embedding", "time_embedding", "time_projection", "img_emb", "ref_conv"),
        detect_keys=detect_keys,
        detect_model=detect_model,
        server_forward=server_forward,
        client_payload=client_payload,
        notes="Wan 2.1 / 2.2 14B: 40 blocks; 1.3B: 30; Wan 2.2 TI2V 5B: 30",
        call_info=call_info,
        # the input of time_projection is the time embedding the head modulates with
        captures={"e": Capture("time_projection", "in", 0)},
        request_names=r"x|e0|e|context|freqs",
        request_widths={"x": "dim", "e0": "dim", "e": "dim"},
    )
)
