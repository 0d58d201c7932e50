"""Qwen-Image (20B MMDiT, also Edit / Edit-2509 / Edit-2511 / Layered): ComfyUI's
``QwenImageTransformer2DModel``.

One block list, ``transformer_blocks`` (60 in the released models; counted from the
checkpoint), every block a joint image+text block (``patches_replace["dit"]["double_block"]``)
that takes and returns both streams. The server holds the last N blocks plus the output layer
(``norm_out``, ``proj_out``) and returns ``proj_out``'s output for the main image tokens only,
[B, L_img, 64]; the client's stubbed head pads it with zeros over the reference-image tokens
(``pad_head_tokens``), which the model drops right after its head.

Per call the client sends:
  coded  the seam state ``img`` (image tokens, reference images appended) and ``txt``
  exact  ``vec``: the time embedding [B, 3072] ([2B, 3072] with index_timestep_zero: the
         reference tokens' timestep-0 rows follow), which every block modulates itself with
  consts ``pe`` (RoPE, [B, 1, L, 64, 2, 2]) and, when the text has padding, ``mask`` (the
         additive text mask exactly as the model hands it to its blocks): once per generation
  scalars ``img_len`` (main image tokens) and ``tz`` (index_timestep_zero is on)

Edit models append the reference latents as extra image tokens (ComfyUI's ``ref_latents``); they
cross with ``img`` and are cut after the head. ControlNet residuals into remote blocks
(``control["input"]``) and per-block patches that would run inside remote blocks
(``double_block`` / ``attn1_patch``: DiffSynth ControlNets, hypertile...) are refused.

ComfyUI's detection reads only the input channels and block count of a Qwen-Image checkpoint;
``config_from_shapes`` reads the widths from the tensor shapes too, so the server also loads
checkpoints of other widths (the tests' tiny models); for released checkpoints they are
ComfyUI's defaults.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch

from ..errors import LocalError, RemoteProtocolError
from ..payload import SeamPayload
from . import Adapter, SeamCall, SplitPlan, register

BLOCKS = "transformer_blocks"
HEAD_DIM = 128  # ComfyUI's default attention_head_dim; its RoPE axes (16, 56, 56) fill it
# Patches that run inside or after every block: remote blocks would skip them.
BLOCK_PATCHES = ("double_block", "attn1_patch", "attn1_output_patch")


def detect_keys(keys: set[str]) -> bool:
    return (
        "txt_norm.weight" in keys
        and "img_in.weight" in keys
        and "time_text_embed.timestep_embedder.linear_1.weight" in keys
        and "transformer_blocks.0.img_mod.1.weight" in keys
    )


def detect_model(dm: Any) -> bool:
    if type(dm).__name__ != "QwenImageTransformer2DModel" or not hasattr(dm, BLOCKS):
        return False
    if not hasattr(dm, "proj_out"):
        raise LocalError(
            "this Qwen-Image model was built without its output layer (final_layer=False): it cannot be split; "
            "run it without Icarus"
        )
    return True


def config_from_shapes(shapes: dict[str, tuple[int, ...]]) -> dict[str, Any]:
    """unet_config widths ComfyUI's detection does not read, from the checkpoint's tensor shapes."""
    try:
        inner = shapes["img_in.weight"][0]
        head = shapes["transformer_blocks.0.attn.norm_q.weight"][0]
        text = shapes["txt_norm.weight"][0]
        out = shapes["proj_out.weight"][0]
    except (KeyError, IndexError):
        return {}
    if head != HEAD_DIM or inner % head:
        raise LocalError(
            f"Qwen-Image checkpoint with attention heads of {head} channels (width {inner}): ComfyUI builds "
            f"Qwen-Image with heads of {HEAD_DIM}; this checkpoint is not one it can load"
        )
    return {"num_attention_heads": inner // head, "joint_attention_dim": text, "out_channels": out // 4}


def call_info(args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, Any]:
    """From the model call's arguments (x, timestep, context, attention_mask, ...): the text mask
    as the model hands it to its blocks, and the latent's shape (the main image token count)."""
    x = args[0] if args else kwargs.get("x")
    mask = args[3] if len(args) > 3 else kwargs.get("attention_mask")
    if isinstance(mask, torch.Tensor) and isinstance(x, torch.Tensor) and not torch.is_floating_point(mask):
        mask = (mask - 1).to(x.dtype) * torch.finfo(x.dtype).max  # as the model's _forward does
    return {"mask": mask, "x_shape": tuple(x.shape) if isinstance(x, torch.Tensor) else None}


