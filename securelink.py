"""The encrypted link after the handshake, sans-IO (docs/PROTOCOL.md §5.2).

Both peers derive two keys from the token and the handshake (``derive_keys``: HKDF-SHA256 over the
token, salted with both nonces, bound to the server id, key id, client name and link mode), one per
direction. Every byte after WELCOME then travels in records:

    length  u32 little-endian: bytes of ciphertext + tag that follow (17 .. RECORD_PLAINTEXT_BYTES + 16)
    sealed  AES-256-GCM(key of this direction, nonce = 96-bit big-endian record counter,
                        associated data = the 4 length bytes)

The plaintext of the records, back to back, is the ordinary frame stream (protocol.py): a frame may
take several records and a record may end one frame and start the next, so a frame of any size is
sealed and opened a bounded record at a time (no second copy of a 3 GiB frame). A record that fails
authentication (altered, replayed, reordered, dropped, or sealed under another key) raises
``RemoteProtocolError``; the opener is then broken and the connection must be closed.

No sockets here: ``Sealer.seal`` turns frame buffers into records, ``Opener`` takes received bytes
(``feed`` or ``reserve``/``commit``) and hands out plaintext (``take``). ``netio`` drives both.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Union

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from .auth import Transcript
from .constants import RECORD_PLAINTEXT_BYTES
from .errors import LocalError, RemoteProtocolError

Buffer = Union[bytes, bytearray, memoryview]

LINK_AES_GCM = "aes-256-gcm"  # CHALLENGE.link: every frame after WELCOME sealed (the default)
LINK_NONE = "none"  # --no-auth (no token, no keys) or --no-encrypt

TAG_BYTES = 16
KEY_BYTES = 32
_LENGTH = struct.Struct("<I")
RECORD_HEADER_BYTES = _LENGTH.size
MAX_RECORD_BYTES = RECORD_PLAINTEXT_BYTES + TAG_BYTES  # ciphertext + tag of one record
_MAX_COUNTER = (1 << 96) - 1
# Plaintext pieces smaller than this are joined into one record rather than sealed alone.
_JOIN_BELOW = 64 << 10


# AESGCM.encrypt_into / decrypt_into (recent ``cryptography``) seal and open into our reused buffers;
# older releases (the floor is 42) allocate one per record, the same bytes a little slower.
_INTO = hasattr(AESGCM, "encrypt_into") and hasattr(AESGCM, "decrypt_into")


def derive_keys(token: str, t: Transcript) -> tuple[bytes, bytes]:
    """(client -> server key, server -> client key) for the connection ``t`` describes."""
    hkdf = HKDF(
        algorithm=hashes.SHA256(),
        length=2 * KEY_BYTES,
        salt=(t.client_nonce + "|" + t.server_nonce).encode(),
        info=t.message(b"link-keys"),
    )
    okm = hkdf.derive(token.strip().encode())
    return okm[:KEY_BYTES], okm[KEY_BYTES:]


def _nonce(counter: int) -> bytes:
    if counter > _MAX_COUNTER:  # 2^96 records: unreachable, but a nonce must never repeat
        raise LocalError("record counter exhausted: reconnect")
    return counter.to_bytes(12, "big")


class Sealer:
    """One direction's sending half: frame buffers in, records out (counter nonces from 0)."""

    def __init__(self, key: bytes, record_bytes: int = RECORD_PLAINTEXT_BYTES):
        if not 0 < record_bytes <= RECORD_PLAINTEXT_BYTES:
            raise LocalError(f"record size {record_bytes} must be 1..{RECORD_PLAINTEXT_BYTES}")
        self._aead = AESGCM(key)
        self.counter = 0
        self.record_bytes = record_bytes
        # Big records are sealed into this buffer, reused from call to call (a fresh one per record
        # costs page faults on every call); it grows to the biggest record sent, at most one record.
        self._out = bytearray()

    def _seal_one(self, plain: Buffer, reuse: bool = False) -> tuple[bytes, Buffer]:
        n = memoryview(plain).nbytes
        header = _LENGTH.pack(n + TAG_BYTES)
        if not (reuse and _INTO):
            sealed: Buffer = self._aead.encrypt(_nonce(self.counter), plain, header)
        else:
            if len(self._out) < n + TAG_BYTES:
                self._out = bytearray(n + TAG_BYTES)
            sealed = memoryview(self._out)[: n + TAG_BYTES]
            self._aead.encrypt_into(_nonce(self.counter), plain, header, sealed)
        self.counter += 1
        return header, sealed

    def seal(self, buffers: Iterable[Buffer]) -> Iterator[tuple[bytes, Buffer]]:
        """(length header, sealed record) pairs carrying ``buffers`` back to back. Big buffers are
        sealed in place a record at a time; small ones are joined first (one record per small frame).
        A big record is a view of this sealer's own buffer: send it (or copy it) before taking the next."""
        pending: list[memoryview] = []  # small pieces joined into one record
        pending_n = 0
        limit = self.record_bytes
        join = min(_JOIN_BELOW, limit)
        for buf in buffers:
            mv = memoryview(buf).cast("B")
            while mv.nbytes:
                if pending:  # top the small record up to ``join`` bytes, then seal it
                    k = min(mv.nbytes, join - pending_n)
                    pending.append(mv[:k])
                    pending_n += k
                    mv = mv[k:]
                    if pending_n >= join:
                        yield self._seal_one(b"".join(pending))
                        pending, pending_n = [], 0
                elif mv.nbytes >= join:  # big: sealed straight from the caller's buffer
                    k = min(mv.nbytes, limit)
                    yield self._seal_one(mv[:k], reuse=True)
                    mv = mv[k:]
                else:
                    pending, pending_n = [mv], mv.nbytes
                    mv = mv[mv.nbytes :]
        if pending:
            yield self._seal_one(b"".join(pending))


