"""The ``Codec`` base (one signature, the guards every codec shares), raw and int8, and the
dtype / byte helpers every codec uses.

A codec turns a tensor into a ``WireTensor`` (dtype, shape, codec id, small JSON meta,
payload bytes) and back. ``Codec.encode`` / ``Codec.decode`` are template methods: the
float-input check, the raw fallback of empty and 0-d tensors (``meta {"raw": true}``) and
the wrapping of decode failures into ``CodecError`` are written here once; subclasses
implement ``_encode`` / ``_decode``.
"""

from __future__ import annotations

import importlib
import math
import struct
import sys
import threading
import warnings
from collections.abc import Callable, Generator
from typing import Any, ClassVar, TypeVar

import torch

from ..constants import DECODE_ALIGN_BYTES, MAX_BODY_BYTES
from ..errors import CodecError, LocalError
from ..protocol import WireTensor

T = TypeVar("T")

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
# What the lossy codecs take (and return): float64 would only pretend to more precision.
LOSSY_DTYPES = ("float32", "float16", "bfloat16")
# Largest tensor (in bytes) a payload may expand to: what could have been sent raw.
MAX_DECODED_BYTES = MAX_BODY_BYTES
# Exceptions that a malformed payload can raise from torch / numpy / struct code: CodecError.
_DECODE_FAILURES = (RuntimeError, ValueError, TypeError, IndexError, OverflowError, KeyError, struct.error)


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


def itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def numel(shape: tuple[int, ...]) -> int:
    return math.prod(shape)


def check_shape(wt: WireTensor) -> int:
    """Elements of ``wt``'s shape, refusing tensors larger than a frame could carry raw."""
    n = numel(wt.shape)
    if n * itemsize(torch_dtype(wt.dtype)) > MAX_DECODED_BYTES:
        raise CodecError(f"{wt.name!r}: shape {list(wt.shape)} x {wt.dtype} exceeds {MAX_DECODED_BYTES} bytes")
    return n


def to_bytes(t: torch.Tensor) -> memoryview:
    """A tensor's bytes as a memoryview of a contiguous CPU copy (no copy if already so).

    A CUDA tensor is copied into page-locked host memory (far faster than a plain ``.cpu()``
    into fresh pageable memory; docs/BENCHMARKS.md). The memoryview keeps the buffer alive;
    torch's host allocator reuses it once it is dropped."""
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


def byte_view(data: Any) -> memoryview:
    """``data`` as a flat memoryview of bytes (an empty one for empty data)."""
    mv = memoryview(data)
    return mv.cast("B") if mv.nbytes else memoryview(b"")


def _aligned(t: torch.Tensor) -> bool:
    return t.data_ptr() % DECODE_ALIGN_BYTES == 0


def decodes_in_place(wt: WireTensor, device: torch.device | str = "cpu") -> bool:
    """Whether ``decode(wt, device)`` is a view of the received bytes, allocating nothing: a raw
    tensor decoded on the CPU from a writable, aligned buffer (``from_bytes``)."""
    if wt.codec != 0 or torch.device(device).type != "cpu" or wt.meta:
        return False
    mv = byte_view(wt.data)
    return not mv.readonly and mv.nbytes > 0 and _aligned(torch.frombuffer(mv, dtype=torch.uint8))


def from_bytes(
    data: Any, dtype: torch.dtype, shape: tuple[int, ...], device: torch.device | str = "cpu"
) -> torch.Tensor:
    """Rebuild a tensor from raw bytes on ``device``, checking the size first."""
    expected = numel(shape) * itemsize(dtype)
    mv = byte_view(data)
    if mv.nbytes != expected:
        raise CodecError(f"payload has {mv.nbytes} bytes, shape {list(shape)} x {dtype} needs {expected}")
    if expected == 0:
        return torch.empty(shape, dtype=dtype, device=device)
    if torch.device(device).type != "cpu":  # straight from the received buffer to the device
        return host_view(mv).to(device).view(dtype).reshape(shape)
    if mv.readonly:
        mv = memoryview(bytearray(mv))
    t = torch.frombuffer(mv, dtype=torch.uint8)
    if not _aligned(t):
        # A tensor at an odd offset of the received frame: CPU kernels take other (scalar) paths on
        # misaligned data and round differently, so the split would no longer match unsplit bit for bit.
        t = t.clone()  # torch's CPU allocator aligns to 64 bytes
    return t.view(dtype).reshape(shape)