def main_tokens(x_shape: tuple[int, ...], patch: int) -> int:
    """Image tokens of the latent itself (process_img pads each side up to the patch size)."""
    t = x_shape[-3] if len(x_shape) == 5 else 1
    return t * (-(-x_shape[-2] // patch)) * (-(-x_shape[-1] // patch))


def client_payload(args: dict[str, Any], sc: SeamCall) -> SeamPayload:
    img, txt, vec, pe = args["img"], args["txt"], args["vec"], args["pe"]
    topts = args.get("transformer_options") or {}
    patches = topts.get("patches") or {}
    found = [k for k in BLOCK_PATCHES if patches.get(k)]
    if found:
        raise LocalError(
            f"Qwen-Image split: the model carries {', '.join(found)} patches (e.g. a DiffSynth / model-patch "
            "ControlNet or an attention patch), which would run inside the blocks on Daedalus: remove them, "
            "or run this workflow without Icarus"
        )
    x_shape = sc.values.get("x_shape")
    patch = sc.modules.get("patch_size")
    if x_shape is None or not isinstance(patch, int):
        raise LocalError("Qwen-Image split: the latent shape was not seen (unexpected model code path)")
    img_len = main_tokens(x_shape, patch)
    b = img.shape[0]
    if not 0 < img_len <= img.shape[1] or vec.shape[0] not in (b, 2 * b):
        raise LocalError(
            f"Qwen-Image split: {img.shape[1]} image tokens for a latent of {img_len} and {vec.shape[0]} time "
            f"embeddings for batch {b} (another node changed the model's inputs?): run without Icarus"
        )
    consts = {"pe": pe}
    mask = sc.values.get("mask")
    if isinstance(mask, torch.Tensor):
        consts["mask"] = mask
    scalars = {"img_len": int(img_len), "tz": bool(vec.shape[0] == 2 * b)}
    return SeamPayload({"img": img, "txt": txt}, {"vec": vec}, consts, scalars)


def _takes_timestep_zero(block: Any) -> bool:
    try:
        return "timestep_zero_index" in inspect.signature(type(block).forward).parameters
    except (TypeError, ValueError):
        return False


def server_forward(dm: Any, plan: SplitPlan, t: dict[str, torch.Tensor], s: dict[str, Any]) -> dict[str, torch.Tensor]:
    """Run the slim model's blocks, then norm_out and proj_out; mirrors the tail of _forward."""
    missing = [k for k in ("img", "txt", "vec", "pe") if k not in t]
    if missing:
        raise RemoteProtocolError(f"Qwen-Image request lacks tensors {missing}")
    img, txt, vec, pe, mask = t["img"], t["txt"], t["vec"], t["pe"], t.get("mask")
    img_len, tz = s.get("img_len"), s.get("tz")
    if not isinstance(img_len, int) or isinstance(img_len, bool) or not isinstance(tz, bool):
        raise RemoteProtocolError(f"Qwen-Image request: bad img_len {img_len!r} / tz {tz!r}")
    b = img.shape[0]
    if (
        img.ndim != 3
        or txt.ndim != 3
        or txt.shape[0] != b
        or img.shape[-1] != dm.inner_dim
        or txt.shape[-1] != dm.inner_dim
        or vec.shape != (2 * b if tz else b, dm.inner_dim)
        or not 0 < img_len <= img.shape[1]
    ):
        raise RemoteProtocolError(
            f"Qwen-Image request: img {list(img.shape)}, txt {list(txt.shape)}, vec {list(vec.shape)}, img_len "
            f"{img_len}, tz {tz} do not fit this model (width {dm.inner_dim})"
        )
    if pe.ndim < 3 or pe.shape[0] not in (1, b) or pe.shape[2] != img.shape[1] + txt.shape[1]:
        raise RemoteProtocolError(f"Qwen-Image request: RoPE {list(pe.shape)} for {img.shape[1] + txt.shape[1]} tokens")
    if mask is not None and (mask.ndim != 2 or mask.shape[0] not in (1, b) or mask.shape[1] != txt.shape[1]):
        raise RemoteProtocolError(f"Qwen-Image request: text mask {list(mask.shape)} for text {list(txt.shape)}")
    extra: dict[str, Any] = {}
    if tz:
        if len(dm.transformer_blocks) and not _takes_timestep_zero(dm.transformer_blocks[0]):
            raise RemoteProtocolError(
                "Qwen-Image request uses index_timestep_zero (Edit-2511), which this side's ComfyUI's blocks do "
                "not take: run the same ComfyUI release on both machines"
            )
        extra["timestep_zero_index"] = img_len
    topts: dict[str, Any] = {"total_blocks": plan.counts[BLOCKS], "block_type": "double"}
    first = plan.first_remote(BLOCKS)
    for i, block in enumerate(dm.transformer_blocks):
        topts["block_index"] = first + i
        txt, img = block(
            hidden_states=img,
            encoder_hidden_states=txt,
            encoder_hidden_states_mask=mask,
            temb=vec,
            image_rotary_emb=pe,
            transformer_options=topts,
            **extra,
        )
    if tz:
        vec = vec.chunk(2, dim=0)[0]
    out = dm.proj_out(dm.norm_out(img, vec))
    return {"out": out[:, :img_len]}


ADAPTER = register(
    Adapter(
        family="qwen_image",
        display="Qwen-Image",
        block_groups=(BLOCKS,),
        hook_names={BLOCKS: "double_block"},
        config_keys={BLOCKS: "num_layers"},
        heads=("norm_out", "proj_out"),
        server_drops=("img_in", "txt_in", "txt_norm", "time_text_embed"),
        detect_keys=detect_keys,
        detect_model=detect_model,
        server_forward=server_forward,
        client_payload=client_payload,
        notes="Qwen-Image / Edit / Edit-2509 / Edit-2511 (20B): 60 joint blocks",
        call_info=call_info,
        payload_modules={"patch_size": "patch_size"},  # an int attribute: the latent's patch size
        control_keys={BLOCKS: "input"},  # ControlNet residuals added after each block
        hook_returns=("img", "txt"),
        pad_head_tokens=True,  # reference-image tokens: the server returns the main image tokens only
        config_from_shapes=config_from_shapes,
        request_names=r"img|txt|vec|pe|mask",
        request_widths={"img": "inner_dim", "txt": "inner_dim", "vec": "inner_dim"},
    )
)
