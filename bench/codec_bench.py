"""Activation codec benchmark: every registered codec x data sets -> bytes, speed, fidelity, RD efficiency.

    python bench/codec_bench.py [--device cpu|cuda] [--grid 32x32] [--text 0] [--channels 1024] [--steps 8]
        [--r 0.3] [--dtype bfloat16] [--file acts.safetensors] [--captured seam.safetensors]
        [--codecs quant,quant-t] [--backend zstd|ans] [--params 'NAME={"k": v}'] [--json out.json]

Data sets (each a sequence of steps of one seam tensor [B, L, C]):
  synthetic  DiT-like statistics: log-normal channel scales and means, a few "massive" channels
             (hundreds of times the median, near-constant over tokens, growing with the step),
             fields smooth over a 2-D token grid, and step-to-step correlation with relative
             residual r (AR(1) on the centered signal: ||x_t - x_t-1|| / ||x_t|| ~ r).
  file       --file: a safetensors file, one tensor per step, keys in natural order, or a quoted glob
             of such files: e.g. what Icarus writes with COMFYUI_MESH_SEAM_DUMP=PREFIX set,
             --file 'PREFIX-img-*.safetensors' (one file per remote call and seam tensor).
  captured   --captured: (a) seam activations captured elsewhere (e.g. from a full-size random-weight
             model on a GPU during a short sampling run); same format. The hook is ``load_steps``.

Per codec (and parameter set) and data set: bytes per step, ratio to the input, encode and decode ms
(median over steps; CUDA synchronized), cosine (worst step), "cos c." (the same after removing the input's
channel means: what a codec's ``cosine`` target refers to), relative L2 (worst), max abs error, PSNR
(peak = max |x|), bits/value, and the Gaussian rate-distortion bound at the distortion achieved
(reverse water-filling over the per-channel variances of each step) with efficiency = bits / bound.
Temporal codecs run the sequence with their state; the others code each step alone. A second
table compares intra and temporal coding on synthetic sequences with r = 0.1, 0.3, 0.6.
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

PARAMS: dict[str, list[dict[str, Any]]] = {
    "quant": [{"cosine": 0.999}, {"cosine": 0.995}],
    "quant-t": [{"cosine": 0.999}, {"cosine": 0.995}],
    "auto": [{"cosine": 0.999}],
}
OURS = range(2, 16)  # wire ids that understand the "backend" parameter


# ---------------------------------------------------------------------------- data


def synthetic(
    steps: int,
    grid: tuple[int, int] = (32, 32),
    text: int = 0,
    channels: int = 1024,
    r: float = 0.3,
    massive: int = 4,
    smooth: float = 0.7,
    batch: int = 1,
    seed: int = 0,
    dtype: torch.dtype = torch.bfloat16,
    device: str = "cpu",
) -> list[torch.Tensor]:
    """``steps`` tensors [batch, text + H*W, channels] with DiT-like statistics (see module doc)."""
    g = torch.Generator().manual_seed(seed)
    h, w = grid
    c = channels
    sig = torch.exp(0.5 * torch.randn(c, generator=g))
    mu = 0.3 * sig * torch.randn(c, generator=g)
    big = torch.randperm(c, generator=g)[: min(massive, c)]
    scale = float(sig.median())
    sign = torch.where(torch.rand(big.numel(), generator=g) < 0.5, -1.0, 1.0)
    mu[big] = sign * scale * (100 + 200 * torch.rand(big.numel(), generator=g))
    sig[big] *= 3.0

    def field() -> torch.Tensor:
        white = torch.randn(batch * c, 1, h, w, generator=g)
        s = torch.nn.functional.avg_pool2d(white, 5, stride=1, padding=2, count_include_pad=False)
        s = torch.nn.functional.avg_pool2d(s, 5, stride=1, padding=2, count_include_pad=False)
        s = s / s.std().clamp(min=1e-6)
        f = (math.sqrt(smooth) * s + math.sqrt(1 - smooth) * white).reshape(batch, c, h * w).transpose(1, 2)
        return torch.cat([torch.randn(batch, text, c, generator=g), f], dim=1)

    rho = max(-1.0, 1.0 - r * r / 2.0)
    z = field()
    out = []
    for t in range(steps):
        amp = torch.ones(c)
        amp[big] = 1.0 + 0.5 * t / max(steps - 1, 1)  # massive channels grow with the timestep
        out.append((mu * amp + sig * z).to(dtype).to(device))
        z = rho * z + math.sqrt(max(0.0, 1 - rho * rho)) * field()
    return out


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
    enc, dec, nbytes, cos, cosc, rel, mx, psnr, bound, pbits, pbound = ([] for _ in range(11))
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
    n = steps[0].numel()
    row.bytes_step = statistics.mean(nbytes)
    row.ratio = steps[0].numel() * steps[0].element_size() / row.bytes_step
    row.enc_ms, row.dec_ms = statistics.median(enc), statistics.median(dec)
    row.cosine, row.cos_c, row.rel_l2, row.max_abs = min(cos), min(cosc), max(rel), max(mx)
    row.psnr = statistics.mean(psnr) if all(math.isfinite(p) for p in psnr) else math.inf
    row.bits = 8.0 * row.bytes_step / n
    row.bound = statistics.mean(bound) if all(math.isfinite(b) for b in bound) else math.inf
    row.efficiency = row.bits / row.bound if math.isfinite(row.bound) and row.bound > 0 else math.nan
    row.p_bits = statistics.mean(pbits) if pbits else math.nan
    row.p_bound = statistics.mean(pbound) if pbound and all(math.isfinite(b) for b in pbound) else math.nan
    return row


def fmt(v: float, spec: str) -> str:
    if isinstance(v, float) and math.isnan(v):
        return "-"
    if isinstance(v, float) and math.isinf(v):
        return "exact" if spec == "psnr" else "-"
    if spec == "psnr":
        return f"{v:.1f}"
    return format(v, spec)


def table(rows: list[Row]) -> str:
    head = (
        "| data | codec | params | bytes/step | ratio | enc ms | dec ms | cosine | cos c. | rel L2 | max abs "
        "| PSNR dB | bits/val | bound | eff. | note |"
    )
    lines = [head, "|" + "---|" * 16]
    for r in rows:
        lines.append(
            f"| {r.data} | {r.codec} | {r.params} | {r.bytes_step:,.0f} | {fmt(r.ratio, '.2f')} | "
            f"{fmt(r.enc_ms, '.1f')} | {fmt(r.dec_ms, '.1f')} | {fmt(r.cosine, '.6f')} | {fmt(r.cos_c, '.5f')} | "
            f"{fmt(r.rel_l2, '.2e')} | "
            f"{fmt(r.max_abs, '.3g')} | {fmt(r.psnr, 'psnr')} | {fmt(r.bits, '.3f')} | {fmt(r.bound, '.3f')} | "
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
    """The original scheme (per-channel uint8 + HEVC QP 18, tile 8) against ours at ITS cosine.

    Runs ``quant`` (and ``quant-t`` over several steps) with the centered cosine the original
    reached on its worst step, and prints bytes next to the Gaussian bound at that distortion:
    the bound / original ratio is the least any codec could reach against it on this data."""
    target = min(orig.cos_c, 0.999999)
    p: dict[str, Any] = {"cosine": round(target, 6)}
    if a.backend:
        p["backend"] = a.backend
    ours = [run("quant", p, steps, a.device, label)]
    if len(steps) > 1 and "quant-t" in {c.name for c in codec.CODECS.values()}:
        ours.append(run("quant-t", p, steps, a.device, label))
    print(f"### {label}: ours at the original scheme's cosine (cos c. {target:.5f})\n")
    print("| codec | bytes/step | cos c. | bits/val | bound | bytes vs original | bound vs original |")
    print("|---|---|---|---|---|---|---|")
    print(f"| hevc-orig (QP 18, tile 8) | {orig.bytes_step:,.0f} | {orig.cos_c:.5f} | {orig.bits:.3f} | "
          f"{orig.bound:.3f} | 1.00 | {orig.bound / orig.bits:.2f} |")  # fmt: skip
    for r in ours:
        print(f"| {r.codec} | {r.bytes_step:,.0f} | {r.cos_c:.5f} | {r.bits:.3f} | {r.bound:.3f} | "
              f"{r.bytes_step / orig.bytes_step:.2f} | {r.bound / orig.bits:.2f} |")  # fmt: skip
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
    datasets = {f"synthetic r={a.r}": synthetic(a.steps, r=a.r, device=a.device, **kw)}  # type: ignore[arg-type]
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
            seq = synthetic(max(a.steps, 8), r=r, device=a.device, seed=1, **kw)  # type: ignore[arg-type]
            res = centered_residual(seq)
            pairs = [
                ("quant", "quant-t", {"cosine": 0.999}),
                ("quant", "quant-t", {"cosine": 0.995}),
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
