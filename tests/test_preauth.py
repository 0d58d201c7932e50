"""Daedalus before authentication: no lockout by unauthenticated sockets, a deadline for the whole
handshake, capped unauthenticated connections, malformed auth input answered without a traceback, and
a bounded log under garbage (issue 14, items 2 and 3)."""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
from comfyui_mesh import auth, constants, protocol
from comfyui_mesh.config import ClientConfig, ServerConfig
from comfyui_mesh.errors import LocalError
from comfyui_mesh.netio import recv_message, send_message
from comfyui_mesh.server.core import DaedalusServer, ServerState
from comfyui_mesh.server.ratelog import RateLimitedLog
from comfyui_mesh.server.toy import ToyBackend
from comfyui_mesh.transport import MeshClient
from toy_support import wait_for

TOKEN = "0123456789abcdef0123456789abcdef"
HELLO = protocol.encode_bytes(protocol.Hello(nonce=auth.new_nonce(), client_name="trickle"))


@contextmanager
def serve(**cfg: object) -> Iterator[DaedalusServer]:
    srv = DaedalusServer(ServerState(ServerConfig(port=0, device="cpu", n_blocks=3, **cfg), ToyBackend, token=TOKEN))  # type: ignore[arg-type]
    srv.start()
    try:
        yield srv
    finally:
        srv.shutdown()


def client(srv: DaedalusServer, token: str = TOKEN) -> MeshClient:
    host, port = srv.address
    return MeshClient(ClientConfig(host=host, port=port, token=token), expect={"arch": "toy", "n_blocks": 3})


# "Served, not locked out": the lockout these tests guard against lasted as long as the attacker
# kept trickling (60 s in the report). Not a speed target (a loaded CI machine may take a second
# or two); the <= 1 s figure is measured by bench/preauth_bench.py.
SERVED_S = 10.0


def time_to_welcome(srv: DaedalusServer) -> float:
    c = client(srv)
    t0 = time.perf_counter()
    c.connect()  # returns after WELCOME (and the client's checks)
    dt = time.perf_counter() - t0
    assert c.ping(echo_bytes=16)[1] >= 16  # the session works (bytes received, frame included)
    c.close()
    return dt


def connect(srv: DaedalusServer, source: str = "127.0.0.1") -> socket.socket:
    s = socket.socket()
    s.bind((source, 0))
    s.connect(srv.address)
    return s


class Trickler:
    """Sockets that each send one byte of a HELLO every ``every_s`` seconds, until stopped."""

    def __init__(self, socks: list[socket.socket], every_s: float):
        self.socks = socks
        self.every_s = every_s
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        i = 0
        while not self.stop.wait(self.every_s):
            for s in self.socks:
                try:
                    s.send(HELLO[i % len(HELLO) : i % len(HELLO) + 1])
                except OSError:
                    pass  # closed by the server
            i += 1

    def close(self) -> None:
        self.stop.set()
        self.thread.join()
        for s in self.socks:
            s.close()


def read_error(s: socket.socket, timeout: float = 3.0) -> protocol.Error:
    """The error frame the server sends before it closes, then EOF."""
    s.settimeout(timeout)
    dec = protocol.FrameDecoder()
    msg, _ = recv_message(s, dec)
    assert isinstance(msg, protocol.Error)
    assert s.recv(1) == b""  # then the server closed
    return msg


# ---------------------------------------------------------------------------- (a) no lockout


@pytest.mark.parametrize("sources", [1, 10], ids=["one-address", "ten-addresses"])
def test_trickling_sockets_do_not_keep_an_authenticated_client_out(sources):
    # 40 sockets, each trickling one byte of a HELLO every 0.5 s: before, 16 of them filled
    # MAX_CLIENTS and a client with the token got "busy" for as long as they trickled.
    with serve(max_unauthenticated=16, max_unauthenticated_per_address=8) as srv:
        socks = [connect(srv, f"127.0.0.{1 + i % sources}") for i in range(40)]
        trickle = Trickler(socks, 0.5)
        try:
            assert wait_for(lambda: srv.unauthenticated == min(16, 8 * sources))
            assert time_to_welcome(srv) <= SERVED_S
            assert time_to_welcome(srv) <= SERVED_S  # and again: nothing was used up
            assert wait_for(lambda: srv.state.stats.clients == 0)  # the closed sessions gave their slots back
        finally:
            trickle.close()


def test_many_idle_unauthenticated_sockets(request):
    # 500 idle sockets (before: 600 of them denied service until each timed out)
    with serve() as srv:
        socks = [connect(srv) for _ in range(500)]
        try:
            assert wait_for(lambda: srv.unauthenticated == constants.MAX_UNAUTHENTICATED_PER_ADDRESS)
            dt = time_to_welcome(srv)
            assert dt <= SERVED_S
            request.node.user_properties.append(("welcome_s_with_500_sockets", dt))
        finally:
            for s in socks:
                s.close()


