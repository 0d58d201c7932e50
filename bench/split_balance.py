"""Does the n_blocks_remote suggestion (balance.py) point at the fastest split? A sweep measures it.

    python bench/split_balance.py --comfyui PATH --model tiny|klein9b|dev|ltx-tiny|ltx23 --sweep 4,8,16,24 \\
        [--mode rows|serial] [--link 1gbe|direct|UP[/DOWN]mbit@RTTms] [--codec raw] [--steps 4] [--res 1024] \\
        [--cfg 2] [--repeats 2] [--device cuda:0] [--server-device cuda:1] [--out results.json]

For each n_blocks_remote of ``--sweep`` the one Daedalus process is reconfigured to hold that many
blocks (as the node's Confirm button does), the model is split with that n (``--mode rows``: row
pipelining on; ``serial``: off, one call per step), sampled once to warm up and ``--repeats`` times
timed, over the link ``--link`` (bench/linkemu.py; ``direct``: loopback TCP). Per n it prints the
measured s/step (median step of the best run), the suggestion's estimate for the same n and its
measured sides (client / server / link ms per step), and the suggestion that run made; then the
measured best n, and for each run whether its suggestion points toward it (moves the right way, or
stays where no other swept n is 5 % faster).

The model setup, the Daedalus process, the sampler and the link emulator are bench/split_link.py's.
FLUX.2 in ``rows`` mode defaults to CFG 2 (cond + uncond: two rows to pipeline). Client and Daedalus
on one GPU (no second one, or ``--server-device`` the same) compete for it: the sweep then measures
that, not two GPUs. On the CPU with ``--model tiny`` it is a smoke run (tests/test_balance_split.py).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import os
import signal
import statistics
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # split_link, linkemu: run as a script or by path
import linkemu  # noqa: E402
import split_link  # noqa: E402
from comfyui_mesh.balance import Suggestion  # noqa: E402
from comfyui_mesh.config import ClientConfig  # noqa: E402
from comfyui_mesh.constants import BALANCE_MIN_GAIN  # noqa: E402
from comfyui_mesh.icarus import SplitSettings, split_model  # noqa: E402
from comfyui_mesh.transport import MeshClient, drop_pooled  # noqa: E402

MODES = {"rows": "on", "serial": "off"}  # --mode -> SplitSettings.rows


@dataclasses.dataclass
class Run:
    n: int
    step_s: float  # measured: the median step of the best timed run
    est_step_s: float  # the suggestion's estimate of the same step
    client_ms: float  # per step, as the suggestion measured them
    server_ms: float
    link_ms: float
    bound: str
    suggested: int
    est_new_step_s: float
    text: str
    toward_best: bool = False  # set once the sweep's best is known


def toward(run: Run, best: Run, min_gain: float = BALANCE_MIN_GAIN) -> bool:
    """Whether ``run``'s suggestion points toward the measured ``best``: it moves the same way, or it
    stays where no swept n was ``min_gain`` faster than this one."""
    if run.suggested == run.n:
        return best.step_s >= run.step_s * (1.0 - min_gain)
    return (run.suggested > run.n) == (best.n > run.n) and best.n != run.n


def sweep(
    sample: split_link.Sampler,
    model: Any,
    server: tuple[str, int],
    via: tuple[str, int],
    token: str | None,
    ns: Sequence[int],
    mode: str,
    codec_name: str,
    repeats: int = 1,
    between: Callable[[], None] = lambda: None,
    say: Callable[[str], None] = print,
) -> list[Run]:
    """Per n: reconfigure the Daedalus at ``server`` to n blocks, split ``model`` with n reaching it
    through ``via`` (the link emulator, or ``server`` itself), a warm-up and ``repeats`` timed runs."""
    runs = []
    for n in ns:
        probe = MeshClient(ClientConfig(host=server[0], port=server[1], token=token))  # as the node's Confirm
        try:
            probe.reconfigure(n)
        finally:
            probe.close("reconfigured by the sweep")
        got: list[Suggestion] = []
        cfg = ClientConfig(host=via[0], port=via[1], token=token, samehost=False)  # the seam takes the link
        settings = SplitSettings(n_remote=n, client=cfg, codec_name=codec_name, rows=MODES[mode], on_suggest=got.append)
        m, _run = split_model(model, settings)
        between()
        sample(m)  # warm-up: connection, constants, kernels
        best: tuple[float, Suggestion] | None = None
        for _ in range(repeats):
            got.clear()
            step = statistics.median(sample(m)[2])
            if not got:
                raise SystemExit(f"n={n}: the run made no suggestion (too few remote calls: raise --steps)")
            if best is None or step < best[0]:
                best = (step, got[-1])
        assert best is not None
        step, s = best
        runs.append(
            Run(
                n=n,
                step_s=step,
                est_step_s=s.current.step_ms / 1e3,
                client_ms=s.current.client_ms,
                server_ms=s.current.server_ms,
                link_ms=s.current.link_ms,
                bound=s.current.bound,
                suggested=s.best.n,
                est_new_step_s=s.best.step_ms / 1e3,
                text=s.line(),
            )
        )
        say(f"n={n}: {step:.4f} s/step measured; {s.line()}")
        drop_pooled(*via)
    best_run = min(runs, key=lambda r: r.step_s)
    for r in runs:
        r.toward_best = toward(r, best_run)
    return runs


def table(runs: Sequence[Run]) -> str:
    best = min(runs, key=lambda r: r.step_s)
    out = [
        "| n_blocks_remote | s/step measured | s/step est. | client / server / link ms per step | bound | "
        "suggests | est. s/step there | toward the measured best |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in runs:
        mark = " (best)" if r is best else ""
        out.append(
            f"| {r.n}{mark} | {r.step_s:.4f} | {r.est_step_s:.4f} | {r.client_ms:.1f} / {r.server_ms:.1f} / "
            f"{r.link_ms:.1f} | {r.bound} | {r.suggested} | {r.est_new_step_s:.4f} | "
            f"{'yes' if r.toward_best else 'NO'} |"
        )
    ok = sum(r.toward_best for r in runs)
    out.append(f"\nmeasured best: n={best.n} ({best.step_s:.4f} s/step); suggestions toward it: {ok}/{len(runs)}")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--comfyui", default=os.environ.get("COMFYUI_PATH", ""), help="ComfyUI checkout (COMFYUI_PATH)")
    ap.add_argument("--model", default="tiny", choices=list(split_link.MODELS))
    ap.add_argument("--sweep", default="", help="n_blocks_remote values, e.g. 4,8,16,24 (default: per model)")
    ap.add_argument("--mode", default="rows", choices=list(MODES))
    ap.add_argument("--link", default="1gbe", help="direct, a linkemu profile or UP[/DOWN]mbit@RTTms")
    ap.add_argument("--codec", default="raw")
    ap.add_argument("--res", default="", help="FLUX.2: image side in pixels; LTX-AV: WxHxFRAMES (default: per model)")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--cfg", type=float, default=None, help="default: 2 for FLUX.2 in rows mode, else per model")
    ap.add_argument("--repeats", type=int, default=2, help="timed runs per n (the best counts)")
    ap.add_argument("--device", default="cuda:0" if torch.cuda.is_available() else "cpu", help="client device")
    ap.add_argument("--server-device", default="", help="Daedalus's device (default: cuda:1 if there are 2 GPUs, else --device)")  # fmt: skip
    ap.add_argument("--threads", type=int, default=1, help="CPU runs: torch threads per process (0: torch's default)")
    ap.add_argument("--workdir", default="/tmp/mesh-bench")
    ap.add_argument("--out", default="", help="write the runs and settings as JSON here")
    a = ap.parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so the finally below stops Daedalus
    if not a.comfyui:
        ap.error("--comfyui PATH (or COMFYUI_PATH) is required")
    spec = split_link.MODELS[a.model]
    ns = [int(x) for x in a.sweep.split(",") if x] or sorted({1, max(spec.n_blocks // 2, 1), spec.n_blocks})
    link = None if a.link == split_link.DIRECT else linkemu.parse_link(a.link)  # fail early on a typo
    cuda = a.device.startswith("cuda")
    from comfyui_mesh import tiny

    comfy = tiny.import_comfy(a.comfyui, cpu=not cuda)
    threads = a.threads if not cuda else 0
    if threads:
        torch.set_num_threads(threads)
    res = a.res or spec.res
    cfg_scale = a.cfg if a.cfg is not None else (2.0 if a.mode == "rows" and spec.family == "flux2" else spec.cfg)
    wd = Path(a.workdir)
    wd.mkdir(parents=True, exist_ok=True)
    weights = split_link.ensure_weights(a.model, wd, a.device)
    server_dev = a.server_device or ("cuda:1" if cuda and torch.cuda.device_count() > 1 else a.device)
    srv = split_link.Daedalus(weights, ns[0], server_dev, a.comfyui, wd / "state", threads)
    print(f"# Daedalus on {server_dev}, port {srv.port}", flush=True)
    target = ("127.0.0.1", srv.port)
    emu = linkemu.RelayProcess(target, link) if link is not None else None
    try:
        via = target if emu is None else ("127.0.0.1", emu.start())
        with torch.inference_mode():  # as ComfyUI's node execution loads it
            model = comfy.sd.load_diffusion_model(str(weights))
        inputs = split_link.model_inputs(spec, getattr(tiny, spec.config), res)
        sample = split_link.sampler(comfy, inputs, a.steps, cfg_scale, cuda)
        runs = sweep(sample, model, target, via, srv.token, ns, a.mode, a.codec, a.repeats,
                     split_link.unloader(comfy, cuda), lambda s: print("#", s, flush=True))  # fmt: skip
    finally:
        if emu is not None:
            emu.close()
        srv.stop()
    device = torch.cuda.get_device_name(0) if cuda else f"CPU ({os.cpu_count()} cores)"
    side = res if "x" in res else f"{res}x{res}"
    head = (
        f"{a.model}, {side}, {a.steps} steps, CFG {cfg_scale:g}, mode {a.mode}, codec {a.codec}, link {a.link} "
        f"({link.describe() if link is not None else 'loopback TCP'}), client {a.device}, Daedalus {server_dev} "
        f"({device}), torch {torch.__version__}, {datetime.date.today().isoformat()}"
    )
    print(f"\n{head}\n\n{table(runs)}")
    if a.out:
        settings = {
            **vars(a),
            "sweep": ns,
            "res": res,
            "cfg": cfg_scale,
            "server_device": server_dev,
            "device_name": device,
        }
        split_link.write_doc(a.out, settings, runs=[dataclasses.asdict(r) for r in runs],
                             best=min(runs, key=lambda r: r.step_s).n)  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
