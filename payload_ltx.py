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
CT_INTS = ("batch_size", "num_frames", "patches_per_frame", "feature_dim")
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
DEDUP_MIN_ROWS = 64  # per-token tables at least this tall are checked for repeated rows
_BITS = {2: torch.int16, 4: torch.int32, 8: torch.int64}


# ---------------------------------------------------------------------------- duck typing


def is_compressed_timestep(v: Any) -> bool:
    """ComfyUI's ``CompressedTimestep`` (``__slots__`` data, batch_size, num_frames, patches_per_frame, feature_dim)."""
    return type(v).__name__ == "CompressedTimestep" and all(hasattr(v, a) for a in ("data", *CT_INTS))


def is_guide_mask(v: Any) -> bool:
    """ComfyUI's ``GuideAttentionMask`` (per-guide attention attenuation of LTXV guides)."""
    return type(v).__name__ == "GuideAttentionMask" and all(
        hasattr(v, a) for a in ("guide_start", "tracked_count", "noisy_mask", "tracked_mask")
    )


def kind_of(key: str, v: Any) -> str:
    if v is None:
        return "none"
    if isinstance(v, torch.Tensor):
        return "t"
    if is_compressed_timestep(v):
        return "ct"
    if is_guide_mask(v):
        return "guide"
    if isinstance(v, (tuple, list)) and len(v) in (2, 3) and all(isinstance(x, torch.Tensor) for x in v[:2]):
        return "pe"
    raise LocalError(
        f"LTX-AV split: block argument {key!r} is a {type(v).__name__}, which cannot cross the split "
        "(another node pack changed the LTX block arguments?): run this workflow without Icarus LTX"
    )


# ---------------------------------------------------------------------------- parts


def parts_of(kind: str, v: Any) -> tuple[Any, ...]:
    """The value as a flat tuple of tensors and plain numbers/bools (client side)."""
    if kind == "t":
        return (v,)
    if kind == "ct":
        return (v.data, *(int(getattr(v, a)) for a in CT_INTS))
    if kind == "pe":
        return (v[0], v[1], bool(v[2]) if len(v) > 2 else False)
    if kind == "guide":
        return (v.noisy_mask, v.tracked_mask, int(v.guide_start), int(v.tracked_count))
    return ()


def _bits(t: torch.Tensor) -> torch.Tensor:
    dt = _BITS.get(t.element_size())
    if dt is None or t.dtype == torch.bool:
        return t
    return t.contiguous().view(dt)


