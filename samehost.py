"""The same-host fast path (docs/PROTOCOL.md §11): seam tensors through shared memory, TCP for control.

**Proof.** A server with the fast path on holds a ``HostSecret``: 32 random bytes in a
``multiprocessing.shared_memory`` segment with a random name (POSIX shared memory is created mode
0600: only processes of this user on this host, and in this /dev/shm namespace, can open it). The
CHALLENGE names the segment; a client that can read it answers with HMAC(secret, nonces) in AUTH,
and the server's WELCOME says whether the proof held. Nothing is assumed from the address: a
container, an SSH tunnel or a port forward on 127.0.0.1 cannot read the segment, and the session
stays on TCP with one logged reason.

**Data plane** (``Channel``, one per connection and side). Each side writes the payloads it sends
into its own segment (one per direction, grown on demand, bounded by ``max_bytes``, unlinked when
the connection ends; names derived from the secret and both nonces, so a peer can make this side
map only segments of this connection) and the descriptor carries ``meta.shm = [name, offset,
length]`` with an empty payload. A CUDA tensor sent raw travels as a CUDA IPC handle instead
(``meta.cuda``, torch's own ``_share_cuda_`` / ``_new_shared_cuda`` pair, the one
``torch.multiprocessing`` uses) when the peer announced that it sees the tensor's GPU. The receiver
copies every payload out before it answers, so the sender may reuse its segment (and free its CUDA
memory) once the reply (or the next request) has arrived. Where a CUDA GPU takes the tensors, the
segments are page-locked with ``cudaHostRegister`` (through ``torch.cuda.cudart()``), so the copies
between them and the GPU run at DMA speed. Shared-memory bytes are not encrypted: they never leave
the host and only this user can map them.
"""

from __future__ import annotations

import atexit
import dataclasses
import hashlib
import hmac
import logging
import os
import re
import secrets
import threading
from multiprocessing import resource_tracker, shared_memory
from typing import Any

import numpy as np
import torch

from . import codec
from .errors import CodecError, RemoteProtocolError
from .protocol import Message, WireTensor
from .wirecodecs.base import dtype_name, itemsize, numel, torch_dtype

log = logging.getLogger("comfyui_mesh")

SECRET_BYTES = 32
PROOF_CHARS = 64  # HMAC-SHA256, lowercase hex
# Tensors smaller than this stay in the frame (a shared-memory descriptor is not much smaller).
MIN_SHM_BYTES = 4096
ALIGN = 64  # each payload starts on a 64-byte boundary of its segment
MIN_SEGMENT_BYTES = 1 << 20
MAX_GPUS = 64  # GPU ids one side may announce
# The start of the error a receiver answers when it cannot open a CUDA IPC handle: the client then
# sends CUDA tensors through the segments for the rest of the connection.
IPC_FAILED = "cannot open its CUDA IPC handle"
_SECRET_NAME = re.compile(r"mh[0-9a-f]{24}p\Z")
_GPU_ID = re.compile(r"[0-9A-Za-z-]{1,64}\Z")
_TORCH_REF = re.compile(rb"/torch_[0-9A-Za-z_]{1,64}\Z")  # torch's IPC reference-counter files
_HEX = re.compile(r"(?:[0-9a-f]{2}){1,256}\Z")

# Segments this process created: attaching one of them again (a server and a client in one process,
# the tests) must leave its resource-tracker registration alone.
_CREATED: set[str] = set()
_CREATED_LOCK = threading.Lock()
# Those still linked, by name: unlinked at interpreter exit too, so a process that never closed its
# connections (a script, ComfyUI stopped with Ctrl-C) leaves nothing in /dev/shm and the resource
# tracker has nothing to warn about.
_LIVE: dict[str, shared_memory.SharedMemory] = {}


@atexit.register
def _unlink_all_at_exit() -> None:
    with _CREATED_LOCK:
        live = list(_LIVE.values())
    for seg in live:
        _unlink(seg)


