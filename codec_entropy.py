"""Entropy stage for activation codecs: zstd on the CPU, nvCOMP ANS on the GPU; the ``lossless`` codec.

Wire ids of this codec family (stable; never reused or renumbered):

    ==  ============  ==========================================================  ================
    id  name          what                                                        module
    ==  ============  ==========================================================  ================
    2   lossless      byte planes (high/low byte of 16-bit values) + entropy      codec_entropy
    3   quant         one shared quantizer step for a cosine target + entropy     codec_quant
    4   q4            4-bit, one scale per group of tokens in a channel + entropy codec_quant
    5   clip-sparse   0.5 %/99.5 % per-channel clip, 8 bits, exact sparse         codec_quant
                      outliers (the original's "Nvenc LTX" quantization) + entropy
    6   lossless-t    temporal lossless: difference to the previous step          codec_temporal
    7   quant-t       temporal ``quant``: residual to the previous reconstruction codec_temporal
    8-14              reserved for this family
    15  auto          picks one of the above per link/GPU/fidelity; never on the  codec_auto
                      wire (it encodes with the codec it picked)
    ==  ============  ==========================================================  ================

Payload container shared by ids 2..7: ``meta`` holds small JSON parameters plus
``be`` (the entropy backend that coded the payload: ``"zstd"`` or ``"ans"``) and ``s``,
the section table ``[[kind, raw_len, stored_len], ...]``; the payload is the sections
back to back. ``kind`` 0 = stored as is, 1 = coded by ``be``. Every length is checked
against what the shape implies before anything is allocated. A zstd section is one
zstd frame with its content size and a checksum; an ANS section is one nvCOMP native
ANS bitstream (``|u1`` symbols). A payload coded by ``ans`` decodes only where nvCOMP
and CUDA are present: elsewhere ``BackendUnavailable`` (a ``CodecError``) names the fix,
and a section that did not compress is stored, so it decodes anywhere.

Non-finite values: ``lossless`` carries NaN/Inf bit-exactly; the lossy codecs apply the
policy of ``codec.py`` (NaN -> 0, +-Inf -> +-largest finite magnitude of the channel).
"""

from __future__ import annotations

import ctypes
import dataclasses
import importlib
import math
import sys
import threading
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch

from .codec import Codec, RawCodec, dtype_name, host_view, numel, register, to_bytes, torch_dtype
from .constants import ANS_CHUNK_BYTES, MAX_BODY_BYTES
from .errors import BackendUnavailable, CodecError, LocalError
from .protocol import WireTensor

# Largest tensor (in bytes) a payload may expand to: what could have been sent raw.
MAX_DECODED_BYTES = MAX_BODY_BYTES
# Coded sections decoded in one batch may declare at most this many times the tensor's bytes
# (checked before allocating; our codecs need at most ~5.5x: clip-sparse, every value an outlier).
BATCH_EXPANSION = 8
BACKENDS = ("zstd", "ans")
LOSSY_DTYPES = ("float32", "float16", "bfloat16")

ZSTD_HINT = "pip install zstandard (or: pip install 'comfyui-mesh[codecs]')"
NVCOMP_HINT = (
    "pip install nvidia-nvcomp-cu12 nvidia-libnvcomp-cu12 (-cu13 for a CUDA 13 torch) on a machine with an NVIDIA GPU"
)

# ---------------------------------------------------------------------------- untrusted meta


def meta_int(meta: dict[str, Any], key: str, lo: int, hi: int) -> int:
    v = meta.get(key)
    if not isinstance(v, int) or isinstance(v, bool) or not lo <= v <= hi:
        raise CodecError(f"codec meta {key!r} = {v!r} is not an integer in {lo}..{hi}")
    return v


def meta_float(meta: dict[str, Any], key: str, positive: bool = False) -> float:
    v = meta.get(key)
    if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v) or (positive and v <= 0):
        raise CodecError(f"codec meta {key!r} = {v!r} is not a finite{' positive' if positive else ''} number")
    return float(v)


def meta_str(meta: dict[str, Any], key: str, allowed: tuple[str, ...]) -> str:
    v = meta.get(key)
    if v not in allowed:
        raise CodecError(f"codec meta {key!r} = {v!r} is not one of {list(allowed)}")
    return str(v)


