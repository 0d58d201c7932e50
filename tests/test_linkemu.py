"""bench/linkemu.py, the userspace link emulator: bytes arrive intact, no faster than the rate allows,
after the delay, in each direction with its own settings, and a side that closes closes the other.

Bounds are generous (a loaded 2-core CI machine): the lower bounds are what the pacing guarantees,
the upper ones allow for seconds of scheduling noise. Accuracy figures: ``linkemu.py --selftest``.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import socket
import sys
import threading
import time
from pathlib import Path

import pytest


def _load():
    """bench/linkemu.py, once per process (bench/split_link.py imports the same module)."""
    if "linkemu" in sys.modules:
        return sys.modules["linkemu"]
    spec = importlib.util.spec_from_file_location("linkemu", Path(__file__).parents[1] / "bench" / "linkemu.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules["linkemu"] = mod  # dataclasses look their module up
    spec.loader.exec_module(mod)
    return mod


linkemu = _load()


class Echo:
    """Upstream: echoes every byte back (or only records what came, ``echo=False``); records EOFs."""

    def __init__(self, echo: bool = True):
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.echo = echo
        self.received: list[bytes] = []
        self.eof = threading.Event()
        self.conns: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                c, _ = self.sock.accept()
            except OSError:
                return
            self.conns.append(c)
            threading.Thread(target=self._serve, args=(c,), daemon=True).start()

    def _serve(self, c: socket.socket) -> None:
        try:
            while data := c.recv(1 << 20):
                self.received.append(data)
                if self.echo:
                    c.sendall(data)
            self.eof.set()
            c.shutdown(socket.SHUT_WR)
        except OSError:
            self.eof.set()

    def close(self) -> None:
        self.sock.close()
        for c in self.conns:
            c.close()


@pytest.fixture
def echo():
    e = Echo()
    yield e
    e.close()


def recv_n(s: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        part = s.recv(min(1 << 20, n - len(buf)))
        if not part:
            raise ConnectionError(f"closed after {len(buf)} of {n} bytes")
        buf += part
    return bytes(buf)


def connect(port: int) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port), timeout=30)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return s


def round_trip(port: int, payload: bytes) -> tuple[bytes, float]:
    """Send ``payload`` (from a second thread, so echo and send overlap) and read it back."""
    with connect(port) as s:
        t = time.perf_counter()
        sender = threading.Thread(target=s.sendall, args=(payload,))
        sender.start()
        back = recv_n(s, len(payload))
        sender.join()
        return back, time.perf_counter() - t


def test_bytes_arrive_bit_exact_both_ways_at_the_rate(echo):
    """3 MB through 80 Mbit/s each way: the echo's last byte cannot come before 3 MB at 80 Mbit/s
    (0.3 s: the two directions overlap) plus the round trip."""
    payload = os.urandom(3_000_000)
    link = linkemu.custom(80, 80, rtt_ms=10)
    with linkemu.LinkEmulator(("127.0.0.1", echo.port), link) as emu:
        back, took = round_trip(emu.port, payload)
        assert emu.bytes_up == len(payload) and emu.bytes_down == len(payload)
    assert hashlib.sha256(back).digest() == hashlib.sha256(payload).digest()
    expect = len(payload) * 8 / 80e6 + 0.010
    assert expect * 0.95 <= took <= expect * 1.3 + 1.0, f"{took:.3f} s for {expect:.3f} s of link"


def test_each_direction_has_its_own_rate_and_delay():
    """Up 16 Mbit/s, down 64: 1 MB up takes four times as long as 1 MB down; the delays add once each way."""
    peer = linkemu._Peer()
    link = linkemu.Link("asym", up_mbps=16, down_mbps=64, up_delay_ms=40, down_delay_ms=10)
    try:
        with linkemu.LinkEmulator(("127.0.0.1", peer.port), link) as emu:
            up = linkemu.measure_up(emu.port, 1_000_000)  # 0.5 s + 50 ms
            down = linkemu.measure_down(emu.port, 1_000_000)  # 0.125 s + 50 ms
            rtt = linkemu.measure_rtt(emu.port, 5)
    finally:
        peer.close()
    assert link.wire_s(1_000_000, 0) == pytest.approx(0.55) and link.wire_s(0, 1_000_000) == pytest.approx(0.175)
    assert 0.55 * 0.95 <= up <= 0.55 * 1.3 + 1.0
    assert 0.175 * 0.95 <= down <= 0.175 * 1.3 + 1.0
    assert up > 2 * down
    assert 0.050 <= rtt <= 0.050 + 1.0


def test_delay_is_applied_without_serializing_the_bytes(echo):
    """100 ms RTT, unlimited rate: one small message takes a round trip; 2 MB sent in many small writes
    also take about one round trip, not one per write."""
    link = linkemu.Link("delay", 0, 0, 50, 50)
    with linkemu.LinkEmulator(("127.0.0.1", echo.port), link) as emu:
        back, small = round_trip(emu.port, b"hello")
        assert back == b"hello"
        payload = os.urandom(2_000_000)
        with connect(emu.port) as s:
            t = time.perf_counter()
            for i in range(0, len(payload), 20_000):
                s.sendall(payload[i : i + 20_000])
            back = recv_n(s, len(payload))
            many = time.perf_counter() - t
    assert back == payload
    assert 0.1 <= small <= 1.1
    assert 0.1 <= many <= 1.5, f"{many:.3f} s: the delay was paid per write"


@pytest.mark.parametrize("who", ["client", "server"])
def test_a_closed_side_closes_the_other(who):
    up = Echo(echo=False)
    try:
        with linkemu.LinkEmulator(("127.0.0.1", up.port), linkemu.custom(100, rtt_ms=20)) as emu:
            c = connect(emu.port)
            c.sendall(b"data before the close")
            deadline = time.monotonic() + 10
            while sum(map(len, up.received)) < 21 and time.monotonic() < deadline:
                time.sleep(0.01)
            assert b"".join(up.received) == b"data before the close"  # delivered before the FIN
            if who == "client":
                c.close()
                assert up.eof.wait(10), "the server never saw the client's close"
            else:
                up.conns[0].shutdown(socket.SHUT_RDWR)  # (close() alone waits for the thread in recv)
                up.conns[0].close()
                c.settimeout(10)
                assert c.recv(10) == b"", "the client never saw the server's close"
                c.close()
            deadline = time.monotonic() + 10
            while emu._conns and time.monotonic() < deadline:
                time.sleep(0.01)
            assert not emu._conns, "the relay kept the connection after both sides closed"
    finally:
        up.close()


def test_unreachable_target_closes_the_client():
    port = socket.create_server(("127.0.0.1", 0))
    dead = port.getsockname()[1]
    port.close()
    with linkemu.LinkEmulator(("127.0.0.1", dead), linkemu.PROFILES["1gbe"]) as emu:
        c = connect(emu.port)
        c.settimeout(10)
        try:
            assert c.recv(1) == b""
        except ConnectionResetError:
            pass
        c.close()


def test_profiles_and_link_specs():
    p = linkemu.PROFILES
    assert {"10gbe", "2.5gbe", "1gbe", "vpn"} <= set(p)
    assert p["1gbe"].up_mbps == p["1gbe"].down_mbps == 1000
    assert p["vpn"].up_mbps == 100 and p["vpn"].rtt_ms == 20
    # 8.66 MB out + 1.05 MB back over 1 GbE: ~78 ms of serialization (issue 15) + the round trip
    assert p["1gbe"].wire_s(8_660_000, 1_050_000) == pytest.approx(0.0777 + 0.0004, abs=1e-4)
    assert linkemu.parse_link("vpn") is p["vpn"]
    c = linkemu.parse_link("50/200mbit@30ms")
    assert (c.up_mbps, c.down_mbps, c.up_delay_ms, c.down_delay_ms) == (50, 200, 15, 15)
    with pytest.raises(SystemExit, match="unknown link"):
        linkemu.parse_link("fast")


def test_relay_process_paces_like_the_in_process_relay_and_goes_away(echo):
    """The relay the benchmarks use runs in a child process (its threads must not take the measured
    process's GIL): the same bytes at the same rate and delay, and nothing left running after close."""
    payload = os.urandom(2_000_000)
    link = linkemu.Link("asym", up_mbps=80, down_mbps=160, up_delay_ms=15, down_delay_ms=5)
    relay = linkemu.RelayProcess(("127.0.0.1", echo.port), link)
    with relay:
        assert relay.port and relay._proc is not None and relay._proc.poll() is None
        proc = relay._proc
        back, took = round_trip(relay.port, payload)
    assert hashlib.sha256(back).digest() == hashlib.sha256(payload).digest()
    expect = len(payload) * 8 / 80e6 + 0.020  # the slower direction sets the pace; the two overlap
    assert expect * 0.95 <= took <= expect * 1.3 + 1.0, f"{took:.3f} s for {expect:.3f} s of link"
    assert proc.wait(10) is not None, "the relay process outlived close()"


def test_relay_process_that_cannot_start_says_so():
    relay = linkemu.RelayProcess(("127.0.0.1", 1), linkemu.Link("bad", -5, 10))
    with pytest.raises(RuntimeError, match="relay process did not start"):
        relay.start()