def _buf(seg: shared_memory.SharedMemory) -> memoryview:
    buf = seg.buf
    assert buf is not None, "segment already closed"
    return buf


def _create(name: str, size: int) -> shared_memory.SharedMemory:
    seg = shared_memory.SharedMemory(name=name, create=True, size=size)
    with _CREATED_LOCK:
        _CREATED.add(seg.name)
        _LIVE[seg.name] = seg
    return seg


def _unlink(seg: shared_memory.SharedMemory) -> None:
    with _CREATED_LOCK:
        _CREATED.discard(seg.name)
        _LIVE.pop(seg.name, None)
    try:
        seg.unlink()
    except FileNotFoundError:
        pass
    _close(seg)


def _close(seg: shared_memory.SharedMemory) -> None:
    try:
        seg.close()
    except BufferError:  # a view is still alive somewhere: the mapping goes with it
        pass


def _attach(name: str) -> shared_memory.SharedMemory:
    """Open another process's segment without taking ownership: Python before 3.13 registers
    every attached segment with this process's resource tracker, which would unlink it at exit."""
    # Attach and unregister as one step: the tracker keeps a set of names, so two threads attaching
    # the same segment (clients proving the same host at once) would register it once and unregister
    # it twice, and the tracker process prints a KeyError traceback.
    with _CREATED_LOCK:
        seg = shared_memory.SharedMemory(name=name)
        mine = seg.name in _CREATED
        if not mine and os.name == "posix":  # only POSIX registers attached segments
            try:
                resource_tracker.unregister(seg._name, "shared_memory")  # type: ignore[attr-defined]
            except Exception:  # noqa: BLE001 - no tracker (Windows): nothing to undo
                pass
    return seg


def _mac(secret: bytes, what: bytes, client_nonce: str, server_nonce: str) -> str:
    msg = b"comfyui-mesh|samehost|" + what + b"|" + client_nonce.encode() + b"|" + server_nonce.encode()
    return hmac.new(secret, msg, hashlib.sha256).hexdigest()


def gpu_ids() -> list[str]:
    """UUIDs of the CUDA GPUs this process sees (what a peer's CUDA IPC handle may point into)."""
    if not torch.cuda.is_available():
        return []
    try:
        return [str(torch.cuda.get_device_properties(i).uuid) for i in range(torch.cuda.device_count())]
    except (RuntimeError, AttributeError):
        return []


def _gpu_list(value: Any) -> list[str]:
    if not isinstance(value, list) or len(value) > MAX_GPUS:
        return []
    return [g for g in value if isinstance(g, str) and _GPU_ID.match(g)]


class HostSecret:
    """The server's host-local secret (one per server process); ``close()`` removes it."""

    def __init__(self) -> None:
        self.secret = secrets.token_bytes(SECRET_BYTES)
        self._seg = _create("mh" + secrets.token_hex(12) + "p", SECRET_BYTES)
        _buf(self._seg)[:SECRET_BYTES] = self.secret
        self.name = self._seg.name.lstrip("/")

    def offer(self) -> dict[str, Any]:
        """CHALLENGE.samehost: where the secret is, and the GPUs this server can open IPC handles of."""
        return {"seg": self.name, "gpus": gpu_ids()}

    def verify(self, answer: Any, client_nonce: str, server_nonce: str) -> tuple[bool, str]:
        """AUTH.samehost against the secret: (accepted, the reason when not)."""
        if not answer:
            return False, "the client did not prove it runs on this host (it cannot read the host secret)"
        proof = answer.get("proof") if isinstance(answer, dict) else None
        if not isinstance(proof, str) or len(proof) != PROOF_CHARS:
            return False, "malformed same-host proof"
        if not hmac.compare_digest(_mac(self.secret, b"proof", client_nonce, server_nonce).encode(), proof.encode()):
            return False, "wrong same-host proof (another host, container or /dev/shm namespace)"
        return True, ""

    def close(self) -> None:
        _unlink(self._seg)


