"""Daedalus before authentication: how long a client with the token waits for WELCOME while
hostile sockets are open (issue #14 target: <= 1 s with 500 unauthenticated sockets).

    python bench/preauth_bench.py [--sockets 500] [--reps 10]

A toy back half on the CPU, in this process. Scenarios: no other sockets; N idle sockets from one
address; N sockets trickling one byte of a HELLO every 0.5 s; N idle sockets from 10 addresses
(127.0.0.x). Prints a Markdown table of the median and worst time to WELCOME over --reps
connections.
"""

from __future__ import annotations

import argparse
import socket
import statistics
import threading
import time

from comfyui_mesh.config import ClientConfig, ServerConfig
from comfyui_mesh.server.core import DaedalusServer, ServerState
from comfyui_mesh.server.toy import ToyBackend
from comfyui_mesh.transport import MeshClient

TOKEN = "0" * 64


def welcome_times(srv: DaedalusServer, reps: int) -> list[float]:
    out = []
    for _ in range(reps):
        c = MeshClient(ClientConfig(host=srv.address[0], port=srv.address[1], token=TOKEN))
        t0 = time.perf_counter()
        c.connect()
        out.append(time.perf_counter() - t0)
        c.close()
    return out


def run(sockets: int, mode: str, reps: int) -> list[float]:
    srv = DaedalusServer(
        ServerState(ServerConfig(port=0, device="cpu", n_blocks=3), lambda n: ToyBackend(n), token=TOKEN)
    )
    srv.start()
    socks: list[socket.socket] = []
    stop = threading.Event()
    try:
        for i in range(sockets if mode != "none" else 0):
            src = f"127.0.0.{1 + i % 10}" if mode == "ten-addresses" else "127.0.0.1"
            s = socket.socket()
            s.bind((src, 0))
            s.connect(srv.address)
            socks.append(s)
        if mode == "trickle":

            def trickle() -> None:
                while not stop.wait(0.5):
                    for s in socks:
                        try:
                            s.send(b"M")
                        except OSError:
                            pass

            threading.Thread(target=trickle, daemon=True).start()
        time.sleep(0.5)
        return welcome_times(srv, reps)
    finally:
        stop.set()
        for s in socks:
            s.close()
        srv.shutdown()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sockets", type=int, default=500)
    ap.add_argument("--reps", type=int, default=10)
    a = ap.parse_args()
    print(f"# preauth bench — {time.strftime('%Y-%m-%d')}, CPU, {a.sockets} sockets, {a.reps} connections each\n")
    print("| sockets open | welcome median ms | welcome worst ms |")
    print("|---|---:|---:|")
    for mode in ("none", "idle", "trickle", "ten-addresses"):
        ts = run(a.sockets, mode, a.reps)
        label = "none" if mode == "none" else f"{a.sockets} {mode}"
        print(f"| {label} | {statistics.median(ts) * 1e3:.1f} | {max(ts) * 1e3:.1f} |", flush=True)


if __name__ == "__main__":
    main()
