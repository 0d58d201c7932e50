"""Link emulation in user space: a TCP relay with a rate and a one-way delay per direction.

    python bench/linkemu.py --target HOST:PORT --profile 1gbe [--listen 127.0.0.1:0]
    python bench/linkemu.py --target HOST:PORT --up-mbps 100 --down-mbps 100 --rtt-ms 20
    python bench/linkemu.py --selftest [--mb 20] [--profiles relay,10gbe,2.5gbe,1gbe,vpn]

Clients connect to the relay's port; each connection gets its own upstream connection to the
target (Daedalus). No root, no ``tc``: it runs wherever Python does (the GPU machines give no root).

The model, per direction: a byte that the relay reads at time t leaves the link's sending end once
every byte before it has (``free = max(t, free) + size / rate``: serialization at the link rate,
queued behind what is already in flight) and is written to the other side ``delay`` later
(propagation). Bytes are paced in slices of at most ~0.5 ms of wire time, so a big write is not
held back as one block beyond the rate, and many slices are in flight at once (the delay does not
serialize them). The queue between the two is bounded (``queue_bytes``, default 8 MiB, about what a
kernel's socket buffers hold): when it is full the relay stops reading and the sender's TCP
blocks, as on a real link. A FIN (one side shut down its writes) travels like data and is passed
on with ``shutdown(SHUT_WR)``; a reset or any error tears down both connections.

Not modelled: loss, jitter, Ethernet/IP/TCP framing overhead (a real 1 GbE carries ~940 Mbit/s of
TCP payload; the profiles' rates are payload rates), the receive-window ramp of a fresh TCP
connection over a long delay (Daedalus keeps one connection open, so only the first call pays it).

Library use::

    with LinkEmulator(("127.0.0.1", daedalus_port), PROFILES["1gbe"]) as emu:
        port = emu.port  # connect the client here

``RelayProcess`` is the same relay in a process of its own: what a benchmark measures should use it.
The relay's threads hold the GIL for every slice they pace (thousands a second on a fast link), so an
in-process relay slows the client it measures (its coding and sending threads wait for the GIL);
a real link costs the client nothing of the kind.

``--selftest`` measures this machine's ceiling and accuracy (bulk transfer each way, ping-pong RTT)
and prints a Markdown table; ``docs/BENCHMARKS.md`` has the figures. Python relays a few hundred MB/s
to ~1 GB/s per direction on one core, so the 10 GbE profile is ceiling-bound on slow machines: read
the ``relay`` row (no rate, no delay) before trusting a 10 GbE figure.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import socket
import statistics
import subprocess
import sys
import threading
import time
from collections import deque
from typing import Any

READ_BYTES = 1 << 20  # one recv() at most
QUEUE_BYTES = 8 << 20  # bytes in flight inside the relay per direction before it stops reading
SLICE_S = 0.5e-3  # pacing granularity (wire time per slice)
MIN_SLICE = 16 << 10
_EOF = b""


@dataclasses.dataclass(frozen=True)
class Link:
    """One emulated link. Rates in Mbit/s (1e6 bit/s) of payload, 0 = not limited; delays one-way, ms.
    ``up``: client -> server (the request), ``down``: server -> client (the reply)."""

    name: str
    up_mbps: float
    down_mbps: float
    up_delay_ms: float = 0.0
    down_delay_ms: float = 0.0

    @property
    def rtt_ms(self) -> float:
        return self.up_delay_ms + self.down_delay_ms

    def wire_s(self, bytes_up: int, bytes_down: int, round_trips: int = 1) -> float:
        """Seconds the link itself needs for a request of ``bytes_up`` answered by ``bytes_down``
        (serialization each way + ``round_trips`` round-trip delays); 0 where it is not limited."""
        t = round_trips * self.rtt_ms / 1e3
        if self.up_mbps > 0:
            t += bytes_up * 8 / (self.up_mbps * 1e6)
        if self.down_mbps > 0:
            t += bytes_down * 8 / (self.down_mbps * 1e6)
        return t

    def describe(self) -> str:
        def rate(m: float) -> str:
            return "unlimited" if m <= 0 else (f"{m / 1000:g} Gbit/s" if m >= 1000 else f"{m:g} Mbit/s")

        if self.up_mbps == self.down_mbps and self.up_delay_ms == self.down_delay_ms:
            return f"{rate(self.up_mbps)} each way, RTT {self.rtt_ms:g} ms"
        return (
            f"up {rate(self.up_mbps)} +{self.up_delay_ms:g} ms, down {rate(self.down_mbps)} +{self.down_delay_ms:g} ms"
        )


def symmetric(name: str, mbps: float, rtt_ms: float) -> Link:
    return Link(name, mbps, mbps, rtt_ms / 2, rtt_ms / 2)


# LAN round trips as measured through a switch (one-way 0.05 / 0.1 / 0.2 ms, the delays in issue 15's
# measurements); "vpn": a 100 Mbit/s broadband or VPN path at 20 ms RTT; "relay": no limit (the
# relay's own cost, for comparison with direct loopback).
PROFILES: dict[str, Link] = {
    "relay": symmetric("relay", 0, 0),
    "10gbe": symmetric("10gbe", 10_000, 0.1),
    "2.5gbe": symmetric("2.5gbe", 2_500, 0.2),
    "1gbe": symmetric("1gbe", 1_000, 0.4),
    "vpn": symmetric("vpn", 100, 20.0),
}


def custom(up_mbps: float, down_mbps: float | None = None, rtt_ms: float = 0.0, name: str = "") -> Link:
    down = up_mbps if down_mbps is None else down_mbps
    return Link(name or f"{up_mbps:g}/{down:g}Mbit-{rtt_ms:g}ms", up_mbps, down, rtt_ms / 2, rtt_ms / 2)


def parse_link(spec: str) -> Link:
    """A profile name, or ``UP[/DOWN]mbit@RTTms`` (e.g. ``100mbit@20ms``, ``50/200mbit@30ms``)."""
    if spec in PROFILES:
        return PROFILES[spec]
    try:
        rates, _, rtt = spec.lower().partition("@")
        up, _, down = rates.removesuffix("mbit").partition("/")
        return custom(float(up), float(down) if down else None, float(rtt.removesuffix("ms") or 0), spec)
    except ValueError:
        raise SystemExit(
            f"unknown link {spec!r}: use one of {', '.join(PROFILES)} or UP[/DOWN]mbit@RTTms (e.g. 100mbit@20ms)"
        ) from None


class _Pipe:
    """One direction of one relayed connection: a reader thread that stamps release times and a
    writer thread that sends each slice when its time has come."""

    def __init__(self, conn: _Conn, src: socket.socket, dst: socket.socket, mbps: float, delay_ms: float, name: str):
        self.conn, self.src, self.dst, self.name = conn, src, dst, name
        self.bytes_per_s = mbps * 1e6 / 8 if mbps > 0 else 0.0
        self.delay = delay_ms / 1e3
        self.slice = max(MIN_SLICE, int(self.bytes_per_s * SLICE_S)) if self.bytes_per_s else READ_BYTES
        self.queue: deque[tuple[float, Any]] = deque()
        self.queued = 0
        self.cv = threading.Condition()
        self.free = 0.0  # when the link's sending end is free again
        self.bytes = 0
        self.done = False
        self.threads = [
            threading.Thread(target=self._read, name=f"linkemu-{name}-read", daemon=True),
            threading.Thread(target=self._write, name=f"linkemu-{name}-write", daemon=True),
        ]

    def start(self) -> None:
        for t in self.threads:
            t.start()

    def stop(self) -> None:
        with self.cv:
            self.done = True
            self.cv.notify_all()

    def _put(self, release: float, data: Any) -> bool:
        with self.cv:
            while self.queued >= QUEUE_BYTES and not self.done:
                self.cv.wait()
            if self.done:
                return False
            self.queue.append((release, data))
            self.queued += len(data)
            self.cv.notify_all()
            return True

    def _read(self) -> None:
        try:
            while True:
                data = self.src.recv(READ_BYTES)
                now = time.perf_counter()
                if not data:
                    self._put(max(now, self.free) + self.delay, _EOF)
                    return
                self.bytes += len(data)
                view = memoryview(data)
                for i in range(0, len(view), self.slice):
                    part = view[i : i + self.slice]
                    if self.bytes_per_s:
                        self.free = max(now, self.free) + len(part) / self.bytes_per_s
                        release = self.free + self.delay
                    else:
                        release = now + self.delay
                    if not self._put(release, part):
                        return
        except OSError:
            self.conn.abort()

    def _write(self) -> None:
        try:
            while True:
                with self.cv:
                    while not self.queue and not self.done:
                        self.cv.wait()
                    if self.done:
                        return
                    release, data = self.queue[0]
                wait = release - time.perf_counter()
                if wait > 0:
                    time.sleep(wait)
                if len(data) == 0:
                    self.dst.shutdown(socket.SHUT_WR)
                    self.conn.half_closed()
                    return
                self.dst.sendall(data)
                with self.cv:
                    self.queue.popleft()
                    self.queued -= len(data)
                    self.cv.notify_all()
        except OSError:
            self.conn.abort()


class _Conn:
    def __init__(self, emu: LinkEmulator, client: socket.socket, server: socket.socket):
        self.emu, self.client, self.server = emu, client, server
        link = emu.link
        self.up = _Pipe(self, client, server, link.up_mbps, link.up_delay_ms, "up")
        self.down = _Pipe(self, server, client, link.down_mbps, link.down_delay_ms, "down")
        self.lock = threading.Lock()
        self.halves = 0
        self.closed = False

    def start(self) -> None:
        self.up.start()
        self.down.start()

    def half_closed(self) -> None:
        with self.lock:
            self.halves += 1
            both = self.halves == 2
        if both:
            self.abort()

    def abort(self) -> None:
        with self.lock:
            if self.closed:
                return
            self.closed = True
        self.up.stop()
        self.down.stop()
        for s in (self.client, self.server):
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            s.close()
        self.emu._forget(self)


class LinkEmulator:
    """Listens on ``listen`` and relays every connection to ``target`` through ``link``.
    ``start()`` returns the port (also ``.port``); ``close()`` ends the listener and every connection.
    ``bytes_up`` / ``bytes_down``: totals relayed so far (closed connections included)."""

    def __init__(self, target: tuple[str, int], link: Link, listen: tuple[str, int] = ("127.0.0.1", 0)):
        self.target, self.link, self.listen = target, link, listen
        self.port = 0
        self._sock: socket.socket | None = None
        self._conns: set[_Conn] = set()
        self._lock = threading.Lock()
        self._closed_bytes = [0, 0]
        self.connections = 0

    def start(self) -> int:
        s = socket.create_server(self.listen, reuse_port=False)
        self._sock = s
        self.port = s.getsockname()[1]
        threading.Thread(target=self._accept, args=(s,), name="linkemu-accept", daemon=True).start()
        return self.port

    def __enter__(self) -> LinkEmulator:
        self.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    @property
    def bytes_up(self) -> int:
        with self._lock:
            return self._closed_bytes[0] + sum(c.up.bytes for c in self._conns)

    @property
    def bytes_down(self) -> int:
        with self._lock:
            return self._closed_bytes[1] + sum(c.down.bytes for c in self._conns)

    def _accept(self, sock: socket.socket) -> None:
        while True:
            try:
                client, _ = sock.accept()
            except OSError:
                return  # closed
            try:
                server = socket.create_connection(self.target, timeout=10)
            except OSError as e:
                print(f"linkemu: cannot reach {self.target[0]}:{self.target[1]}: {e}", file=sys.stderr, flush=True)
                client.close()
                continue
            server.settimeout(None)
            for s in (client, server):
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            conn = _Conn(self, client, server)
            with self._lock:
                self._conns.add(conn)
                self.connections += 1
            conn.start()

    def _forget(self, conn: _Conn) -> None:
        with self._lock:
            if conn in self._conns:
                self._conns.discard(conn)
                self._closed_bytes[0] += conn.up.bytes
                self._closed_bytes[1] += conn.down.bytes

    def close(self) -> None:
        if self._sock is not None:
            with contextlib.suppress(OSError):
                self._sock.shutdown(socket.SHUT_RDWR)
            self._sock.close()
            self._sock = None
        with self._lock:
            conns = list(self._conns)
        for c in conns:
            c.abort()


class RelayProcess:
    """A ``LinkEmulator`` in a child process (``python linkemu.py --target ...``): the relay's threads
    do not compete with the measured process for its GIL. ``start()`` returns the port; ``close()``
    ends the process. Same use as ``LinkEmulator`` (also a context manager)."""

    def __init__(self, target: tuple[str, int], link: Link, start_timeout_s: float = 30.0):
        self.target, self.link, self.start_timeout_s = target, link, start_timeout_s
        self.port = 0
        self._proc: subprocess.Popen[str] | None = None

    def start(self) -> int:
        cmd = [sys.executable, os.path.abspath(__file__), "--target", f"{self.target[0]}:{self.target[1]}",
               "--up-mbps", repr(self.link.up_mbps), "--down-mbps", repr(self.link.down_mbps),
               "--up-delay-ms", repr(self.link.up_delay_ms), "--down-delay-ms", repr(self.link.down_delay_ms),
               "--name", self.link.name]  # fmt: skip
        proc = self._proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        lines: list[str] = []
        ready = threading.Event()

        def pump() -> None:  # its first line names the port; the rest (errors) goes to our stderr
            assert proc.stdout is not None
            for line in proc.stdout:
                if ready.is_set():
                    print(line, end="", file=sys.stderr, flush=True)
                    continue
                lines.append(line)
                if "listening on" in line:
                    self.port = int(line.split("listening on ")[1].split()[0].rsplit(":", 1)[1])
                    ready.set()
            ready.set()

        threading.Thread(target=pump, name="linkemu-relay-output", daemon=True).start()
        if not ready.wait(self.start_timeout_s) or not self.port:
            self.close()
            raise RuntimeError(f"linkemu relay process did not start: {''.join(lines[-5:]).strip() or 'no output'}")
        return self.port

    def __enter__(self) -> RelayProcess:
        self.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


# ---------------------------------------------------------------------------- self-test


class _Peer:
    """The far end for the self-test: ``push N`` (send N bytes), ``pull N`` (read N bytes, answer 1
    byte), ``ping`` (answer each byte with one byte)."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                c, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(c,), daemon=True).start()

    def _serve(self, c: socket.socket) -> None:
        c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        with c, contextlib.suppress(OSError, ConnectionError):
            line = b""
            while not line.endswith(b"\n"):
                part = c.recv(1)
                if not part:
                    return
                line += part
            cmd, _, n = line.strip().partition(b" ")
            if cmd == b"push":
                _send_n(c, int(n))
            elif cmd == b"pull":
                _drain(c, int(n))
                c.sendall(b"k")
            elif cmd == b"ping":
                while c.recv(1):
                    c.sendall(b"k")

    def close(self) -> None:
        self.sock.close()