class Opener:
    """One direction's receiving half, sans-IO: record bytes in (``feed`` or ``reserve``/``commit``),
    plaintext out (``take``). Lengths are checked before a record's buffer is allocated."""

    def __init__(self, key: bytes):
        self._aead = AESGCM(key)
        self.counter = 0
        self._header = bytearray()
        self._body: bytearray | None = None  # the record being received (reused between records)
        self._need = 0  # its length
        self._fill = 0
        self._plain = memoryview(b"")  # opened and not yet taken
        self._opened = bytearray()  # plaintext buffer, reused like the record's (grows to the biggest record)
        self._broken: str | None = None  # why it broke (not the exception: see FrameDecoder._broken)
        self._dst: memoryview | None = None  # where the next record opens, if its plaintext fits (``into``)
        self._direct = 0  # plaintext bytes the last record opened into ``_dst``, not yet reported

    @property
    def pending(self) -> int:
        """Plaintext bytes opened and not yet taken (or opened straight into the ``into`` buffer)."""
        return self._plain.nbytes + self._direct

    def into(self, dst: memoryview | None) -> None:
        """Open the next record straight into ``dst`` (writable bytes) when its plaintext fits there,
        saving a copy out of this opener's buffer; ``opened_into`` then says how many bytes it wrote.
        A record that does not fit (or cryptography < 45) opens as usual, for ``take``."""
        if self._plain.nbytes or self._direct:
            raise LocalError("into() before the opened plaintext was taken")
        self._dst = dst

    def opened_into(self) -> int:
        """Bytes the last record opened into the ``into`` buffer (0: none; its plaintext is for
        ``take``); the buffer is no longer referenced here."""
        n, self._direct, self._dst = self._direct, 0, None
        return n

    @property
    def in_body(self) -> bool:
        """The current record's length header is in (``reserve`` may be used)."""
        return len(self._header) == RECORD_HEADER_BYTES

    def bytes_needed(self) -> int:
        """Record bytes still missing before the next plaintext can be opened (>= 1)."""
        if self._broken:
            raise RemoteProtocolError(self._broken)
        if len(self._header) < RECORD_HEADER_BYTES:
            return RECORD_HEADER_BYTES - len(self._header)
        return self._need - self._fill

    def _fail(self, message: str) -> RemoteProtocolError:
        self._broken = message
        return RemoteProtocolError(message)

    def _start_body(self) -> None:
        (n,) = _LENGTH.unpack(self._header)
        if not TAG_BYTES < n <= MAX_RECORD_BYTES:
            raise self._fail(f"sealed record of {n} bytes (must be {TAG_BYTES + 1}..{MAX_RECORD_BYTES})")
        if self._body is None or len(self._body) < n:
            self._body = bytearray(n)
        self._need, self._fill = n, 0

    def feed(self, data: Buffer) -> None:
        """Record bytes as they arrive; at most up to the end of the current record."""
        mv = memoryview(data).cast("B")
        while mv.nbytes:
            if self._plain.nbytes:
                raise LocalError("feed() before the opened plaintext was taken")
            need = self.bytes_needed()
            k = min(need, mv.nbytes)
            if len(self._header) < RECORD_HEADER_BYTES:
                self._header += mv[:k]
                if len(self._header) == RECORD_HEADER_BYTES:
                    self._start_body()
            else:
                view = self.reserve(k)
                view[:] = mv[:k]
                view.release()
                self.commit(k)
            mv = mv[k:]

    def reserve(self, n: int) -> memoryview:
        """Zero-copy receive into the current record's body: a writable view of at most ``n`` bytes
        (fill it, release it, ``commit``). Only once the length header is in."""
        if self._broken:
            raise RemoteProtocolError(self._broken)
        if len(self._header) < RECORD_HEADER_BYTES or self._body is None:
            raise LocalError("reserve() before the record's length header")
        k = min(n, self._need - self._fill)
        return memoryview(self._body)[self._fill : self._fill + k]

    def commit(self, written: int) -> None:
        self._fill += max(0, written)
        if self._fill >= self._need:
            self._open()

    def _open(self) -> None:
        assert self._body is not None
        sealed = memoryview(self._body)[: self._need]
        n = self._need - TAG_BYTES
        dst, self._dst = self._dst, None
        direct = _INTO and dst is not None and n <= dst.nbytes
        if _INTO and not direct and len(self._opened) < n:
            self._opened = bytearray(n)
        plain = dst[:n] if direct and dst is not None else memoryview(self._opened)[:n]
        try:
            if _INTO:
                self._aead.decrypt_into(_nonce(self.counter), sealed, bytes(self._header), plain)
            else:
                plain = memoryview(self._aead.decrypt(_nonce(self.counter), sealed, bytes(self._header)))
        except InvalidTag:
            raise self._fail(
                f"sealed record {self.counter} failed authentication (altered, replayed, reordered or dropped "
                "in transit, or sealed with another key)"
            ) from None
        finally:
            sealed.release()
        self.counter += 1
        self._header = bytearray()
        self._need = self._fill = 0
        if direct:
            plain.release()
            self._direct = n
        else:
            self._plain = plain

    def take(self, n: int) -> memoryview:
        """Up to ``n`` opened plaintext bytes (empty when none is pending); a view of this opener's
        buffer, valid until the next record is received: copy what must outlive it."""
        out, self._plain = self._plain[:n], self._plain[n:]
        return out


@dataclass
class SecureLink:
    """One connection's two directions: ``sealer`` for what this side sends, ``opener`` for what it receives."""

    sealer: Sealer
    opener: Opener

    @classmethod
    def for_client(cls, token: str, t: Transcript) -> SecureLink:
        c2s, s2c = derive_keys(token, t)
        return cls(Sealer(c2s), Opener(s2c))

    @classmethod
    def for_server(cls, token: str, t: Transcript) -> SecureLink:
        c2s, s2c = derive_keys(token, t)
        return cls(Sealer(s2c), Opener(c2s))


__all__ = [
    "LINK_AES_GCM",
    "LINK_NONE",
    "MAX_RECORD_BYTES",
    "RECORD_HEADER_BYTES",
    "Opener",
    "Sealer",
    "SecureLink",
    "derive_keys",
]