def param_float(params: dict[str, Any], key: str, default: float, lo: float, hi: float) -> float:
    """A caller's codec parameter (our side: misuse is a LocalError)."""
    v = params.get(key, default)
    if not isinstance(v, (int, float)) or isinstance(v, bool) or not (lo <= v <= hi):
        raise LocalError(f"codec parameter {key}={v!r} must be a number in [{lo}, {hi}]")
    return float(v)


def param_int(params: dict[str, Any], key: str, default: int, lo: int, hi: int) -> int:
    v = params.get(key, default)
    if not isinstance(v, int) or isinstance(v, bool) or not (lo <= v <= hi):
        raise LocalError(f"codec parameter {key}={v!r} must be an integer in {lo}..{hi}")
    return v


# ---------------------------------------------------------------------------- backends


class Backend:
    name: ClassVar[str]

    def available(self) -> str | None:
        raise NotImplementedError

    def compress(self, u8: torch.Tensor) -> Any:
        """1-D uint8 tensor -> compressed bytes (zstd: a bytes object; ans: a CUDA uint8 tensor)."""
        raise NotImplementedError

    def compress_many(self, rows: list[torch.Tensor]) -> list[Any]:
        """Several sections at once (a backend may batch them); same results as one by one."""
        return [self.compress(r) for r in rows]

    def decompress(self, comp: memoryview, n: int, device: torch.device) -> torch.Tensor:
        """Compressed bytes -> 1-D uint8 tensor of exactly ``n`` bytes on ``device``."""
        raise NotImplementedError

    def decompress_many(self, payload: torch.Tensor, host: memoryview, items: list[tuple[int, int, int]]) -> list[Any]:
        """Several sections of one payload at once: ``items`` are (offset, stored, raw) byte
        counts into ``payload`` (the whole payload, already on the device) and ``host`` (the
        same bytes on the host). Returns uint8 tensors of ``raw`` bytes on payload's device."""
        return [self.decompress(host[o : o + m], n, payload.device) for o, m, n in items]


class ZstdBackend(Backend):
    """zstd, one frame per section, tuned for symbol streams (little LZ, Huffman literals).

    ``min_match=7`` and a tiny hash table keep the match finder from spending bits on the
    short accidental matches that noise-like quantized data is full of (measured: 0.1-0.15
    bit/value less than level 1 at the same speed). The frame carries a checksum."""

    name = "zstd"

    def __init__(self) -> None:
        self._tls = threading.local()
        self._mod: Any = None

    def _zstd(self) -> Any:
        if self._mod is None:
            try:
                self._mod = importlib.import_module("zstandard")
            except ImportError:
                return None
        return self._mod

    def available(self) -> str | None:
        return None if self._zstd() is not None else f"the zstd entropy coder is not installed: {ZSTD_HINT}"

    def _ctx(self) -> tuple[Any, Any]:
        ctx = getattr(self._tls, "ctx", None)
        if ctx is None:
            zs = self._zstd()
            p = zs.ZstdCompressionParameters.from_level(
                1,
                min_match=7,
                search_log=1,
                hash_log=6,
                window_log=17,
                strategy=zs.STRATEGY_FAST,
                write_checksum=True,
                write_content_size=True,
            )
            ctx = (zs.ZstdCompressor(compression_params=p), zs.ZstdDecompressor())
            self._tls.ctx = ctx
        return ctx

    def compress(self, u8: torch.Tensor) -> Any:
        return self._ctx()[0].compress(to_bytes(u8))

    def decompress(self, comp: memoryview, n: int, device: torch.device) -> torch.Tensor:
        zs = self._zstd()
        if zs is None:
            raise BackendUnavailable(f"payload is zstd-coded but {ZSTD_HINT.split(' (')[0]} first", "zstd")
        try:
            size = zs.frame_content_size(comp)
        except zs.ZstdError as e:
            raise CodecError(f"zstd section is not a zstd frame: {e}") from None
        if size != n:
            raise CodecError(f"zstd section declares {size} bytes, the header says {n}")
        try:
            out = self._ctx()[1].decompress(comp, max_output_size=n)
        except zs.ZstdError as e:
            raise CodecError(f"zstd section does not decode: {e}") from None
        if len(out) != n:
            raise CodecError(f"zstd section decoded to {len(out)} bytes, expected {n}")
        t = torch.frombuffer(bytearray(out), dtype=torch.uint8) if n else torch.empty(0, dtype=torch.uint8)
        return t.to(device)


_NV: dict[str, Any] = {}