def _connect(port: int) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port))
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return s


_BLOCK = os.urandom(READ_BYTES)


def _send_n(s: socket.socket, n: int) -> None:
    view = memoryview(_BLOCK)
    while n:
        k = min(n, len(view))
        s.sendall(view[:k])
        n -= k


def _drain(s: socket.socket, n: int) -> None:
    buf = memoryview(bytearray(READ_BYTES))
    while n:
        k = s.recv_into(buf, min(n, len(buf)))
        if not k:
            raise ConnectionError(f"closed with {n} bytes to go")
        n -= k


def measure_up(port: int, nbytes: int) -> float:
    """Seconds from the first byte sent to the far end's one-byte acknowledgement (includes one RTT)."""
    with _connect(port) as s:
        s.sendall(f"pull {nbytes}\n".encode())
        t = time.perf_counter()
        _send_n(s, nbytes)
        _drain(s, 1)
        return time.perf_counter() - t


def measure_down(port: int, nbytes: int) -> float:
    """Seconds from the request sent to its last byte received (includes one RTT)."""
    with _connect(port) as s:
        t = time.perf_counter()
        s.sendall(f"push {nbytes}\n".encode())
        _drain(s, nbytes)
        return time.perf_counter() - t


def measure_rtt(port: int, n: int = 30) -> float:
    """Median seconds of a one-byte ping-pong."""
    with _connect(port) as s:
        s.sendall(b"ping\n")
        times = []
        for _ in range(n):
            t = time.perf_counter()
            s.sendall(b"x")
            _drain(s, 1)
            times.append(time.perf_counter() - t)
        return statistics.median(times)


