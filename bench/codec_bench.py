"""Activation codec benchmark: every registered codec x data sets -> bytes, speed, fidelity, RD efficiency.

    python bench/codec_bench.py [--device cpu|cuda] [--grid 32x32] [--text 0] [--channels 1024] [--steps 8]
        [--r 0.3] [--dtype bfloat16] [--sets synthetic,massive] [--massive 4] [--massive-scale 300]
        [--file acts.safetensors] [--captured seam.safetensors] [--codecs quant,quant-t]
        [--backend zstd|ans] [--params 'NAME={"k": v}'] [--json out.json]

Data sets (each a sequence of steps of one seam tensor [B, L, C]; ``comfyui_mesh.synthetic``):
  synthetic  DiT-like statistics: log-normal channel scales and means, a few "massive" channels
             (hundreds of times the median, near-constant over tokens, growing with the step),
             fields smooth over a 2-D token grid, and step-to-step correlation with relative
             residual r (AR(1) on the centered signal: ||x_t - x_t-1|| / ||x_t|| ~ r).
  massive    the same with massive channels as trained models have them: spread over the tokens
             --massive-scale x the median channel's, sign-stable, smooth over the token grid, on
             text tokens too, growing with the step (what random weights and the set above miss).
  file       --file: a safetensors file, one tensor per step, keys in natural order, or a quoted glob
             of such files: e.g. what Icarus writes with COMFYUI_MESH_SEAM_DUMP=PREFIX set,
             --file 'PREFIX-img-*.safetensors' (one file per remote call and seam tensor).
  captured   --captured: (a) seam activations captured elsewhere (e.g. from a full-size random-weight
             model on a GPU during a short sampling run); same format. The hook is ``load_steps``.

Per codec (and parameter set) and data set: bytes per step, ratio to the input, encode and decode ms
(median over steps; CUDA synchronized), per-channel SNR in dB (each channel's variance over the tokens
/ its MSE; "min": the worst channel of the worst step, "median": the median channel, mean over steps;
the measure every lossy codec's floor is stated in), cosine (worst step), "cos c." (the same after
removing the input's channel means), relative L2 (worst), max abs error, PSNR (peak = max |x|),
bits/value, and two Gaussian rate-distortion bounds: "bound/ch" = 0.5 log2(SNR) bits/value, the least
any codec needs to give EVERY channel the worst-channel SNR achieved (the per-channel measure), and
"bound (MSE)" = reverse water-filling over the per-channel variances at the whole-tensor MSE achieved
(the old measure: it lets quiet channels be rounded away), with efficiency = bits / bound (MSE).
Temporal codecs run the sequence with their state; the others code each step alone. A second
table compares intra and temporal coding on sequences of the massive set with r = 0.1, 0.3, 0.6.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import re
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
from comfyui_mesh import codec
from comfyui_mesh.errors import MeshError
from comfyui_mesh.synthetic import seam_steps
from comfyui_mesh.wirecodecs.fidelity import channel_snr_db

PARAMS: dict[str, list[dict[str, Any]]] = {
    "quant": [{}, {"snr_db": 20.0}],  # {}: the default floor, 27 dB per channel
    "quant-t": [{}, {"snr_db": 20.0}],
    "auto": [{}],
}
OURS = range(2, 16)  # wire ids that understand the "backend" parameter


# ---------------------------------------------------------------------------- data


def synthetic(steps: int, **kw: Any) -> list[torch.Tensor]:
    """The synthetic sets (``comfyui_mesh.synthetic.seam_steps``; ``varying=False``: the old
    near-constant massive channels)."""
    return seam_steps(steps, **kw)


def load_steps(path: str, device: str = "cpu") -> list[torch.Tensor]:
    """Hook for captured / user activations: safetensors, one tensor per step, natural key order.

    ``path`` may also be a glob (quote it), e.g. what Icarus writes with COMFYUI_MESH_SEAM_DUMP=PREFIX:
    ``'PREFIX-img-*.safetensors'``; the files are taken in natural order, the tensors of each too."""
    import glob

    from safetensors.torch import load_file

    def natural(k: str) -> list[Any]:
        return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", k)]

    files = sorted(glob.glob(path), key=natural) if any(c in path for c in "*?[") else [path]
    out = []
    for f in files:
        d = load_file(f)
        out += [d[k].to(device) for k in sorted(d, key=natural)]
    if not out:
        raise SystemExit(f"{path}: no tensors")
    return out


# ---------------------------------------------------------------------------- metrics


def wire_copy(wt: Any) -> Any:
    """The WireTensor as the peer's frame decoder hands it over."""
    return dataclasses.replace(wt, data=bytes(wt.data), meta=json.loads(json.dumps(wt.meta)))


