"""Streamed calls (docs/PROTOCOL.md §6.1): big tensors cut into token slabs that travel in chunk frames.

The sender cuts each big tensor along its token dimension (``plan``), codes every slab as a tensor
of its own (name ``<tensor>#<k>``; a temporal codec keeps one reference per slab) and sends it in a
FORWARD_CHUNK / RESULT_CHUNK frame while it codes the next; the receiver decodes each chunk as it
arrives and, when the closing FORWARD / RESULT names the slabs, checks and joins them with
``torch.cat`` (``check`` + ``join``): for raw and lossless the very tensor the unstreamed path would
have decoded, bit for bit. Codec-free and socket-free: transport.py and server/core.py drive it.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from .constants import MAX_NAME_LEN, MAX_STREAM_PARTS, MAX_TENSORS_PER_FRAME

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

    def names(self) -> list[str]:
        return [f"{self.name}{SEP}{k}" for k in range(self.parts)]

    def spec(self) -> dict[str, Any]:
        """This cut as ``Forward.slabs`` / ``Result.slabs`` carry it."""
        return {"dim": self.dim, "parts": self.names()}

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
                cuts[n] = Cut(n, d, k)
        if sum(c.parts for c in cuts.values()) <= max_parts:
            return cuts
        size *= 2


@dataclass(frozen=True)
class Joined:
    """Checked slabs, ready to join: name -> (dim, slabs in order)."""

    pieces: dict[str, tuple[int, list[torch.Tensor]]]

    @property
    def nbytes(self) -> int:
        """Bytes of the joined tensors (for a budget, before ``join`` allocates them)."""
        return sum(sum(_nbytes(s) for s in slabs) for _, slabs in self.pieces.values())

    def join(self) -> dict[str, torch.Tensor]:
        return {n: torch.cat(slabs, dim) for n, (dim, slabs) in self.pieces.items()}


def expected(spec: Any, exc: type[Exception]) -> set[str]:
    """The slab names a ``slabs`` field announces (checked: bounded, well formed, each named once)."""
    if not isinstance(spec, dict) or len(spec) > MAX_TENSORS_PER_FRAME:
        raise exc(f"'slabs' must map at most {MAX_TENSORS_PER_FRAME} tensor names to their slabs")
    out: set[str] = set()
    for name, s in spec.items():
        names = s.get("parts") if isinstance(s, dict) else None
        if not (0 < len(name) <= MAX_NAME_LEN) or not isinstance(names, list):
            raise exc(f"slabs of {name!r}: expected a name of 1..{MAX_NAME_LEN} characters and a list of parts")
        for p in names:
            if not isinstance(p, str) or not (0 < len(p) <= MAX_NAME_LEN) or p in out:
                raise exc(f"slabs of {name!r}: slab name {p!r} is not a name of 1..{MAX_NAME_LEN} characters, or twice")
            out.add(p)
        if len(out) > MAX_STREAM_PARTS:
            raise exc(f"'slabs' name more than {MAX_STREAM_PARTS} slabs")
    return out


def check(spec: Any, parts: Mapping[str, torch.Tensor], exc: type[Exception]) -> Joined:
    """Check a peer's ``slabs`` field against the slabs ``parts`` it sent (decoded): every slab named
    exactly once, every one received used, shapes that join. Raises ``exc`` naming what is wrong."""
    if not isinstance(spec, dict) or len(spec) > MAX_TENSORS_PER_FRAME:
        raise exc(f"'slabs' must map at most {MAX_TENSORS_PER_FRAME} tensor names to their slabs")
    used: set[str] = set()
    pieces: dict[str, tuple[int, list[torch.Tensor]]] = {}
    for name, s in spec.items():
        if not (0 < len(name) <= MAX_NAME_LEN) or not isinstance(s, dict):
            raise exc(f"slabs of {name!r}: expected a name of 1..{MAX_NAME_LEN} characters and an object")
        dim, names = s.get("dim"), s.get("parts")
        if not isinstance(names, list) or not (1 <= len(names) <= MAX_STREAM_PARTS):
            raise exc(f"slabs of {name!r}: 'parts' must list 1..{MAX_STREAM_PARTS} slab names")
        slabs = []
        for p in names:
            if not isinstance(p, str) or p not in parts or p in used:
                raise exc(f"slabs of {name!r}: slab {p!r} was not received, or is named twice")
            used.add(p)
            slabs.append(parts[p])
        first = slabs[0]
        if not isinstance(dim, int) or isinstance(dim, bool) or not (0 <= dim < first.dim()):
            raise exc(f"slabs of {name!r}: bad dimension {dim!r} for slabs of shape {list(first.shape)}")
        for t in slabs[1:]:
            same = t.dim() == first.dim() and all(
                a == b for i, (a, b) in enumerate(zip(t.shape, first.shape, strict=False)) if i != dim
            )
            if not same or t.dtype != first.dtype or t.device != first.device:
                raise exc(
                    f"slabs of {name!r} do not join along dim {dim}: {list(first.shape)} {first.dtype} "
                    f"and {list(t.shape)} {t.dtype}"
                )
        pieces[name] = (dim, slabs)
    extra = sorted(set(parts) - used)
    if extra:
        raise exc(f"{len(extra)} slabs were sent but not named by the closing frame, e.g. {extra[0]!r}")
    return Joined(pieces)


__all__ = ["SEP", "Cut", "Joined", "check", "expected", "plan", "slab_dim"]
