"""LTX-AV split on two GPUs: full-size random-weight LTX-2.3-style model, unsplit vs split.

    python bench/ltx_gpu_check.py --comfyui /path/to/ComfyUI

One command, unattended. Writes a 48-block bf16 LTX-AV checkpoint with random weights
(~42 GB, LTX-2.3 flags; streamed to disk from the GPU), starts Daedalus on cuda:1 holding the
last --n-blocks blocks (loopback), loads the whole model on cuda:0 as ComfyUI does, and
samples 768x512x121 and 1280x704x121 (video + audio latents, CFG > 1, --steps steps):
first single-GPU unsplit, then split with the raw codec. Prints progress as it goes and a
Markdown table at the end: seconds per step, bytes per call, peak VRAM per side, and the
split's max abs difference from the unsplit output.

Peak VRAM is given two ways: torch's peak allocated bytes in each process (the server
reports its own on SIGUSR1) and the device's peak used memory (cudaMemGetInfo, sampled
every 50 ms; includes CUDA contexts, caches and allocations outside torch's allocator).

``--cpu`` runs the same pipeline on the CPU with a tiny model and tiny sizes (a dry run of
the script itself; no GPU needed).
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

T0 = time.perf_counter()


def say(msg: str) -> None:
    print(f"[{time.perf_counter() - T0:7.1f}s] {msg}", flush=True)


# ---------------------------------------------------------------------------- server process


def serve(argv: list[str]) -> int:
    """Daedalus, plus: on SIGUSR1 print this process's torch peak VRAM on its device, then reset it."""
    import torch

    device = argv[argv.index("--device") + 1] if "--device" in argv else "cuda:0"

    def report(*_: Any) -> None:
        if device.startswith("cuda") and torch.cuda.is_available():
            d = torch.device(device)
            print(
                f"[bench] server peak allocated {torch.cuda.max_memory_allocated(d)} "
                f"reserved {torch.cuda.max_memory_reserved(d)}",
                flush=True,
            )
            torch.cuda.reset_peak_memory_stats(d)
        else:
            print("[bench] server peak allocated 0 reserved 0", flush=True)

    signal.signal(signal.SIGUSR1, report)
    from comfyui_mesh.server.__main__ import main

    return main(argv)


class Server:
    def __init__(self, weights: Path, n: int, device: str, comfyui: str, state: Path):
        cmd = [sys.executable, str(Path(__file__).resolve()), "--serve", "--weights", str(weights), "--n-blocks", str(n), "--port", "0",
               "--device", device, "--comfyui", comfyui, "--state-dir", str(state), "--no-auth"]  # fmt: skip
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1)
        self.lines: list[str] = []
        self.port = 0
        self.ready = threading.Event()
        self.peaks: list[tuple[int, int]] = []
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line)
            if "READY listening on" in line and not self.port:
                self.port = int(line.split("listening on ")[1].split()[0].rsplit(":", 1)[1])
                self.ready.set()
            elif line.startswith("[bench] server peak"):
                parts = line.split()
                self.peaks.append((int(parts[4]), int(parts[6])))
            elif "Error" in line or "error" in line:
                print("  [server] " + line.rstrip(), flush=True)
        self.ready.set()

    def wait_ready(self, timeout: float) -> None:
        if not self.ready.wait(timeout) or not self.port:
            raise SystemExit("Daedalus did not start:\n" + "".join(self.lines[-40:]))

    def peak(self) -> tuple[int, int]:
        """Torch peak (allocated, reserved) bytes since the last call; resets it."""
        n = len(self.peaks)
        self.proc.send_signal(signal.SIGUSR1)
        t = time.monotonic()
        while len(self.peaks) == n and time.monotonic() - t < 5:
            time.sleep(0.05)
        return self.peaks[-1] if len(self.peaks) > n else (-1, -1)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()


class DevicePeaks:
    """Peak used memory (total - free) of each GPU, sampled every 50 ms, per phase."""

    def __init__(self, devices: list[int]):
        import torch

        self.torch = torch
        self.devices = devices
        self.base = {d: self._used(d) for d in devices}
        self.peak = dict(self.base)
        self._stop = threading.Event()
        threading.Thread(target=self._run, daemon=True).start()

    def _used(self, d: int) -> int:
        free, total = self.torch.cuda.mem_get_info(d)
        return total - free

    def _run(self) -> None:
        while not self._stop.wait(0.05):
            for d in self.devices:
                try:
                    self.peak[d] = max(self.peak[d], self._used(d))
                except RuntimeError:
                    pass

    def take(self) -> dict[int, int]:
        """Peak used bytes above the baseline since the last call; restarts the phase."""
        out = {d: self.peak[d] - self.base[d] for d in self.devices}
        self.peak = {d: self._used(d) for d in self.devices}
        return out

    def stop(self) -> None:
        self._stop.set()


