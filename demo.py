"""Loopback demo: a Daedalus process and an Icarus client on this machine, tiny FLUX.2.

    python -m comfyui_mesh.demo [--comfyui PATH] [--steps 4] [--n-blocks 3]

Builds a tiny random-weight FLUX.2 with ComfyUI's classes, starts Daedalus on a free
port (token auth on), samples once unsplit and once split per codec, and prints the
per-step bytes and times and whether the split result matches the unsplit one.
"""

from __future__ import annotations

import argparse
import logging
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

from .config import ClientConfig
from .errors import MeshError
from .server.loader import find_comfyui


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m comfyui_mesh.demo", description=__doc__.split("\n\n")[0])
    ap.add_argument("--comfyui", default="", help="ComfyUI checkout (default: $COMFYUI_PATH or a sibling folder)")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--n-blocks", type=int, default=3, help="blocks on Daedalus (tiny model has 5)")
    ap.add_argument("--codecs", default="raw,int8")
    a = ap.parse_args(argv)
    try:
        comfy_path = find_comfyui(a.comfyui)
    except MeshError as e:
        print(f"demo: {e}", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.WARNING)
    icarus_log = logging.getLogger("comfyui_mesh")
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter("  [icarus] %(message)s"))
    icarus_log.addHandler(handler)
    icarus_log.setLevel(logging.INFO)
    icarus_log.propagate = False
    from . import tiny

    comfy = tiny.import_comfy(comfy_path, cpu=not torch.cuda.is_available())
    from .icarus import SplitSettings, split_model
    from .transport import MeshClient

    tmp = Path(tempfile.mkdtemp(prefix="mesh-demo-"))
    weights = tiny.make_flux2(tmp / "tiny_flux2.safetensors")
    print(f"demo: tiny FLUX.2 (2 double + 3 single blocks, width 256) at {weights}")
    device = "cuda:0" if torch.cuda.is_available() else "cpu"
    cmd = [sys.executable, "-m", "comfyui_mesh.server", "--weights", str(weights), "--n-blocks", str(a.n_blocks),
           "--port", "0", "--device", device, "--comfyui", str(comfy_path), "--state-dir", str(tmp / "state")]  # fmt: skip
    print("demo: starting Daedalus:", " ".join(cmd[1:]))
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    port = 0
    assert proc.stdout is not None
    for line in proc.stdout:
        if "token:" not in line:
            print("  " + line.rstrip())
        if "READY listening on" in line:
            port = int(line.split("listening on ")[1].split()[0].rsplit(":", 1)[1])
            break
    if not port:
        print("demo: Daedalus did not start (see its output above)", file=sys.stderr)
        proc.kill()
        proc.wait(20)
        shutil.rmtree(tmp, ignore_errors=True)
        return 1
    out_stream = proc.stdout
    threading.Thread(target=lambda: [print("  " + ln.rstrip()) for ln in out_stream], daemon=True).start()
    token = (tmp / "state" / "token").read_text().strip()
    try:
        model = comfy.sd.load_diffusion_model(str(weights))
        inputs = tiny.flux2_inputs()

        def sample(m):
            return comfy.sample.sample(m, inputs["noise"], a.steps, 2.5, "euler", "simple", inputs["positive"],
                                       inputs["negative"], inputs["latent_image"], seed=0, disable_pbar=True)  # fmt: skip

        t0 = time.perf_counter()
        ref = sample(model)
        print(f"demo: unsplit sample, {a.steps} steps, CFG 2.5: {time.perf_counter() - t0:.2f} s")
        cfg = ClientConfig(port=port, token=token)
        for name in a.codecs.split(","):
            m, run = split_model(model, SplitSettings(n_remote=a.n_blocks, client=cfg, codec_name=name))
            MeshClient(cfg).close()
            t0 = time.perf_counter()
            out = sample(m)
            time.sleep(0.2)
            dt = time.perf_counter() - t0
            diff = (out - ref).abs().max().item()
            same = torch.equal(out, ref)
            rel = ((out - ref).norm() / ref.norm()).item()
            print(
                f"demo: split n_blocks={a.n_blocks} codec={name}: {run.calls} remote calls, {dt:.2f} s; "
                f"{'BIT-IDENTICAL to unsplit' if same else f'max |diff| {diff:.2e}, relative L2 {rel:.2e}'}"
            )
        return 0
    finally:
        proc.terminate()
        proc.wait(20)
        shutil.rmtree(tmp, ignore_errors=True)  # the tiny checkpoint and the server's state folder


if __name__ == "__main__":
    sys.exit(main())