# ---------------------------------------------------------------------------- optional imports

_IMPORTS: dict[str, tuple[Any, str | None]] = {}
_IMPORT_LOCK = threading.RLock()


def optional_import(name: str, hint: str, prepare: Callable[[], bool] | None = None) -> tuple[Any, str | None]:
    """(module, None) or (None, why), cached. Any import failure (a missing native library
    raises OSError/RuntimeError inside some imports) counts as 'not installed'. ``prepare``
    (e.g. preloading a wheel's shared library) runs after a first failure; when it returns
    True the import is tried once more."""
    with _IMPORT_LOCK:
        if name not in _IMPORTS:
            err: BaseException | None = None
            for attempt in (0, 1):
                try:
                    _IMPORTS[name] = (importlib.import_module(name), None)
                    break
                except Exception as e:  # noqa: BLE001 - native import failures come in many types
                    err = e
                    if attempt or prepare is None or not prepare():
                        break
            if name not in _IMPORTS:
                _IMPORTS[name] = (None, f"{name} is not importable ({type(err).__name__}: {err}); {hint}")
        return _IMPORTS[name]


# ---------------------------------------------------------------------------- the base


def float_input(t: torch.Tensor, name: str, codec: str) -> str:
    """``t``'s dtype name when a lossy codec can take it (float16/bfloat16/float32), else LocalError."""
    dname = dtype_name(t.dtype)
    if dname not in LOSSY_DTYPES:
        raise LocalError(
            f"{codec} codec needs a float tensor (float16/bfloat16/float32); {name!r} is {dname}: "
            "send it raw or lossless"
        )
    return dname


# An encoder in stages (``Codec.staged_encode``): yields where it needs a host round trip next, returns
# the payload.
Staged = Generator[None, None, WireTensor]


def run_stages(gen: Generator[None, None, T]) -> T:
    """The rest of a staged computation, all stages: its return value."""
    while True:
        try:
            next(gen)
        except StopIteration as e:
            return e.value


def raw_decode(wt: WireTensor, device: torch.device | str) -> torch.Tensor:
    return from_bytes(wt.data, torch_dtype(wt.dtype), wt.shape, device)


class Codec:
    """Base class. Subclasses set ``wire_id``, ``name``, ``lossless`` and implement
    ``_encode`` / ``_decode``; ``encode`` / ``decode`` apply the shared guards around them.

    ``state``: a dict owned by the caller, one per connection and stream (see
    ``wirecodecs.temporal.stream_state``), kept identically by the encoding and the decoding
    side; only codecs with ``stateful = True`` (temporal coding) use it, the others ignore
    it. ``state=None`` means "no history": a stateful encoder then sends a self-contained
    keyframe.

    ``float_only``: the codec takes float16/bfloat16/float32 only (LocalError otherwise).
    ``uses_entropy_backend``: its payloads are coded by an entropy backend (zstd / nvCOMP
    ANS) that the caller may pin with ``params["backend"]``.
    """

    wire_id: ClassVar[int]
    name: ClassVar[str]
    lossless: ClassVar[bool]
    stateful: ClassVar[bool] = False
    float_only: ClassVar[bool] = False
    uses_entropy_backend: ClassVar[bool] = False
    raw_fallback: ClassVar[bool] = True  # empty and 0-d tensors travel raw, ``meta {"raw": true}``

    def available(self) -> str | None:
        """None when usable here, else a sentence naming what to install."""
        return None

    def encode(
        self, t: torch.Tensor, name: str, params: dict[str, Any], state: dict[Any, Any] | None = None
    ) -> WireTensor:
        return run_stages(self.staged_encode(t, name, params, state))

    def staged_encode(
        self, t: torch.Tensor, name: str, params: dict[str, Any], state: dict[Any, Any] | None = None
    ) -> Staged:
        """``encode`` in stages: the first ``next()`` checks the input and queues the device work that
        needs no host round trip (on a GPU it runs behind whatever is queued before it, e.g. the blocks
        that make ``t``, while the host goes on); ``run_stages`` does the rest and returns the payload.
        A codec without ``_encode_staged`` does all its work in the last stage. Abandoning the
        generator between stages leaves ``state`` as it was."""
        dname = float_input(t, name, self.name) if self.float_only else dtype_name(t.dtype)
        self.check_params(params)
        if self.raw_fallback and (t.ndim == 0 or t.numel() == 0):  # nothing to code: send the bytes
            yield
            return WireTensor(name, dname, tuple(t.shape), self.wire_id, to_bytes(t), {"raw": True})
        return (yield from self._encode_staged(t, name, params, state))

    def _encode_staged(
        self, t: torch.Tensor, name: str, params: dict[str, Any], state: dict[Any, Any] | None
    ) -> Staged:
        yield
        return self._encode(t, name, params, state)

    def decode(self, wt: WireTensor, device: torch.device | str, state: dict[Any, Any] | None = None) -> torch.Tensor:
        try:
            if self.raw_fallback and wt.meta.get("raw") is True:
                return raw_decode(wt, device)
            if self.raw_fallback and len(wt.shape) == 0:
                raise CodecError(f"{self.name} payload for {wt.name!r} has a 0-d shape but is not raw")
            return self._decode(wt, torch.device(device), state)
        except CodecError:
            raise
        except _DECODE_FAILURES as e:
            raise CodecError(f"cannot decode {wt.name!r} with codec {self.name}: {e}") from e

    def check_params(self, params: dict[str, Any]) -> None:
        """Refuse bad parameters (LocalError) before the raw fallback; most codecs check them
        while encoding."""

    def _encode(self, t: torch.Tensor, name: str, params: dict[str, Any], state: dict[Any, Any] | None) -> WireTensor:
        raise NotImplementedError

    def _decode(self, wt: WireTensor, device: torch.device, state: dict[Any, Any] | None) -> torch.Tensor:
        raise NotImplementedError


