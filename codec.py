"""Activation codecs: a registry keyed by stable wire ids.

A codec turns a tensor into a ``WireTensor`` (dtype, shape, codec id, small JSON meta,
payload bytes) and back. Wire ids are part of the protocol: never reuse or renumber one.

Non-finite policy: ``raw`` carries NaN/Inf bit-exactly. Lossy codecs map NaN to 0 and
+-Inf to the largest finite magnitude of the channel (documented in docs/PROTOCOL.md).
"""

from __future__ import annotations

import dataclasses
import math
import sys
import warnings
from typing import Any, ClassVar, cast

import torch

from .errors import CodecError, LocalError
from .protocol import WireTensor

if sys.byteorder != "little":  # payloads are the host's bytes; every supported platform is little-endian
    raise ImportError("ComfyUI-Mesh supports little-endian machines only")

_TORCH_DTYPES: dict[str, torch.dtype] = {
    "float64": torch.float64,
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float8_e4m3fn": torch.float8_e4m3fn,
    "float8_e5m2": torch.float8_e5m2,
    "int64": torch.int64,
    "int32": torch.int32,
    "int16": torch.int16,
    "int8": torch.int8,
    "uint8": torch.uint8,
    "bool": torch.bool,
}
_DTYPE_NAMES = {v: k for k, v in _TORCH_DTYPES.items()}
FLOAT_DTYPES = frozenset({"float64", "float32", "float16", "bfloat16"})


def dtype_name(dtype: torch.dtype) -> str:
    try:
        return _DTYPE_NAMES[dtype]
    except KeyError:
        raise LocalError(f"dtype {dtype} cannot cross the wire; supported: {sorted(_TORCH_DTYPES)}") from None


def torch_dtype(name: str) -> torch.dtype:
    try:
        return _TORCH_DTYPES[name]
    except KeyError:
        raise CodecError(f"unknown dtype {name!r}") from None


def numel(shape: tuple[int, ...]) -> int:
    return math.prod(shape)


def to_bytes(t: torch.Tensor) -> memoryview:
    """A tensor's bytes as a memoryview of a contiguous CPU copy (no copy if already so).

    A CUDA tensor is copied into page-locked host memory: on an H200, 25 MB took 0.46 ms that
    way and 15.9 ms as a plain ``.cpu()`` into fresh pageable memory. The memoryview keeps the
    buffer alive; torch's host allocator reuses it once it is dropped."""
    t = t.detach().contiguous().reshape(-1)
    if t.numel() == 0:
        return memoryview(b"")
    if t.device.type == "cuda":
        u8 = t.view(torch.uint8)
        try:
            host = torch.empty(u8.numel(), dtype=torch.uint8, pin_memory=True)
        except RuntimeError:  # page-locked memory refused (limits, WSL): the plain copy still works
            host = None
        if host is not None:
            host.copy_(u8, non_blocking=True)
            torch.cuda.current_stream(t.device).synchronize()
            pinned: Any = host.numpy()
            return memoryview(pinned)
    if t.device.type != "cpu":
        t = t.cpu()
    arr: Any = t.view(torch.uint8).numpy()
    return memoryview(arr)


