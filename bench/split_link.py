"""The split over emulated links: every codec x link x mode against unsplit, through a real Daedalus.

    python bench/split_link.py --comfyui PATH --model tiny|klein9b|dev|ltx-tiny|ltx23 [--res 1024] [--steps 4] \\
        [--codecs raw,lossless,quant,quant-t,auto] [--links direct,relay,10gbe,2.5gbe,1gbe,vpn] \\
        [--modes tcp] [--n-blocks N] [--device cuda:0] [--server-device cuda:1] [--out results.json]

FLUX.2 (``tiny.make_flux2``) or LTX-AV (``tiny.make_ltxav``, LTX-2.3 flags; video + audio latents,
as bench/ltx_gpu_check.py) shapes with random weights, sampled by ComfyUI under inference mode (Euler;
CFG 1 for FLUX.2, 3 for LTX-AV unless ``--cfg``); Daedalus is the real CLI process (token auth on) serving the last ``--n-blocks`` blocks.
The client reaches it directly (``direct``: loopback TCP) or through ``bench/linkemu.py`` with each
link profile (``relay``: the emulator with no limit, its own cost). Per codec x link x mode:

* s/step: the median step of a timed sampling run (after a warm-up run that sends the constants),
  the best of ``--repeats`` runs; unsplit likewise, measured again before each link's runs; with
  ``--interleave`` an unsplit run before each timed split run, s/step the median of the runs' medians
  and the overhead the median of the pairs' differences (drift over minutes cancels);
* overhead = split - unsplit per step; wire = what the link needs for the bytes of one step
  (calls per step x (bytes out / up rate + bytes in / down rate + RTT)); overhead - wire: issue 15's
  target metric (what the split costs beyond the link itself; <= 8 ms is the target);
* MB out / in per call (median over the timed run's calls after the first step's, whose keyframes
  temporal codecs send), and the client's encode / round trip / decode and the server's forward ms;
* fidelity of the final latent against unsplit: bit-identical, else relative L2 and PSNR (dB, over
  the unsplit latent's peak-to-peak range); in a mode with row pipelining on (``rows``), against the
  unsplit model run row by row (``icarus.row_by_row``: the same per-row kernels);
* unsplit / split: the speed-up (> 1: the split is faster), calls/step (rows pipelined: one per row).

Modes are named sets of ``SplitSettings`` / ``ClientConfig`` overrides (``MODES``; add one with
``--mode-def NAME:key=value,key=value``, values parsed as JSON where they parse (and True / False /
None as Python writes them), e.g.
``--mode-def reply-lossless:reply_codec=lossless``).

Prints a Markdown table; ``--out FILE`` writes every row and the run's settings as JSON.
On the CPU with ``--model tiny`` it is a smoke run (CI runs its core, ``measure``, in
tests/test_split_link.py). The GPU kernels of the codecs need a GPU; unavailable codecs are skipped
with their reason.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import math
import os
import signal
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # linkemu, run as a script or imported by path
import linkemu  # noqa: E402
from comfyui_mesh import codec  # noqa: E402
from comfyui_mesh.config import ClientConfig  # noqa: E402
from comfyui_mesh.icarus import SplitSettings, row_by_row, split_model  # noqa: E402
from comfyui_mesh.transport import StepStats, drop_pooled  # noqa: E402

DIRECT = "direct"  # no emulator: loopback TCP straight to Daedalus
# "tcp": the node's settings (raw reply); "reply-lossless": the reply coded too, still bit-identical.
# Client and Daedalus share this host, so the same-host fast path (PROTOCOL.md §11) would carry the
# seam past the emulated link: every TCP mode turns it off; "samehost" measures it (link "direct").
# "batched" / "rows": row pipelining (rows.py) forced off / on, over TCP (bench/split_pipeline.py).
MODES: dict[str, dict[str, Any]] = {
    "tcp": {"samehost": False},
    "batched": {"samehost": False, "rows": "off"},
    "rows": {"samehost": False, "rows": "on"},
    "reply-lossless": {"reply_codec": "lossless", "samehost": False},
    "samehost": {"samehost": True},
}
SETTINGS_FIELDS = {f.name for f in dataclasses.fields(SplitSettings)} - {"n_remote", "client", "codec_name", "on_step"}
CLIENT_FIELDS = {f.name for f in dataclasses.fields(ClientConfig)} - {"host", "port", "token"}

# (model) -> (latent, total s, per-step seconds)
Sampler = Callable[[Any], tuple[Any, float, list[float]]]


@dataclasses.dataclass
class Row:
    link: str
    link_desc: str
    codec: str
    mode: str
    step_s: float  # median s/step, split
    unsplit_step_s: float
    overhead_ms: float  # per step
    wire_ms: float  # per step, what the link needs for the bytes (0 on direct)
    over_wire_ms: float  # overhead - wire: the target metric
    calls_per_step: float
    mb_out: float  # per call
    mb_in: float
    identical: bool
    rel_l2: float
    psnr_db: float
    encode_ms: float  # client, per call (median)
    round_trip_ms: float
    decode_ms: float
    server_forward_ms: float
    total_s: float
    codec_used: str  # what "auto" picked (or the codec itself)
    speedup: float  # unsplit s/step / split s/step (> 1: the split is faster)
    reference: str  # what fidelity compares with: "unsplit", or "unsplit row by row" (rows on)
    slabs_out: float = 0.0  # median slabs a request was streamed in (0: one frame; the plan, streaming.best_parts)
    per_call: list[str] = dataclasses.field(default_factory=list)  # "slabs/encode ms/round trip ms" of every call

    def fidelity(self) -> str:
        how = "bit-identical" if self.identical else f"rel L2 {self.rel_l2:.2e}, PSNR {self.psnr_db:.1f} dB"
        return how if self.reference == "unsplit" else f"{how} vs {self.reference}"


COLUMNS = [f.name for f in dataclasses.fields(Row)]


def fidelity(out: Any, ref: Any) -> tuple[bool, float, float]:
    """(bit-identical, relative L2, PSNR dB over ref's peak-to-peak range) of ``out`` against ``ref``
    (tensors, or lists / NestedTensors of them)."""

    def flat(x: Any) -> torch.Tensor:
        parts = getattr(x, "tensors", x)
        if isinstance(parts, (list, tuple)):
            return torch.cat([t.detach().float().flatten().cpu() for t in parts])
        return parts.detach().float().flatten().cpu()

    a, b = flat(out), flat(ref)
    identical = bool(torch.equal(a, b)) and _exact(out, ref)
    diff = a - b
    rel = float(diff.norm() / b.norm()) if b.norm() > 0 else float(diff.norm())
    mse = float((diff * diff).mean())
    peak = float(b.max() - b.min())
    psnr = math.inf if mse == 0 else 10 * math.log10(peak * peak / mse)
    return identical, rel, psnr


def _exact(out: Any, ref: Any) -> bool:
    """Dtypes agree too (a float32 copy of a bf16 latent is not 'bit-identical')."""
    po, pr = getattr(out, "tensors", out), getattr(ref, "tensors", ref)
    if isinstance(po, (list, tuple)):
        return len(po) == len(pr) and all(x.dtype == y.dtype and torch.equal(x, y) for x, y in zip(po, pr, strict=True))
    return po.dtype == pr.dtype and torch.equal(po, pr)


def median_stats(stats: Sequence[StepStats]) -> dict[str, float]:
    def med(f: Callable[[StepStats], float]) -> float:
        return statistics.median(f(s) for s in stats) if stats else 0.0

    return {
        "bytes_out": med(lambda s: s.bytes_out),
        "bytes_in": med(lambda s: s.bytes_in),
        "encode_ms": med(lambda s: s.encode_ms),
        "round_trip_ms": med(lambda s: s.wait_ms),
        "decode_ms": med(lambda s: s.decode_ms),
        "server_forward_ms": med(lambda s: s.server.get("forward", 0.0)),
    }


def parse_modes(names: str, defs: Sequence[str] = ()) -> dict[str, dict[str, Any]]:
    known = dict(MODES)
    for d in defs:
        name, _, body = d.partition(":")
        over: dict[str, Any] = {}
        for kv in filter(None, body.split(",")):
            k, _, v = kv.partition("=")
            if k not in SETTINGS_FIELDS | CLIENT_FIELDS:
                raise SystemExit(f"--mode-def {d!r}: {k!r} is neither a SplitSettings nor a ClientConfig field")
            try:
                over[k] = (
                    {"True": True, "False": False, "None": None}.get(v, None)
                    if v in ("True", "False", "None")
                    else json.loads(v)
                )
            except ValueError:
                over[k] = v
        known[name] = over
    out = {}
    for n in filter(None, names.split(",")):
        if n not in known:
            raise SystemExit(f"unknown mode {n!r}: known {', '.join(known)} (define one with --mode-def)")
        out[n] = known[n]
    return out


def measure(
    sample: Sampler,
    model: Any,
    target: tuple[str, int],
    token: str | None,
    n_remote: int,
    links: Sequence[str],
    codecs: Sequence[str],
    modes: dict[str, dict[str, Any]],
    repeats: int = 1,
    between: Callable[[], None] = lambda: None,
    say: Callable[[str], None] = print,
    row_ref: Any = None,
    interleave: bool = False,
) -> list[Row]:
    """Every link x mode x codec split against the Daedalus at ``target``, each link's runs after an
    unsplit one (the overhead is against the unsplit figure nearest in time).
    ``sample(model)``: one sampling run -> (latent, total s, per-step s); ``between()``: after each
    split is made (ComfyUI: unload models so the clone loads). Codecs not available here are skipped.
    ``row_ref``: the unsplit model run row by row (``icarus.row_by_row``): the fidelity reference of
    the modes with row pipelining on (the same per-row kernels), sampled once.
    ``interleave``: every timed split run right after an unsplit one (models swapped between them),
    and the overhead the median over these pairs of split - unsplit: what drifts over minutes (clocks,
    the other process on a shared GPU) cancels out, at the price of reloading the models twice a run."""
    ref = None
    ref_rows = None
    rows = []
    for link_name in links:
        # unsplit again before each link's runs: the figure next to them in time (load drifts)
        between()
        out, _, unsplit = _best(sample, model, repeats)
        unsplit_step = statistics.median(unsplit)
        if ref is None:
            ref = out
        elif not fidelity(out, ref)[0]:
            say("unsplit runs differ from each other: fidelity figures compare against the first")
        say(f"unsplit: {unsplit_step * 1e3:.1f} ms/step")
        link = None if link_name == DIRECT else linkemu.parse_link(link_name)
        emu = linkemu.RelayProcess(target, link) if link is not None else None
        host, port = target if emu is None else ("127.0.0.1", emu.start())
        try:
            for mode, over in modes.items():
                for name in codecs:
                    why = codec.by_name(name).available()
                    if why:
                        say(f"skip {name}: {why}")
                        continue
                    cfg = ClientConfig(
                        host=host, port=port, token=token, **{k: v for k, v in over.items() if k in CLIENT_FIELDS}
                    )
                    stats: list[StepStats] = []

                    def on_step(_call: int, s: StepStats, _stats: list[StepStats] = stats) -> None:
                        _stats.append(s)

                    settings = SplitSettings(
                        n_remote=n_remote,
                        client=cfg,
                        codec_name=name,
                        on_step=on_step,
                        **{k: v for k, v in over.items() if k in SETTINGS_FIELDS},
                    )
                    m, _run = split_model(model, settings)
                    between()
                    sample(m)  # warm-up: connection, constants, kernels
                    best: tuple[Any, float, list[float]] | None = None
                    best_stats: list[StepStats] = []
                    pairs: list[tuple[float, float]] = []  # (unsplit, split) median s/step, interleaved
                    for _ in range(repeats):
                        if interleave:
                            between()
                            u = statistics.median(sample(model)[2])
                            between()
                        stats.clear()
                        res = sample(m)
                        if interleave:
                            pairs.append((u, statistics.median(res[2])))
                        if best is None or statistics.median(res[2]) < statistics.median(best[2]):
                            best, best_stats = res, list(stats)
                    assert best is not None
                    out, total, steps = best
                    step_s, against_step = statistics.median(steps), unsplit_step
                    if pairs:  # overhead: the median of the pairs' differences
                        step_s = statistics.median(p[1] for p in pairs)
                        against_step = step_s - statistics.median(p[1] - p[0] for p in pairs)
                        say(
                            "unsplit / split ms/step, pairs: "
                            + ", ".join(f"{u * 1e3:.1f}/{v * 1e3:.1f}" for u, v in pairs)
                        )
                    by_row = row_ref is not None and over.get("rows") == "on"
                    if by_row and ref_rows is None:
                        between()
                        ref_rows = sample(row_ref)[0]
                    against = ref_rows if by_row else ref
                    rows.append(
                        _row(link_name, link, name, mode, out, against, total, steps, against_step, best_stats, step_s)
                    )
                    rows[-1].reference = "unsplit row by row" if by_row else "unsplit"
                    r = rows[-1]
                    say(
                        f"{link_name} {mode} {name}: {r.step_s * 1e3:.1f} ms/step, overhead {r.overhead_ms:+.1f} ms, "
                        f"wire {r.wire_ms:.1f}, beyond the wire {r.over_wire_ms:+.1f} ms; {r.fidelity()}"
                    )
        finally:
            drop_pooled(host, port)
            if emu is not None:
                emu.close()
    return rows


def _best(sample: Sampler, model: Any, repeats: int) -> tuple[Any, float, list[float]]:
    sample(model)  # warm-up
    runs = [sample(model) for _ in range(repeats)]
    return min(runs, key=lambda r: statistics.median(r[2]))


def _row(
    link_name: str,
    link: linkemu.Link | None,
    name: str,
    mode: str,
    out: Any,
    ref: Any,
    total: float,
    steps: list[float],
    unsplit_step: float,
    stats: list[StepStats],
    step_s: float | None = None,
) -> Row:
    n_steps = len(steps) + 1  # the intervals between step callbacks leave out the first step
    per_step = max(1.0, len(stats) / n_steps)
    later = stats[int(round(per_step)) :] or stats  # after the first step's calls (temporal keyframes)
    med = median_stats(later)
    step = statistics.median(steps) if step_s is None else step_s
    wire = per_step * link.wire_s(int(med["bytes_out"]), int(med["bytes_in"])) if link is not None else 0.0
    identical, rel, psnr = fidelity(out, ref)
    overhead = step - unsplit_step
    used = later[-1].codec.get("codec", name) if later else name
    return Row(
        link=link_name,
        link_desc=link.describe() if link is not None else "loopback TCP, no emulator",
        codec=name,
        mode=mode,
        step_s=step,
        unsplit_step_s=unsplit_step,
        overhead_ms=overhead * 1e3,
        wire_ms=wire * 1e3,
        over_wire_ms=(overhead - wire) * 1e3,
        calls_per_step=per_step,
        mb_out=med["bytes_out"] / 1e6,
        mb_in=med["bytes_in"] / 1e6,
        identical=identical,
        rel_l2=rel,
        psnr_db=psnr,
        encode_ms=med["encode_ms"],
        round_trip_ms=med["round_trip_ms"],
        decode_ms=med["decode_ms"],
        server_forward_ms=med["server_forward_ms"],
        total_s=total,
        codec_used=str(used),
        speedup=unsplit_step / step if step > 0 else 0.0,
        reference="unsplit",
        slabs_out=statistics.median(s.slabs_out for s in later) if later else 0.0,
        per_call=[f"{s.slabs_out}/{s.encode_ms:.1f}/{s.wait_ms:.1f}" for s in stats],
    )


def table(rows: Sequence[Row]) -> str:
    out = [
        "| link | codec | mode | s/step (unsplit) | unsplit / split | overhead ms/step | wire ms/step | "
        "overhead - wire ms | calls/step | MB out / in per call | fidelity (final latent) | "
        "encode / round trip / decode ms | server forward ms | slabs per request |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        name = r.codec if r.codec_used in ("", r.codec) else f"{r.codec} ({r.codec_used})"
        out.append(
            f"| {r.link} | {name} | {r.mode} | {r.step_s:.3f} ({r.unsplit_step_s:.3f}) | {r.speedup:.2f}x | "
            f"{r.overhead_ms:+.1f} | {r.wire_ms:.1f} | {r.over_wire_ms:+.1f} | {r.calls_per_step:g} | "
            f"{r.mb_out:.2f} / {r.mb_in:.2f} | {r.fidelity()} | "
            f"{r.encode_ms:.1f} / {r.round_trip_ms:.1f} / {r.decode_ms:.1f} | {r.server_forward_ms:.1f} | "
            f"{r.slabs_out:g} |"
        )
    return "\n".join(out)


def links_table(links: Sequence[str]) -> str:
    lines = []
    for n in links:
        desc = "loopback TCP, no emulator" if n == DIRECT else linkemu.parse_link(n).describe()
        lines.append(f"- `{n}`: {desc}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------- ComfyUI + Daedalus process


@dataclasses.dataclass(frozen=True)
class Model:
    family: str  # flux2 | ltxav
    config: str  # the tiny.py shape table
    n_blocks: int  # default blocks on Daedalus
    res: str  # default size: "SIDE" (FLUX.2) or "WxHxFRAMES" (LTX-AV)
    text_tokens: int
    cfg: float


MODELS = {
    "tiny": Model("flux2", "FLUX2_TINY", 3, "256", 7, 1.0),
    "klein9b": Model("flux2", "FLUX2_KLEIN_9B", 16, "1024", 512, 1.0),
    "dev": Model("flux2", "FLUX2_DEV", 24, "1024", 512, 1.0),
    "ltx-tiny": Model("ltxav", "LTXAV23_TINY", 2, "64x64x17", 7, 3.0),
    "ltx23": Model("ltxav", "LTXAV23_FULL", 8, "768x512x121", 1024, 3.0),  # as bench/ltx_gpu_check.py
}


def model_inputs(spec: Model, config: dict[str, Any], res: str, batch: int = 1) -> dict[str, Any]:
    """noise / positive / negative / latent_image for comfy.sample.sample (CPU tensors, seeded)."""
    from comfyui_mesh import tiny

    if spec.family == "flux2":
        lat = int(res) // 16
        return tiny.flux2_inputs(batch=batch, h=lat, w=lat, txt=spec.text_tokens, ctx=config["context_in_dim"])
    from comfy.nested_tensor import NestedTensor

    w, h, frames = (int(x) for x in res.split("x"))
    g = torch.Generator().manual_seed(1)
    video = (batch, 128, (frames - 1) // 8 + 1, h // 32, w // 32)
    audio = (batch, 8, max(1, round(frames / 25 * 25)), 16)  # 25 audio latents per second at 25 fps
    ctx = config["cross_attention_dim"] + config["audio_cross_attention_dim"]  # processed (2.3) text features
    text = {"frame_rate": 25.0}
    return {
        "noise": NestedTensor([torch.randn(video, generator=g), torch.randn(audio, generator=g)]),
        "latent_image": NestedTensor([torch.zeros(video), torch.zeros(audio)]),
        "positive": [[torch.randn(1, spec.text_tokens, ctx, generator=g), dict(text)]],
        "negative": [[torch.randn(1, spec.text_tokens, ctx, generator=g), dict(text)]],
    }


class Daedalus:
    """``python -m comfyui_mesh.server`` serving ``weights``; ``port`` and ``token`` once READY."""

    def __init__(
        self, weights: Path, n: int, device: str, comfyui: str, state: Path, threads: int = 0, timeout: float = 900
    ):
        cmd = [sys.executable, "-m", "comfyui_mesh.server", "--weights", str(weights), "--n-blocks", str(n),
               "--port", "0", "--device", device, "--comfyui", comfyui, "--state-dir", str(state)]  # fmt: skip
        env = {**os.environ, "OMP_NUM_THREADS": str(threads)} if threads else None
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
        self.lines: list[str] = []
        self.port = 0
        ready = threading.Event()

        def pump() -> None:
            assert self.proc.stdout is not None
            for line in self.proc.stdout:
                self.lines.append(line)
                if not self.port and "READY listening on" in line:
                    self.port = int(line.split("listening on ")[1].split()[0].rsplit(":", 1)[1])
                    ready.set()
            ready.set()

        threading.Thread(target=pump, daemon=True).start()
        if not ready.wait(timeout) or not self.port:
            self.stop()
            raise SystemExit("Daedalus did not start:\n" + "".join(self.lines[-40:]))
        self.token = (state / "token").read_text().strip()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()


def ensure_weights(model: str, workdir: Path, device: str) -> Path:
    """The random checkpoint of ``MODELS[model]`` in ``workdir`` (bf16 on CUDA, else fp32), written once."""
    from comfyui_mesh import tiny

    spec = MODELS[model]
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    weights = workdir / f"{model}-{str(dtype).removeprefix('torch.')}.safetensors"
    if not weights.exists():
        t = time.perf_counter()
        part = weights.with_suffix(".partial")
        make = tiny.make_flux2 if spec.family == "flux2" else tiny.make_ltxav
        make(part, config=getattr(tiny, spec.config), dtype=dtype, device=device)
        part.rename(weights)
        print(
            f"# wrote {weights} ({weights.stat().st_size / 1e9:.2f} GB) in {time.perf_counter() - t:.1f} s", flush=True
        )
    return weights


def sampler(comfy: Any, inputs: dict[str, Any], steps: int, cfg_scale: float, cuda: bool) -> Sampler:
    """One seeded Euler sampling run of ``inputs`` -> (latent, total s, per-step s), synchronized on CUDA."""

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize()

    def sample(m: Any) -> tuple[Any, float, list[float]]:
        stamps: list[float] = []
        sync()
        t = time.perf_counter()
        with torch.inference_mode():
            out = comfy.sample.sample(
                m, inputs["noise"], steps, cfg_scale, "euler", "simple", inputs["positive"], inputs["negative"],
                inputs["latent_image"], seed=0, disable_pbar=True, callback=lambda *_: stamps.append(time.perf_counter()),
            )  # fmt: skip
        sync()
        total = time.perf_counter() - t
        return out, total, [b - c for b, c in zip(stamps[1:], stamps[:-1], strict=False)] or [total]

    return sample


def unloader(comfy: Any, cuda: bool) -> Callable[[], None]:
    """Unload every model (so a new split clone loads), freeing the CUDA cache."""

    def between() -> None:
        comfy.model_management.unload_all_models()
        if cuda:
            torch.cuda.empty_cache()

    return between


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--comfyui", default=os.environ.get("COMFYUI_PATH", ""), help="ComfyUI checkout (COMFYUI_PATH)")
    ap.add_argument("--model", default="tiny", choices=list(MODELS))
    ap.add_argument("--res", default="", help="FLUX.2: image side in pixels; LTX-AV: WxHxFRAMES (default: per model)")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--cfg", type=float, default=None, help="default: FLUX.2 1, LTX-AV 3")
    ap.add_argument("--batch", type=int, default=1, help="latents per prompt (rows per model call: batch x CFG rows)")
    ap.add_argument("--n-blocks", type=int, default=0, help="blocks on Daedalus (default: per model)")
    ap.add_argument("--codecs", default="raw,lossless,int8,quant,quant-t,auto")
    ap.add_argument("--links", default="direct,relay,10gbe,2.5gbe,1gbe,vpn", help="direct, linkemu profiles or UP[/DOWN]mbit@RTTms")  # fmt: skip
    ap.add_argument("--modes", default="tcp", help=f"named setting sets: {', '.join(MODES)}")
    ap.add_argument("--mode-def", action="append", default=[], help="NAME:key=value,... (SplitSettings/ClientConfig)")
    ap.add_argument("--repeats", type=int, default=2, help="timed runs per configuration (the best counts)")
    ap.add_argument("--interleave", action="store_true",
                    help="an unsplit run before every timed split run; overhead = the median of the pairs' differences")  # fmt: skip
    ap.add_argument("--device", default="cuda:0" if torch.cuda.is_available() else "cpu", help="client device")
    ap.add_argument("--server-device", default="", help="Daedalus's device (default: cuda:1 if there are 2 GPUs, else --device)")  # fmt: skip
    ap.add_argument("--threads", type=int, default=1, help="CPU runs: torch threads per process (0: torch's default)")
    ap.add_argument("--workdir", default="/tmp/mesh-bench")
    ap.add_argument("--out", default="", help="write the rows and settings as JSON here")
    ap.add_argument("--selftest-mb", type=float, default=20, help="the emulator's own accuracy on this machine first, MB per transfer (0: skip)")  # fmt: skip
    a = ap.parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so the finally below stops Daedalus
    if not a.comfyui:
        ap.error("--comfyui PATH (or COMFYUI_PATH) is required")
    cuda = a.device.startswith("cuda")
    from comfyui_mesh import tiny

    comfy = tiny.import_comfy(a.comfyui, cpu=not cuda)
    threads = a.threads if not cuda else 0
    if threads:
        torch.set_num_threads(threads)
    modes = parse_modes(a.modes, a.mode_def)
    links = [s for s in a.links.split(",") if s]
    for n in links:
        if n != DIRECT:
            linkemu.parse_link(n)  # fail early on a typo
    spec = MODELS[a.model]
    config = getattr(tiny, spec.config)
    n = a.n_blocks or spec.n_blocks
    res = a.res or spec.res
    cfg_scale = spec.cfg if a.cfg is None else a.cfg
    wd = Path(a.workdir)
    wd.mkdir(parents=True, exist_ok=True)
    weights = ensure_weights(a.model, wd, a.device)
    server_dev = a.server_device or ("cuda:1" if cuda and torch.cuda.device_count() > 1 else a.device)
    emu_links = [linkemu.parse_link(k) for k in links if k != DIRECT]
    emu_rows = linkemu.selftest(emu_links, a.selftest_mb) if a.selftest_mb > 0 and emu_links else []
    srv = Daedalus(weights, n, server_dev, a.comfyui, wd / "state", threads)
    print(f"# Daedalus on {server_dev}, port {srv.port}", flush=True)

    try:
        with torch.inference_mode():  # as ComfyUI's node execution loads it
            model = comfy.sd.load_diffusion_model(str(weights))
        inputs = model_inputs(spec, config, res, a.batch)
        sample = sampler(comfy, inputs, a.steps, cfg_scale, cuda)
        between = unloader(comfy, cuda)
        row_ref = row_by_row(model) if any(m.get("rows") == "on" for m in modes.values()) else None
        rows = measure(sample, model, ("127.0.0.1", srv.port), srv.token, n, links, a.codecs.split(","), modes,
                       repeats=a.repeats, between=between, say=lambda s: print("#", s, flush=True),
                       row_ref=row_ref, interleave=a.interleave)  # fmt: skip
    finally:
        srv.stop()
    device = torch.cuda.get_device_name(0) if cuda else f"CPU ({os.cpu_count()} cores)"
    head = (
        f"{a.model}, {res if 'x' in res else f'{res}x{res}'}, batch {a.batch}, {a.steps} steps, CFG {cfg_scale:g}, n_blocks {n}, client {a.device}, Daedalus {server_dev} "
        f"({device}{f', {threads} torch thread(s) each' if threads else ''}), torch {torch.__version__}, "
        f"{datetime.date.today().isoformat()}"
    )
    print(f"\n{head}\n\n{links_table(links)}\n\n{table(rows)}")
    if emu_rows:
        print(f"\nThe emulator on this machine ({a.selftest_mb:g} MB each way, no model running):\n")
        print(linkemu.selftest_table(emu_rows))
    if a.out:
        settings = {
            **vars(a),
            "n_blocks": n,
            "res": res,
            "cfg": cfg_scale,
            "server_device": server_dev,
            "device_name": device,
            "modes": modes,
            "links": {k: dataclasses.asdict(linkemu.parse_link(k)) for k in links if k != DIRECT},
        }
        write_doc(a.out, settings, linkemu_selftest=emu_rows, columns=COLUMNS,
                  rows=[{k: (None if isinstance(v, float) and math.isinf(v) else v) for k, v in dataclasses.asdict(r).items()} for r in rows])  # fmt: skip
    return 0


def write_doc(path: str, settings: dict[str, Any], **rest: Any) -> None:
    """A bench run as JSON at ``path``: its ``settings`` (with torch's version, the date and the command
    line added) and ``rest``."""
    run = {"torch": torch.__version__, "date": datetime.datetime.now().isoformat(timespec="seconds"),
           "command": " ".join(sys.argv)}  # fmt: skip
    Path(path).write_text(json.dumps({"settings": {**settings, **run}, **rest}, indent=1))
    print(f"\n# wrote {path}")


if __name__ == "__main__":
    sys.exit(main())