# ---------------------------------------------------------------------------- client


def default_workdir() -> str:
    """RAM-backed /dev/shm when it can hold the checkpoint (no disk writes), else /tmp."""
    try:
        if shutil.disk_usage("/dev/shm").free > 60e9:
            return "/dev/shm/mesh-ltx"
    except OSError:
        pass
    return "/tmp/mesh-ltx"


def gb(n: float) -> str:
    return f"{n / 1e9:.1f}" if n >= 0 else "?"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--comfyui", default=os.environ.get("COMFYUI_PATH", ""), help="ComfyUI checkout")
    ap.add_argument("--n-blocks", type=int, default=8, help="blocks on the server (of 48)")
    ap.add_argument("--res", default="768x512x121,1280x704x121", help="WxHxFRAMES list")
    ap.add_argument("--steps", type=int, default=2, help="sampler steps per run (the last one is timed)")
    ap.add_argument("--cfg", type=float, default=3.0)
    ap.add_argument("--fps", type=float, default=25.0)
    ap.add_argument("--text-tokens", type=int, default=1024)
    ap.add_argument("--codecs", default="raw", help="split codecs to run, e.g. raw,int8")
    ap.add_argument("--workdir", default="", help="default: /dev/shm/mesh-ltx if it has room, else /tmp/mesh-ltx")
    ap.add_argument("--budget", type=float, default=540.0, help="seconds; later runs are skipped past it")
    ap.add_argument("--layers", type=int, default=0, help="blocks of the model (default: the real 48); fewer = faster")
    ap.add_argument("--cpu", action="store_true", help="dry run on the CPU with a tiny model and tiny sizes")
    a = ap.parse_args()
    if not a.comfyui:
        raise SystemExit("pass --comfyui /path/to/ComfyUI (or set COMFYUI_PATH)")

    import torch
    from comfyui_mesh import tiny

    comfy = tiny.import_comfy(a.comfyui, cpu=a.cpu)
    from comfy.nested_tensor import NestedTensor
    from comfyui_mesh.config import ClientConfig
    from comfyui_mesh.icarus import SplitSettings, split_model

    cuda = torch.cuda.is_available() and not a.cpu
    if not a.cpu and not cuda:
        raise SystemExit("no CUDA device: run on a GPU machine, or pass --cpu for a dry run")
    ngpu = torch.cuda.device_count() if cuda else 0
    client_dev, server_dev = ("cpu", "cpu") if not cuda else ("cuda:0", "cuda:1" if ngpu > 1 else "cuda:0")
    config = dict(tiny.LTXAV23_TINY if a.cpu else tiny.LTXAV23_FULL)
    if a.layers:
        config["num_layers"] = a.layers
    res = "64x64x17" if a.cpu and a.res == ap.get_default("res") else a.res
    wd = Path(a.workdir or default_workdir())
    wd.mkdir(parents=True, exist_ok=True)
    weights = wd / ("ltxav23_tiny.safetensors" if a.cpu else "ltxav23_48blocks_bf16.safetensors")
    say(
        f"torch {torch.__version__}, {ngpu} GPU(s): "
        + (", ".join(torch.cuda.get_device_name(i) for i in range(ngpu)) if cuda else "CPU dry run")
        + f"; client {client_dev}, server {server_dev}, n_blocks {a.n_blocks}"
    )
    if cuda and ngpu < 2:
        say("WARNING: one GPU only: client and server share cuda:0 (VRAM figures overlap)")

    # 1) the checkpoint
    if not weights.exists():
        dtype = torch.float32 if a.cpu else torch.bfloat16
        need = 48e9 if not a.cpu else 1e8
        free = shutil.disk_usage(wd).free
        if free < need:
            raise SystemExit(f"{wd} has {free / 1e9:.0f} GB free, the checkpoint needs {need / 1e9:.0f} GB")
        say(f"writing {weights.name} (random weights, {dtype}) ...")
        t = time.perf_counter()
        tmp = weights.with_suffix(".partial")
        tiny.make_ltxav(tmp, seed=0, config=config, dtype=dtype, device=client_dev)
        tmp.rename(weights)
        say(f"  {weights.stat().st_size / 1e9:.1f} GB in {time.perf_counter() - t:.0f} s")
    else:
        say(f"reusing {weights} ({weights.stat().st_size / 1e9:.1f} GB)")

    if cuda:
        torch.cuda.empty_cache()  # the generator's blocks: not part of any baseline
    dev_peaks = DevicePeaks([0, 1] if ngpu > 1 else [0]) if cuda else None
    # 2) server (loads the last N blocks) while the client loads the whole model
    server = Server(weights, a.n_blocks, server_dev, a.comfyui, wd / "state")
    rows: list[dict[str, Any]] = []
    try:
        t = time.perf_counter()
        with torch.inference_mode():
            model = comfy.sd.load_diffusion_model(str(weights))
        dynamic = bool(getattr(model, "is_dynamic", lambda: False)())
        say(f"client model loaded in {time.perf_counter() - t:.0f} s (ComfyUI dynamic VRAM: {dynamic})")
        server.wait_ready(600)
        for ln in server.lines:
            if "loaded " in ln or "READY" in ln:
                say("server: " + ln.strip())
        cfg = ClientConfig(port=server.port, read_timeout_s=600.0)

        def inputs(w: int, h: int, frames: int) -> dict[str, Any]:
            f = (frames - 1) // 8 + 1
            audio = max(1, round(frames / a.fps * 25))  # LTX audio latents: 25 per second
            g = torch.Generator().manual_seed(1)
            video, sound = (1, 128, f, h // 32, w // 32), (1, 8, audio, 16)
            ctx = config["cross_attention_dim"] + config["audio_cross_attention_dim"]  # processed (2.3) text features
            return {
                "noise": NestedTensor([torch.randn(video, generator=g), torch.randn(sound, generator=g)]),
                "latent": NestedTensor([torch.zeros(video), torch.zeros(sound)]),
                "pos": [[torch.randn(1, a.text_tokens, ctx, generator=g), {"frame_rate": a.fps}]],
                "neg": [[torch.randn(1, a.text_tokens, ctx, generator=g), {"frame_rate": a.fps}]],
                "tokens": f * (h // 32) * (w // 32),
                "audio_tokens": audio,
            }

        def sample(m: Any, inp: dict[str, Any]) -> tuple[list[torch.Tensor], float, float]:
            stamps: list[float] = []
            if cuda:
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            with torch.inference_mode():
                out = comfy.sample.sample(
                    m, inp["noise"], a.steps, a.cfg, "euler", "simple", inp["pos"], inp["neg"], inp["latent"],
                    seed=0, disable_pbar=True, callback=lambda *_: stamps.append(time.perf_counter()),
                )  # fmt: skip
            if cuda:
                torch.cuda.synchronize()
            total = time.perf_counter() - t0
            step = stamps[-1] - stamps[-2] if len(stamps) > 1 else total
            return list(out.unbind()), total, step

        def reset_peaks() -> None:
            if cuda:
                torch.cuda.reset_peak_memory_stats(0)
            if dev_peaks is not None:
                dev_peaks.take()

        def left() -> float:
            return a.budget - (time.perf_counter() - T0)

        sizes = [tuple(int(x) for x in r.split("x")) for r in res.split(",")]
        total_mem = torch.cuda.get_device_properties(0).total_memory if cuda else 0
        refs: dict[tuple[int, int, int], list[torch.Tensor]] = {}

        # 3) unsplit, single GPU
        for w, h, frames in sizes:
            if left() < 90:
                say(f"skip unsplit {w}x{h}x{frames}: {left():.0f} s of the budget left")
                continue
            inp = inputs(w, h, frames)
            reset_peaks()
            say(f"unsplit {w}x{h}x{frames} ({inp['tokens']} video + {inp['audio_tokens']} audio tokens) ...")
            try:
                out, total, step = sample(model, inp)
            except torch.cuda.OutOfMemoryError:
                say("  out of GPU memory: skipped")
                rows.append({"run": "unsplit (1 GPU)", "res": f"{w}x{h}x{frames}", "note": "OOM"})
                torch.cuda.empty_cache()
                continue
            refs[(w, h, frames)] = out
            dp = dev_peaks.take() if dev_peaks else {}
            finite = all(torch.isfinite(o).all().item() for o in out)
            rows.append(
                {
                    "run": "unsplit (1 GPU)",
                    "res": f"{w}x{h}x{frames}",
                    "step": step,
                    "total": total,
                    "client_alloc": torch.cuda.max_memory_allocated(0) if cuda else -1,
                    "client_dev": dp.get(0, -1),
                    "note": "" if finite else "NON-FINITE output",
                }
            )
            say(f"  step {step:.2f} s, total {total:.1f} s, peak {gb(rows[-1]['client_alloc'])} GB")

        # 4) split: client cuda:0 + Daedalus cuda:1, loopback
        if cuda:
            comfy.model_management.unload_all_models()
            comfy.model_management.soft_empty_cache(True)
        server.peak()  # the server's load peak; starts its per-run window
        for codec in a.codecs.split(","):
            stats: list[Any] = []
            m, run = split_model(
                model,
                SplitSettings(
                    n_remote=a.n_blocks, client=cfg, codec_name=codec, on_step=lambda i, s, _st=stats: _st.append(s)
                ),
            )
            say(f"split {codec}: client model {m.model_size() / 1e9:.1f} GB of {model.model_size() / 1e9:.1f} GB")
            for w, h, frames in sizes:
                if left() < 60:
                    say(f"skip split {codec} {w}x{h}x{frames}: {left():.0f} s of the budget left")
                    continue
                if cuda and (w, h, frames) not in refs and total_mem < 60e9:
                    say(f"skip split {codec} {w}x{h}x{frames}: no unsplit reference and a small GPU")
                    continue
                inp = inputs(w, h, frames)
                stats.clear()
                calls0 = run.calls
                reset_peaks()
                server.peak()
                say(f"split {codec} {w}x{h}x{frames} ...")
                try:
                    out, total, step = sample(m, inp)
                except torch.cuda.OutOfMemoryError:
                    say("  out of GPU memory: skipped")
                    rows.append({"run": f"split n={a.n_blocks} {codec}", "res": f"{w}x{h}x{frames}", "note": "OOM"})
                    torch.cuda.empty_cache()
                    continue
                dp = dev_peaks.take() if dev_peaks else {}
                s_alloc, _ = server.peak()
                ref = refs.get((w, h, frames))
                diff = (
                    " / ".join(
                        f"{(o.float() - r.float()).abs().max().item():.3g}" for o, r in zip(out, ref, strict=True)
                    )
                    if ref is not None
                    else "no reference"
                )
                same = ref is not None and all(torch.equal(o, r) for o, r in zip(out, ref, strict=True))
                first, last = stats[0], stats[-1]
                rows.append(
                    {
                        "run": f"split n={a.n_blocks} {codec}",
                        "res": f"{w}x{h}x{frames}",
                        "step": step,
                        "total": total,
                        "calls": (run.calls - calls0) / a.steps,
                        "out": last.bytes_out,
                        "in": last.bytes_in,
                        "first": first.bytes_out,
                        "consts": first.consts_sent,
                        "client_alloc": torch.cuda.max_memory_allocated(0) if cuda else -1,
                        "client_dev": dp.get(0, -1),
                        "server_alloc": s_alloc,
                        "server_dev": dp.get(1, -1),
                        "diff": ("0 (bit-identical)" if same else diff),
                        "server_ms": last.server.get("forward", 0.0),
                        "wait_ms": last.wait_ms,
                    }
                )
                say(f"  step {step:.2f} s, total {total:.1f} s; last call: {last.line()}")
                say(f"  max abs diff vs unsplit (video / audio): {rows[-1]['diff']}")
    except Exception as e:  # print what was measured so far
        import traceback

        traceback.print_exc()
        rows.append({"run": "FAILED", "res": "", "note": f"{type(e).__name__}: {e}"[:200]})
    finally:
        server.stop()
        if dev_peaks is not None:
            dev_peaks.stop()

    # 5) the table
    dev = torch.cuda.get_device_name(0) if cuda else "CPU"
    print(
        f"\nLTX-AV 2.3-style, {config['num_layers']} blocks, {'fp32 tiny (dry run)' if a.cpu else 'bf16'}, random "
        f"weights; {a.steps} steps, cfg {a.cfg}, {a.text_tokens} text "
        f"tokens; client {client_dev}, Daedalus {server_dev} ({dev}), loopback; torch {torch.__version__}\n",
        flush=True,
    )
    print(
        "| run | W x H x frames | calls/step | s/step (last) | total s | MB out / in per call | 1st call MB "
        "(consts sent) | client peak GB alloc / device | server peak GB alloc / device | max abs diff vs unsplit "
        "(video / audio) | server forward ms / round trip ms |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        if "step" not in r:
            print(f"| {r['run']} | {r['res']} | | | | | | | | {r.get('note', '')} | |")
            continue
        split_row = "out" in r
        print(
            f"| {r['run']} | {r['res']} | {format(r['calls'], 'g') if split_row else '-'} | {r['step']:.2f} | {r['total']:.1f} | "
            + (
                f"{r['out'] / 1e6:.1f} / {r['in'] / 1e6:.2f} | {r['first'] / 1e6:.1f} ({r['consts']}) | "
                if split_row
                else "- | - | "
            )
            + f"{gb(r['client_alloc'])} / {gb(r['client_dev'])} | "
            + (f"{gb(r['server_alloc'])} / {gb(r['server_dev'])} | " if split_row else "- | ")
            + (
                f"{r['diff']} | {r['server_ms']:.0f} / {r['wait_ms']:.0f} |"
                if split_row
                else f"{r.get('note') or '-'} | - |"
            )
        )
    steps = [ln for ln in server.lines if " step " in ln]
    if steps:
        print("\n# last server step: " + steps[-1].strip(), flush=True)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--serve":
        sys.exit(serve(sys.argv[2:]))
    main()
