"""LTX-AV (LTX-2 19B, LTX-2.3 22B): ComfyUI's ``LTXAVModel``, audio and video in every block.

One block list, ``transformer_blocks`` (48 in the released models; counted from the
checkpoint), every block taking and returning both streams (vx, ax). The server holds the
last N blocks plus the output heads of both streams (``norm_out`` / ``scale_shift_table`` /
``proj_out`` and their ``audio_`` twins) and returns the heads' outputs, still patchified:
``vx`` [B, Tv, 128] and ``ax`` [B, Ta, 128], never the hidden states. The client's
``proj_out`` / ``audio_proj_out`` are stubs that return them, so ComfyUI's own unpatchify,
keyframe scatter and audio/video recombination run locally as usual. What crosses per step
and per generation is in ``payload_ltx``.

The server never loads the patchify projections, the text connectors (0.7-2 B parameters)
or the timestep embedders: the client computes their outputs and sends those.

Video-only LTXV (``LTXVModel``, a different block) is refused with a clear message.
"""

from __future__ import annotations

import inspect
import sys
from typing import Any

import torch

from .. import payload_ltx
from ..errors import LocalError, RemoteProtocolError
from ..payload import SeamPayload, is_compressed_timestep
from . import Adapter, Capture, SeamCall, SplitPlan, register

BLOCKS = "transformer_blocks"

VIDEO_ONLY = (
    "this is a video-only LTXV (LTX-Video) model; ComfyUI-Mesh splits LTX-AV only (LTX-2 / LTX-2.3 "
    "audio+video checkpoints): load an LTX-2.x AV checkpoint, or run this model without Icarus"
)


def detect_keys(keys: set[str]) -> bool:
    if "adaln_single.emb.timestep_embedder.linear_1.bias" not in keys or "pos_embed.proj.bias" in keys:
        return False  # not Lightricks (pos_embed: PixArt, which shares the timestep embedder)
    if not any(k.startswith(BLOCKS + ".") for k in keys):
        return False
    if "audio_adaln_single.linear.weight" in keys:
        return True
    raise LocalError(VIDEO_ONLY)


def detect_model(dm: Any) -> bool:
    name = type(dm).__name__
    if name == "LTXVModel":
        raise LocalError(VIDEO_ONLY)
    return name == "LTXAVModel" and hasattr(dm, BLOCKS) and hasattr(dm, "audio_proj_out")


def client_payload(args: dict[str, Any], sc: SeamCall) -> SeamPayload:
    """One block-hook call at the seam -> (coded, exact, consts, scalars); see payload_ltx."""
    v = sc.values
    return payload_ltx.flatten(args, v.get("v_emb"), v.get("a_emb"), sc.memo, v.get("ref_audio_len", 0))


def call_info(args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, Any]:
    """From the model call's arguments: how many leading reference-audio tokens (ID-LoRA) the
    model prepends to the audio stream and drops again before its audio head."""
    ref = kwargs.get("ref_audio")
    tokens = ref.get("tokens") if isinstance(ref, dict) else None
    return {"ref_audio_len": int(tokens.shape[1]) if isinstance(tokens, torch.Tensor) else 0}


_CLASS_NAMES = ("CompressedTimestep", "GuideAttentionMask")


def comfy_classes(dm: Any) -> dict[str, type]:
    """ComfyUI's CompressedTimestep / GuideAttentionMask, found through the model's own modules
    (this package never imports ComfyUI; the server's model was built by it). Releases before
    they existed (LTX-2 in ComfyUI 0.8) have neither and never produce them: a request that
    carries one is refused when it is rebuilt (``payload.build``)."""
    found: dict[str, type] = {}
    for cls in type(dm).__mro__:
        mod = sys.modules.get(cls.__module__)
        for name in _CLASS_NAMES:
            obj = getattr(mod, name, None)
            if name not in found and isinstance(obj, type):
                found[name] = obj
    return found


def video_head(dm: Any, x: torch.Tensor, emb: Any) -> torch.Tensor:
    """The video output head of ``LTXVModel._process_output`` up to ``proj_out`` (no unpatchify)."""
    if is_compressed_timestep(emb):
        emb = emb.expand()
    if emb.ndim != 3 or emb.shape[0] != x.shape[0] or emb.shape[1] not in (1, x.shape[1]):
        raise RemoteProtocolError(f"LTX-AV request: video head timestep {list(emb.shape)} for tokens {list(x.shape)}")
    table = dm.scale_shift_table[None, None].to(device=x.device, dtype=x.dtype) + emb[:, :, None]
    shift, scale = table[:, :, 0], table[:, :, 1]
    return dm.proj_out(dm.norm_out(x) * (1 + scale) + shift)


