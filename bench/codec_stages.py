"""The first slab's coding latency after the front half, whole vs staged (GPU only).

    python bench/codec_stages.py [--tokens 576,1280,5120] [--channels 3072] [--calls 10]

A "front half" (20 bf16 matmuls of 8192², ~30 ms on an H200) is queued, then a seam slab is coded two
ways: the old way (wait for the front half, then ``codec.encode``) and staged (``codec.staged_encode``:
its first stage queued behind the front half, then wait, then ``run_stages``). Prints, per codec and
slab size, the median time after the front half is done (what is in series with the call) and the
first stage's host time (hidden behind the front half). docs/BENCHMARKS.md has the H200 figures.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from comfyui_mesh import codec
from comfyui_mesh.wirecodecs.base import run_stages


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", default="576,1280,5120")
    ap.add_argument("--channels", type=int, default=3072)
    ap.add_argument("--calls", type=int, default=10)
    ap.add_argument("--codecs", default="quant,quant-t")
    a = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("needs a CUDA GPU")
    dev = torch.device("cuda:0")
    g = torch.Generator(device=dev).manual_seed(0)
    front = torch.randn(8192, 8192, device=dev, dtype=torch.bfloat16)

    def front_half() -> torch.cuda.Event:
        for _ in range(20):
            front @ front
        ev = torch.cuda.Event()
        ev.record()
        return ev

    for name in a.codecs.split(","):
        for n in (int(k) for k in a.tokens.split(",")):
            base = torch.randn(1, n, a.channels, generator=g, device=dev) * 0.7
            base[..., 7] = base[..., 7] * 300 + 50  # a massive channel
            whole, first, after = [], [], []
            st_whole: dict = {}
            st_staged: dict = {}
            for _ in range(a.calls):
                x = (base + 0.05 * torch.randn(base.shape, generator=g, device=dev)).to(torch.bfloat16)
                torch.cuda.synchronize()
                front_half().synchronize()
                t0 = time.perf_counter()
                codec.encode(x, "x", name, {}, state=st_whole)
                whole.append((time.perf_counter() - t0) * 1e3)
                torch.cuda.synchronize()
                ev = front_half()
                t0 = time.perf_counter()
                gen = codec.staged_encode(x, "x", name, {}, state=st_staged)
                next(gen)
                first.append((time.perf_counter() - t0) * 1e3)
                ev.synchronize()
                t0 = time.perf_counter()
                run_stages(gen)
                after.append((time.perf_counter() - t0) * 1e3)

            def med(v: list[float]) -> float:
                return statistics.median(v[3:] if len(v) > 5 else v)

            print(
                f"{name:8s} {n:5d} tokens: after the front half: whole {med(whole):6.2f} ms | "
                f"staged {med(after):6.2f} ms (first stage {med(first):5.2f} ms, hidden)",
                flush=True,
            )


if __name__ == "__main__":
    main()
