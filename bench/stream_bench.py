"""Streamed vs single-frame calls (docs/PROTOCOL.md §6.1) through a real Daedalus on loopback.

The back half is an echo (no compute), so the time per call is the split's own cost: encode, send,
receive, decode, both ways. Default shapes are FLUX.2 Klein 9B's at 1024²: the seam x [1, 4608+512,
3072] bf16 (31.5 MB) out, the reply [1, 4096, 128] bf16 (1 MB) back.

    python bench/stream_bench.py                         # CPU, every codec, streamed and not
    python bench/stream_bench.py --device cuda --calls 20
    python bench/stream_bench.py --codecs raw,quant-t --slab-mb 4,1

Prints a markdown table: ms per call (median, min), MB out / in per call, client encode / decode ms.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from typing import Any

import torch
from comfyui_mesh.config import ClientConfig, ServerConfig
from comfyui_mesh.server.core import DaedalusServer, ServerState
from comfyui_mesh.transport import MeshClient


class EchoBackend:
    """Returns the first ``reply_tokens`` tokens and ``reply_channels`` channels of ``x``: a reply of
    the real size, and no compute."""

    arch = "echo"
    comfyui_version = ""
    model_name = "echo"
    fingerprint = ""
    n_blocks_max = 64

    def __init__(self, n_blocks: int, device: str, reply_tokens: int, reply_channels: int):
        self.n_blocks = n_blocks
        self.device = torch.device(device)
        self.reply = (reply_tokens, reply_channels)

    def forward(self, tensors: dict[str, torch.Tensor], scalars: dict[str, Any]) -> dict[str, torch.Tensor]:
        x = tensors["x"]
        return {"out": x[:, : self.reply[0], : self.reply[1]].contiguous()}

    def close(self) -> None:
        pass


def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    # over TCP: on the same-host fast path nothing is streamed (docs/PROTOCOL.md §6.1)
    cfg = ServerConfig(port=0, device=args.device, n_blocks=1, auth=False, samehost=False)
    st = ServerState(cfg, lambda n: EchoBackend(n, args.device, args.reply_tokens, args.reply_channels), token=None)
    srv = DaedalusServer(st)
    host, port = srv.start()
    g = torch.Generator().manual_seed(0)
    base = torch.randn(1, args.tokens, args.channels, generator=g)
    # a few steps that change a little, as a sampler's do (temporal codecs code the change)
    fronts = [
        (base + 0.05 * k * torch.randn(base.shape, generator=g)).to(torch.bfloat16).to(args.device) for k in range(4)
    ]
    rows = []
    try:
        for codec_name in args.codecs.split(","):
            for slab_mb in [0.0] + [float(s) for s in args.slab_mb.split(",")]:
                ccfg = ClientConfig(host=host, port=port, stream_slab_bytes=int(slab_mb * (1 << 20)))
                c = MeshClient(ccfg, expect={"arch": "echo", "n_blocks": 1})
                times, stats_all = [], []
                try:
                    for i in range(args.warmup + args.calls):
                        t0 = time.perf_counter()
                        _, stats = c.forward(
                            arch="echo",
                            n_blocks=1,
                            coded={"x": fronts[i % len(fronts)]},
                            exact={},
                            consts={},
                            scalars={},
                            codec_name=codec_name,
                            reply_codec=args.reply_codec,
                            stream={"gen": "bench"},
                            device=args.device,
                        )
                        if args.device.startswith("cuda"):
                            torch.cuda.synchronize()
                        if i >= args.warmup:
                            times.append((time.perf_counter() - t0) * 1e3)
                            stats_all.append(stats)
                finally:
                    c.close()
                rows.append(
                    {
                        "codec": codec_name,
                        "slab": f"{slab_mb:g} MiB" if slab_mb else "off",
                        "median": statistics.median(times),
                        "min": min(times),
                        "out": statistics.mean(s.bytes_out for s in stats_all) / 1e6,
                        "in": statistics.mean(s.bytes_in for s in stats_all) / 1e6,
                        "enc": statistics.median(s.encode_ms for s in stats_all),
                        "dec": statistics.median(s.decode_ms for s in stats_all),
                        "srv": statistics.median(s.server.get("decode", 0) for s in stats_all),
                    }
                )
                r = rows[-1]
                print(f"  {r['codec']:<11} stream {r['slab']:<8} {r['median']:8.1f} ms/call", file=sys.stderr)
    finally:
        srv.shutdown()
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--codecs", default="raw,lossless,quant,lossless-t,quant-t")
    ap.add_argument("--slab-mb", default="4", help="slab sizes to compare with single frames, MiB, comma-separated")
    ap.add_argument("--tokens", type=int, default=4608 + 512)
    ap.add_argument("--channels", type=int, default=3072)
    ap.add_argument("--reply-tokens", type=int, default=4096)
    ap.add_argument("--reply-channels", type=int, default=128)
    ap.add_argument("--reply-codec", default="raw")
    ap.add_argument("--calls", type=int, default=8)
    ap.add_argument("--warmup", type=int, default=2)
    args = ap.parse_args(argv)
    rows = run(args)
    print(
        f"\n{platform.node()} {args.device} ({torch.get_num_threads()} threads), {time.strftime('%Y-%m-%d')}, "
        f"x [1, {args.tokens}, {args.channels}] bf16, reply [1, {args.reply_tokens}, {args.reply_channels}], "
        f"loopback TCP, echo back half\n"
    )
    print(
        "| codec | streamed | ms/call (median) | min | MB out | MB in | client encode ms | server decode ms | client decode ms |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['codec']} | {r['slab']} | {r['median']:.1f} | {r['min']:.1f} | {r['out']:.2f} | {r['in']:.2f} | "
            f"{r['enc']:.1f} | {r['srv']:.1f} | {r['dec']:.1f} |"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
