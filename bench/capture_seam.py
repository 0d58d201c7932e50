"""Capture the seam state of a short FLUX.2 sampling run (codec benchmark data set (a)).

    python bench/capture_seam.py --comfyui PATH --model klein9b --n-blocks 16 --out seam.safetensors

Random weights of the real shapes, generated on the GPU. Saves one tensor per model call
(``step000``, ...): exactly what Icarus would send across the split at that cut.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from comfyui_mesh import tiny


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--comfyui", required=True)
    ap.add_argument("--model", default="klein9b", choices=["tiny", "klein9b", "dev"])
    ap.add_argument("--n-blocks", type=int, default=16)
    ap.add_argument("--res", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--out", required=True)
    ap.add_argument("--workdir", default="/tmp/mesh-bench")
    a = ap.parse_args()
    cuda = torch.cuda.is_available()
    dev = "cuda:0" if cuda else "cpu"
    comfy = tiny.import_comfy(a.comfyui, cpu=not cuda)
    cfgs = {"tiny": (tiny.FLUX2_TINY, 64), "klein9b": (tiny.FLUX2_KLEIN_9B, 12288), "dev": (tiny.FLUX2_DEV, 15360)}
    config, ctx = cfgs[a.model]
    wd = Path(a.workdir)
    wd.mkdir(parents=True, exist_ok=True)
    weights = wd / f"{a.model}.safetensors"
    if not weights.exists():
        tiny.make_flux2(weights, config=config, dtype=torch.bfloat16 if cuda else torch.float32, device=dev)
    model = comfy.sd.load_diffusion_model(str(weights))
    n_single = config["depth_single_blocks"]
    if a.n_blocks > n_single:
        raise SystemExit("capture supports cuts inside the single blocks")
    index = n_single - a.n_blocks
    captured: dict[str, torch.Tensor] = {}

    def hook(args, extra):
        captured[f"step{len(captured):03d}"] = args["img"].detach().to("cpu", copy=True).contiguous()
        return extra["original_block"](args)

    m = model.clone()
    m.set_model_patch_replace(hook, "dit", "single_block", index)
    lat = a.res // 16
    i = tiny.flux2_inputs(h=lat, w=lat, txt=512 if a.model != "tiny" else 7, ctx=ctx)
    t0 = time.perf_counter()
    comfy.sample.sample(m, i["noise"], a.steps, 1.0, "euler", "simple", i["positive"], i["negative"],
                        i["latent_image"], seed=0, disable_pbar=True)  # fmt: skip
    from safetensors.torch import save_file

    save_file(captured, a.out)
    first = next(iter(captured.values()))
    print(f"captured {len(captured)} x {list(first.shape)} {first.dtype} at single block {index} "
          f"in {time.perf_counter() - t0:.1f} s -> {a.out}", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
