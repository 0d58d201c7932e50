"""Blocking socket pumps around protocol.py's sans-IO frames: the client, the server and the status
probe move bytes through these and nothing else."""

from __future__ import annotations

import socket
import time

from .constants import SEND_SLICE, SOCKET_CHUNK
from .protocol import NEED_DATA, FrameDecoder, Message, encode


def tune_socket(sock: socket.socket) -> None:
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    for opt in (socket.SO_SNDBUF, socket.SO_RCVBUF):
        try:
            sock.setsockopt(socket.SOL_SOCKET, opt, 4 << 20)
        except OSError:
            pass


def send_message(sock: socket.socket, msg: Message) -> int:
    """Write one frame; returns bytes written. A big buffer goes out in ``SEND_SLICE`` pieces: a socket
    timeout (which bounds one whole ``sendall``) then bounds a stalled link, not a big frame's transfer."""
    n = 0
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


def _until(sock: socket.socket, deadline: float | None) -> None:
    """Before a recv: the socket timeout is what is left until ``deadline`` (time.monotonic)."""
    if deadline is None:
        return
    left = deadline - time.monotonic()
    if left <= 0:
        raise TimeoutError("deadline passed")
    sock.settimeout(left)


def recv_message(sock: socket.socket, dec: FrameDecoder, deadline: float | None = None) -> tuple[Message, int]:
    """Read until one whole frame is decoded; returns (message, bytes read). EOF -> ConnectionError.

    ``deadline`` (time.monotonic): the whole frame must be in by then, however its bytes trickle
    (TimeoutError); None keeps the socket's own per-recv timeout."""
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


__all__ = ["recv_message", "send_message", "tune_socket"]