def test_max_clients_counts_authenticated_sessions_only():
    with serve(max_clients=2, max_unauthenticated=4) as srv:
        idle = [connect(srv) for _ in range(3)]  # unauthenticated: not counted against max_clients
        a, b = client(srv), client(srv)
        a.connect()
        b.connect()
        assert srv.state.stats.clients == 2
        c = client(srv)
        with pytest.raises(Exception, match="busy|2 clients"):
            c.connect()
        a.close()
        assert wait_for(lambda: srv.state.stats.clients == 1)
        c.connect()  # a slot came free
        assert srv.state.stats.clients == 2
        for x in (b, c):
            x.close()
        for s in idle:
            s.close()


# ---------------------------------------------------------------------------- (b) deadlines


def test_trickling_handshake_is_closed_at_the_deadline():
    # one byte every 0.1 s keeps any per-recv timeout happy; the whole handshake has 0.6 s
    with serve(handshake_timeout_s=0.6) as srv:
        s = connect(srv)
        t0 = time.monotonic()
        trickle = Trickler([s], 0.1)
        try:
            s.settimeout(3.0)
            dec = protocol.FrameDecoder()
            msg, _ = recv_message(s, dec)
            dt = time.monotonic() - t0
            assert isinstance(msg, protocol.Error) and msg.code == "bad_request"
            assert "handshake not finished within 0.6 s" in msg.message
            assert 0.5 <= dt <= 2.0
            assert wait_for(lambda: srv.unauthenticated == 0)
            assert time_to_welcome(srv) <= SERVED_S  # a handshake in time still works
        finally:
            trickle.close()


def test_idle_authenticated_client_is_dropped():
    with serve(idle_timeout_s=0.3) as srv:
        c = client(srv)
        c.connect()
        assert srv.state.stats.clients == 1
        assert wait_for(lambda: srv.state.stats.clients == 0, timeout=3.0)
        c.close()


@pytest.mark.parametrize(
    "bad",
    [
        {"max_clients": 0},
        {"max_unauthenticated": 0},
        {"max_unauthenticated_per_address": -1},
        {"handshake_timeout_s": 0.0},
        {"idle_timeout_s": -1.0},
        {"max_clients": True},
    ],
)
def test_server_config_rejects_bad_limits(bad):
    with pytest.raises(LocalError):
        ServerConfig(**bad)


def test_cli_sets_the_connection_limits():
    from comfyui_mesh.server.__main__ import build_parser, config_from_args

    default = config_from_args(build_parser().parse_args(["--toy"]))
    assert (default.max_clients, default.max_unauthenticated, default.max_unauthenticated_per_address) == (
        constants.MAX_CLIENTS,
        constants.MAX_UNAUTHENTICATED,
        constants.MAX_UNAUTHENTICATED_PER_ADDRESS,
    )
    assert (default.handshake_timeout_s, default.idle_timeout_s) == (
        constants.HANDSHAKE_TIMEOUT_S,
        constants.SERVER_IDLE_TIMEOUT_S,
    )
    argv = "--toy --max-clients 3 --max-unauthenticated 9 --max-unauthenticated-per-address 2"
    argv += " --handshake-timeout 2.5 --idle-timeout 60"
    cfg = config_from_args(build_parser().parse_args(argv.split()))
    assert (cfg.max_clients, cfg.max_unauthenticated, cfg.max_unauthenticated_per_address) == (3, 9, 2)
    assert (cfg.handshake_timeout_s, cfg.idle_timeout_s) == (2.5, 60.0)


# ---------------------------------------------------------------------------- (c) per-address cap


def test_unauthenticated_connections_are_capped_per_address():
    with serve(max_unauthenticated_per_address=3, max_unauthenticated=10) as srv:
        socks = [connect(srv) for _ in range(6)]
        try:
            assert wait_for(lambda: srv.unauthenticated == 3)
            for s in socks[:3]:  # the oldest were pushed out, with a reason
                err = read_error(s)
                assert err.code == "busy" and "unauthenticated" in err.message
            for s in socks[3:]:  # the newest still wait for their handshake
                s.settimeout(0.2)
                with pytest.raises(TimeoutError):
                    s.recv(1)
            other = connect(srv, "127.0.0.2")  # another address has its own share
            assert wait_for(lambda: srv.unauthenticated == 4)
            s = socks[3]
            s.settimeout(0.2)
            with pytest.raises(TimeoutError):
                s.recv(1)
            other.close()
        finally:
            for s in socks:
                s.close()


def test_unauthenticated_connections_are_capped_in_total():
    with serve(max_unauthenticated_per_address=2, max_unauthenticated=4) as srv:
        socks = [connect(srv, f"127.0.0.{i}") for i in range(1, 7)]  # six addresses, one each
        try:
            assert wait_for(lambda: srv.unauthenticated == 4)
            for s in socks[:2]:
                assert read_error(s).code == "busy"
        finally:
            for s in socks:
                s.close()


# ---------------------------------------------------------------------------- (d) malformed auth