def host_view(buf: Any) -> torch.Tensor:
    """A CPU uint8 tensor over ``buf``'s bytes without copying, read-only buffers included:
    callers only read it (to copy it elsewhere)."""
    mv = memoryview(buf).cast("B")
    if mv.nbytes == 0:
        return torch.empty(0, dtype=torch.uint8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "the given buffer is not writable"
        return torch.frombuffer(mv, dtype=torch.uint8)


def from_bytes(
    data: Any, dtype: torch.dtype, shape: tuple[int, ...], device: torch.device | str = "cpu"
) -> torch.Tensor:
    """Rebuild a tensor from raw bytes on ``device``, checking the size first."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    expected = numel(shape) * itemsize
    mv = memoryview(data).cast("B") if memoryview(data).nbytes else memoryview(b"")
    if mv.nbytes != expected:
        raise CodecError(f"payload has {mv.nbytes} bytes, shape {list(shape)} x {dtype} needs {expected}")
    if expected == 0:
        return torch.empty(shape, dtype=dtype, device=device)
    if torch.device(device).type != "cpu":  # straight from the received buffer to the device
        return host_view(mv).to(device).view(dtype).reshape(shape)
    if mv.readonly:
        mv = memoryview(bytearray(mv))
    return torch.frombuffer(mv, dtype=torch.uint8).view(dtype).reshape(shape)


class Codec:
    """Base class. Subclasses set ``wire_id``, ``name``, ``lossless`` and implement the pair.

    A codec with ``stateful = True`` (temporal coding) adds a keyword argument ``state=None``
    to both methods: a dict owned by the caller, one per connection and stream (see
    ``codec_temporal.stream_state``), kept identically by the encoding and the decoding side.
    ``state=None`` means "no history": a stateful encoder then sends a self-contained
    keyframe. Stateless codecs never see it.
    """

    wire_id: ClassVar[int]
    name: ClassVar[str]
    lossless: ClassVar[bool]
    stateful: ClassVar[bool] = False

    def available(self) -> str | None:
        """None when usable here, else a sentence naming what to install."""
        return None

    def encode(self, t: torch.Tensor, name: str, params: dict[str, Any]) -> WireTensor:
        raise NotImplementedError

    def decode(self, wt: WireTensor, device: torch.device | str) -> torch.Tensor:
        raise NotImplementedError


class RawCodec(Codec):
    """The tensor's bytes, any dtype, exact."""

    wire_id = 0
    name = "raw"
    lossless = True

    def encode(self, t: torch.Tensor, name: str, params: dict[str, Any]) -> WireTensor:
        return WireTensor(name, dtype_name(t.dtype), tuple(t.shape), self.wire_id, to_bytes(t))

    def decode(self, wt: WireTensor, device: torch.device | str) -> torch.Tensor:
        return from_bytes(wt.data, torch_dtype(wt.dtype), wt.shape, device)


class Int8Codec(Codec):
    """Per-channel (last axis) symmetric int8: scale = absmax / 127, round to nearest.

    Payload: C float32 scales, then the int8 values. Computed on the tensor's device.
    Error budget: |x - x'| <= scale_c / 2 per element (documented, tested).
    """

    wire_id = 1
    name = "int8"
    lossless = False

    def encode(self, t: torch.Tensor, name: str, params: dict[str, Any]) -> WireTensor:
        dname = dtype_name(t.dtype)
        if dname not in FLOAT_DTYPES or dname == "float64":
            raise LocalError(
                f"int8 codec needs a float tensor (float16/bfloat16/float32); {name!r} is {dname}: send it raw"
            )
        shape = tuple(t.shape)
        if t.ndim == 0 or t.numel() == 0:
            raw = RawCodec().encode(t, name, params)
            return dataclasses.replace(raw, codec=self.wire_id, meta={"raw": True})
        x = t.detach().float().reshape(-1, shape[-1])
        finite = torch.nan_to_num(x, nan=0.0, posinf=0.0, neginf=0.0)
        absmax = finite.abs().amax(dim=0)
        scale = absmax / 127.0
        safe = torch.where(scale > 0, scale, torch.ones_like(scale))
        q = torch.nan_to_num(x, nan=0.0).div(safe).round().clamp_(-127, 127).to(torch.int8)
        payload = torch.cat([scale.contiguous().view(torch.uint8), q.reshape(-1).view(torch.uint8)])
        return WireTensor(name, dname, shape, self.wire_id, to_bytes(payload), {})

    def decode(self, wt: WireTensor, device: torch.device | str) -> torch.Tensor:
        dtype = torch_dtype(wt.dtype)
        if wt.meta.get("raw"):
            return RawCodec().decode(wt, device)
        if wt.dtype not in FLOAT_DTYPES or len(wt.shape) == 0:
            raise CodecError(f"int8 payload for {wt.name!r} has dtype {wt.dtype} / shape {list(wt.shape)}")
        c = wt.shape[-1]
        n = numel(wt.shape)
        if memoryview(wt.data).nbytes != 4 * c + n:
            raise CodecError(
                f"int8 payload for {wt.name!r} has {memoryview(wt.data).nbytes} bytes, expected {4 * c + n}"
            )
        buf = from_bytes(wt.data, torch.uint8, (4 * c + n,), device)
        scale = buf[: 4 * c].view(torch.float32)
        q = buf[4 * c :].view(torch.int8).reshape(-1, c)
        return (q.float() * scale).to(dtype).reshape(wt.shape)


# ---------------------------------------------------------------------------- registry

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


register(RawCodec())
register(Int8Codec())


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
    c = by_name(codec) if isinstance(codec, str) else by_id(codec)
    why = c.available()
    if why:
        raise LocalError(f"codec {c.name!r} is not usable here: {why}")
    if c.stateful:
        return cast(Any, c).encode(t, name, params or {}, state=state)
    return c.encode(t, name, params or {})


def decode(wt: WireTensor, device: torch.device | str = "cpu", state: dict[Any, Any] | None = None) -> torch.Tensor:
    c = by_id(wt.codec)
    try:
        if c.stateful:
            return cast(Any, c).decode(wt, device, state=state)
        return c.decode(wt, device)
    except CodecError:
        raise
    except (RuntimeError, ValueError, TypeError) as e:
        raise CodecError(f"cannot decode {wt.name!r} with codec {c.name}: {e}") from e


# Entropy-coded, quantized, temporal and auto codecs (wire ids 2..15) register themselves.
from . import codec_entropy  # noqa: E402,F401
from . import codec_hevc as _codec_hevc  # noqa: E402,F401  (HEVC, wire ids 16..23)
