"""Blocking socket pumps around protocol.py's sans-IO frames: the client, the server and the status
probe move bytes through these and nothing else. After the handshake both take the connection's
``securelink.SecureLink``: frames then travel as sealed records (docs/PROTOCOL.md §5.2)."""

from __future__ import annotations

import ipaddress
import socket
import time

from .constants import SEND_SLICE, SOCKET_CHUNK
from .protocol import NEED_DATA, FrameDecoder, Message, encode
from .securelink import Opener, SecureLink


def tune_socket(sock: socket.socket) -> None:
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    for opt in (socket.SO_SNDBUF, socket.SO_RCVBUF):
        try:
            sock.setsockopt(socket.SOL_SOCKET, opt, 4 << 20)
        except OSError:
            pass


# A sealed record smaller than this goes out in one write with its length header (a copy); a bigger
# one in two writes (no copy of its megabytes; sendmsg is not on every platform).
_JOIN_WRITE_BELOW = 256 << 10


def is_loopback(sock: socket.socket) -> bool:
    """The connected peer is this machine's loopback address (127.0.0.0/8, ::1)."""
    try:
        ip = ipaddress.ip_address(sock.getpeername()[0])
    except (OSError, ValueError):
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_loopback


def send_message(sock: socket.socket, msg: Message, link: SecureLink | None = None) -> int:
    """Write one frame (sealed when ``link`` is given); returns bytes written. A big buffer goes out in
    ``SEND_SLICE`` pieces (sealed records are at most 4 MiB anyway): a socket timeout (which bounds one
    whole ``sendall``) then bounds a stalled link, not a big frame's transfer."""
    n = 0
    if link is None:
        for buf in encode(msg):
            mv = memoryview(buf)
            if mv.nbytes <= SEND_SLICE:
                sock.sendall(buf)
            else:
                mv = mv.cast("B")
                for i in range(0, mv.nbytes, SEND_SLICE):
                    sock.sendall(mv[i : i + SEND_SLICE])
            n += mv.nbytes
        return n
    for header, sealed in link.sealer.seal(encode(msg)):
        if len(sealed) < _JOIN_WRITE_BELOW:
            sock.sendall(header + sealed)
        else:
            sock.sendall(header)
            sock.sendall(sealed)
        n += len(header) + len(sealed)
    return n


def _until(sock: socket.socket, deadline: float | None) -> None:
    """Before a recv: the socket timeout is what is left until ``deadline`` (time.monotonic)."""
    if deadline is None:
        return
    left = deadline - time.monotonic()
    if left <= 0:
        raise TimeoutError("deadline passed")
    sock.settimeout(left)


def recv_message(
    sock: socket.socket, dec: FrameDecoder, deadline: float | None = None, link: SecureLink | None = None
) -> tuple[Message, int]:
    """Read until one whole frame is decoded; returns (message, bytes read). EOF -> ConnectionError.

    ``deadline`` (time.monotonic): the whole frame must be in by then, however its bytes trickle
    (TimeoutError); None keeps the socket's own per-recv timeout. ``link``: the frame arrives as
    sealed records (a record that fails authentication raises RemoteProtocolError)."""
    if link is not None:
        return _recv_sealed(sock, dec, link.opener, deadline)
    got = 0
    while True:
        msg = dec.next_message()
        if msg is not NEED_DATA:
            return msg, got
        need = dec.bytes_needed()
        if need >= SOCKET_CHUNK:  # the rest of a big frame: receive straight into its buffer
            view = dec.reserve(need)
            k = 0
            try:
                while k < need:
                    _until(sock, deadline)
                    r = sock.recv_into(view[k:], min(need - k, SOCKET_CHUNK * 16))
                    if not r:
                        raise ConnectionError("peer closed the connection")
                    k += r
            finally:
                view.release()
                dec.commit(k)
            got += k
            continue
        _until(sock, deadline)
        chunk = sock.recv(min(need, SOCKET_CHUNK))
        if not chunk:
            raise ConnectionError("peer closed the connection")
        got += len(chunk)
        dec.feed(chunk)


def _read_record(sock: socket.socket, opener: Opener, deadline: float | None) -> int:
    """Receive one whole sealed record into ``opener`` (which opens it); returns bytes read."""
    got = 0
    while not opener.pending:
        need = opener.bytes_needed()
        _until(sock, deadline)
        if not opener.in_body:  # the 4-byte length header
            chunk = sock.recv(need)
            if not chunk:
                raise ConnectionError("peer closed the connection")
            opener.feed(chunk)
            got += len(chunk)
            continue
        view = opener.reserve(need)
        try:
            r = sock.recv_into(view, min(need, SOCKET_CHUNK * 16))
        finally:
            view.release()
        if not r:
            raise ConnectionError("peer closed the connection")
        opener.commit(r)
        got += r
    return got


def _recv_sealed(sock: socket.socket, dec: FrameDecoder, opener: Opener, deadline: float | None) -> tuple[Message, int]:
    """``recv_message`` over sealed records: their plaintext goes into ``dec`` a record at a time; the
    rest of a big frame straight into the buffer the decoder reserves for it (as without a link)."""
    got = 0
    while True:
        msg = dec.next_message()
        if msg is not NEED_DATA:
            return msg, got
        need = dec.bytes_needed()
        if need < SOCKET_CHUNK:
            if not opener.pending:
                got += _read_record(sock, opener, deadline)
            dec.feed(opener.take(need))
            continue
        view = dec.reserve(need)
        k = 0
        try:
            while k < need:
                if not opener.pending:  # a record wholly inside the frame opens straight into it
                    opener.into(view[k:])
                    try:
                        got += _read_record(sock, opener, deadline)
                    finally:
                        k += opener.opened_into()
                    if k >= need or not opener.pending:
                        continue
                part = opener.take(need - k)
                view[k : k + part.nbytes] = part
                k += part.nbytes
        finally:
            view.release()
            dec.commit(k)


__all__ = ["is_loopback", "recv_message", "send_message", "tune_socket"]
