"""The section container shared by the entropy-coded codecs (ids 2..7), and byte planes.

``meta`` holds small JSON parameters plus ``be`` (the entropy backend that coded the
payload: ``"zstd"`` or ``"ans"``) and ``s``, the section table ``[[kind, raw_len,
stored_len], ...]``; the payload is the sections back to back. ``kind`` 0 = stored as is,
1 = coded by ``be``. Every length is checked against what the shape implies before
anything is allocated. A section that did not compress is stored, so it decodes anywhere.
"""

from __future__ import annotations

from typing import Any

import torch

from ..errors import CodecError
from ..protocol import WireTensor
from .backends import BACKENDS, ZSTD, Backend, backend
from .base import MAX_DECODED_BYTES, Codec, byte_view, check_shape, host_view, itemsize, to_bytes, torch_dtype
from .channels import meta_str

# Coded sections decoded in one batch may declare at most this many times the tensor's bytes
# (checked before allocating; our codecs need at most ~5.5x: clip-sparse, every value an outlier).
BATCH_EXPANSION = 8


class SectionWriter:
    """Collects a payload's sections: ``raw`` (side info, stored) and ``coded`` (entropy-coded).

    Coded sections are compressed together in ``finish`` (one batched call on the GPU)."""

    def __init__(self, be: Backend):
        self.be = be
        self.on_device = be.on_device  # ANS parts stay on the GPU until one copy at the end
        self.parts: list[Any] = []
        self.table: list[list[int]] = []
        self.pending: list[int] = []  # indices of coded sections not compressed yet
        self._empty: Any = None if self.on_device else b""

    def _put(self, u8: torch.Tensor) -> Any:
        return u8.to(self.be.device(u8.device)) if self.on_device else to_bytes(u8)

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
        self.parts.append(u8.to(self.be.device(u8.device)) if self.on_device else u8)
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
        self.data = byte_view(wt.data)
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
        self.limit = (
            BATCH_EXPANSION * check_shape(wt) * itemsize(torch_dtype(wt.dtype)) if coded_limit is None else coded_limit
        )
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
        kind, chunk, off = self._next(count * itemsize(dtype), what)
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
            return backend(self.be_name).decompress(chunk, n, self.device)
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
        outs = backend(self.be_name).decompress_many(self.payload(), self.data, items)
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
    k = itemsize(dtype)
    if k == 1:
        return r.coded(count, what).view(dtype)
    return unplanes([r.coded(count, f"{what} byte {j}") for j in range(k)], dtype)


class EntropyCodec(Codec):
    """Base of ids 2..7: payloads in the section container, coded by an entropy backend."""

    lossless = False
    uses_entropy_backend = True

    def available(self) -> str | None:
        return ZSTD.available()
