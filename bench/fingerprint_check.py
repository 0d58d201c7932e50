"""Client vs server back-half fingerprint for one LTX-AV / FLUX.2 checkpoint, on any device.

    python bench/fingerprint_check.py --comfyui PATH [--model ltx-tiny48|ltx-wide10|klein-tiny] [--n-blocks 8]
        [--dump PREFIX]

Diagnoses a handshake "fingerprint mismatch" for identical weights. Writes a random bf16
checkpoint, then computes the fingerprint the way Icarus does (ComfyUI's loader, the model
as loaded, after a load onto the GPU, after an unload) and the way Daedalus does (its slim
loader), in one process. With ``--dump`` every computation writes one line per tensor to
``PREFIX-<stage>-<pid>.txt`` and the first differing tensors are printed.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import torch
from comfyui_mesh import tiny
from comfyui_mesh.fingerprint import DUMP_ENV, fingerprint


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--comfyui", default=os.environ.get("COMFYUI_PATH", ""))
    ap.add_argument("--model", default="ltx-tiny48", choices=["ltx-tiny48", "ltx-wide10", "klein-tiny"])
    ap.add_argument("--n-blocks", type=int, default=8)
    ap.add_argument("--dump", default="", help="path prefix for per-tensor dumps")
    ap.add_argument("--workdir", default="/tmp/mesh-fp")
    a = ap.parse_args()
    cuda = torch.cuda.is_available()
    dev = "cuda:0" if cuda else "cpu"
    comfy = tiny.import_comfy(a.comfyui, cpu=not cuda)
    from comfyui_mesh import arch
    from comfyui_mesh.config import ServerConfig
    from comfyui_mesh.icarus import _original_state
    from comfyui_mesh.server.loader import ComfyBackend

    wd = Path(a.workdir)
    wd.mkdir(parents=True, exist_ok=True)
    if a.dump:
        Path(a.dump).parent.mkdir(parents=True, exist_ok=True)
    p = wd / f"{a.model}.safetensors"
    t0 = time.perf_counter()
    if not p.exists():
        if a.model.startswith("ltx"):
            cfg = dict(tiny.LTXAV23_TINY if a.model == "ltx-tiny48" else tiny.LTXAV23_FULL)
            cfg["num_layers"] = 48 if a.model == "ltx-tiny48" else 10
            tiny.make_ltxav(p, seed=0, config=cfg, dtype=torch.bfloat16, device=dev)
        else:
            tiny.make_flux2(p, config=tiny.FLUX2_TINY, dtype=torch.bfloat16, device=dev)
    print(f"[fp] {a.model}: {p.stat().st_size / 1e9:.2f} GB written in {time.perf_counter() - t0:.0f} s", flush=True)

    def fp(stage: str, items: list) -> str:
        if a.dump:
            os.environ[DUMP_ENV] = f"{a.dump}-{stage}"
        else:
            os.environ.pop(DUMP_ENV, None)
        return fingerprint(items)

    with torch.inference_mode():
        model = comfy.sd.load_diffusion_model(str(p))
    dm = model.get_model_object("diffusion_model")
    ad = arch.for_model(dm)
    plan = ad.plan({g: len(getattr(dm, g)) for g in ad.block_groups}, a.n_blocks)
    got = {"client-loaded": fp("client-loaded", _original_state(model, ad, plan))}
    if cuda:
        comfy.model_management.load_models_gpu([model], force_full_load=True)
        got["client-on-gpu"] = fp("client-on-gpu", _original_state(model, ad, plan))
        comfy.model_management.unload_all_models()
        got["client-unloaded"] = fp("client-unloaded", _original_state(model, ad, plan))
    del model, dm
    if a.dump:
        os.environ[DUMP_ENV] = f"{a.dump}-server"
    b = ComfyBackend(ServerConfig(weights=str(p), n_blocks=a.n_blocks, device=dev, comfyui_path=a.comfyui), a.n_blocks)
    got["server"] = b.fingerprint
    for k, v in got.items():
        print(f"[fp] {k:16s} {v}  {'MATCH' if v == got['server'] else 'DIFFERS from server'}", flush=True)
    if a.dump:
        import glob

        def lines(stage: str) -> dict[str, str]:
            out: dict[str, str] = {}
            for f in glob.glob(f"{a.dump}-{stage}-*.txt"):
                for ln in Path(f).read_text().splitlines():
                    if not ln.startswith("#"):
                        out[ln.split("|", 1)[0]] = ln
            return out

        srv = lines("server")
        for stage in got:
            if stage == "server":
                continue
            cl = lines(stage)
            only_c, only_s = sorted(set(cl) - set(srv)), sorted(set(srv) - set(cl))
            diff = [k for k in sorted(set(cl) & set(srv)) if cl[k] != srv[k]]
            print(f"[fp] {stage}: {len(cl)} tensors vs server {len(srv)}; only client {len(only_c)}, "
                  f"only server {len(only_s)}, differing {len(diff)}")  # fmt: skip
            for k in only_c[:5]:
                print(f"    client only: {cl[k][:200]}")
            for k in only_s[:5]:
                print(f"    server only: {srv[k][:200]}")
            for k in diff[:8]:
                print(f"    client: {cl[k][:200]}\n    server: {srv[k][:200]}")


if __name__ == "__main__":
    main()
