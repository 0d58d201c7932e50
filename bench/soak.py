"""Soak a Daedalus with many clients at once, every answer checked (issue #14 item 8).

    python bench/soak.py [--clients 10] [--steps 200] [--json report.json]

Starts ``python -m comfyui_mesh.server --toy --device cpu --port 0`` (auth on) and runs N Icarus
clients (``transport.MeshClient``, one thread each) against it for S steps. Client i uses its own
activation codec (raw, lossless, lossless-t, quant, quant-t, int8, q4, clip-sparse, auto, hevc-orig,
nvenc: those usable here, in turn), its own reply codec (raw or lossless), token count and scale, and
its own per-generation constant set: the toy back half has no LoRA, so the per-client "LoRA" is the
constant ``bias`` it sends once per generation (a new one, and a new temporal-codec generation, every
--gen-steps steps, with END_STREAM at each generation's end).

Each answer is checked against the toy math run here on exactly what the server decoded: the client
records the wire tensors it sent and this tool decodes them with its own copy of the codec state
(so lossy and temporal codecs are checked exactly, not against a tolerance). An answer is wrong when
it differs by more than --atol (float32 round-off between two processes). Reports per client p50 /
p99 step latency, wrong answers and errors, and the server's RSS over time.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import torch
from comfyui_mesh import codec
from comfyui_mesh.config import ClientConfig
from comfyui_mesh.server.toy import ToyModel
from comfyui_mesh.transport import MeshClient
from comfyui_mesh.wirecodecs import temporal
from serverproc import ServerProc, percentile, read_status

CODEC_ORDER = (
    "raw", "lossless", "lossless-t", "quant", "quant-t", "int8", "q4", "clip-sparse", "auto", "hevc-orig", "nvenc",
)  # fmt: skip
N_BLOCKS = 3  # served by the toy server (of ToyModel's 8)


class CheckedClient(MeshClient):
    """A MeshClient that keeps what it sent and a mirror of the server's codec state, so the
    caller can decode exactly what the server decoded."""

    def __init__(self, *a: Any, **kw: Any):
        super().__init__(*a, **kw)
        self.mirror: dict[str, Any] = {}
        self.sent: list = []

    def _encode_coded(self, coded, codec_name, codec_params, stream, stats):  # type: ignore[no-untyped-def]
        done = super()._encode_coded(coded, codec_name, codec_params, stream, stats)
        self.sent = done.whole
        return done

    def _reset_codec_state(self) -> None:
        super()._reset_codec_state()
        self.mirror = {}

    def end_stream(self, gen: str | None = None) -> None:
        temporal.end_stream(self.mirror, gen)
        super().end_stream(gen)

    def as_server_decoded(self, stream: dict[str, Any]) -> dict[str, torch.Tensor]:
        sub = temporal.stream_state(self.mirror, stream)
        return {wt.name: codec.decode(wt, "cpu", state=sub) for wt in self.sent}


def client_run(i: int, srv: ServerProc, name: str, reply: str, steps: int, gen_steps: int, atol: float) -> dict:
    model = ToyModel()
    first = model.total - N_BLOCKS
    g = torch.Generator().manual_seed(1000 + i)
    L = 8 + 8 * (i % 4)
    scale = 1.0 + 0.1 * i
    c = CheckedClient(
        ClientConfig(host=srv.address[0], port=srv.address[1], token=srv.token, client_name=f"soak-{i}"),
        expect={"arch": "toy", "n_blocks": N_BLOCKS},
    )
    lat: list[float] = []
    wrong, errors, exact, worst = 0, [], 0, 0.0
    x = torch.randn(1, L, 64, generator=g)
    bias = torch.zeros(64)
    stream: dict[str, Any] = {}
    for step in range(steps):
        if step % gen_steps == 0:  # a new generation: its own constant set and temporal stream
            if step:
                c.end_stream(stream["gen"])
            bias = torch.randn(64, generator=g) * 0.1
            stream = {"gen": f"c{i}-g{step // gen_steps}", "cfg": 0}
            x = torch.randn(1, L, 64, generator=g)
        x = x + 0.05 * torch.randn(1, L, 64, generator=g)  # the next step's seam: close to the last
        front = model.run(x, bias, 0, first)
        t0 = time.perf_counter()
        try:
            out, _ = c.forward(
                arch="toy",
                n_blocks=N_BLOCKS,
                coded={"x": front},
                exact={},
                consts={"bias": bias},
                scalars={"scale": scale},
                codec_name=name,
                reply_codec=reply,
                stream=stream,
            )
        except Exception as e:  # any failure is counted and shown, the soak goes on
            errors.append(f"step {step}: {type(e).__name__}: {e}")
            continue
        lat.append((time.perf_counter() - t0) * 1e3)
        seen = c.as_server_decoded(stream)["x"]
        want = model.run(seen, bias, first) * scale
        got = out["out"]
        diff = (got.float() - want.float()).abs().max().item() if got.shape == want.shape else float("inf")
        worst = max(worst, diff)
        exact += bool(got.shape == want.shape and torch.equal(got, want))
        wrong += not diff <= atol
    c.end_stream(stream.get("gen"))
    c.close()
    return {
        "client": i,
        "codec": name,
        "reply": reply,
        "tokens": L,
        "steps": steps,
        "answers": len(lat),
        "wrong": wrong,
        "bit_exact": exact,
        "max_diff": worst,
        "errors": len(errors),
        "first_errors": errors[:3],
        "p50_ms": round(percentile(lat, 50), 2),
        "p99_ms": round(percentile(lat, 99), 2),
        "mean_ms": round(statistics.fmean(lat), 2) if lat else 0.0,
    }


def run(clients: int = 10, steps: int = 200, gen_steps: int = 25, atol: float = 1e-5, workdir: str = "") -> dict:
    usable = [n for n in CODEC_ORDER if codec.by_name(n).available() is None]
    tmp = tempfile.TemporaryDirectory(prefix="mesh-soak-") if not workdir else None
    wd = Path(workdir or tmp.name)  # type: ignore[union-attr]
    wd.mkdir(parents=True, exist_ok=True)
    # Every client connects from 127.0.0.1 at the same moment: raise the per-address cap on connections
    # still in the handshake (default 8), which would push the oldest out with `busy`.
    caps = ["--max-clients", str(clients + 4), "--max-unauthenticated-per-address", str(clients + 4)]
    srv = ServerProc(wd, caps)
    series: list[tuple[float, int]] = []
    stop = threading.Event()
    t0 = time.monotonic()

    def sample() -> None:
        while not stop.wait(0.5):
            series.append((round(time.monotonic() - t0, 1), read_status(srv.pid)["VmRSS"]))

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    results: list[dict] = [{}] * clients

    def one(i: int) -> None:
        results[i] = client_run(
            i, srv, usable[i % len(usable)], "lossless" if i % 3 == 2 else "raw", steps, gen_steps, atol
        )

    try:
        ts = [threading.Thread(target=one, args=(i,)) for i in range(clients)]
        for th in ts:
            th.start()
        for th in ts:
            th.join()
        elapsed = time.monotonic() - t0
        stop.set()
        sampler.join()
        alive = srv.alive()
        hwm = read_status(srv.pid)["VmHWM"]
        n_tb, tb_kinds = srv.tracebacks()
    finally:
        srv.stop()
        if tmp is not None:
            tmp.cleanup()
    rss = [r for _, r in series] or [0]
    all_lat_p99 = max((r["p99_ms"] for r in results), default=0.0)
    return {
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "clients": clients,
        "steps": steps,
        "seconds": round(elapsed, 1),
        "answers": sum(r["answers"] for r in results),
        "wrong": sum(r["wrong"] for r in results),
        "errors": sum(r["errors"] for r in results),
        "worst_p99_ms": all_lat_p99,
        "server_alive": alive,
        "tracebacks": n_tb,
        "traceback_kinds": tb_kinds,
        "rss_start_mb": round(rss[0] / 2**20, 1),
        "rss_max_mb": round(max(max(rss), hwm) / 2**20, 1),
        "rss_end_mb": round(rss[-1] / 2**20, 1),
        "rss_series_mb": [(t, round(r / 2**20, 1)) for t, r in series[:: max(1, len(series) // 20)]],
        "per_client": results,
    }


def markdown(r: dict) -> str:
    out = [
        "| client | codec | reply | tokens | answers | wrong | bit-exact | max diff | errors | p50 ms | p99 ms |",
        "|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for c in r["per_client"]:
        out.append(
            f"| {c['client']} | {c['codec']} | {c['reply']} | {c['tokens']} | {c['answers']} | {c['wrong']} | "
            f"{c['bit_exact']} | {c['max_diff']:.2g} | {c['errors']} | {c['p50_ms']} | {c['p99_ms']} |"
        )
    out.append("")
    out.append(
        f"{r['clients']} clients x {r['steps']} steps in {r['seconds']} s: {r['answers']} answers, {r['wrong']} wrong, "
        f"{r['errors']} errors, server alive {r['server_alive']}, {r['tracebacks']} tracebacks; server RSS "
        f"{r['rss_start_mb']} MB at start, {r['rss_max_mb']} MB max, {r['rss_end_mb']} MB at the end"
    )
    out.append("RSS over time (s, MB): " + ", ".join(f"{t:g}: {m:g}" for t, m in r["rss_series_mb"]))
    for c in r["per_client"]:
        for e in c["first_errors"]:
            out.append(f"- client {c['client']} ({c['codec']}): {e[:300]}")
    return "\n".join(out)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--clients", type=int, default=10)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--gen-steps", type=int, default=25, help="steps per generation (new constants, new stream)")
    ap.add_argument("--atol", type=float, default=1e-5, help="largest difference from the local toy math")
    ap.add_argument("--workdir", default="", help="keep the server's output here")
    ap.add_argument("--json", default="", help="write the report here")
    a = ap.parse_args()
    r = run(a.clients, a.steps, a.gen_steps, a.atol, a.workdir)
    if a.json:
        Path(a.json).write_text(json.dumps(r, indent=1))
    print(f"# soak — {r['date']}, this CPU machine, toy back half\n")
    print(markdown(r))
    return 1 if r["wrong"] or r["errors"] or r["tracebacks"] or not r["server_alive"] else 0


if __name__ == "__main__":
    sys.exit(main())
