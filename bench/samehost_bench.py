"""Per-call overhead of one seam between two processes on this host: TCP loopback vs the same-host
fast path (samehost.py). A toy Daedalus runs in a subprocess; the client sends a raw seam of --mb
megabytes (float32 [1, N, 64]) and gets the same size back. Overhead = round trip - server forward.

    python bench/samehost_bench.py [--mb 37.7] [--calls 20] [--device cpu|cuda]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time

import torch
from comfyui_mesh.config import ClientConfig
from comfyui_mesh.transport import MeshClient


def start_server(device: str) -> tuple[subprocess.Popen, int]:
    state = tempfile.mkdtemp()
    cmd = [sys.executable, "-m", "comfyui_mesh.server", "--toy", "--device", device, "--port", "0"]
    p = subprocess.Popen(
        [*cmd, "--n-blocks", "1", "--no-auth", "--state-dir", state],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    assert p.stdout is not None
    for line in p.stdout:
        if "READY listening on" in line:
            return p, int(line.split("listening on ")[1].split()[0].rsplit(":", 1)[1])
    raise RuntimeError("server did not start")


def run(port: int, x: torch.Tensor, bias: torch.Tensor, calls: int, device: str, samehost: bool) -> list[float]:
    os.environ["COMFYUI_MESH_SAMEHOST"] = "1" if samehost else "0"
    c = MeshClient(ClientConfig(port=port), expect={"arch": "toy", "n_blocks": 1})
    out = []
    try:
        for i in range(calls + 2):
            t0 = time.perf_counter()
            _, st = c.forward(
                arch="toy", n_blocks=1, coded={"x": x}, exact={}, consts={"bias": bias}, scalars={}, device=device
            )
            dt = (time.perf_counter() - t0) * 1e3 - st.server.get("forward", 0.0)
            assert st.via == ("samehost" if samehost else "tcp"), st.via
            if i >= 2:  # warm-up: constants, first segment
                out.append(dt)
    finally:
        c.close()
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mb", type=float, default=37.7)
    ap.add_argument("--calls", type=int, default=20)
    ap.add_argument("--device", default="cpu")
    a = ap.parse_args()
    n = int(a.mb * 1e6 / 4 / 64)
    x = torch.randn(1, n, 64, device=a.device)
    bias = torch.zeros(64, device=a.device)
    p, port = start_server(a.device)
    try:
        for same in (False, True):
            ms = run(port, x, bias, a.calls, a.device, same)
            print(
                f"{'samehost' if same else 'tcp':8s} seam {x.numel() * 4 / 1e6:.1f} MB each way, device {a.device}: "
                f"overhead per call median {statistics.median(ms):.1f} ms, min {min(ms):.1f} ms ({len(ms)} calls)"
            )
    finally:
        p.terminate()
        p.wait(20)


if __name__ == "__main__":
    main()