class RawCodec(Codec):
    """The tensor's bytes, any dtype, exact (0-d and empty tensors included)."""

    wire_id = 0
    name = "raw"
    lossless = True
    raw_fallback = False

    def _encode(self, t: torch.Tensor, name: str, params: dict[str, Any], state: dict[Any, Any] | None) -> WireTensor:
        return WireTensor(name, dtype_name(t.dtype), tuple(t.shape), self.wire_id, to_bytes(t))

    def _decode(self, wt: WireTensor, device: torch.device, state: dict[Any, Any] | None) -> torch.Tensor:
        return raw_decode(wt, device)


class Int8Codec(Codec):
    """Per-channel (last axis) symmetric int8: scale = absmax / 127, round to nearest.

    Payload: C float32 scales, then the int8 values. Computed on the tensor's device.
    Error budget: |x - x'| <= scale_c / 2 per element (documented, tested).
    """

    wire_id = 1
    name = "int8"
    lossless = False
    float_only = True

    def _encode(self, t: torch.Tensor, name: str, params: dict[str, Any], state: dict[Any, Any] | None) -> WireTensor:
        shape = tuple(t.shape)
        x = t.detach().float().reshape(-1, shape[-1])
        finite = torch.nan_to_num(x, nan=0.0, posinf=0.0, neginf=0.0)
        absmax = finite.abs().amax(dim=0)
        scale = absmax / 127.0
        safe = torch.where(scale > 0, scale, torch.ones_like(scale))
        q = torch.nan_to_num(x, nan=0.0).div(safe).round().clamp_(-127, 127).to(torch.int8)
        payload = torch.cat([scale.contiguous().view(torch.uint8), q.reshape(-1).view(torch.uint8)])
        return WireTensor(name, dtype_name(t.dtype), shape, self.wire_id, to_bytes(payload), {})

    def _decode(self, wt: WireTensor, device: torch.device, state: dict[Any, Any] | None) -> torch.Tensor:
        dtype = torch_dtype(wt.dtype)
        if wt.dtype not in FLOAT_DTYPES:
            raise CodecError(f"int8 payload for {wt.name!r} has dtype {wt.dtype} / shape {list(wt.shape)}")
        c = wt.shape[-1]
        n = numel(wt.shape)
        nbytes = memoryview(wt.data).nbytes
        if nbytes != 4 * c + n:
            raise CodecError(f"int8 payload for {wt.name!r} has {nbytes} bytes, expected {4 * c + n}")
        buf = from_bytes(wt.data, torch.uint8, (4 * c + n,), device)
        scale = buf[: 4 * c].view(torch.float32)
        q = buf[4 * c :].view(torch.int8).reshape(-1, c)
        return (q.float() * scale).to(dtype).reshape(wt.shape)