def dedup_rows(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(unique rows [U, F], int32 index [N]) of ``t`` viewed as [N, F] rows, compared bit for bit;
    None when that would not save at least half the bytes."""
    if t.ndim < 2 or t.numel() == 0:
        return None
    rows = t.reshape(-1, t.shape[-1])
    if rows.shape[0] < DEDUP_MIN_ROWS:
        return None
    bits = _bits(rows)
    uniq, inv = torch.unique(bits, dim=0, return_inverse=True)
    if uniq.shape[0] * 2 > rows.shape[0]:
        return None
    if bits is not rows:
        uniq = uniq.view(t.dtype)
    return uniq.contiguous(), inv.to(torch.int32).contiguous()


def pack(
    kind: str, key: str, parts: tuple[Any, ...], dedup: bool = False
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """parts -> (wire tensors by name, JSON info). Inverse of ``unpack``."""
    info: dict[str, Any] = {"k": kind}
    if kind == "none":
        return {}, info
    if kind in ("t", "ct"):
        t = parts[0]
        if kind == "ct":
            info["i"] = list(parts[1:])
        d = dedup_rows(t) if dedup else None
        if d is not None:
            info["rows"] = list(t.shape)
            return {key: d[0], key + ".idx": d[1]}, info
        return {key: t}, info
    if kind == "pe":
        cos, sin, split = parts
        if cos.shape != sin.shape or cos.ndim < 2:
            raise LocalError(f"LTX-AV split: RoPE {key} has cos {list(cos.shape)} and sin {list(sin.shape)}")
        b = cos.shape[0]
        info.update(split=bool(split), b=b)
        if b > 1 and all(torch.equal(cos[0], cos[i]) and torch.equal(sin[0], sin[i]) for i in range(1, b)):
            cos, sin = cos[:1], sin[:1]  # the same positions for every sample (CFG cond + uncond)
        return {key: torch.stack((cos, sin))}, info
    if kind == "guide":
        noisy, tracked, start, count = parts
        info["i"] = [start, count]
        return {key: noisy, key + ".1": tracked}, info
    raise LocalError(f"LTX-AV split: unknown payload kind {kind!r}")


def _int_list(v: Any, n: int, what: str) -> list[int]:
    if not (isinstance(v, list) and len(v) == n and all(isinstance(x, int) and not isinstance(x, bool) for x in v)):
        raise RemoteProtocolError(f"LTX-AV request: {what} must be {n} integers, got {v!r}")
    if any(x < 0 for x in v):
        raise RemoteProtocolError(f"LTX-AV request: {what} has a negative value: {v!r}")
    return v


def _need(tensors: Mapping[str, torch.Tensor], name: str) -> torch.Tensor:
    t = tensors.get(name)
    if t is None:
        raise RemoteProtocolError(f"LTX-AV request lacks tensor {name!r}")
    return t


def unpack(kind: str, key: str, tensors: Mapping[str, torch.Tensor], info: Mapping[str, Any]) -> tuple[Any, ...]:
    """(wire tensors, info) -> parts, checking shapes. Raises RemoteProtocolError on garbage."""
    if kind == "none":
        return ()
    if kind in ("t", "ct"):
        t = _need(tensors, key)
        if "rows" in info:
            rows = info["rows"]
            shape = _int_list(rows, len(rows) if isinstance(rows, list) else 0, f"{key} row-table shape")
            idx = _need(tensors, key + ".idx")
            if (
                not shape
                or t.ndim != 2
                or t.shape[1] != shape[-1]
                or idx.dtype != torch.int32
                or idx.ndim != 1
                or idx.numel() * shape[-1] != _numel(shape)
            ):
                raise RemoteProtocolError(f"LTX-AV request: row table {key} does not match shape {shape}")
            if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= t.shape[0]):
                raise RemoteProtocolError(f"LTX-AV request: row index of {key} out of range")
            t = t[idx.long()].reshape(shape)
        if kind == "t":
            return (t,)
        b, f, p, d = _int_list(info.get("i"), 4, f"{key} compressed-timestep fields")
        if list(t.shape) != [b, f, d] or p < 1:
            raise RemoteProtocolError(
                f"LTX-AV request: compressed timestep {key} has data {list(t.shape)}, fields say "
                f"batch {b} frames {f} features {d} (patches per frame {p})"
            )
        return (t, b, f, p, d)
    if kind == "pe":
        t = _need(tensors, key)
        nb = info.get("b")
        split = info.get("split")
        if not isinstance(nb, int) or isinstance(nb, bool) or nb < 1 or not isinstance(split, bool):
            raise RemoteProtocolError(f"LTX-AV request: RoPE {key} has bad batch {nb!r} / split flag {split!r}")
        if t.ndim < 3 or t.shape[0] != 2 or t.shape[1] not in (1, nb):
            raise RemoteProtocolError(f"LTX-AV request: RoPE {key} has shape {list(t.shape)} for batch {nb}")
        cos, sin = t[0], t[1]
        if cos.shape[0] != nb:
            cos, sin = cos.expand(nb, *cos.shape[1:]), sin.expand(nb, *sin.shape[1:])
        return (cos, sin, split)
    if kind == "guide":
        start, count = _int_list(info.get("i"), 2, f"{key} guide fields")
        return (_need(tensors, key), _need(tensors, key + ".1"), start, count)
    raise RemoteProtocolError(f"LTX-AV request: argument {key} has unknown kind {kind!r}")


def _numel(shape: list[int]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def same_parts(a: tuple[Any, ...], b: tuple[Any, ...]) -> bool:
    """Bitwise equality of two parts tuples (tensors: shape, dtype, device and values)."""
    if len(a) != len(b):
        return False
    for x, y in zip(a, b, strict=True):
        if isinstance(x, torch.Tensor) or isinstance(y, torch.Tensor):
            if not (
                isinstance(x, torch.Tensor)
                and isinstance(y, torch.Tensor)
                and x.shape == y.shape
                and x.dtype == y.dtype
                and x.device == y.device
            ):
                return False
            if x is not y and not torch.equal(x, y):
                return False
        elif x != y:
            return False
    return True


def plain(packed: tuple[dict[str, torch.Tensor], dict[str, Any]]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The packed tensors as ordinary tensors. ComfyUI runs nodes under ``torch.inference_mode``,
    and inference tensors have no version counter, which the transport's constant memo reads."""
    tensors, info = packed
    if not any(t.is_inference() for t in tensors.values()):
        return packed
    with torch.inference_mode(False):
        return {k: t.clone() if t.is_inference() else t for k, t in tensors.items()}, info


class ConstMemo:
    """Per-run memory of packed per-generation constants (see the module docstring)."""

    def __init__(self, keep: int = 2):
        self.keep = keep  # 2: cond and uncond may be separate model calls, alternating
        self._d: dict[str, list[tuple[dict[str, torch.Tensor], dict[str, Any]]]] = {}
        self.hits = 0
        self.misses = 0

    def pack(self, kind: str, key: str, parts: tuple[Any, ...]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        entries = self._d.setdefault(key, [])
        for i, (tensors, info) in enumerate(entries):
            if info["k"] == kind and same_parts(parts, unpack(kind, key, tensors, info)):
                entries.insert(0, entries.pop(i))
                self.hits += 1
                return tensors, info
        self.misses += 1
        packed = plain(pack(kind, key, parts))
        entries.insert(0, packed)
        del entries[self.keep :]
        return packed

    def clear(self) -> None:
        self._d.clear()


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
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], dict[str, torch.Tensor], dict[str, Any]]:
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
    return coded, exact, consts, scalars


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


def build(kind: str, parts: tuple[Any, ...], classes: Mapping[str, type]) -> Any:
    """parts -> the object the block expects (tensor, CompressedTimestep, RoPE tuple, guide mask)."""
    if kind == "none":
        return None
    if kind == "t":
        return parts[0]
    if kind == "pe":
        return tuple(parts)
    if kind == "ct":
        obj: Any = object.__new__(classes["CompressedTimestep"])  # no __init__: the data is compressed already
        for name, value in zip(("data", *CT_INTS), parts, strict=True):
            setattr(obj, name, value)
        return obj
    if kind == "guide":
        guide: Any = object.__new__(classes["GuideAttentionMask"])
        guide.noisy_mask, guide.tracked_mask, guide.guide_start, guide.tracked_count = parts
        return guide
    raise RemoteProtocolError(f"LTX-AV request: unknown kind {kind!r}")


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
    vx, ax = _need(tensors, "vx"), _need(tensors, "ax")
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
