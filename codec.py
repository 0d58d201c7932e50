"""Activation codecs: the registry, keyed by stable wire ids.

A codec turns a tensor into a ``WireTensor`` (dtype, shape, codec id, small JSON meta,
payload bytes) and back; the codecs themselves are the leaves in ``wirecodecs/`` (this module
sits above them and builds the table; no leaf imports it). Wire ids are part of the
protocol: never reuse or renumber one. ``WIRE_IDS`` is the table, checked against the
registered codecs at import.

Non-finite policy: ``raw`` carries NaN/Inf bit-exactly. Lossy codecs map NaN to 0 and
+-Inf to the largest finite magnitude of the channel (documented in docs/PROTOCOL.md).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

from .errors import CodecError, LocalError
from .protocol import WireTensor
from .wirecodecs import auto, base, hevc, lossless, quant, temporal
from .wirecodecs.base import Codec, Staged

# Every wire id in use (8..14 reserved for the entropy family, 18..23 for HEVC). ``auto`` (15)
# is a name only: it encodes with the codec it picks, so id 15 never appears on the wire.
WIRE_IDS: dict[int, str] = {
    0: "raw",
    1: "int8",
    2: "lossless",
    3: "quant",
    4: "q4",
    5: "clip-sparse",
    6: "lossless-t",
    7: "quant-t",
    15: "auto",
    16: "nvenc",
    17: "hevc-orig",
}

CODECS: dict[int, Codec] = {}
_BY_NAME: dict[str, Codec] = {}


def register(codec: Codec) -> Codec:
    if codec.wire_id in CODECS:
        raise LocalError(f"codec wire id {codec.wire_id} registered twice ({CODECS[codec.wire_id].name}, {codec.name})")
    if codec.name in _BY_NAME:
        raise LocalError(f"codec name {codec.name!r} registered twice")
    CODECS[codec.wire_id] = codec
    _BY_NAME[codec.name] = codec
    return codec


def by_name(name: str) -> Codec:
    try:
        return _BY_NAME[name]
    except KeyError:
        raise LocalError(f"unknown codec {name!r}; available: {sorted(_BY_NAME)}") from None


def by_id(wire_id: int) -> Codec:
    try:
        return CODECS[wire_id]
    except KeyError:
        raise CodecError(f"unknown codec id {wire_id}; this side knows {sorted(CODECS)}") from None


def check_table(codecs: Iterable[Codec], table: dict[int, str] = WIRE_IDS) -> None:
    """LocalError unless ``codecs`` are exactly ``table``: every id once, every name once."""
    codecs = list(codecs)
    ids = [c.wire_id for c in codecs]
    names = [c.name for c in codecs]
    dup = sorted({i for i in ids if ids.count(i) > 1}) + sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise LocalError(f"codec wire ids / names registered twice: {dup}")
    got = {c.wire_id: c.name for c in codecs}
    if got != table:
        missing = {i: n for i, n in table.items() if got.get(i) != n}
        extra = {i: n for i, n in got.items() if table.get(i) != n}
        raise LocalError(f"codec table mismatch: missing {missing}, not in WIRE_IDS {extra}")


_ALL: list[Codec] = [
    base.RawCodec(),
    base.Int8Codec(),
    lossless.LosslessCodec(),
    quant.QuantCodec(),
    quant.Q4Codec(),
    quant.ClipSparseCodec(),
    temporal.LosslessTemporalCodec(),
    temporal.QuantTemporalCodec(),
    auto.AutoCodec(by_name),
    hevc.HevcCodec(),
    hevc.HevcOriginalCodec(),
]
check_table(_ALL)
for _c in _ALL:
    register(_c)


def names() -> list[str]:
    """Every registered codec name (usable here or not)."""
    return sorted(c.name for c in CODECS.values())


def available_ids() -> list[int]:
    return sorted(i for i, c in CODECS.items() if c.available() is None)


def encode(
    t: torch.Tensor,
    name: str,
    codec: str | int = "raw",
    params: dict[str, Any] | None = None,
    state: dict[Any, Any] | None = None,
) -> WireTensor:
    """``state``: the caller's per-connection, per-stream dict, used only by stateful codecs."""
    return base.run_stages(staged_encode(t, name, codec, params, state))


def staged_encode(
    t: torch.Tensor,
    name: str,
    codec: str | int = "raw",
    params: dict[str, Any] | None = None,
    state: dict[Any, Any] | None = None,
) -> Staged:
    """``encode`` in stages (``Codec.staged_encode``): the first ``next()`` queues the device work that
    needs no host round trip, ``run_stages`` returns the payload. The codec is checked here, at once."""
    c = by_name(codec) if isinstance(codec, str) else by_id(codec)
    why = c.available()
    if why:
        raise LocalError(f"codec {c.name!r} is not usable here: {why}")
    return c.staged_encode(t, name, params or {}, state=state)


def decode(wt: WireTensor, device: torch.device | str = "cpu", state: dict[Any, Any] | None = None) -> torch.Tensor:
    """Errors: ``CodecError`` for anything a bad payload can cause (the codec's guard)."""
    return by_id(wt.codec).decode(wt, device, state=state)