def channel_var(x: torch.Tensor) -> torch.Tensor:
    x2 = x.detach().reshape(-1, x.shape[-1]).double()
    return x2.var(dim=0, correction=0) if x2.shape[0] > 1 else torch.zeros(x2.shape[1], dtype=torch.float64)


def innovation_var(x: torch.Tensor, prev: torch.Tensor) -> torch.Tensor:
    """Per-channel variance of x minus its best per-channel scaled prediction from the previous
    decoded step: what a closed-loop temporal coder has left to send."""
    a = x.detach().reshape(-1, x.shape[-1]).double()
    p = prev.detach().reshape(-1, x.shape[-1]).double()
    a, p = a - a.mean(0), p - p.mean(0)
    alpha = (a * p).sum(0) / (p * p).sum(0).clamp(min=1e-300)
    return (a - alpha * p).var(dim=0, correction=0)


def gaussian_bound(var: torch.Tensor, d: float) -> float:
    """Bits/value of independent Gaussian channels at MSE d per value (reverse water-filling)."""
    v = torch.sort(var.double().cpu().clamp(min=0)).values
    c = v.numel()
    if d <= 0:
        return math.inf
    if c == 0 or d >= float(v.mean()):
        return 0.0
    below = torch.cumsum(v, 0) - v
    theta = (d * c - below) / torch.arange(c, 0, -1, dtype=torch.float64)
    th = float(theta[int(torch.nonzero(theta <= v)[0, 0])])
    return float((0.5 * torch.log2(v / th)).clamp(min=0).mean())


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


@dataclasses.dataclass
class Row:
    data: str
    codec: str
    params: str
    bytes_step: float = 0.0
    ratio: float = 0.0
    enc_ms: float = 0.0
    dec_ms: float = 0.0
    cosine: float = 1.0
    cos_c: float = 1.0  # cosine after removing the input's channel means (what codec targets refer to)
    rel_l2: float = 0.0
    max_abs: float = 0.0
    psnr: float = math.inf
    bits: float = 0.0
    bound: float = math.inf
    efficiency: float = math.nan
    snr_min: float = math.inf  # per-channel SNR (dB) against the channel's own spread: worst channel, worst step
    snr_med: float = math.inf  # median channel, mean over steps
    bound_ch: float = math.inf  # Gaussian bits/value for every channel at >= snr_min: 0.5 log2(SNR)
    note: str = ""
    p_bits: float = math.nan  # temporal codecs: bits/value over the P-frames only
    p_bound: float = math.nan  # Gaussian bound of the P-frames: variances of x_t - a_c * x'_{t-1}