def audio_head(dm: Any, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
    """The audio output head of ``LTXAVModel._process_output`` up to ``audio_proj_out``."""
    if emb.ndim != 3 or emb.shape[0] != x.shape[0] or emb.shape[1] not in (1, x.shape[1]):
        raise RemoteProtocolError(f"LTX-AV request: audio head timestep {list(emb.shape)} for tokens {list(x.shape)}")
    table = dm.audio_scale_shift_table[None, None].to(device=emb.device, dtype=emb.dtype) + emb[:, :, None]
    shift, scale = table[:, :, 0], table[:, :, 1]
    return dm.audio_proj_out(dm.audio_norm_out(x) * (1 + scale) + shift)


def block_kwargs_for(block: Any, kwargs: dict[str, Any]) -> dict[str, Any]:
    """``kwargs`` for this ComfyUI's block: arguments its ``forward`` lacks (added by later releases,
    e.g. ``self_attention_mask``) are left out when they are None, and refused when they carry a value."""
    try:
        params = inspect.signature(type(block).forward).parameters
    except (TypeError, ValueError):
        return kwargs
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return kwargs
    extra = [k for k in kwargs if k not in params]
    carried = [k for k in extra if kwargs[k] is not None]
    if carried:
        raise RemoteProtocolError(
            f"LTX-AV request carries {', '.join(carried)}, which this side's ComfyUI's blocks do not take: run the "
            "same ComfyUI release on both machines"
        )
    return {k: v for k, v in kwargs.items() if k in params}


def server_forward(dm: Any, plan: SplitPlan, t: dict[str, torch.Tensor], s: dict[str, Any]) -> dict[str, torch.Tensor]:
    """Run the slim model's blocks, then both output heads."""
    call = payload_ltx.rebuild(t, s, comfy_classes(dm))
    vx, ax = call.vx, call.ax
    if vx.shape[-1] != dm.inner_dim or ax.shape[-1] != dm.audio_inner_dim:
        raise RemoteProtocolError(
            f"LTX-AV request: hidden widths video {vx.shape[-1]} / audio {ax.shape[-1]}, this model has "
            f"{dm.inner_dim} / {dm.audio_inner_dim}"
        )
    topts: dict[str, Any] = dict(call.flags)  # what a block reads from transformer_options
    kwargs = block_kwargs_for(dm.transformer_blocks[0], call.block_kwargs) if len(dm.transformer_blocks) else {}
    for block in dm.transformer_blocks:
        vx, ax = block((vx, ax), transformer_options=topts, **kwargs)
    a_emb = call.a_emb
    if call.ref_audio:  # reference-audio tokens are dropped before the audio head, as the model does
        ax = ax[:, call.ref_audio :]
        if a_emb.shape[1] > 1:
            a_emb = a_emb[:, call.ref_audio :]
    return {"vx": video_head(dm, vx, call.v_emb), "ax": audio_head(dm, ax, a_emb)}


ADAPTER = register(
    Adapter(
        family="ltxav",
        display="LTX-AV",
        block_groups=(BLOCKS,),
        hook_names={BLOCKS: "double_block"},
        config_keys={BLOCKS: "num_layers"},
        heads=(
            "norm_out",
            "scale_shift_table",
            "proj_out",
            "audio_norm_out",
            "audio_scale_shift_table",
            "audio_proj_out",
        ),
        server_drops=(
            "patchify_proj",
            "audio_patchify_proj",
            "adaln_single",
            "audio_adaln_single",
            "prompt_adaln_single",
            "audio_prompt_adaln_single",
            "av_ca_video_scale_shift_adaln_single",
            "av_ca_a2v_gate_adaln_single",
            "av_ca_audio_scale_shift_adaln_single",
            "av_ca_v2a_gate_adaln_single",
            "caption_projection",
            "audio_caption_projection",
            "video_embeddings_connector",
            "audio_embeddings_connector",
        ),
        detect_keys=detect_keys,
        detect_model=detect_model,
        server_forward=server_forward,
        client_payload=client_payload,
        notes="LTX-2 (19B) and LTX-2.3 (22B): 48 audio+video blocks",
        call_info=call_info,
        # the heads' embedded timesteps: second output of the two timestep AdaLNs
        captures={"v_emb": Capture("adaln_single", "out", 1), "a_emb": Capture("audio_adaln_single", "out", 1)},
        head_outputs={"proj_out": "vx", "audio_proj_out": "ax"},
        # the two streams, and every block / head argument of payload_ltx (packed: ".idx" row tables,
        # ".1" a guide's second tensor)
        request_names=r"vx|ax|(" + "|".join(payload_ltx.BLOCK_KEYS + payload_ltx.HEAD_KEYS) + r")(\.idx|\.1)?",
        request_widths={"vx": "inner_dim", "ax": "audio_inner_dim"},
        # ComfyUI's CONDConstant inputs of model_base.LTXAV: the same for every row
        row_constants=("frame_rate", "latent_shapes", "guide_attention_entries", "ref_audio"),
    )
)
