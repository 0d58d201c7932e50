"""Any registered family split on a GPU: unsplit vs split through a real Daedalus (issue #17 item 5).

    python bench/split_family.py --comfyui PATH --family wan --size 14b [--n-blocks N] [--steps 2]
        [--codecs raw] [--families-json out.json] [--two-experts]

A random-weight checkpoint of ``tiny.BENCH[family].configs[size]`` (bf16 on a GPU) is written, loaded
unsplit by ComfyUI and sampled with the family's inputs and CFG (``tiny.BENCH``), then split at
``--n-blocks`` (default: the family's) against ``python -m comfyui_mesh.server`` on the same GPU (client
cuda:0, server cuda:1 when there are two). Reports s/step unsplit and split, whether raw is
bit-identical, MB out / in per call, client and server peak GPU memory. ``--family`` may list several
(comma-separated, each ``family:size``) to run one after another in one process; a family that fails
is reported and the next one runs. ``--two-experts`` (Wan 2.2 A14B): two checkpoints of the size served
by one Daedalus, half the steps on each (use an even ``--steps``), unsplit vs split as above.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
import traceback
from pathlib import Path

import torch
from comfyui_mesh import tiny
from comfyui_mesh.config import ClientConfig

CUDA = torch.cuda.is_available()
DEV = "cuda:0" if CUDA else "cpu"


def sync() -> None:
    if CUDA:
        torch.cuda.synchronize()


def start_server(
    comfyui: str, weights: Path, n: int, device: str, state: Path, extra: tuple[Path, ...] = ()
) -> tuple[subprocess.Popen, int, list]:
    """A Daedalus process serving ``weights`` (and each of ``extra``: --weights repeated) at ``n`` blocks."""
    more = [arg for w in extra for arg in ("--weights", str(w))]
    cmd = [sys.executable, "-m", "comfyui_mesh.server", "--weights", str(weights), *more, "--n-blocks", str(n),
           "--port", "0", "--device", device, "--comfyui", comfyui, "--state-dir", str(state)]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: list[str] = []
    assert proc.stdout is not None
    for line in proc.stdout:
        lines.append(line)
        if "READY" in line:
            port = int(line.split("listening on ")[1].split()[0].rsplit(":", 1)[1])
            threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True).start()  # type: ignore[arg-type]
            return proc, port, lines
    raise RuntimeError("server did not start:\n" + "".join(lines[-30:]))


def run_one(comfy, comfyui: str, family: str, size: str, a: argparse.Namespace) -> dict:
    from comfyui_mesh.icarus import SplitSettings, split_model

    spec = tiny.BENCH[family]
    config = spec.configs[size]
    n = a.n_blocks or spec.n_blocks[size]
    wd = Path(a.workdir)
    wd.mkdir(parents=True, exist_ok=True)
    weights = wd / f"{family}-{size}.safetensors"
    dtype = torch.bfloat16 if CUDA else torch.float32
    t0 = time.perf_counter()
    if not weights.exists():
        spec.make(weights, config=config, dtype=dtype, device=DEV)
    # --two-experts: a second checkpoint (another seed), the low-noise expert of a Wan 2.2-style pair; both
    # are served by ONE Daedalus, and each sample runs the first half of the steps on the first, the rest
    # on the second (two KSamplerAdvanced).
    low = wd / f"{family}-{size}-low.safetensors" if a.two_experts else None
    if low is not None and not low.exists():
        spec.make(low, seed=1, config=config, dtype=dtype, device=DEV)
    row: dict = {"family": family, "size": size, "n_blocks": n, "cfg": spec.cfg, "steps": a.steps}
    if low is not None:
        row["experts"] = 2
    row["checkpoint_gb"] = round(weights.stat().st_size / 1e9, 2)
    row["write_s"] = round(time.perf_counter() - t0, 1)
    print(f"# {family}/{size}: {row['checkpoint_gb']} GB written in {row['write_s']} s", flush=True)
    server_dev = "cuda:1" if torch.cuda.device_count() > 1 else DEV
    extra = (low,) if low is not None else ()
    proc, port, lines = start_server(comfyui, weights, n, server_dev, wd / "state", extra)
    try:
        token = (wd / "state" / "token").read_text().strip()
        load = getattr(spec, "load", None)

        def load_model(path: Path):
            return load(path) if load is not None else comfy.sd.load_diffusion_model(str(path))

        model = load_model(weights)
        model_low = load_model(low) if low is not None else None
        inputs = spec.inputs(size, 1, 1)
        half = a.steps // 2

        def sample(m, m_low=None):
            """The sample and its s/step; with ``m_low``: steps 0..half on ``m``, the rest on ``m_low``."""
            sync()
            t = time.perf_counter()
            args = ("euler", "simple", inputs["positive"], inputs["negative"])
            if m_low is None:
                out = comfy.sample.sample(m, inputs["noise"], a.steps, spec.cfg, *args, inputs["latent_image"],
                                          seed=0, disable_pbar=True)  # fmt: skip
            else:
                mid = comfy.sample.sample(m, inputs["noise"], a.steps, spec.cfg, *args, inputs["latent_image"],
                                          seed=0, disable_pbar=True, start_step=0, last_step=half,
                                          force_full_denoise=False)  # fmt: skip
                out = comfy.sample.sample(m_low, torch.zeros_like(mid), a.steps, spec.cfg, *args, mid, seed=0,
                                          disable_pbar=True, start_step=half, last_step=a.steps,
                                          force_full_denoise=True, disable_noise=True)  # fmt: skip
            sync()
            total = time.perf_counter() - t
            return out, total / a.steps

        sample(model, model_low)  # warm-up (load, kernels)
        if CUDA:
            torch.cuda.reset_peak_memory_stats(0)
        ref, step = sample(model, model_low)
        row["unsplit_s_step"] = round(step, 3)
        row["unsplit_peak_gb"] = round(torch.cuda.max_memory_allocated(0) / 1e9, 1) if CUDA else 0.0
        cfg = ClientConfig(port=port, token=token)
        for name in a.codecs.split(","):
            m, run = split_model(model, SplitSettings(n_remote=n, client=cfg, codec_name=name))
            m_low = run_low = None
            if model_low is not None:  # the same host:port: a session of its own, bound by its fingerprint
                m_low, run_low = split_model(model_low, SplitSettings(n_remote=n, client=cfg, codec_name=name))
            comfy.model_management.unload_all_models()
            if CUDA:
                torch.cuda.empty_cache()
            sample(m, m_low)  # warm-up: constants, connection
            if CUDA:
                torch.cuda.reset_peak_memory_stats(0)
            out, step = sample(m, m_low)
            st = run.last_stats
            if run_low is not None:
                row[f"{name}_calls_per_expert"] = f"{run.calls} / {run_low.calls}"
                row[f"{name}_expert_sessions"] = len({id(run.client()), id(run_low.client())})
            same = torch.equal(out, ref)
            rel = ((out.float() - ref.float()).norm() / ref.float().norm()).item()
            row[f"{name}_s_step"] = round(step, 3)
            row[f"{name}_vs_unsplit"] = "bit-identical" if same else f"rel L2 {rel:.2e}"
            row[f"{name}_mb_out_in"] = f"{st.bytes_out / 1e6:.1f} / {st.bytes_in / 1e6:.2f}" if st else "?"
            # the client's own peak over the split run (the server shares this GPU: its memory is not in it)
            row[f"{name}_client_peak_gb"] = round(torch.cuda.max_memory_allocated(0) / 1e9, 1) if CUDA else 0.0
        peaks = [ln for ln in lines if "GB on" in ln]
        row["server_loaded"] = " | ".join(p.strip()[:160] for p in peaks[-1 - len(extra) :]) if peaks else "?"
        del model, model_low
    finally:
        proc.terminate()
        proc.wait(60)
        if not a.keep:
            weights.unlink(missing_ok=True)
            if low is not None:
                low.unlink(missing_ok=True)
        if CUDA:
            torch.cuda.empty_cache()
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--comfyui", required=True)
    ap.add_argument("--family", required=True, help="BENCH key, or several 'family:size' separated by commas")
    ap.add_argument("--size", default="tiny")
    ap.add_argument("--n-blocks", type=int, default=0)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument(
        "--two-experts",
        action="store_true",
        help="Wan 2.2-style pair: a second checkpoint (seed 1) in the same Daedalus (--weights twice); each "
        "sample runs half the steps on each expert, both split against that one server",
    )
    ap.add_argument("--codecs", default="raw")
    ap.add_argument("--workdir", default="/tmp/mesh-family-bench")
    ap.add_argument("--keep", action="store_true", help="keep the written checkpoints")
    ap.add_argument("--json", default="", help="append each family's row (JSON lines) to this file")
    a = ap.parse_args()
    comfy = tiny.import_comfy(a.comfyui, cpu=not CUDA)
    runs = [tuple(x.split(":", 1)) if ":" in x else (x, a.size) for x in a.family.split(",")]
    rows = []
    for family, size in runs:
        try:
            row = run_one(comfy, a.comfyui, family, size, a)
        except Exception as e:  # report it and go on with the next family
            traceback.print_exc()
            row = {"family": family, "size": size, "error": f"{type(e).__name__}: {e}"[:300]}
        rows.append(row)
        print("#", json.dumps(row), flush=True)
        if a.json:
            with open(a.json, "a") as f:
                f.write(json.dumps(row) + "\n")
    dev = torch.cuda.get_device_name(0) if CUDA else "CPU"
    print(f"\n{dev}, torch {torch.__version__}, {a.steps} steps, codecs {a.codecs}\n")
    print(
        "| family / size | n_blocks | unsplit s/step | split s/step | raw vs unsplit | MB out / in per call | peak GB unsplit / split client |"
    )
    print("|---|---:|---:|---:|---|---|---|")
    c = a.codecs.split(",")[0]
    for r in rows:
        if "error" in r:
            print(f"| {r['family']} / {r['size']} | | | | {r['error'][:80]} | | |")
            continue
        print(
            f"| {r['family']} / {r['size']} | {r['n_blocks']} | {r['unsplit_s_step']} | {r[f'{c}_s_step']} | "
            f"{r[f'{c}_vs_unsplit']} | {r[f'{c}_mb_out_in']} | {r['unsplit_peak_gb']} / {r[f'{c}_client_peak_gb']} |"
        )
    if os.environ.get("MESH_BENCH_FAIL_ON_ERROR") == "1" and any("error" in r for r in rows):
        raise SystemExit(1)


if __name__ == "__main__":
    main()
