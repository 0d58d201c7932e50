"""Streamed calls (docs/PROTOCOL.md §6.1): big tensors cut into token slabs that travel in chunk frames.

The sender cuts each big tensor along its token dimension (``plan``), codes every slab as a tensor
of its own (name ``<tensor>#<k>``; a temporal codec keeps one reference per slab) and sends it in a
FORWARD_CHUNK / RESULT_CHUNK frame while it codes the next; the receiver decodes each chunk as it
arrives into its place in the whole tensor (``Assembler``, allocated from the shape and dtype that
the ``slabs`` field announces): for raw and lossless the very tensor the unstreamed path would have
decoded, bit for bit. Codec-free and socket-free: transport.py and server/core.py drive it.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from .constants import (
    MAX_NAME_LEN,
    MAX_STREAM_PARTS,
    MAX_TENSOR_NDIM,
    MAX_TENSORS_PER_FRAME,
    STREAM_SIDE_MS_PER_MB,
    STREAM_SLAB_MS,
)
from .protocol import DTYPES, WireTensor
from .wirecodecs.base import dtype_name, itemsize, numel, torch_dtype

SEP = "#"


def slab_dim(shape: Sequence[int]) -> int | None:
    """The dimension a tensor is cut along: the longest one but the last (the channels), the first of
    equally long ones (for a [B, T, C] seam, T); None when the tensor cannot be cut."""
    if len(shape) < 2:
        return None
    d = max(range(len(shape) - 1), key=lambda i: (shape[i], -i))
    return d if shape[d] > 1 else None


@dataclass(frozen=True)
class Cut:
    """One tensor cut into ``parts`` slabs along ``dim`` (``torch.tensor_split``: near-equal sizes)."""

    name: str
    dim: int
    parts: int
    shape: tuple[int, ...]
    dtype: torch.dtype

    def names(self) -> list[str]:
        return [f"{self.name}{SEP}{k}" for k in range(self.parts)]

    def spec(self) -> dict[str, Any]:
        """This cut as ``Forward.slabs`` / ``Result.slabs`` carry it."""
        return {"dim": self.dim, "parts": self.names(), "shape": list(self.shape), "dtype": dtype_name(self.dtype)}

    def slabs(self, t: torch.Tensor) -> Iterator[tuple[str, torch.Tensor]]:
        for name, s in zip(self.names(), torch.tensor_split(t, self.parts, self.dim), strict=True):
            yield name, s.contiguous()


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def plan(tensors: Mapping[str, torch.Tensor], slab_bytes: int, max_parts: int = MAX_STREAM_PARTS) -> dict[str, Cut]:
    """How to cut ``tensors`` into slabs of about ``slab_bytes`` raw bytes: only the tensors larger than
    one slab, at most ``max_parts`` slabs in all (slabs grow until they fit). {} = nothing to cut."""
    if slab_bytes <= 0 or max_parts < 2:
        return {}
    big = {n: t for n, t in tensors.items() if _nbytes(t) > slab_bytes and slab_dim(t.shape) is not None}
    if not big:
        return {}
    size = max(slab_bytes, -(-sum(_nbytes(t) for t in big.values()) // max_parts))
    while True:
        cuts = {}
        for n, t in big.items():
            d = slab_dim(t.shape)
            assert d is not None
            k = min(-(-_nbytes(t) // size), t.shape[d])
            if k >= 2 and len(n) + len(SEP) + len(str(k - 1)) <= MAX_NAME_LEN:
                cuts[n] = Cut(n, d, k, tuple(t.shape), t.dtype)
        if sum(c.parts for c in cuts.values()) <= max_parts:
            return cuts
        size *= 2


@dataclass
class _Whole:
    dim: int
    parts: list[str]
    shape: tuple[int, ...]
    dtype: torch.dtype
    done: int = 0  # slabs received
    filled: int = 0  # along dim
    tensor: torch.Tensor | None = None


def _fits(shape: tuple[int, ...], w: _Whole) -> bool:
    """``shape`` is a slab of ``w``: the same but along the cut dimension."""
    return len(shape) == len(w.shape) and all(shape[i] == w.shape[i] for i in range(len(shape)) if i != w.dim)


class Assembler:
    """Receives the slabs a peer's ``slabs`` field announces into the whole tensors.

    Construction checks the field (bounded, well formed, each slab named once; shapes and dtypes
    valid) without allocating; ``nbytes`` is what ``allocate`` will take. Then for each slab as it
    arrives: ``admit`` (before decoding: a named slab, in its tensor's order, that fits) and ``put``
    (the decoded slab is copied into its place). ``finish`` checks every tensor is filled exactly.
    Every violation raises ``exc``."""

    def __init__(self, spec: Any, exc: type[Exception]):
        self.exc = exc
        if not isinstance(spec, dict) or len(spec) > MAX_TENSORS_PER_FRAME:
            raise exc(f"'slabs' must map at most {MAX_TENSORS_PER_FRAME} tensor names to their slabs")
        self.wholes: dict[str, _Whole] = {}
        self.pending: dict[str, tuple[str, int]] = {}  # slab name -> (tensor name, index)
        for name, s in spec.items():
            if not (0 < len(name) <= MAX_NAME_LEN) or not isinstance(s, dict):
                raise exc(f"slabs of {name!r}: expected a name of 1..{MAX_NAME_LEN} characters and an object")
            dim, parts, shape, dtype = s.get("dim"), s.get("parts"), s.get("shape"), s.get("dtype")
            if not isinstance(parts, list) or not parts:
                raise exc(f"slabs of {name!r}: 'parts' must list the slab names")
            for k, p in enumerate(parts):
                if not isinstance(p, str) or not (0 < len(p) <= MAX_NAME_LEN) or p in self.pending:
                    raise exc(
                        f"slabs of {name!r}: slab name {p!r} is not a name of 1..{MAX_NAME_LEN} characters, or twice"
                    )
                self.pending[p] = (name, k)
            if len(self.pending) > MAX_STREAM_PARTS:
                raise exc(f"'slabs' name more than {MAX_STREAM_PARTS} slabs")
            if (
                not isinstance(shape, list)
                or len(shape) > MAX_TENSOR_NDIM
                or not all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in shape)
                or not isinstance(dim, int)
                or isinstance(dim, bool)
                or not (0 <= dim < len(shape))
                or dtype not in DTYPES
            ):
                raise exc(f"slabs of {name!r}: bad shape {shape!r}, dim {dim!r} or dtype {dtype!r}")
            self.wholes[name] = _Whole(dim, parts, tuple(shape), torch_dtype(dtype))

    @property
    def nbytes(self) -> int:
        """Bytes of the whole tensors (take them from a budget before ``allocate``)."""
        return sum(numel(w.shape) * itemsize(w.dtype) for w in self.wholes.values())

    def allocate(self, device: torch.device | str) -> None:
        for w in self.wholes.values():
            w.tensor = torch.empty(w.shape, dtype=w.dtype, device=device)

    def admit(self, wt: WireTensor) -> None:
        """Before ``wt`` is decoded: a slab still due, the next of its tensor, that fits in it."""
        hit = self.pending.get(wt.name)
        if hit is None:
            raise self.exc(f"slab {wt.name!r} was not named by its request, or came twice")
        w = self.wholes[hit[0]]
        if hit[1] != w.done:
            raise self.exc(f"slab {wt.name!r} came before slab {w.parts[w.done]!r}")
        shape = tuple(wt.shape)
        if not _fits(shape, w) or w.filled + shape[w.dim] > w.shape[w.dim] or torch_dtype(wt.dtype) != w.dtype:
            raise self.exc(
                f"slab {wt.name!r} ({list(shape)} {wt.dtype}) does not fit {hit[0]!r} ({list(w.shape)} "
                f"{dtype_name(w.dtype)}) at {w.filled} along dim {w.dim}"
            )

    def put(self, name: str, t: torch.Tensor) -> None:
        """The decoded slab ``name`` (admitted): copied into its place."""
        tname, _ = self.pending.pop(name)
        w = self.wholes[tname]
        n = t.shape[w.dim] if _fits(tuple(t.shape), w) else -1
        if w.tensor is None or n < 0 or t.dtype != w.dtype or w.filled + n > w.shape[w.dim]:
            raise self.exc(f"slab {name!r} decoded to {list(t.shape)} {t.dtype}, not what it declared")
        w.tensor.narrow(w.dim, w.filled, n).copy_(t)
        w.filled += n
        w.done += 1

    def skip(self, name: str) -> None:
        """Slab ``name`` arrived for a request that already failed: counted, not decoded."""
        if self.pending.pop(name, None) is None:
            raise self.exc(f"slab {name!r} was not named by its request, or came twice")

    @property
    def complete(self) -> bool:
        return not self.pending

    def finish(self) -> dict[str, torch.Tensor]:
        """The whole tensors, every one filled exactly by its slabs."""
        out = {}
        for name, w in self.wholes.items():
            if self.pending or w.tensor is None or w.filled != w.shape[w.dim]:
                raise self.exc(f"the slabs of {name!r} fill {w.filled} of its {w.shape[w.dim]} along dim {w.dim}")
            out[name] = w.tensor
        return out

    def drop(self) -> None:
        for w in self.wholes.values():
            w.tensor = None


# ---------------------------------------------------------------------------- how many slabs


@dataclass
class Affine:
    """A per-call cost: ``per_call_ms`` whatever the size (kernel launches, host round trips, Python)
    plus ``per_mb_ms`` per MB (10^6 bytes) of raw input."""

    per_call_ms: float
    per_mb_ms: float

    def ms(self, nbytes: float) -> float:
        return self.per_call_ms + self.per_mb_ms * nbytes / 1e6


def pipeline_ms(
    raw_bytes: float,
    wire_bytes: float,
    link_bps: float,
    enc: Affine,
    dec: Affine,
    parts: int,
    side_ms_per_mb: float = STREAM_SIDE_MS_PER_MB,
    slab_ms: float = STREAM_SLAB_MS,
) -> float:
    """Time of a call streamed in ``parts`` equal slabs through three stages (code, wire, decode) that
    overlap slab by slab: the first slab passes all three, then the slowest stage sets the pace. Each
    side also pays ``side_ms_per_mb`` per MB on the wire (sealing or opening records, host copies) and
    ``slab_ms`` per slab (a frame, a record, a pass through the receive loop)."""
    side = side_ms_per_mb * wire_bytes / parts / 1e6 + slab_ms
    e = enc.ms(raw_bytes / parts) + side
    w = wire_bytes / parts / max(link_bps, 1.0) * 1e3
    d = dec.ms(raw_bytes / parts) + side
    return e + w + d + (parts - 1) * max(e, w, d)


def best_parts(
    raw_bytes: float, wire_bytes: float, link_bps: float, enc: Affine, dec: Affine, max_parts: int, current: int = 0
) -> int:
    """The slab count (1 = one frame, not streamed) with the least ``pipeline_ms``: many slabs where
    the cost grows with the bytes (raw on a link, any codec on a CPU), few where a codec's cost is
    mostly per call (an entropy coder on a GPU: ~6 ms a call whatever its size, H200 measurements in
    docs/BENCHMARKS.md) and the wire cannot hide one call per slab. Of counts within ``TIE_MS``, the
    fewer slabs; ``current`` (the count of the previous call) is kept unless another saves
    ``KEEP_MS`` + ``KEEP_FRACTION``, so a temporal codec's references (one per slab) are not restarted for nothing."""
    top = max(1, max_parts)
    times = {k: pipeline_ms(raw_bytes, wire_bytes, link_bps, enc, dec, k) for k in range(1, top + 1)}
    best = min(times.values())
    pick = min(k for k, t in times.items() if t <= best + TIE_MS)
    if 1 <= current <= top and times[current] <= times[pick] * (1 + KEEP_FRACTION) + KEEP_MS:
        return current
    return pick


TIE_MS = 0.25  # best_parts: counts this close are a tie (the fewer slabs win)
KEEP_MS = 1.0  # best_parts: the previous count stays unless another is this much faster,
KEEP_FRACTION = 0.05  # plus this fraction of its time


class CostModel:
    """What one kind of call (coding a slab here, or decoding one on the peer) costs, learnt from the
    last ``WINDOW`` observations ``(raw bytes, ms)``. Medians, so a first call's warm-up (CUDA kernels
    loaded, buffers allocated) or a hiccup does not steer the plan. Calls of two sizes (at least 1.5x
    apart): the per-call and per-MB parts from the medians of the smaller and the larger half. Calls of
    one size only: the ``prior`` scaled by how much slower or faster they were than it said."""

    WINDOW = 16

    def __init__(self, prior: Affine):
        self.prior = prior
        self.seen: list[tuple[float, float]] = []

    def observe(self, nbytes: float, ms: float) -> None:
        if nbytes > 0 and ms >= 0:
            self.seen = [*self.seen[-(self.WINDOW - 1) :], (float(nbytes), float(ms))]

    @property
    def cost(self) -> Affine:
        if not self.seen:
            return self.prior
        pts = sorted(self.seen)
        lo, hi = pts[: len(pts) // 2], pts[len(pts) // 2 :]
        if lo and hi and _median([b for b, _ in hi]) >= 1.5 * _median([b for b, _ in lo]):
            (b0, t0), (b1, t1) = [(_median([b for b, _ in g]), _median([t for _, t in g])) for g in (lo, hi)]
            slope = max(0.0, (t1 - t0) / ((b1 - b0) / 1e6))
            return Affine(max(0.0, t0 - slope * b0 / 1e6), slope)
        scale = _median([t / max(self.prior.ms(b), 1e-6) for b, t in pts])
        return Affine(self.prior.per_call_ms * scale, self.prior.per_mb_ms * scale)


def _median(xs: list[float]) -> float:
    xs = sorted(xs)
    n = len(xs)
    return xs[n // 2] if n % 2 else 0.5 * (xs[n // 2 - 1] + xs[n // 2])


class CostTracker:
    """What coding and decoding slabs cost on one connection with one codec (``CostModel`` each), the
    coded / raw bytes of the last call (``ratio``), and the slab count of the last plan (kept unless
    another is clearly faster: ``best_parts``)."""

    def __init__(self, enc: Affine, dec: Affine, ratio: float):
        self.enc, self.dec, self.ratio = CostModel(enc), CostModel(dec), ratio
        self._ratios: list[float] = []
        self.parts = 0  # the slab count of the last plan (0: none yet)

    def coded(self, nbytes: float, ms: float) -> None:
        self.enc.observe(nbytes, ms)

    def decoded(self, nbytes: float, ms: float) -> None:
        self.dec.observe(nbytes, ms)

    def sent(self, raw_bytes: float, wire_bytes: float) -> None:
        """Coded / raw bytes of a call; ``ratio`` is the median of the last few (a temporal codec's
        keyframes are the exception, its P-frames the rule)."""
        if raw_bytes > 0:
            self._ratios = [*self._ratios[-7:], max(1e-3, wire_bytes / raw_bytes)]
            self.ratio = _median(self._ratios)

    def parts_for(self, raw_bytes: float, link_bps: float, max_parts: int) -> int:
        k = best_parts(raw_bytes, raw_bytes * self.ratio, link_bps, self.enc.cost, self.dec.cost, max_parts, self.parts)
        self.parts = k
        return k


__all__ = [
    "SEP",
    "Affine",
    "Assembler",
    "CostModel",
    "CostTracker",
    "Cut",
    "best_parts",
    "pipeline_ms",
    "plan",
    "slab_dim",
]