def _import_nvcomp() -> tuple[Any, str | None]:
    """(module, None) or (None, why). The libnvcomp wheel's .so must be loadable first."""
    if "mod" in _NV or "why" in _NV:
        return _NV.get("mod"), _NV.get("why")
    err: BaseException | None = None
    for attempt in (0, 1):
        try:
            mod = importlib.import_module("nvidia.nvcomp")
            _NV["mod"] = mod
            return mod, None
        except (ImportError, OSError) as e:
            err = e
            if attempt == 0 and not _preload_libnvcomp():
                break
    _NV["why"] = f"nvCOMP is not importable ({type(err).__name__}: {err}); {NVCOMP_HINT}"
    return None, _NV["why"]


def _preload_libnvcomp() -> bool:
    """Load libnvcomp.so.* from the nvidia-libnvcomp wheel (its lib64/ is not on the loader path)."""
    for base in sys.path:
        lib = Path(base or ".") / "nvidia" / "libnvcomp" / "lib64"
        if not lib.is_dir():
            continue
        for so in sorted(lib.glob("libnvcomp.so*")):
            try:
                ctypes.CDLL(str(so), mode=ctypes.RTLD_GLOBAL)
            except OSError:
                continue
            importlib.invalidate_caches()
            return True
    return False


class AnsBackend(Backend):
    """nvCOMP ANS (``|u1`` symbols, native bitstream with per-chunk frequency tables) on CUDA.

    Runs on the caller's current CUDA stream, so it orders with torch work. CI has no GPU: this
    class is exercised on a device GPU (H200, nvCOMP 6.0.0.12, tests/test_codec_entropy.py and
    bench/ans_speed.py; docs/BENCHMARKS.md). All sections of a payload go through one batched
    call; chunks of ``ANS_CHUNK_BYTES`` (the decoder reads the size from the bitstream)."""

    name = "ans"

    def __init__(self) -> None:
        self._tls = threading.local()  # nvCOMP codec objects are not shared between threads

    def available(self) -> str | None:
        if not torch.cuda.is_available():
            return f"nvCOMP ANS needs a CUDA GPU and torch with CUDA (none here); {NVCOMP_HINT}"
        return _import_nvcomp()[1]

    @staticmethod
    def _device(device: torch.device) -> torch.device:
        return device if device.type == "cuda" else torch.device("cuda", torch.cuda.current_device())

    def _codec(self, dev: torch.device) -> tuple[Any, Any, int]:
        nv = _import_nvcomp()[0]
        idx = dev.index if dev.index is not None else torch.cuda.current_device()
        stream = torch.cuda.current_stream(idx).cuda_stream
        codecs = self._tls.__dict__.setdefault("codecs", {})
        key = (idx, stream, ANS_CHUNK_BYTES)
        c = codecs.get(key)
        if c is None:
            c = nv.Codec(
                algorithm="ANS", device_id=idx, cuda_stream=stream, data_type="|u1", uncomp_chunk_size=ANS_CHUNK_BYTES
            )
            codecs[key] = c
        return nv, c, stream

    # nvCOMP's outputs are read through __cuda_array_interface__ (torch.as_tensor keeps the nvCOMP
    # array alive), never torch.from_dlpack: on nvCOMP 6.0 + torch 2.11 (H200) a from_dlpack'd
    # output decoded to wrong bytes and later crashed the process with a double free.
    def compress(self, u8: torch.Tensor) -> Any:
        return self.compress_many([u8])[0]

    def compress_many(self, rows: list[torch.Tensor]) -> list[torch.Tensor]:
        """Every row in ONE batched nvCOMP call (one launch sequence, one sync for the sizes)."""
        dev = self._device(rows[0].device)
        sizes = [int(r.numel()) for r in rows]
        offsets, total = [], 0
        for n in sizes:  # each row on a 256-byte boundary (nvCOMP's alignment needs are smaller)
            offsets.append(total)
            total += -(-n // 256) * 256
        buf = torch.empty(total, dtype=torch.uint8, device=dev)
        for o, r, n in zip(offsets, rows, sizes, strict=True):
            buf[o : o + n].copy_(r.reshape(-1).view(torch.uint8))
        nv, c, stream = self._codec(dev)
        enc = c.encode(nv.as_arrays(buf, offsets, sizes, stream))
        comp = [int(m) for m in enc.buffer_sizes]
        parts = [torch.as_tensor(enc[i], device=dev).reshape(-1).view(torch.uint8)[:m] for i, m in enumerate(comp)]
        out = torch.cat(parts)  # our own memory from here on
        del parts, enc
        return list(out.split(comp))

    def decompress(self, comp: memoryview, n: int, device: torch.device) -> torch.Tensor:
        self._check_available()
        dev = self._device(device)
        (out,) = self.decompress_many(host_view(comp).to(dev), comp, [(0, comp.nbytes, n)])
        return out.to(device)

    def _check_available(self) -> None:
        why = self.available()
        if why:
            raise BackendUnavailable(
                f"payload was coded with nvCOMP ANS on a GPU; this side cannot decode it: {why}", "ans"
            )

    _host_headers: ClassVar[bool | None] = None  # does get_uncomp_buffer_size read host arrays?

    def _declared(self, nv: Any, c: Any, host: memoryview, dev: torch.Tensor, stream: int) -> int:
        """Size an nvCOMP bitstream declares: read from the host bytes where nvCOMP allows it
        (no device round trip), else from the device copy (one stream synchronization). A host
        read that fails is retried on the device: only when both fail is the section bad, and
        only a device success after a host failure turns the host path off."""
        if AnsBackend._host_headers is not False:
            try:
                n = int(c.get_uncomp_buffer_size(nv.as_array(np.frombuffer(host, dtype=np.uint8))))
                AnsBackend._host_headers = True
                return n
            except (RuntimeError, ValueError, TypeError):
                pass
        try:
            n = int(c.get_uncomp_buffer_size(nv.as_array(dev, stream)))
        except (RuntimeError, ValueError) as e:
            raise CodecError(f"ANS section is not an nvCOMP bitstream: {e}") from None
        if AnsBackend._host_headers is None:
            AnsBackend._host_headers = False
        return n

    def decompress_many(self, payload: torch.Tensor, host: memoryview, items: list[tuple[int, int, int]]) -> list[Any]:
        """Every section in ONE batched nvCOMP call, decoded into one buffer of ours.

        The size each bitstream declares must equal the section table's; nvCOMP then writes
        into fixed-capacity outputs."""
        self._check_available()
        dev = payload.device
        nv, c, stream = self._codec(dev)
        # nvCOMP wants aligned inputs: copy each section to a 256-byte boundary (device to device)
        in_offs, out_offs, tin, tout = [], [], 0, 0
        for _, m, n in items:
            in_offs.append(tin)
            out_offs.append(tout)
            tin += -(-m // 256) * 256
            tout += -(-n // 256) * 256
        src = torch.empty(tin, dtype=torch.uint8, device=dev)
        for (o, m, n), io in zip(items, in_offs, strict=True):
            src[io : io + m].copy_(payload[o : o + m])
            if self._declared(nv, c, host[o : o + m], src[io : io + m], stream) != n:
                raise CodecError(f"ANS section declares another size than the {n} bytes the header says")
        out = torch.empty(tout, dtype=torch.uint8, device=dev)
        ins = nv.as_arrays(src, in_offs, [m for _, m, _ in items], stream)
        outs = nv.as_arrays(out, out_offs, [n for _, _, n in items], stream)
        try:
            try:
                c.decode(ins, data_type="|u1", out=outs)
            except TypeError:  # an nvCOMP without ``out=`` for batches: copy its outputs into ours
                res = c.decode(ins, data_type="|u1")
                for i, (oo, (_, _, n)) in enumerate(zip(out_offs, items, strict=True)):
                    got = torch.as_tensor(res[i], device=dev).reshape(-1).view(torch.uint8)
                    if got.numel() != n:
                        raise CodecError(f"ANS section decoded to {got.numel()} bytes, expected {n}") from None
                    out[oo : oo + n].copy_(got)
        except (RuntimeError, ValueError) as e:
            raise CodecError(f"ANS sections do not decode: {e}") from None
        return [out[oo : oo + n] for oo, (_, _, n) in zip(out_offs, items, strict=True)]


ZSTD = ZstdBackend()
ANS = AnsBackend()
_BACKENDS: dict[str, Backend] = {"zstd": ZSTD, "ans": ANS}


def backend(name: str) -> Backend:
    return _BACKENDS[name]


def pick_backend(params: dict[str, Any], device: torch.device) -> Backend:
    """``params["backend"]``: "auto" (default: ANS for a CUDA tensor when nvCOMP works, else
    zstd), "zstd" or "ans". Refuses (LocalError) a backend that cannot run here."""
    want = params.get("backend", "auto")
    if want not in ("auto", *BACKENDS):
        raise LocalError(f"codec parameter backend={want!r} must be one of auto, zstd, ans")
    if want == "auto":
        want = "ans" if device.type == "cuda" and ANS.available() is None else "zstd"
    b = _BACKENDS[want]
    why = b.available()
    if why:
        raise LocalError(f"entropy backend {want!r} is not usable here: {why}")
    return b


# ---------------------------------------------------------------------------- sections


class SectionWriter:
    """Collects a payload's sections: ``raw`` (side info, stored) and ``coded`` (entropy-coded).

    Coded sections are compressed together in ``finish`` (one batched call on the GPU)."""

    def __init__(self, be: Backend):
        self.be = be
        self.on_device = be is ANS  # ANS parts stay on the GPU until one copy at the end
        self.parts: list[Any] = []
        self.table: list[list[int]] = []
        self.pending: list[int] = []  # indices of coded sections not compressed yet
        self._empty: Any = None if self.on_device else b""

    def _put(self, u8: torch.Tensor) -> Any:
        return u8.to(ANS._device(u8.device)) if self.on_device else to_bytes(u8)

    def raw(self, t: torch.Tensor) -> None:
        u8 = t.detach().contiguous().reshape(-1).view(torch.uint8)
        self.parts.append(self._put(u8))
        self.table.append([0, u8.numel(), u8.numel()])

    def empty(self, k: int = 1) -> None:
        """``k`` zero-length sections (what ``raw``/``coded`` of an empty tensor would add)."""
        self.table.extend([0, 0, 0] for _ in range(k))
        self.parts.extend([self._empty] * k)

    def coded(self, u8: torch.Tensor) -> None:
        u8 = u8.detach().contiguous().reshape(-1)
        if u8.dtype != torch.uint8:
            u8 = u8.view(torch.uint8)
        n = u8.numel()
        if n < 64:
            self.parts.append(self._put(u8))
            self.table.append([0, n, n])
            return
        self.pending.append(len(self.parts))
        self.parts.append(u8.to(ANS._device(u8.device)) if self.on_device else u8)
        self.table.append([1, n, n])

    def _compress_pending(self) -> None:
        if not self.pending:
            return
        comps = self.be.compress_many([self.parts[i] for i in self.pending])
        for i, comp in zip(self.pending, comps, strict=True):
            n = self.table[i][1]
            m = comp.numel() if isinstance(comp, torch.Tensor) else len(comp)
            if m >= n:  # did not compress: stored, so it decodes anywhere
                self.parts[i] = self.parts[i] if self.on_device else to_bytes(self.parts[i])
                self.table[i] = [0, n, n]
            else:
                self.parts[i] = comp if isinstance(comp, torch.Tensor) else memoryview(comp)
                self.table[i] = [1, n, m]
        self.pending = []

    def finish(self, meta: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
        self._compress_pending()
        meta = {**meta, "be": self.be.name, "s": self.table}
        if self.on_device:
            parts = [p for p in self.parts if p is not None and p.numel()]
            data: Any = to_bytes(torch.cat(parts)) if parts else b""
        else:
            data = b"".join(self.parts)
        return data, meta


class SectionReader:
    """Reads sections back in order, each checked against the size the caller expects."""

    def __init__(self, wt: WireTensor, device: torch.device | str, coded_limit: int | None = None):
        """``coded_limit``: most bytes the coded sections may declare in all (checked before a
        batched decode allocates); default ``BATCH_EXPANSION`` x the tensor's bytes. A codec
        whose format can expand more (q4's padded groups) passes its own bound."""
        self.device = torch.device(device)
        self.data = memoryview(wt.data).cast("B") if memoryview(wt.data).nbytes else memoryview(b"")
        self.be_name = meta_str(wt.meta, "be", BACKENDS)
        table = wt.meta.get("s")
        if not isinstance(table, list) or len(table) > 64:
            raise CodecError(f"codec meta 's' of {wt.name!r} must be a list of at most 64 sections")
        total = 0
        for e in table:
            if (
                not isinstance(e, list)
                or len(e) != 3
                or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in e)
                or e[0] not in (0, 1)
                or e[1] > MAX_DECODED_BYTES
                or (e[0] == 0 and e[1] != e[2])
                or (e[0] == 1 and (e[1] == 0 or e[2] == 0))  # a coded section holds something
            ):
                raise CodecError(f"bad section entry {e!r} in the payload of {wt.name!r}")
            total += e[2]
        if total != self.data.nbytes:
            raise CodecError(f"sections of {wt.name!r} add up to {total} bytes but the payload has {self.data.nbytes}")
        self.table = table
        self.name = wt.name
        self.i = 0
        self.off = 0
        # ANS payloads decoded on a GPU: the whole payload crosses to the device in one copy and
        # every coded section is decoded in one batched call, the first time one is asked for.
        self.batched = self.be_name == "ans" and self.device.type == "cuda" and self.data.nbytes > 0
        itemsize = torch.empty((), dtype=torch_dtype(wt.dtype)).element_size()
        self.limit = BATCH_EXPANSION * check_shape(wt) * itemsize if coded_limit is None else coded_limit
        self._payload: torch.Tensor | None = None
        self._decoded: dict[int, torch.Tensor] = {}

    def _next(self, n: int, what: str) -> tuple[int, memoryview, int]:
        if self.i >= len(self.table):
            raise CodecError(f"payload of {self.name!r} lacks its {what} section")
        kind, raw, stored = self.table[self.i]
        if raw != n:
            raise CodecError(f"{what} section of {self.name!r} holds {raw} bytes, expected {n}")
        off = self.off
        self.i += 1
        self.off += stored
        return kind, self.data[off : off + stored], off

    def _stored(self, chunk: memoryview, off: int) -> torch.Tensor:
        """A stored section as a fresh uint8 tensor on the device."""
        if self._payload is not None or self.batched:
            return self.payload()[off : off + chunk.nbytes].clone()
        return host_view(chunk).to(self.device, copy=True)

    def payload(self) -> torch.Tensor:
        """The whole payload on the device (copied once)."""
        if self._payload is None:
            self._payload = host_view(self.data).to(self.device)
        return self._payload

    def raw(self, dtype: torch.dtype, count: int, what: str) -> torch.Tensor:
        """A stored section as a fresh tensor on the device."""
        return self.raw_both(dtype, count, what)[1]

    def skip_empty(self, k: int, what: str) -> None:
        """Consume ``k`` sections that must be empty and stored."""
        for j in range(k):
            if self._next(0, f"{what} section {j}")[0] != 0:
                raise CodecError(f"{what} section {j} of {self.name!r} must be stored, not coded")

    def raw_host(self, dtype: torch.dtype, count: int, what: str) -> torch.Tensor:
        """A stored section read on the host only (a read-only view of the received bytes)."""
        return self.raw_both(dtype, count, what, device_copy=False)[0]

    def raw_both(
        self, dtype: torch.dtype, count: int, what: str, device_copy: bool = True
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """A stored section on the host (to check or read without a device round trip) and on
        the device."""
        itemsize = torch.empty((), dtype=dtype).element_size()
        kind, chunk, off = self._next(count * itemsize, what)
        if kind != 0:
            raise CodecError(f"{what} section of {self.name!r} must be stored, not coded")
        host = host_view(chunk).view(dtype) if count else torch.empty(0, dtype=dtype)
        if not device_copy:
            return host, host
        if self.device.type == "cpu":
            return host, host.clone()
        return host, (self._stored(chunk, off).view(dtype) if count else host.to(self.device))

    def coded(self, n: int, what: str) -> torch.Tensor:
        i = self.i
        kind, chunk, off = self._next(n, what)
        if n == 0:
            return torch.empty(0, dtype=torch.uint8, device=self.device)
        if kind == 0:
            return self._stored(chunk, off)
        if not self.batched:
            return _BACKENDS[self.be_name].decompress(chunk, n, self.device)
        if i not in self._decoded:
            self._decode_rest(i, off)
        return self._decoded.pop(i)

    def _decode_rest(self, i: int, off: int) -> None:
        """Decode coded sections i.. in one batched call, after bounding what they declare."""
        items, idx = [], []
        for j in range(i, len(self.table)):
            kind, raw, stored = self.table[j]
            if kind == 1:
                items.append((off, stored, raw))
                idx.append(j)
            off += stored
        total = sum(n for _, _, n in items)
        if total > self.limit:
            raise CodecError(f"coded sections of {self.name!r} declare {total} bytes, more than its format allows")
        outs = _BACKENDS[self.be_name].decompress_many(self.payload(), self.data, items)
        self._decoded = dict(zip(idx, outs, strict=True))

    def done(self) -> None:
        if self.i != len(self.table):
            raise CodecError(f"payload of {self.name!r} has {len(self.table) - self.i} unexpected extra sections")


# ---------------------------------------------------------------------------- helpers


def planes(t: torch.Tensor, host_numpy: bool = True) -> list[torch.Tensor]:
    """Byte planes of a tensor's values: plane j holds byte j (little-endian) of every value.

    A 16-bit value gives [low byte, high byte]: the high byte of bf16/fp16 is the sign and
    the exponent, the compressible part. Arithmetic shifts on the GPU, numpy strided copies
    on the CPU (both far faster than a uint8 transpose in torch)."""
    k = t.element_size()
    u8 = t.detach().contiguous().reshape(-1).view(torch.uint8)
    if k == 1:
        return [u8]
    if u8.device.type == "cpu" and host_numpy:
        a = u8.numpy().reshape(-1, k)
        return [torch.from_numpy(a[:, j].copy()) for j in range(k)]
    v = u8.view({2: torch.int16, 4: torch.int32, 8: torch.int64}[k])
    return [(v >> (8 * j)).to(torch.uint8) for j in range(k)]


def unplanes(rows: list[torch.Tensor], dtype: torch.dtype, host_numpy: bool = True) -> torch.Tensor:
    """Inverse of ``planes``: 1-D tensor of ``dtype``."""
    k = len(rows)
    if k == 1:
        return rows[0].view(dtype)
    n = rows[0].numel()
    if rows[0].device.type == "cpu" and host_numpy:
        out = torch.empty(n * k, dtype=torch.uint8)
        a = out.numpy().reshape(-1, k)
        for j, r in enumerate(rows):
            a[:, j] = r.numpy()
        return out.view(dtype)
    it = {2: torch.int16, 4: torch.int32, 8: torch.int64}[k]
    v = rows[k - 1].to(it)
    for j in range(k - 2, -1, -1):
        v.bitwise_left_shift_(8).bitwise_or_(rows[j].to(it))
    return v.view(dtype)


def put_planes(w: SectionWriter, t: torch.Tensor) -> None:
    """Entropy-code a tensor exactly, one section per byte plane (16-bit: low byte, high byte)."""
    for row in planes(t):
        w.coded(row)


def get_planes(r: SectionReader, dtype: torch.dtype, count: int, what: str) -> torch.Tensor:
    k = torch.empty((), dtype=dtype).element_size()
    if k == 1:
        return r.coded(count, what).view(dtype)
    return unplanes([r.coded(count, f"{what} byte {j}") for j in range(k)], dtype)


def sanitize(x: torch.Tensor, dim: int = 0) -> torch.Tensor:
    """The lossy non-finite policy on a float32 2-D tensor whose channels run along the other
    axis than ``dim`` (tokens): NaN -> 0, +-Inf -> +-the channel's largest finite magnitude."""
    if bool(torch.isfinite(x.sum(dim)).all()):  # one cheap reduction; an overflow only costs the slow path
        return x
    finite = torch.nan_to_num(x, nan=0.0, posinf=0.0, neginf=0.0)
    absmax = finite.abs().amax(dim=dim, keepdim=True).expand_as(x)
    out = torch.where(torch.isposinf(x), absmax, finite)
    return torch.where(torch.isneginf(x), -absmax, out)


def channel_major(t: torch.Tensor) -> torch.Tensor:
    """A fresh float32 [C, N] copy of ``t`` viewed as [N, C] (C = last axis), with the lossy
    non-finite policy applied: the layout every quantizer works in (safe to modify)."""
    x = t.detach().reshape(-1, t.shape[-1])
    if x.dtype in (torch.float16, torch.bfloat16):  # transpose 16-bit words, then widen: 2x faster
        xt = x.view(torch.int16).t().contiguous().view(x.dtype).float()
    else:
        xt = torch.empty((x.shape[1], x.shape[0]), dtype=torch.float32, device=x.device).copy_(x.t())
    return sanitize(xt, dim=1)


def float_input(t: torch.Tensor, name: str, codec: str) -> str:
    dname = dtype_name(t.dtype)
    if dname not in LOSSY_DTYPES:
        raise LocalError(
            f"{codec} codec needs a float16/bfloat16/float32 tensor; {name!r} is {dname}: send it raw or lossless"
        )
    return dname


def check_shape(wt: WireTensor) -> int:
    """Elements of ``wt``'s shape, refusing tensors larger than a frame could carry raw."""
    n = numel(wt.shape)
    if n * torch.empty((), dtype=torch_dtype(wt.dtype)).element_size() > MAX_DECODED_BYTES:
        raise CodecError(f"{wt.name!r}: shape {list(wt.shape)} x {wt.dtype} exceeds {MAX_DECODED_BYTES} bytes")
    return n


class EntropyCodec(Codec):
    """Base of ids 2..7: 0-d and empty tensors go raw (``meta {"raw": true}``); decode
    turns anything a malformed payload can raise into ``CodecError``."""

    lossless = False

    def available(self) -> str | None:
        return ZSTD.available()

    def raw_fallback(self, t: torch.Tensor, name: str) -> WireTensor | None:
        if t.ndim == 0 or t.numel() == 0:
            raw = RawCodec().encode(t, name, {})
            return dataclasses.replace(raw, codec=self.wire_id, meta={"raw": True})
        return None

    def decode(self, wt: WireTensor, device: torch.device | str, state: dict[Any, Any] | None = None) -> torch.Tensor:
        if wt.meta.get("raw") is True:
            return RawCodec().decode(wt, device)
        if len(wt.shape) == 0:
            raise CodecError(f"{self.name} payload for {wt.name!r} has a 0-d shape but is not raw")
        check_shape(wt)
        try:
            return self._decode(wt, torch.device(device), state)
        except CodecError:
            raise
        except (RuntimeError, ValueError, TypeError, IndexError, OverflowError, KeyError) as e:
            raise CodecError(f"cannot decode {wt.name!r} with codec {self.name}: {type(e).__name__}: {e}") from e

    def _decode(self, wt: WireTensor, device: torch.device, state: dict[Any, Any] | None) -> torch.Tensor:
        raise NotImplementedError


# ---------------------------------------------------------------------------- lossless


class LosslessCodec(EntropyCodec):
    """Exact, any dtype: the values' bytes split into planes (bf16/fp16: high byte = sign +
    exponent, low byte = mantissa), each plane entropy-coded (zstd or nvCOMP ANS).

    ``meta``: ``be``, ``s``, ``l`` (layout: ``"r"`` row-major as given, ``"c"`` channel-major,
    i.e. the last axis first, which groups each channel's exponents). Error budget: none,
    bit-exact including NaN payloads and -0.0. Gains come from the exponent byte: expect
    ~1.3-1.5x on bf16 activations, ~1.1x on fp32."""

    wire_id = 2
    name = "lossless"
    lossless = True

    def encode(self, t: torch.Tensor, name: str, params: dict[str, Any]) -> WireTensor:
        dname = dtype_name(t.dtype)
        fb = self.raw_fallback(t, name)
        if fb is not None:
            return fb
        layout = params.get("layout", "c")
        if layout not in ("r", "c"):
            raise LocalError(f"lossless layout={layout!r} must be 'r' (row-major) or 'c' (channel-major)")
        x = t.detach()
        if layout == "c" and x.ndim >= 2:
            x = x.reshape(-1, x.shape[-1]).t()
        else:
            layout = "r"
        w = SectionWriter(pick_backend(params, t.device))
        if layout == "c" and x.element_size() == 2:
            x = x.view(torch.int16)  # transposing 16-bit words is much faster than half floats
        put_planes(w, x.contiguous())
        data, meta = w.finish({"l": layout})
        return WireTensor(name, dname, tuple(t.shape), self.wire_id, data, meta)

    def _decode(self, wt: WireTensor, device: torch.device, state: dict[Any, Any] | None) -> torch.Tensor:
        dtype = torch_dtype(wt.dtype)
        n = numel(wt.shape)
        layout = meta_str(wt.meta, "l", ("r", "c"))
        r = SectionReader(wt, device)
        flat = get_planes(r, dtype, n, "value")
        r.done()
        if layout == "c" and len(wt.shape) >= 2 and wt.shape[-1]:
            c = wt.shape[-1]
            words = flat.view(torch.int16) if flat.element_size() == 2 else flat
            return words.reshape(c, n // c).t().contiguous().view(dtype).reshape(wt.shape)
        return flat.reshape(wt.shape)


register(LosslessCodec())

# The other members of the family register themselves on import.
from . import codec_auto, codec_quant, codec_temporal  # noqa: E402,F401