def handshake_until_auth(srv: DaedalusServer, nonce: str) -> socket.socket:
    s = connect(srv)
    s.settimeout(3.0)
    send_message(s, protocol.Hello(nonce=nonce, client_name="fuzz"))
    return s


def no_tracebacks(caplog) -> None:
    for r in caplog.records:
        assert r.exc_info is None, r.getMessage()
        assert "Traceback" not in r.getMessage()


@pytest.mark.parametrize(
    "mac",
    ["\ud800" * 64, "\udfff", "é" * 64, "", "ab", "A" * 64, "g" * 64, 5, None, [], {"a": 1}, 1.5, True],
    ids=lambda m: repr(m)[:12],
)
def test_malformed_mac_is_an_auth_failure_without_traceback(caplog, mac):
    caplog.set_level(logging.DEBUG)
    with serve() as srv:
        s = handshake_until_auth(srv, auth.new_nonce())
        ch, _ = recv_message(s, protocol.FrameDecoder())
        assert isinstance(ch, protocol.Challenge)
        s.sendall(protocol.encode_bytes(protocol.Auth(mac=mac)))  # type: ignore[arg-type]
        err = read_error(s)
        assert err.code == "auth_failed"
        s.close()
        assert time_to_welcome(srv) <= SERVED_S  # the server still serves a good client
    no_tracebacks(caplog)
    assert any("authentication failed" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("nonce", ["\ud800" * 64, "x", "Z" * 64, "é" * 64, ""], ids=lambda n: repr(n)[:12])
def test_malformed_hello_nonce_is_an_auth_failure_without_traceback(caplog, nonce):
    caplog.set_level(logging.DEBUG)
    with serve() as srv:
        s = handshake_until_auth(srv, nonce)
        assert read_error(s).code == "auth_failed"
        s.close()
        assert time_to_welcome(srv) <= SERVED_S
    no_tracebacks(caplog)


def test_wrong_type_nonce_is_refused_without_traceback(caplog):
    caplog.set_level(logging.DEBUG)
    with serve() as srv:
        s = connect(srv)
        s.sendall(protocol.encode_bytes(protocol.Hello(nonce=12)))  # type: ignore[arg-type]
        assert read_error(s).code == "bad_frame"  # before AUTH: the frame itself is broken
        s.close()
    no_tracebacks(caplog)


def test_auth_check_and_is_hex_never_raise():
    good = auth.client_proof(TOKEN, auth.Transcript("11" * 32, "22" * 32, "33" * 16, "k", "fuzz", "aes-256-gcm"))
    for bad in ("\ud800" * 64, "é" * 64, 5, None, b"x" * 64, good.upper(), good[:-1], good + "0"):
        assert auth.check(good, bad) is False  # type: ignore[arg-type]
        assert auth.is_hex(bad, auth.MAC_CHARS) is False
    assert auth.check(good, good) is True
    assert auth.is_hex(auth.new_nonce(), auth.NONCE_CHARS)


# ---------------------------------------------------------------------------- (e) bounded log


def test_garbage_connections_log_a_bounded_number_of_lines(caplog):
    caplog.set_level(logging.DEBUG, logger="daedalus")
    n = 1000
    with serve(max_unauthenticated_per_address=64) as srv:  # most garbage reaches the decoder
        for i in range(n):
            s = socket.create_connection(srv.address)
            s.sendall(b"GET / HTTP/1.0\r\n\r\n" + bytes([i % 256]) * 8)  # bad magic
            s.close()
        assert wait_for(lambda: srv.unauthenticated == 0, timeout=30)
        assert wait_for(lambda: not srv._threads, timeout=30)
        assert srv.state.stats.errors > constants.PEER_LOG_LINES  # the server saw more garbage than it logged
        assert time_to_welcome(srv) <= SERVED_S
    lines = [r for r in caplog.records if r.name == "daedalus"]
    # at most one interval's budget (two if the run crossed an interval), a summary, the good client
    assert len(lines) <= 2 * constants.PEER_LOG_LINES + 6, len(lines)
    assert any("suppressed" in r.getMessage() for r in lines)
    no_tracebacks(caplog)


def test_rate_limited_log_budget_and_summary(caplog):
    now = [0.0]
    lg = logging.getLogger("test.ratelog")
    rl = RateLimitedLog(lg, lines=3, interval_s=10.0, clock=lambda: now[0])
    caplog.set_level(logging.INFO, logger="test.ratelog")
    written = [rl.warning("peer %d: garbage", i) for i in range(10)]
    assert written == [True] * 3 + [False] * 7
    assert [r.getMessage() for r in caplog.records] == [f"peer {i}: garbage" for i in range(3)]
    now[0] = 10.0
    caplog.clear()
    assert rl.warning("peer x: garbage")
    assert [r.getMessage() for r in caplog.records] == [
        "suppressed 7 similar messages in the last 10 s",
        "peer x: garbage",
    ]
    rl.flush()  # nothing suppressed in this interval: no summary
    assert len(caplog.records) == 2
