"""HEVC codec (``nvenc``, wire id 16) on a GPU without NVENC: libx265 encode, NVDEC decode.

    python bench/hevc_gpu_check.py [--tokens 4608] [--channels 4096] [--reps 3] [--json out.json]

One command, unattended, on a machine with one NVIDIA GPU (an H100/H200 has NVDEC but no NVENC):

1. Reports the environment and whether NVENC works: ``GetEncoderCaps`` and one ``CreateEncoder``
   (expected on H100/H200: fails, "nvEncOpenEncodeSessionEx ... returned error 2").
2. Builds a Klein-9B-sized seam on the GPU: [1, tokens, channels] bf16 (512 noise-like text
   tokens + a smooth 2-D field over the image tokens, log-normal channel scales).
3. For QP 18 and lossless at tile 8: quantize + pack on the GPU, encode with libx265 on the CPU,
   decode with PyNvVideoCodec/NVDEC into CUDA tensors and with libavcodec (PyAV) on the CPU;
   asserts that the NVDEC planes equal the CPU planes (HEVC decoding is exact, lossy or not)
   and, lossless, equal the encoder's input; then the full codec round trip to CUDA.
4. Prints a table: bytes, ratio to bf16, encode ms (GPU pack / CPU x265 / total), decode ms
   (NVDEC planes / CPU planes / full codec.decode to CUDA), cosine.

Degrades gracefully: without PyNvVideoCodec (or without a GPU) it says so and runs the CPU
parts; without PyAV it says what to install and stops. Exit status 1 if an assertion failed.
Needs (carried as wheels, cp312 manylinux x86_64): av==18.1.0, pynvvideocodec==2.2.4.
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

T0 = time.perf_counter()
RESULTS: dict[str, Any] = {"checks": {}, "rows": []}
FAILED: list[str] = []


def say(msg: str) -> None:
    print(f"[{time.perf_counter() - T0:7.1f}s] {msg}", flush=True)


def check(name: str, ok: bool, detail: str = "") -> None:
    RESULTS["checks"][name] = {"ok": bool(ok), "detail": detail}
    say(f"{'PASS' if ok else 'FAIL'} {name}{': ' + detail if detail else ''}")
    if not ok:
        FAILED.append(name)


def import_package() -> Any:
    """comfyui_mesh, also from a plain checkout (the repository root is the package)."""
    try:
        return importlib.import_module("comfyui_mesh")
    except ImportError:
        root = Path(__file__).resolve().parent.parent
        shim = Path(tempfile.mkdtemp(prefix="mesh_pkg_"))
        (shim / "comfyui_mesh").symlink_to(root, target_is_directory=True)
        sys.path.insert(0, str(shim))
        return importlib.import_module("comfyui_mesh")


def seam(tokens: int, channels: int, device: Any, text: int = 512, seed: int = 0) -> Any:
    import torch

    g = torch.Generator(device=device).manual_seed(seed)
    img = tokens - text
    side = math.isqrt(img)
    if side * side != img:
        raise SystemExit(f"--tokens minus {text} text tokens must be a square grid (got {img})")
    white = torch.randn(channels, 1, side, side, generator=g, device=device)
    f = torch.nn.functional.avg_pool2d(white, 5, stride=1, padding=2, count_include_pad=False)
    f = torch.nn.functional.avg_pool2d(f, 5, stride=1, padding=2, count_include_pad=False)
    f = 0.9 * f / f.std() + 0.1 * white  # smooth, with a little noise
    sig = torch.exp(0.5 * torch.randn(channels, generator=g, device=device))
    mu = 0.3 * sig * torch.randn(channels, generator=g, device=device)
    txt = torch.randn(text, channels, generator=g, device=device)
    x = torch.cat([txt, f.reshape(channels, img).t()], dim=0)
    return (mu + sig * x).reshape(1, tokens, channels).to(torch.bfloat16)


def timed(fn: Any, reps: int, sync: Any) -> tuple[float, Any]:
    """Median ms over ``reps`` runs after one warm-up, and the last result."""
    out = fn()
    sync()
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        out = fn()
        sync()
        ts.append((time.perf_counter() - t) * 1e3)
    ts.sort()
    return ts[len(ts) // 2], out


def nvenc_probe(E: Any, torch: Any) -> None:
    say("NVENC: capability probe")
    if not torch.cuda.is_available():
        check("nvenc_probe", True, "no CUDA GPU: skipped")
        return
    nvc, why = E.nvc_module()
    if why:
        say(f"PyNvVideoCodec missing: {why}")
        RESULTS["nvenc"] = {"importable": False, "why": why}
        return
    info: dict[str, Any] = {"importable": True, "version": getattr(nvc, "__version__", "?")}
    try:
        info["caps"] = {k: str(v) for k, v in dict(nvc.GetEncoderCaps(gpuid=0, codec="hevc") or {}).items()}
    except Exception as e:  # noqa: BLE001
        info["caps_error"] = f"{type(e).__name__}: {e}"
    try:
        enc = nvc.CreateEncoder(256, 256, "YUV444", False, codec="hevc", rc="constqp", constqp="18", bf="0")
        info["create_encoder"] = "works"
        del enc
    except Exception as e:  # noqa: BLE001
        info["create_encoder"] = f"fails: {type(e).__name__}: {e}"
    info["nvenc_status"] = E.nvenc_status(torch.device("cuda", 0)) or "usable"
    RESULTS["nvenc"] = info
    for k, v in info.items():
        say(f"  {k}: {v}")


def one_mode(
    label: str,
    params: dict[str, Any],
    x: Any,
    args: argparse.Namespace,
    dev: Any,
    have_nvdec: bool,
    nvwhy: Any,
    sync: Any,
) -> dict[str, Any]:
    import torch
    from comfyui_mesh import codec
    from comfyui_mesh.wirecodecs import channels as CH
    from comfyui_mesh.wirecodecs import hevc_engines as E
    from comfyui_mesh.wirecodecs import hevc_layout as L

    n, c = x.shape[1], x.shape[2]
    raw = x.numel() * 2
    p = {"tile_dim": 8, "encoder": "x265", **params}
    s = L.settings(p)
    g = L.Geometry(n, c, *L.token_layout(n), 8)
    say(f"[{label}] {g.frames} frames of {g.width} x {g.height}")

    def pack() -> Any:
        q, _, _ = L.quantize(CH.channel_major(x), s.quant, s.share_q)
        return L.pack(q, g)

    t_pack, frames = timed(pack, args.reps, sync)
    frames_cpu = frames.cpu()
    t_x265, _ = timed(lambda: E.encode_x265(frames_cpu, s), args.reps, sync)
    t_enc, wt = timed(lambda: codec.encode(x, "x", "nvenc", p), args.reps, sync)
    parsed = L.parse_header(memoryview(bytes(wt.data)), "x", n, c, x.element_size())
    head, stream = parsed.head, parsed.bits
    t_cpu, planes_cpu = timed(lambda: E.decode_pyav(stream, head.geom), args.reps, sync)
    row: dict[str, Any] = {
        "mode": label,
        "frames": f"{g.frames} x {g.width}x{g.height}",
        "bytes": wt.nbytes,
        "ratio": raw / wt.nbytes,
        "pack_ms": t_pack,
        "x265_ms": t_x265,
        "encode_ms": t_enc,
        "cpu_decode_planes_ms": t_cpu,
    }
    if label == "lossless":
        check(f"{label}: CPU decode == encoder input", bool(torch.equal(planes_cpu, frames_cpu)))
    if have_nvdec:
        try:
            E._DECODERS.clear()
            t = time.perf_counter()
            first = E.decode_nvdec(stream, head.geom, dev)
            sync()
            row["nvdec_first_ms"] = (time.perf_counter() - t) * 1e3  # includes CreateDecoder
            t_nv, planes_nv = timed(lambda: E.decode_nvdec(stream, head.geom, dev), args.reps, sync)
            row["nvdec_planes_ms"] = t_nv
            row["nvdec_decoder_reuse"] = bool(E._NVDEC_STATE["reuse"])
            check(f"{label}: NVDEC planes == CPU planes (first call)", bool(torch.equal(first.cpu(), planes_cpu)))
            check(
                f"{label}: NVDEC planes == CPU planes (reused decoder)", bool(torch.equal(planes_nv.cpu(), planes_cpu))
            )
        except Exception as e:  # noqa: BLE001
            check(f"{label}: NVDEC decode", False, f"{type(e).__name__}: {e}")
            traceback.print_exc()
    else:
        say(f"[{label}] NVDEC skipped: {'no CUDA GPU' if dev.type != 'cuda' else nvwhy}")
    t_dec, y = timed(lambda: codec.decode(wt, dev), args.reps, sync)
    row["decode_ms"] = t_dec
    row["decode_path"] = "nvdec" if have_nvdec and not E._NVDEC_STATE["broken"] else "cpu"
    if E._NVDEC_STATE["broken"]:
        say(f"NVDEC fell back to the CPU inside the codec: {E._NVDEC_STATE['broken']}")
    cos = torch.nn.functional.cosine_similarity(x.double().flatten(), y.double().flatten(), dim=0).item()
    row["cosine"] = cos
    check(f"{label}: decoded on {y.device}", y.device.type == dev.type and y.shape == x.shape)
    check(f"{label}: cosine", cos >= (0.9999 if label == "lossless" else 0.995), f"{cos:.6f}")
    return row


def run(args: argparse.Namespace) -> None:
    import torch

    mesh = import_package()
    from comfyui_mesh.wirecodecs import hevc_engines as E
    from comfyui_mesh.wirecodecs import hevc_layout as L

    say(f"python {sys.version.split()[0]}, torch {torch.__version__}, comfyui_mesh from {Path(mesh.__file__).parent}")
    cuda = torch.cuda.is_available()
    dev = torch.device("cuda", 0) if cuda else torch.device("cpu")
    RESULTS["device"] = torch.cuda.get_device_name(0) if cuda else "cpu"
    say(f"device: {RESULTS['device']}")
    av, why = E.pyav()
    if why or E.x265_status():
        say(f"cannot run: {E.x265_status() or why}")
        RESULTS["fatal"] = E.x265_status() or why
        FAILED.append("pyav")
        return
    say(f"PyAV {av.__version__} (libx265: yes)")
    _, nvwhy = E.nvc_module()
    have_nvdec = cuda and nvwhy is None
    say(f"PyNvVideoCodec: {'importable' if nvwhy is None else nvwhy}")
    nvenc_probe(E, torch)

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize()

    x = seam(args.tokens, args.channels, dev)
    raw = x.numel() * 2
    say(f"seam {tuple(x.shape)} bf16 on {dev}: {raw} bytes")
    for label, params in (("qp18", {"qp": 18}), ("lossless", {"lossless": True})):
        RESULTS["rows"].append(one_mode(label, params, x, args, dev, have_nvdec, nvwhy, sync))
        raw_row = RESULTS["rows"][-1]
        say(f"[{label}] {json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in raw_row.items()})}")

    print()
    print(
        f"HEVC codec on {RESULTS['device']}, seam {list(x.shape)} bf16 = {raw} bytes, tile 8, "
        f"libx265 {L.X265_PRESET} (CPU) encode"
    )
    print()
    print(
        "| mode | bytes | ratio | quantize+pack ms | x265 ms | encode total ms | NVDEC planes ms | CPU planes ms |"
        " decode total ms | decode path | cosine |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|")
    for r in RESULTS["rows"]:
        nv = f"{r['nvdec_planes_ms']:.1f} (first {r['nvdec_first_ms']:.0f})" if "nvdec_planes_ms" in r else "-"
        print(
            f"| {r['mode']} | {r['bytes']} | {r['ratio']:.2f} | {r['pack_ms']:.1f} | {r['x265_ms']:.0f} | "
            f"{r['encode_ms']:.0f} | {nv} | {r['cpu_decode_planes_ms']:.0f} | {r['decode_ms']:.1f} | "
            f"{r['decode_path']} | {r['cosine']:.6f} |"
        )
    print()
    print(f"NVENC: {RESULTS.get('nvenc', {}).get('create_encoder', 'not probed')}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", type=int, default=4608, help="512 text tokens + a square image grid")
    ap.add_argument("--channels", type=int, default=4096)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--json", default=os.environ.get("OUT") and os.path.join(os.environ["OUT"], "hevc_gpu_check.json"))
    args = ap.parse_args()
    try:
        run(args)
    except Exception as e:  # noqa: BLE001 - report, keep the JSON
        FAILED.append(f"crash: {type(e).__name__}: {e}")
        traceback.print_exc()
    RESULTS["failed"] = FAILED
    if args.json:
        Path(args.json).write_text(json.dumps(RESULTS, indent=2))
        say(f"wrote {args.json}")
    say("OK" if not FAILED else f"FAILED: {FAILED}")
    return 1 if FAILED else 0


if __name__ == "__main__":
    sys.exit(main())