def run(name: str, params: dict[str, Any], steps: list[torch.Tensor], device: str, label: str) -> Row:
    c = codec.by_name(name)
    row = Row(label, name, json.dumps(params, separators=(",", ":")) if params else "")
    why = c.available()
    if why:
        row.note = f"unavailable: {why}"
        return row
    stateful = c.stateful
    try:  # warm-up (contexts, kernels) on a throwaway state
        codec.decode(wire_copy(codec.encode(steps[0], "x", name, params, state={})), device, state={})
    except MeshError as e:
        row.note = f"error: {e}"
        return row
    enc_state: dict | None = {} if stateful else None
    dec_state: dict | None = {} if stateful else None
    enc, dec, nbytes, cos, cosc, rel, mx, psnr, bound, pbits, pbound, smin, smed = ([] for _ in range(13))
    prev = None
    for x in steps:
        sync(device)
        t0 = time.perf_counter()
        wt = codec.encode(x, "x", name, params, state=enc_state)  # payload: host bytes
        sync(device)
        t1 = time.perf_counter()
        wc = wire_copy(wt)
        sync(device)
        t2 = time.perf_counter()
        y = codec.decode(wc, device, state=dec_state)
        sync(device)
        t3 = time.perf_counter()
        enc.append((t1 - t0) * 1e3)
        dec.append((t3 - t2) * 1e3)
        nbytes.append(wt.nbytes)
        xd, yd = x.double().reshape(-1), y.double().reshape(-1)
        err = xd - yd
        mse = float(err.square().mean())
        if wt.meta.get("f") == "p" and prev is not None:
            pbits.append(8.0 * wt.nbytes / x.numel())
            pbound.append(gaussian_bound(innovation_var(x, prev), mse))
        prev = y
        nx = float(xd.norm())
        cos.append(float(torch.dot(xd, yd) / (nx * float(yd.norm()))) if nx and float(yd.norm()) else 1.0)
        mu = x.double().reshape(-1, x.shape[-1]).mean(0)
        xc = (x.double().reshape(-1, x.shape[-1]) - mu).reshape(-1)
        yc = (y.double().reshape(-1, x.shape[-1]) - mu).reshape(-1)
        den = float(xc.norm()) * float(yc.norm())
        cosc.append(float(torch.dot(xc, yc)) / den if den else 1.0)
        rel.append(float(err.norm()) / nx if nx else 0.0)
        mx.append(float(err.abs().max()))
        peak = float(xd.abs().max())
        psnr.append(10 * math.log10(peak * peak / mse) if mse > 0 and peak > 0 else math.inf)
        bound.append(gaussian_bound(channel_var(x), mse))
        snr = channel_snr_db(x, y)
        live = snr[~torch.isnan(snr)]
        smin.append(float(live.min()) if live.numel() else math.inf)
        smed.append(float(live.median()) if live.numel() else math.inf)
    n = steps[0].numel()
    row.bytes_step = statistics.mean(nbytes)
    row.ratio = steps[0].numel() * steps[0].element_size() / row.bytes_step
    row.enc_ms, row.dec_ms = statistics.median(enc), statistics.median(dec)
    row.cosine, row.cos_c, row.rel_l2, row.max_abs = min(cos), min(cosc), max(rel), max(mx)
    row.psnr = statistics.mean(psnr) if all(math.isfinite(p) for p in psnr) else math.inf
    row.bits = 8.0 * row.bytes_step / n
    row.bound = statistics.mean(bound) if all(math.isfinite(b) for b in bound) else math.inf
    row.efficiency = row.bits / row.bound if math.isfinite(row.bound) and row.bound > 0 else math.nan
    row.snr_min = min(smin)
    row.snr_med = statistics.mean(smed) if all(math.isfinite(v) for v in smed) else math.inf
    row.bound_ch = 0.5 * math.log2(10 ** (row.snr_min / 10)) if math.isfinite(row.snr_min) else math.inf
    row.p_bits = statistics.mean(pbits) if pbits else math.nan
    row.p_bound = statistics.mean(pbound) if pbound and all(math.isfinite(b) for b in pbound) else math.nan
    return row


def fmt(v: float, spec: str) -> str:
    if isinstance(v, float) and math.isnan(v):
        return "-"
    if isinstance(v, float) and math.isinf(v):
        return "exact" if spec in ("psnr", "db") else "-"
    if spec in ("psnr", "db"):
        return f"{v:.1f}"
    return format(v, spec)


def table(rows: list[Row]) -> str:
    head = (
        "| data | codec | params | bytes/step | ratio | enc ms | dec ms | SNR/ch min dB | SNR/ch median dB | cosine "
        "| cos c. | rel L2 | max abs | PSNR dB | bits/val | bound/ch | bound (MSE) | eff. | note |"
    )
    lines = [head, "|" + "---|" * 19]
    for r in rows:
        lines.append(
            f"| {r.data} | {r.codec} | {r.params} | {r.bytes_step:,.0f} | {fmt(r.ratio, '.2f')} | "
            f"{fmt(r.enc_ms, '.1f')} | {fmt(r.dec_ms, '.1f')} | {fmt(r.snr_min, 'db')} | {fmt(r.snr_med, 'db')} | "
            f"{fmt(r.cosine, '.6f')} | {fmt(r.cos_c, '.5f')} | "
            f"{fmt(r.rel_l2, '.2e')} | "
            f"{fmt(r.max_abs, '.3g')} | {fmt(r.psnr, 'psnr')} | {fmt(r.bits, '.3f')} | {fmt(r.bound_ch, '.3f')} | "
            f"{fmt(r.bound, '.3f')} | "
            f"{fmt(r.efficiency, '.3f')} | {r.note} |"
        )
    return "\n".join(lines)