def answer(offer: Any, client_nonce: str, server_nonce: str) -> tuple[dict[str, Any], bytes, str]:
    """The client's side of the proof: (AUTH.samehost, the secret, "") or ({}, b"", why not)."""
    name = offer.get("seg") if isinstance(offer, dict) else None
    if not isinstance(name, str) or not _SECRET_NAME.match(name):
        return {}, b"", f"malformed same-host offer {offer!r}"
    try:
        seg = _attach(name)
    except (OSError, ValueError) as e:
        return {}, b"", f"the server's host secret is not readable here ({type(e).__name__}): not the same host"
    try:
        if seg.size < SECRET_BYTES:
            return {}, b"", "the server's host secret is truncated"
        secret = bytes(_buf(seg)[:SECRET_BYTES])
    finally:
        _close(seg)
    return {"proof": _mac(secret, b"proof", client_nonce, server_nonce), "gpus": gpu_ids()}, secret, ""


# ---------------------------------------------------------------------------- data plane


def _align(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


def _pin(seg: shared_memory.SharedMemory) -> int:
    """Page-lock ``seg`` for CUDA copies (cudaHostRegister through torch); its address, or 0."""
    try:
        ptr = torch.frombuffer(_buf(seg), dtype=torch.uint8).data_ptr()
        err = torch.cuda.cudart().cudaHostRegister(ptr, seg.size, 0)
    except (RuntimeError, AttributeError, TypeError, ValueError) as e:
        log.info("ComfyUI-Mesh: shared memory not page-locked (%s); copies to the GPU run unpinned", e)
        return 0
    if int(err) != 0:
        log.info("ComfyUI-Mesh: cudaHostRegister refused (%s); copies to the GPU run unpinned", err)
        return 0
    return ptr


def _unpin(ptr: int) -> None:
    if ptr:
        try:
            torch.cuda.cudart().cudaHostUnregister(ptr)
        except (RuntimeError, AttributeError):
            pass


@dataclasses.dataclass
class _Mapped:
    seg: shared_memory.SharedMemory
    pinned: int = 0


class Channel:
    """One connection's fast path on one side (``role`` "c" client, "s" server)."""

    def __init__(
        self,
        secret: bytes,
        client_nonce: str,
        server_nonce: str,
        role: str,
        peer_gpus: Any,
        max_bytes: int,
        pin: bool,
    ):
        self.role = role
        self.peer_role = "s" if role == "c" else "c"
        tag = _mac(secret, b"segment", client_nonce, server_nonce)[:16]
        self.prefix = f"mh{tag}"
        self._peer_name = re.compile(re.escape(self.prefix + self.peer_role) + r"([0-9]{1,6})\Z")
        self.peer_gpus = set(_gpu_list(peer_gpus))
        self.max_bytes = max_bytes
        self.pin = pin
        self._out: _Mapped | None = None
        self._count = 0
        self._mapped: dict[str, _Mapped] = {}
        self._held: list[Any] = []  # CUDA storages shared with the peer until its next message
        self.bytes_out = 0  # payload bytes that went through shared memory / CUDA IPC
        self.bytes_in = 0
        self._warned = False

    # -------------------------------------------------------------- sending
    def _segment(self, need: int) -> _Mapped | None:
        cur = self._out
        if cur is not None and cur.seg.size >= need:
            return cur
        if need > self.max_bytes:
            if not self._warned:
                self._warned = True
                log.warning(
                    "ComfyUI-Mesh: a message of %d bytes is over the shared-memory limit of %d; it goes over TCP",
                    need,
                    self.max_bytes,
                )
            return None
        size = min(self.max_bytes, max(need, MIN_SEGMENT_BYTES, 2 * cur.seg.size if cur else 0))
        self._count += 1
        seg = _create(f"{self.prefix}{self.role}{self._count}", size)
        if cur is not None:
            _unpin(cur.pinned)
            _unlink(cur.seg)
        self._out = _Mapped(seg, _pin(seg) if self.pin else 0)
        return self._out

    def ipc_wire(self, t: torch.Tensor, name: str) -> WireTensor | None:
        """``t`` (raw) as a CUDA IPC handle, when it lives on a GPU the peer sees; None otherwise.
        The storage stays referenced here until ``release()`` (the peer's next message)."""
        if t.device.type != "cuda" or not self.peer_gpus or t.numel() == 0:
            return None
        uuid = str(torch.cuda.get_device_properties(t.device).uuid)
        if uuid not in self.peer_gpus:
            return None
        t = t.detach().contiguous()
        storage = t.untyped_storage()
        dev, handle, size, offset, ref, ref_off, event, sync = storage._share_cuda_()  # type: ignore[attr-defined]
        self._held.append((t, storage))
        meta = {
            "cuda": {
                "gpu": uuid,
                "h": bytes(handle).hex(),
                "size": int(size),
                "off": int(offset),
                "ref": bytes(ref).hex(),
                "ref_off": int(ref_off),
                "ev": bytes(event).hex() if event else "",
                "sync": bool(sync),
                "elem": int(t.storage_offset()),
            }
        }
        self.bytes_out += t.numel() * t.element_size()
        return WireTensor(name, dtype_name(t.dtype), tuple(t.shape), 0, b"", meta)

    def release(self) -> None:
        """The peer has answered: the CUDA memory it was lent may be reused."""
        self._held.clear()

    def outgoing(self, msg: Message) -> Message:
        """``msg`` with its big payloads moved into this side's segment (or unchanged)."""
        big = [i for i, t in enumerate(msg.tensors) if t.nbytes >= MIN_SHM_BYTES]
        if not big:
            return msg
        need = sum(_align(msg.tensors[i].nbytes) for i in big)
        out = self._segment(need)
        if out is None:
            return msg
        tensors = list(msg.tensors)
        off = 0
        buf = _buf(out.seg)
        for i in big:
            t = tensors[i]
            n = t.nbytes
            buf[off : off + n] = memoryview(t.data).cast("B")
            tensors[i] = WireTensor(t.name, t.dtype, t.shape, t.codec, b"", {**t.meta, "shm": [out.seg.name, off, n]})
            off += _align(n)
            self.bytes_out += n
        return dataclasses.replace(msg, tensors=tuple(tensors))

    # -------------------------------------------------------------- receiving
    def _map(self, name: Any) -> _Mapped:
        if not isinstance(name, str):
            raise RemoteProtocolError(f"shared-memory segment name {name!r} is not a string")
        m = self._mapped.get(name)
        if m is not None:
            return m
        k = self._peer_name.match(name.lstrip("/"))
        if not k:
            raise RemoteProtocolError(f"shared-memory segment {name!r} is not one of this connection's")
        try:
            seg = _attach(name)
        except (OSError, ValueError) as e:
            raise RemoteProtocolError(f"cannot open the peer's shared-memory segment {name!r}: {e}") from None
        if seg.size > self.max_bytes:
            _close(seg)
            raise RemoteProtocolError(f"the peer's segment of {seg.size} bytes is over the limit of {self.max_bytes}")
        for old in list(self._mapped):  # the peer replaced its segment: the older mappings go
            self._drop(old)
        m = self._mapped[name] = _Mapped(seg, _pin(seg) if self.pin else 0)
        return m

    def _drop(self, name: str) -> None:
        m = self._mapped.pop(name)
        _unpin(m.pinned)
        _close(m.seg)

    def resolve(self, wt: WireTensor, copy: bool = True) -> WireTensor:
        """A shared-memory descriptor as an ordinary wire tensor: its bytes copied out of the peer's
        segment (``copy`` False: a view, for a consumer that copies them at once, e.g. to a GPU).
        Offsets and lengths are checked against the segment before any view is made."""
        loc = wt.meta.get("shm")
        if loc is None:
            return wt
        if wt.nbytes:
            raise RemoteProtocolError(f"tensor {wt.name!r} has both a payload and a shared-memory location")
        if not (isinstance(loc, list) and len(loc) == 3) or not all(
            isinstance(v, int) and not isinstance(v, bool) for v in loc[1:]
        ):
            raise RemoteProtocolError(f"tensor {wt.name!r}: bad shared-memory location {loc!r}")
        m = self._map(loc[0])
        off, n = loc[1], loc[2]
        if off < 0 or n < 0 or off + n > m.seg.size:
            raise RemoteProtocolError(f"tensor {wt.name!r}: bytes {off}..{off + n} are outside the peer's segment")
        view = _buf(m.seg)[off : off + n]
        if copy:
            data: Any = np.empty(n, dtype=np.uint8)
            data[:] = np.frombuffer(view, dtype=np.uint8)
            view.release()
            data = memoryview(data)
        else:
            data = view
        self.bytes_in += n
        meta = {k: v for k, v in wt.meta.items() if k != "shm"}
        return WireTensor(wt.name, wt.dtype, wt.shape, wt.codec, data, meta)

    def decode(self, wt: WireTensor, device: torch.device | str, state: dict[Any, Any] | None = None) -> torch.Tensor:
        """``codec.decode`` of ``wt`` wherever its bytes are (frame, shared memory, CUDA IPC); the
        result never aliases memory the peer may overwrite."""
        if "cuda" in wt.meta:
            return self._from_ipc(wt, torch.device(device))
        direct = wt.codec == 0 and torch.device(device).type == "cuda"  # the copy to the GPU is the copy out
        return codec.decode(self.resolve(wt, copy=not direct), device, state=state)

    def _from_ipc(self, wt: WireTensor, device: torch.device) -> torch.Tensor:
        c = wt.meta["cuda"]
        try:
            if wt.codec != 0 or wt.nbytes or not isinstance(c, dict):
                raise ValueError("a CUDA IPC tensor must be raw, with an empty payload")
            gpu = c["gpu"]
            local = [str(torch.cuda.get_device_properties(i).uuid) for i in range(torch.cuda.device_count())]
            if gpu not in local:
                raise ValueError(f"GPU {gpu} is not visible here")
            ref = bytes.fromhex(c["ref"])
            if not _TORCH_REF.match(ref) or not all(_HEX.match(c[k]) for k in ("h", "ref")):
                raise ValueError("malformed IPC handle")
            if c["ev"] and not _HEX.match(c["ev"]):
                raise ValueError("malformed IPC event handle")
            dtype = torch_dtype(wt.dtype)
            n = numel(wt.shape)
            size, off, elem = int(c["size"]), int(c["off"]), int(c["elem"])
            if size < 0 or off < 0 or elem < 0 or (elem + n) * itemsize(dtype) > size:
                raise ValueError("the tensor runs past its shared storage")
            storage = torch.UntypedStorage._new_shared_cuda(  # type: ignore[attr-defined]
                local.index(gpu),
                bytes.fromhex(c["h"]),
                size,
                off,
                ref,
                int(c["ref_off"]),
                bytes.fromhex(c["ev"]) if c["ev"] else None,
                bool(c["sync"]),
            )
            stride = torch.empty(wt.shape, device="meta").stride()
            shared = torch.empty(0, dtype=dtype, device=storage.device).set_(storage, elem, wt.shape, stride)
            out = shared.to(device, copy=True)
            for d in {shared.device, out.device}:  # copied before the peer may reuse its memory
                if d.type == "cuda":
                    torch.cuda.synchronize(d)
        except (KeyError, TypeError, ValueError, RuntimeError, CodecError) as e:
            raise RemoteProtocolError(f"tensor {wt.name!r}: {IPC_FAILED}: {e}") from None
        self.bytes_in += n * itemsize(dtype)
        return out

    def close(self) -> None:
        """The connection ended: unlink this side's segment, unmap the peer's."""
        self._held.clear()
        for name in list(self._mapped):
            self._drop(name)
        if self._out is not None:
            _unpin(self._out.pinned)
            _unlink(self._out.seg)
            self._out = None


__all__ = ["Channel", "HostSecret", "answer", "gpu_ids"]