def selftest(profiles: list[Link], mb: float) -> list[dict[str, Any]]:
    peer = _Peer()
    nbytes = int(mb * 1e6)
    rows = []
    try:
        direct = {"up": measure_up(peer.port, nbytes), "down": measure_down(peer.port, nbytes)}
        rows.append({"link": "direct loopback", "describe": "no relay", "bytes": nbytes, "rtt_ms": 0.0,
                     "rtt_measured_ms": measure_rtt(peer.port) * 1e3,
                     **{f"{d}_s": v for d, v in direct.items()},
                     **{f"{d}_expected_s": 0.0 for d in direct}})  # fmt: skip
        for link in profiles:
            with RelayProcess(("127.0.0.1", peer.port), link) as emu:
                up = measure_up(emu.port, nbytes)
                down = measure_down(emu.port, nbytes)
                rtt = measure_rtt(emu.port, 30 if link.rtt_ms < 5 else 10)
            rows.append({"link": link.name, "describe": link.describe(), "bytes": nbytes, "rtt_ms": link.rtt_ms,
                         "rtt_measured_ms": rtt * 1e3, "up_s": up, "down_s": down,
                         "up_expected_s": link.wire_s(nbytes, 0), "down_expected_s": link.wire_s(0, nbytes)})  # fmt: skip
    finally:
        peer.close()
    return rows