def centered_residual(steps: list[torch.Tensor]) -> float:
    """Mean over steps of ||dx|| / ||x|| after removing each step's channel means."""
    out = []
    for a, b in zip(steps[:-1], steps[1:], strict=True):
        a2 = a.double().reshape(-1, a.shape[-1])
        b2 = b.double().reshape(-1, b.shape[-1])
        a2, b2 = a2 - a2.mean(0), b2 - b2.mean(0)
        out.append(float((b2 - a2).norm() / b2.norm()))
    return statistics.mean(out) if out else math.nan


# ---------------------------------------------------------------------------- main


def versus_original(orig: Row, steps: list[torch.Tensor], a: argparse.Namespace, label: str) -> list[Row]:
    """The original scheme (per-channel uint8 + HEVC QP 18, tile 8) against ours at ITS worst-channel SNR.

    Runs ``quant`` (and ``quant-t`` over several steps) with ``snr_db`` = the per-channel SNR the
    original reached on its worst channel and step, and prints bytes next to the bound."""
    target = round(min(max(orig.snr_min, 0.0), 80.0), 2)
    p: dict[str, Any] = {"snr_db": target}
    if a.backend:
        p["backend"] = a.backend
    ours = [run("quant", p, steps, a.device, label)]
    if len(steps) > 1 and "quant-t" in {c.name for c in codec.CODECS.values()}:
        ours.append(run("quant-t", p, steps, a.device, label))
    print(f"### {label}: ours at the original scheme's worst-channel SNR ({target:.2f} dB)\n")
    print("| codec | bytes/step | SNR/ch min dB | SNR/ch median dB | bits/val | bound/ch | bytes vs original |")
    print("|---|---|---|---|---|---|---|")
    for r in [orig, *ours]:
        what = "hevc-orig (QP 18, tile 8)" if r is orig else r.codec
        print(f"| {what} | {r.bytes_step:,.0f} | {fmt(r.snr_min, 'db')} | {fmt(r.snr_med, 'db')} | {r.bits:.3f} | "
              f"{fmt(r.bound_ch, '.3f')} | {r.bytes_step / orig.bytes_step:.2f} |")  # fmt: skip
    print()
    return ours


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--grid", default="32x32", help="image token grid HxW of the synthetic set")
    ap.add_argument("--text", type=int, default=0, help="extra unstructured (text) tokens")
    ap.add_argument("--channels", type=int, default=1024)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--r", type=float, default=0.3, help="relative step-to-step residual of the synthetic set")
    ap.add_argument("--massive", type=int, default=4)
    ap.add_argument("--massive-scale", type=float, default=300.0, help="massive channels' spread / the median's")
    ap.add_argument(
        "--sets", default="synthetic,massive",
        help="synthetic: near-constant massive channels (the old set); massive: token-varying massive channels",
    )  # fmt: skip
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    ap.add_argument("--file", help="user activations: safetensors, one tensor per step")
    ap.add_argument("--captured", help="(a) captured seam activations, same format")
    ap.add_argument("--codecs", default="", help="comma-separated codec names (default: every registered)")
    ap.add_argument("--backend", default="", help="force the entropy backend of ids 2..15: zstd or ans")
    ap.add_argument("--params", action="append", default=[], help='NAME={"json": "params"} (replaces defaults)')
    ap.add_argument("--no-temporal-table", action="store_true")
    ap.add_argument("--json", help="also write every row as JSON here")
    a = ap.parse_args(argv)
    dtype = getattr(torch, a.dtype)
    h, w = (int(v) for v in a.grid.lower().split("x"))
    if a.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("--device cuda but torch sees no CUDA device")
    user: dict[str, list[dict[str, Any]]] = {}
    for spec in a.params:
        k, _, v = spec.partition("=")
        user.setdefault(k.strip(), []).append(json.loads(v))
    params = {**PARAMS, **user}
    names = [n.strip() for n in a.codecs.split(",") if n.strip()] or [c.name for _, c in sorted(codec.CODECS.items())]

    def param_sets(name: str) -> list[dict[str, Any]]:
        sets = params.get(name) or [{}]
        if a.backend and codec.by_name(name).wire_id in OURS:
            sets = [{**p, "backend": a.backend} for p in sets]
        return sets

    kw = dict(grid=(h, w), text=a.text, channels=a.channels, massive=a.massive, batch=a.batch, dtype=dtype)
    sets = {v.strip() for v in a.sets.split(",") if v.strip()}
    datasets = {}
    if "synthetic" in sets:
        datasets[f"synthetic r={a.r}"] = synthetic(a.steps, r=a.r, device=a.device, varying=False, **kw)  # type: ignore[arg-type]
    if "massive" in sets:
        datasets[f"massive r={a.r}"] = synthetic(
            a.steps,
            r=a.r,
            device=a.device,
            massive_scale=a.massive_scale,
            **kw,  # type: ignore[arg-type]
        )
    if a.file:
        datasets[Path(a.file).name] = load_steps(a.file, a.device)
    if a.captured:
        datasets["captured:" + Path(a.captured).name] = load_steps(a.captured, a.device)

    dev = torch.cuda.get_device_name() if a.device.startswith("cuda") else "CPU"
    print(
        f"# codec benchmark — {time.strftime('%Y-%m-%d')}, {dev}, torch {torch.__version__}, threads {torch.get_num_threads()}"
    )
    print(f"command: python bench/codec_bench.py {' '.join(argv if argv is not None else sys.argv[1:])}\n")
    rows: list[Row] = []
    for label, steps in datasets.items():
        x0 = steps[0]
        print(
            f"## {label}: {len(steps)} steps of {list(x0.shape)} {str(x0.dtype).removeprefix('torch.')} "
            f"({x0.numel() * x0.element_size() / 1e6:.2f} MB), centered step residual "
            f"{centered_residual(steps):.3f}\n"
        )
        block = []
        for name in names:
            for p in param_sets(name):
                block.append(run(name, p, steps, a.device, label))
                print(f"  done {name} {p}", file=sys.stderr)
        print(table(block) + "\n")
        rows += block
        orig = next((r for r in block if r.codec == "hevc-orig" and not r.note and r.bytes_step > 0), None)
        if orig is not None and "quant" in names:
            rows += versus_original(orig, steps, a, label)

    if not a.no_temporal_table:
        print("## Temporal vs intra on synthetic sequences (bits/value; P = mean over P-frames)\n")
        print(
            "| r | centered residual | log2(1/r) | codec pair | params | intra bits | temporal bits | P-frame bits "
            "| saved (P) | P bound | P eff. | cos c. intra / temporal |"
        )
        print("|---|---|---|---|---|---|---|---|---|---|---|---|")
        for r in (0.1, 0.3, 0.6):
            seq = synthetic(max(a.steps, 8), r=r, device=a.device, seed=1, massive_scale=a.massive_scale, **kw)  # type: ignore[arg-type]
            res = centered_residual(seq)
            pairs = [
                ("quant", "quant-t", {}),
                ("quant", "quant-t", {"snr_db": 20.0}),
                ("lossless", "lossless-t", {}),
            ]
            known = {c.name for c in codec.CODECS.values()}
            for intra, temporal, p in pairs:
                if intra not in known or temporal not in known:
                    continue
                pi = {**p, "backend": a.backend} if a.backend else p
                ri = run(intra, pi, seq, a.device, f"r={r}")
                rt = run(temporal, {**pi, "keyint": 0}, seq, a.device, f"r={r}")
                print(
                    f"| {r} | {res:.3f} | {math.log2(1 / r):.2f} | {intra} / {temporal} | {json.dumps(p)} | "
                    f"{ri.bits:.3f} | {rt.bits:.3f} | {fmt(rt.p_bits, '.3f')} | {fmt(ri.bits - rt.p_bits, '.3f')} | "
                    f"{fmt(rt.p_bound, '.3f')} | {fmt(rt.p_bits / rt.p_bound if rt.p_bound > 0 else math.nan, '.3f')} | "
                    f"{ri.cos_c:.5f} / {rt.cos_c:.5f} |"
                )
                rows += [ri, rt]
        print()
    if a.json:

        def clean(v: Any) -> Any:
            return None if isinstance(v, float) and not math.isfinite(v) else v

        out = [{k: clean(v) for k, v in dataclasses.asdict(r).items()} for r in rows]
        Path(a.json).write_text(json.dumps(out, indent=1, allow_nan=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
