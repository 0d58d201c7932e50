"""Entropy backends of the section container: zstd on the CPU, nvCOMP ANS on the GPU.

A zstd section is one zstd frame with its content size and a checksum; an ANS section is one
nvCOMP native ANS bitstream (``|u1`` symbols). A payload coded by ``ans`` decodes only where
nvCOMP and CUDA are present: elsewhere ``BackendUnavailable`` (a ``CodecError``) names the fix.
"""

from __future__ import annotations

import ctypes
import importlib
import sys
import threading
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch

from ..constants import ANS_CHUNK_BYTES, CODECS_EXTRA_HINT
from ..errors import BackendUnavailable, CodecError, LocalError
from .base import host_view, optional_import, to_bytes

BACKENDS = ("zstd", "ans")

ZSTD_HINT = f"pip install zstandard (or: {CODECS_EXTRA_HINT})"
NVCOMP_HINT = (
    "pip install nvidia-nvcomp-cu12 nvidia-libnvcomp-cu12 (-cu13 for a CUDA 13 torch) on a machine with an NVIDIA GPU"
)


class Backend:
    name: ClassVar[str]
    on_device: ClassVar[bool] = False  # coded sections stay on the GPU until one copy at the end

    def available(self) -> str | None:
        raise NotImplementedError

    def device(self, device: torch.device) -> torch.device:
        """Where this backend codes a tensor that lives on ``device``."""
        return device

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
        if not n:
            return torch.empty(0, dtype=torch.uint8, device=device)
        # Straight into the one buffer the tensor keeps (a one-shot decompress returns bytes that
        # would have to be copied: a highly compressible section would be held twice).
        buf = bytearray(n)
        view = memoryview(buf)
        got = 0
        try:
            with self._ctx()[1].stream_reader(comp, read_across_frames=False) as r:
                while got < n:
                    k = r.readinto(view[got:])
                    if not k:
                        break
                    got += k
                extra = r.read(1) if got == n else b""
        except zs.ZstdError as e:
            raise CodecError(f"zstd section does not decode: {e}") from None
        if got != n or extra:
            raise CodecError(f"zstd section decoded to {'more than ' if extra else ''}{got} bytes, expected {n}")
        return torch.frombuffer(buf, dtype=torch.uint8).to(device)


def nvcomp_module() -> tuple[Any, str | None]:
    """(module, None) or (None, why). The libnvcomp wheel's .so must be loadable first."""
    return optional_import("nvidia.nvcomp", NVCOMP_HINT, prepare=_preload_libnvcomp)


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
    on_device = True

    def __init__(self) -> None:
        self._tls = threading.local()  # nvCOMP codec objects are not shared between threads

    def available(self) -> str | None:
        if not torch.cuda.is_available():
            return f"nvCOMP ANS needs a CUDA GPU and torch with CUDA (none here); {NVCOMP_HINT}"
        return nvcomp_module()[1]

    def device(self, device: torch.device) -> torch.device:
        return device if device.type == "cuda" else torch.device("cuda", torch.cuda.current_device())

    def _codec(self, dev: torch.device) -> tuple[Any, Any, int]:
        nv = nvcomp_module()[0]
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
        dev = self.device(rows[0].device)
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
        dev = self.device(device)
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