def selftest_table(rows: list[dict[str, Any]]) -> str:
    out = [
        "| link | profile | MB | up s (expected) | up MB/s | down s (expected) | down MB/s | error up / down | RTT ms (set) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        mb = r["bytes"] / 1e6

        def err(d: str, r: dict[str, Any] = r) -> str:
            e = r[f"{d}_expected_s"]
            return f"{(r[f'{d}_s'] - e) / e * 100:+.1f} %" if e else "-"

        out.append(
            f"| {r['link']} | {r['describe']} | {mb:g} | {r['up_s']:.3f} ({r['up_expected_s']:.3f}) | "
            f"{mb / r['up_s']:.0f} | {r['down_s']:.3f} ({r['down_expected_s']:.3f}) | {mb / r['down_s']:.0f} | "
            f"{err('up')} / {err('down')} | {r['rtt_measured_ms']:.2f} ({r['rtt_ms']:g}) |"
        )
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--target", help="HOST:PORT to relay to (Daedalus)")
    ap.add_argument("--listen", default="127.0.0.1:0", help="HOST:PORT to listen on (port 0: any free port)")
    ap.add_argument("--profile", default="", help=f"one of {', '.join(PROFILES)}")
    ap.add_argument("--up-mbps", type=float, help="client -> server payload rate, Mbit/s (0: unlimited)")
    ap.add_argument("--down-mbps", type=float, help="server -> client payload rate, Mbit/s (default: --up-mbps)")
    ap.add_argument("--rtt-ms", type=float, default=0.0, help="round-trip delay, ms (half each way)")
    ap.add_argument("--up-delay-ms", type=float, help="one-way delay client -> server, ms (instead of --rtt-ms)")
    ap.add_argument("--down-delay-ms", type=float, help="one-way delay server -> client, ms (instead of --rtt-ms)")
    ap.add_argument("--name", default="", help="the link's name in the output")
    ap.add_argument("--selftest", action="store_true", help="measure this machine's ceiling and accuracy")
    ap.add_argument("--mb", type=float, default=20.0, help="--selftest: MB per bulk transfer")
    ap.add_argument("--profiles", default="relay,10gbe,2.5gbe,1gbe,vpn", help="--selftest: links to measure")
    a = ap.parse_args(argv)
    if a.selftest:
        rows = selftest([parse_link(p) for p in a.profiles.split(",")], a.mb)
        print(f"linkemu self-test, {a.mb:g} MB each way, {os.cpu_count()} CPUs, Python {sys.version.split()[0]}\n")
        print(selftest_table(rows))
        return 0
    if not a.target:
        ap.error("--target HOST:PORT is required (or --selftest)")
    if a.up_mbps is not None:
        link = custom(a.up_mbps, a.down_mbps, a.rtt_ms, a.name)
        if a.up_delay_ms is not None or a.down_delay_ms is not None:
            up_d = a.up_delay_ms if a.up_delay_ms is not None else link.up_delay_ms
            down_d = a.down_delay_ms if a.down_delay_ms is not None else link.down_delay_ms
            link = dataclasses.replace(link, up_delay_ms=up_d, down_delay_ms=down_d)
    elif a.profile:
        link = parse_link(a.profile)
    else:
        ap.error("give --profile or --up-mbps")
    if min(link.up_mbps, link.down_mbps, link.up_delay_ms, link.down_delay_ms) < 0:
        ap.error(f"rates and delays must not be negative: {link}")
    host, _, port = a.target.rpartition(":")
    lhost, _, lport = a.listen.rpartition(":")
    emu = LinkEmulator((host or "127.0.0.1", int(port)), link, (lhost or "127.0.0.1", int(lport or 0)))
    emu.start()
    print(f"linkemu {link.name} ({link.describe()}): listening on {lhost or '127.0.0.1'}:{emu.port} -> {a.target}",
          flush=True)  # fmt: skip
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        emu.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
