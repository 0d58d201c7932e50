"""LTX-AV (LTX-2 / LTX-2.3, audio + video) payload of one split model call. No ComfyUI import.

ComfyUI calls the ``("double_block", i)`` hook of every LTX-AV block with the same argument
set (``_process_transformer_blocks`` in ``comfy/ldm/lightricks/av_model.py``). At the seam
``flatten`` turns that argument set into wire tensors plus JSON scalars; on the server
``rebuild`` turns them back into the block's keyword arguments. What crosses:

per step (``coded`` / ``exact``)
  ``vx`` [B, Tv, Dv] and ``ax`` [B, Ta, Da], the seam state, through the chosen codec (an
  empty ``ax``, i.e. a video-only latent in an AV model, goes raw: it is 0 bytes);
  the eight block timesteps. ``CompressedTimestep`` objects travel as they are: their
  compressed ``data`` (one row per frame, or one row per sample) plus four ints, rebuilt on
  the server without compressing again. Audio and prompt-AdaLN (2.3) timesteps are tensors.
  A large per-token table whose rows repeat (spatial denoise masks) goes as unique rows + an
  int32 index. Plus the two embedded timesteps only the output heads read: video compressed
  exactly like the block timestep, audio [B, n, Da].
per generation (``consts``: content-hashed by the transport, sent once per connection,
  resent automatically after a server restart or cache eviction)
  ``v_context``, ``a_context``, ``attention_mask``, ``self_attention_mask`` (a tensor or
  ComfyUI's guide mask), and the four RoPE tuples ``v_pe``, ``a_pe``, ``v_cross_pe``,
  ``a_cross_pe``, each as one [2, b, ...] tensor (cos, sin) with b = 1 when all batch rows
  are equal (CFG batches cond and uncond at the same positions; the server expands a view).
scalars
  the layout (kind, ints, RoPE split flag of every argument), the batch size, the four
  ``transformer_options`` flags a block reads (run_vx, run_ax, a2v_cross_attn, v2a_cross_attn),
  and the number of leading reference-audio tokens (ID-LoRA) the audio head drops.

Sizes per step and per generation are tabulated in docs/PROTOCOL.md (section 7b).

ComfyUI recomputes the RoPE tables every step: new tensors, same values. ``ConstMemo``
hands the transport the SAME packed tensor while the values are unchanged (checked on the
device), so an unchanged constant costs one comparison per step, not a copy and a hash.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from .errors import LocalError, RemoteProtocolError
from .payload import ConstMemo, SeamPayload, build, is_compressed_timestep, kind_of, need, pack, parts_of, plain, unpack

LAYOUT_VERSION = 1

CONST_KEYS = (
    "v_context",
    "a_context",
    "attention_mask",
    "self_attention_mask",
    "v_pe",
    "a_pe",
    "v_cross_pe",
    "a_cross_pe",
)
STEP_KEYS = (
    "v_timestep",
    "a_timestep",
    "v_cross_scale_shift_timestep",
    "a_cross_scale_shift_timestep",
    "v_cross_gate_timestep",
    "a_cross_gate_timestep",
    "v_prompt_timestep",
    "a_prompt_timestep",
)
BLOCK_KEYS = CONST_KEYS + STEP_KEYS  # BasicAVTransformerBlock.forward keywords besides x and transformer_options
HEAD_KEYS = ("v_emb", "a_emb")  # embedded timesteps of the output heads (not block arguments)
FLAG_KEYS = ("run_vx", "run_ax", "a2v_cross_attn", "v2a_cross_attn")
PE_KEYS = ("v_pe", "a_pe", "v_cross_pe", "a_cross_pe")

# Which kinds each argument may have on the wire.
_ALLOWED: dict[str, frozenset[str]] = {
    **{k: frozenset({"pe", "none"}) for k in PE_KEYS},
    "v_context": frozenset({"t", "none"}),
    "a_context": frozenset({"t", "none"}),
    "attention_mask": frozenset({"t", "none"}),
    "self_attention_mask": frozenset({"t", "guide", "none"}),
    **{k: frozenset({"t", "ct", "none"}) for k in STEP_KEYS},
    "v_emb": frozenset({"t", "ct"}),
    "a_emb": frozenset({"t"}),
}
# ---------------------------------------------------------------------------- client


def compress_like(emb: torch.Tensor, ts: Any) -> tuple[Any, ...]:
    """Parts of the video embedded timestep, compressed exactly as ComfyUI compresses it.

    ``emb`` is what ``adaln_single`` returned as its second output; ComfyUI wraps it in a
    ``CompressedTimestep`` with the same patches-per-frame as the block timestep ``ts``
    (one row per frame when it could compress, else one row per token or per sample)."""
    if not is_compressed_timestep(ts):
        if isinstance(ts, torch.Tensor):
            return (emb.reshape(ts.shape[0], -1, emb.shape[-1]),)
        raise LocalError("LTX-AV split: the video timestep is neither a tensor nor a CompressedTimestep")
    b, f, p = int(ts.batch_size), int(ts.num_frames), int(ts.patches_per_frame)
    d = emb.shape[-1]
    rows = emb.numel() // max(b * d, 1)
    e = emb.reshape(b, rows, d)
    if rows == f * p and p > 1:
        e = e.view(b, f, p, d)[:, :, 0, :]  # what CompressedTimestep.__init__ keeps: one row per frame
    elif rows != f:
        raise LocalError(
            f"LTX-AV split: embedded timestep has {rows} rows, the block timestep {f} frames x {p} patches "
            "(unexpected model code path)"
        )
    return (e, b, f, p, d)


def flatten(
    args: Mapping[str, Any],
    v_emb: torch.Tensor | None,
    a_emb: torch.Tensor | None,
    memo: ConstMemo | None = None,
    ref_audio: int = 0,
) -> SeamPayload:
    """One LTX-AV block-hook call -> (coded, exact, consts, scalars) for ``MeshClient.forward``.

    ``v_emb`` / ``a_emb``: the embedded timesteps ``adaln_single`` / ``audio_adaln_single``
    returned as their second output in this model call (the output heads need them).
    ``ref_audio``: leading reference-audio tokens (ID-LoRA) the model drops before its audio head."""
    img = args.get("img")
    if not (isinstance(img, (tuple, list)) and len(img) == 2 and all(isinstance(x, torch.Tensor) for x in img)):
        raise LocalError("LTX-AV split: the block hook's img is not (video, audio) hidden states")
    vx, ax = img
    if vx.ndim != 3 or ax.ndim != 3 or ax.shape[0] != vx.shape[0]:
        raise LocalError(f"LTX-AV split: hidden states video {list(vx.shape)} / audio {list(ax.shape)}")
    if v_emb is None or a_emb is None:
        raise LocalError(
            "LTX-AV split: the output heads' embedded timesteps were not captured (adaln_single / "
            "audio_adaln_single did not run in this call: unexpected model code path)"
        )
    batch = vx.shape[0]
    coded: dict[str, torch.Tensor] = {"vx": vx}
    exact: dict[str, torch.Tensor] = {}
    consts: dict[str, torch.Tensor] = {}
    if ax.numel():
        coded["ax"] = ax
    else:
        exact["ax"] = ax  # video-only latent: an empty audio stream, 0 bytes
    layout: dict[str, dict[str, Any]] = {}
    for key in CONST_KEYS:
        v = args.get(key)
        kind = kind_of(key, v)
        _allowed(key, kind, LocalError)
        parts = parts_of(kind, v)
        tensors, info = memo.pack(kind, key, parts) if memo is not None else plain(pack(kind, key, parts))
        consts.update(tensors)
        layout[key] = info
    for key in STEP_KEYS:
        v = args.get(key)
        kind = kind_of(key, v)
        _allowed(key, kind, LocalError)
        tensors, info = pack(kind, key, parts_of(kind, v), dedup=True)
        exact.update(tensors)
        layout[key] = info
    v_parts = compress_like(v_emb, args.get("v_timestep"))
    tensors, info = pack("ct" if len(v_parts) > 1 else "t", "v_emb", v_parts, dedup=True)
    exact.update(tensors)
    layout["v_emb"] = info
    tensors, info = pack("t", "a_emb", (a_emb.reshape(batch, -1, a_emb.shape[-1]),), dedup=True)
    exact.update(tensors)
    layout["a_emb"] = info
    topts = args.get("transformer_options") or {}
    flags = {k: bool(topts[k]) for k in FLAG_KEYS if k in topts}
    if not 0 <= ref_audio <= ax.shape[1]:
        raise LocalError(f"LTX-AV split: {ref_audio} reference-audio tokens but the audio stream has {ax.shape[1]}")
    scalars = {"ltx": LAYOUT_VERSION, "batch": int(batch), "layout": layout, "flags": flags, "ref_audio": ref_audio}
    return SeamPayload(coded, exact, consts, scalars)


def _allowed(key: str, kind: str, exc: type[Exception]) -> None:
    if kind not in _ALLOWED[key]:
        raise exc(f"LTX-AV split: argument {key} arrived as {kind!r}, expected one of {sorted(_ALLOWED[key])}")


# ---------------------------------------------------------------------------- server


@dataclass
class Call:
    """One rebuilt model call: seam state, block keyword arguments, head inputs, flags."""

    vx: torch.Tensor
    ax: torch.Tensor
    block_kwargs: dict[str, Any]
    v_emb: Any  # CompressedTimestep (or tensor): the video head's embedded timestep
    a_emb: torch.Tensor
    flags: dict[str, bool] = field(default_factory=dict)
    ref_audio: int = 0  # leading audio tokens to drop before the audio head


def rebuild(tensors: Mapping[str, torch.Tensor], scalars: Mapping[str, Any], classes: Mapping[str, type]) -> Call:
    """Server side of ``flatten``. ``classes``: ComfyUI's CompressedTimestep and GuideAttentionMask."""
    if scalars.get("ltx") != LAYOUT_VERSION:
        raise RemoteProtocolError(
            f"LTX-AV request has payload layout {scalars.get('ltx')!r}, this server reads {LAYOUT_VERSION}"
        )
    layout, flags, batch = scalars.get("layout"), scalars.get("flags", {}), scalars.get("batch")
    ref_audio = scalars.get("ref_audio", 0)
    if not isinstance(layout, dict) or not isinstance(flags, dict):
        raise RemoteProtocolError("LTX-AV request: layout and flags must be objects")
    if not isinstance(batch, int) or isinstance(batch, bool) or batch < 1:
        raise RemoteProtocolError(f"LTX-AV request: bad batch size {batch!r}")
    unknown = set(layout) - set(BLOCK_KEYS) - set(HEAD_KEYS)
    if unknown or set(flags) - set(FLAG_KEYS) or not all(isinstance(v, bool) for v in flags.values()):
        raise RemoteProtocolError(f"LTX-AV request: unknown arguments {sorted(unknown)} or bad flags {flags!r}")
    vx, ax = need(tensors, "vx"), need(tensors, "ax")
    if vx.ndim != 3 or ax.ndim != 3 or vx.shape[0] != batch or ax.shape[0] != batch:
        raise RemoteProtocolError(
            f"LTX-AV request: hidden states video {list(vx.shape)} / audio {list(ax.shape)} for batch {batch}"
        )
    if not isinstance(ref_audio, int) or isinstance(ref_audio, bool) or not 0 <= ref_audio <= ax.shape[1]:
        raise RemoteProtocolError(f"LTX-AV request: {ref_audio!r} reference-audio tokens for audio {list(ax.shape)}")
    values: dict[str, Any] = {}
    for key in (*BLOCK_KEYS, *HEAD_KEYS):
        info = layout.get(key)
        if not isinstance(info, dict) or not isinstance(info.get("k"), str):
            raise RemoteProtocolError(f"LTX-AV request: no layout for argument {key}")
        kind = info["k"]
        _allowed(key, kind, RemoteProtocolError)
        values[key] = build(kind, unpack(kind, key, tensors, info), classes)
    block_kwargs = {k: values[k] for k in BLOCK_KEYS}
    return Call(vx, ax, block_kwargs, values["v_emb"], values["a_emb"], dict(flags), ref_audio)
