"""Family-free payload machinery: block arguments as wire tensors + JSON info, and back.

A split model call hands the seam block's keyword arguments to the server. Each argument has
a *kind*, the form it takes on the wire:

  ``none``   absent (None)
  ``t``      a tensor; a tall per-token table whose rows repeat may go as unique rows + an
             int32 row index (``pack(..., dedup=True)``)
  ``ct``     ComfyUI's ``CompressedTimestep`` (its compressed ``data`` plus four ints)
  ``pe``     a RoPE tuple ``(cos, sin[, split])``, as one [2, b, ...] tensor
  ``guide``  ComfyUI's ``GuideAttentionMask`` (two tensors plus two ints)

``kind_of`` / ``parts_of`` / ``pack`` run on the client, ``unpack`` / ``build`` on the server
(``unpack`` checks shapes and raises ``RemoteProtocolError`` on garbage; ``build`` is handed
the ComfyUI classes, this module imports no ComfyUI). ``ConstMemo`` keeps per-generation
constants the same objects while their values are unchanged (see its docstring). The
per-family key tables live with the family (``payload_ltx`` for LTX-AV).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NamedTuple

import torch

from .errors import LocalError, RemoteProtocolError

CT_INTS = ("batch_size", "num_frames", "patches_per_frame", "feature_dim")


class SeamPayload(NamedTuple):
    """One model call at the seam, as ``MeshClient.forward`` takes it."""

    coded: dict[str, torch.Tensor]  # the seam state: through the chosen codec
    exact: dict[str, torch.Tensor]  # per-call tensors sent raw (timesteps, modulation)
    consts: dict[str, torch.Tensor]  # per-generation tensors: content-hashed, sent once per connection
    scalars: dict[str, Any]  # JSON


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
        f"split: block argument {key!r} is a {type(v).__name__}, which cannot cross the split "
        "(another node pack changed the block arguments?): run this workflow without Icarus"
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
            raise LocalError(f"split: RoPE {key} has cos {list(cos.shape)} and sin {list(sin.shape)}")
        b = cos.shape[0]
        info.update(split=bool(split), b=b)
        if b > 1 and all(torch.equal(cos[0], cos[i]) and torch.equal(sin[0], sin[i]) for i in range(1, b)):
            cos, sin = cos[:1], sin[:1]  # the same positions for every sample (CFG cond + uncond)
        return {key: torch.stack((cos, sin))}, info
    if kind == "guide":
        noisy, tracked, start, count = parts
        info["i"] = [start, count]
        return {key: noisy, key + ".1": tracked}, info
    raise LocalError(f"split: unknown payload kind {kind!r}")


def int_list(v: Any, n: int, what: str) -> list[int]:
    if not (isinstance(v, list) and len(v) == n and all(isinstance(x, int) and not isinstance(x, bool) for x in v)):
        raise RemoteProtocolError(f"request: {what} must be {n} integers, got {v!r}")
    if any(x < 0 for x in v):
        raise RemoteProtocolError(f"request: {what} has a negative value: {v!r}")
    return v


def need(tensors: Mapping[str, torch.Tensor], name: str) -> torch.Tensor:
    t = tensors.get(name)
    if t is None:
        raise RemoteProtocolError(f"request lacks tensor {name!r}")
    return t


def unpack(kind: str, key: str, tensors: Mapping[str, torch.Tensor], info: Mapping[str, Any]) -> tuple[Any, ...]:
    """(wire tensors, info) -> parts, checking shapes. Raises RemoteProtocolError on garbage."""
    if kind == "none":
        return ()
    if kind in ("t", "ct"):
        t = need(tensors, key)
        if "rows" in info:
            rows = info["rows"]
            shape = int_list(rows, len(rows) if isinstance(rows, list) else 0, f"{key} row-table shape")
            idx = need(tensors, key + ".idx")
            if (
                not shape
                or t.ndim != 2
                or t.shape[1] != shape[-1]
                or idx.dtype != torch.int32
                or idx.ndim != 1
                or idx.numel() * shape[-1] != _numel(shape)
            ):
                raise RemoteProtocolError(f"request: row table {key} does not match shape {shape}")
            if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= t.shape[0]):
                raise RemoteProtocolError(f"request: row index of {key} out of range")
            t = t[idx.long()].reshape(shape)
        if kind == "t":
            return (t,)
        b, f, p, d = int_list(info.get("i"), 4, f"{key} compressed-timestep fields")
        if list(t.shape) != [b, f, d] or p < 1:
            raise RemoteProtocolError(
                f"request: compressed timestep {key} has data {list(t.shape)}, fields say "
                f"batch {b} frames {f} features {d} (patches per frame {p})"
            )
        return (t, b, f, p, d)
    if kind == "pe":
        t = need(tensors, key)
        nb = info.get("b")
        split = info.get("split")
        if not isinstance(nb, int) or isinstance(nb, bool) or nb < 1 or not isinstance(split, bool):
            raise RemoteProtocolError(f"request: RoPE {key} has bad batch {nb!r} / split flag {split!r}")
        if t.ndim < 3 or t.shape[0] != 2 or t.shape[1] not in (1, nb):
            raise RemoteProtocolError(f"request: RoPE {key} has shape {list(t.shape)} for batch {nb}")
        cos, sin = t[0], t[1]
        if cos.shape[0] != nb:
            cos, sin = cos.expand(nb, *cos.shape[1:]), sin.expand(nb, *sin.shape[1:])
        return (cos, sin, split)
    if kind == "guide":
        start, count = int_list(info.get("i"), 2, f"{key} guide fields")
        return (need(tensors, key), need(tensors, key + ".1"), start, count)
    raise RemoteProtocolError(f"request: argument {key} has unknown kind {kind!r}")


def _numel(shape: list[int]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def same_bits(x: torch.Tensor, y: torch.Tensor) -> bool:
    """Bit-for-bit equality (shape, dtype, device, bits): unlike ``torch.equal`` it tells 0.0 from -0.0
    and matches a NaN with the same NaN, so a remembered tensor is exactly the fresh one."""
    if x.shape != y.shape or x.dtype != y.dtype or x.device != y.device:
        return False
    if x is y:
        return True
    if x.dtype != torch.bool and x.element_size() == 1:
        return torch.equal(x.contiguous().view(torch.uint8), y.contiguous().view(torch.uint8))
    return torch.equal(_bits(x), _bits(y))


def same_parts(a: tuple[Any, ...], b: tuple[Any, ...]) -> bool:
    """Bitwise equality of two parts tuples (tensors: shape, dtype, device and bits)."""
    if len(a) != len(b):
        return False
    for x, y in zip(a, b, strict=True):
        if isinstance(x, torch.Tensor) or isinstance(y, torch.Tensor):
            if not (isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor) and same_bits(x, y)):
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
    """Per-generation constants kept the SAME objects while their values are unchanged.

    Models recompute their constants every call (FLUX's RoPE ``pe``, LTX's contexts and RoPE
    tuples): new tensors, same values. The transport sends a constant once per connection by
    content hash and remembers the hash by tensor identity and version counter, so a new
    tensor each call would cost a device-to-host copy and a hash every step. This memo
    compares the fresh value with the one or two remembered (``keep``: cond and uncond may be
    separate model calls, alternating) and hands back the remembered object on a match.

    Why a compare and not identity + version: the fresh tensor is a new object every call, so
    identity alone never hits; and only the values decide what the server computes. The compare
    is bit for bit (``same_bits``) on the tensor's own device: one pass over memory the model
    just wrote, no copy, no hash, and equality is exact, never assumed. A remembered object that
    is the fresh one (``is``) needs no compare at all.

    ``pack`` memoises an argument before packing (LTX: no ``torch.stack`` of cos/sin when
    unchanged); ``tensor`` memoises a finished wire tensor (every family, in ``icarus``).
    """

    def __init__(self, keep: int = 2):
        self.keep = keep
        self._d: dict[str, list[tuple[dict[str, torch.Tensor], dict[str, Any]]]] = {}
        self._t: dict[str, list[torch.Tensor]] = {}
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

    def tensor(self, name: str, t: torch.Tensor) -> torch.Tensor:
        """``t``, or the remembered tensor of ``name`` with the same bits."""
        entries = self._t.setdefault(name, [])
        for i, old in enumerate(entries):
            if same_bits(t, old):
                entries.insert(0, entries.pop(i))
                self.hits += 1
                return old
        self.misses += 1
        entries.insert(0, t)  # kept as it is: the transport matches inference tensors by identity and storage
        del entries[self.keep :]
        return t

    def tensors(self, consts: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {name: self.tensor(name, t) for name, t in consts.items()}

    def clear(self) -> None:
        self._d.clear()
        self._t.clear()


def _class(classes: Mapping[str, type], name: str) -> type:
    cls = classes.get(name)
    if cls is None:  # an older ComfyUI on this side: the client's model makes objects this one never does
        raise RemoteProtocolError(
            f"request carries a {name}, which this side's ComfyUI does not have: run the same ComfyUI release "
            "on both machines"
        )
    return cls


def build(kind: str, parts: tuple[Any, ...], classes: Mapping[str, type]) -> Any:
    """parts -> the object the block expects (tensor, CompressedTimestep, RoPE tuple, guide mask).
    ``classes``: the ComfyUI classes this side has (older releases lack some; see ``_class``)."""
    if kind == "none":
        return None
    if kind == "t":
        return parts[0]
    if kind == "pe":
        return tuple(parts)
    if kind == "ct":
        obj: Any = object.__new__(_class(classes, "CompressedTimestep"))  # no __init__: the data is compressed already
        for name, value in zip(("data", *CT_INTS), parts, strict=True):
            setattr(obj, name, value)
        return obj
    if kind == "guide":
        guide: Any = object.__new__(_class(classes, "GuideAttentionMask"))
        guide.noisy_mask, guide.tracked_mask, guide.guide_start, guide.tracked_count = parts
        return guide
    raise RemoteProtocolError(f"request: unknown kind {kind!r}")
