"""FLUX.2 split on GPUs: unsplit vs split (raw, int8) through a real Daedalus process.

    python bench/split_gpu.py --comfyui PATH --model tiny|klein9b|dev [--n-blocks N] [--res 1024]

Client on cuda:0, server on cuda:1 when there are two GPUs (else both on cuda:0).
Random weights (same compute and bytes as the real model). Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import torch
from comfyui_mesh import tiny
from comfyui_mesh.config import ClientConfig
from split_family import start_server

CUDA = torch.cuda.is_available()
DEV = "cuda:0" if CUDA else "cpu"


def sync() -> None:
    if CUDA:
        torch.cuda.synchronize()


def peak_gb() -> float:
    return torch.cuda.max_memory_allocated(0) / 1e9 if CUDA else 0.0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--comfyui", required=True)
    ap.add_argument("--model", default="tiny", choices=["tiny", "klein9b", "dev"])
    ap.add_argument("--n-blocks", type=int, default=0)
    ap.add_argument("--res", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--cfg", type=float, default=1.0)
    ap.add_argument("--workdir", default="/tmp/mesh-bench")
    ap.add_argument("--codecs", default="raw,int8")
    ap.add_argument("--lora-rank", type=int, default=0, help="also run with a random LoRA of this rank on every block")
    a = ap.parse_args()
    comfy = tiny.import_comfy(a.comfyui, cpu=not CUDA)
    from comfyui_mesh.icarus import SplitSettings, split_model
    from comfyui_mesh.transport import MeshClient

    wd = Path(a.workdir)
    wd.mkdir(parents=True, exist_ok=True)
    cfgs = {
        "tiny": (tiny.FLUX2_TINY, 3, 64),
        "klein9b": (tiny.FLUX2_KLEIN_9B, 16, 12288),
        "dev": (tiny.FLUX2_DEV, 24, 15360),
    }
    config, default_n, ctx = cfgs[a.model]
    n = a.n_blocks or default_n
    weights = wd / f"{a.model}.safetensors"
    t0 = time.perf_counter()
    if not weights.exists():
        tiny.make_flux2(weights, config=config, dtype=torch.bfloat16 if CUDA else torch.float32, device=DEV)
    print(
        f"# model {a.model}: {weights.stat().st_size / 1e9:.2f} GB written in {time.perf_counter() - t0:.1f} s",
        flush=True,
    )
    server_dev = "cuda:1" if torch.cuda.device_count() > 1 else DEV
    proc, port, lines = start_server(a.comfyui, weights, n, server_dev, wd / "state")
    print("#", lines[-1].strip(), flush=True)
    token = (wd / "state" / "token").read_text().strip()
    try:
        model = comfy.sd.load_diffusion_model(str(weights))
        lat = a.res // 16
        inputs = tiny.flux2_inputs(h=lat, w=lat, txt=512 if a.model != "tiny" else 7, ctx=ctx)

        def sample(m):
            stamps: list[float] = []
            sync()
            t = time.perf_counter()
            out = comfy.sample.sample(
                m, inputs["noise"], a.steps, a.cfg, "euler", "simple", inputs["positive"], inputs["negative"],
                inputs["latent_image"], seed=0, disable_pbar=True, callback=lambda *_: stamps.append(time.perf_counter()),
            )  # fmt: skip
            sync()
            total = time.perf_counter() - t
            steps = [b - c for b, c in zip(stamps[1:], stamps[:-1], strict=False)]
            return out, total, (sorted(steps)[len(steps) // 2] if steps else total)

        sample(model)  # warm-up (load, kernels)
        ref, total, step = sample(model)
        peak0 = peak_gb()
        rows = [("unsplit (1 GPU)", total, step, "-", "-", f"{peak0:.1f}")]
        cfg = ClientConfig(port=port, token=token)
        for name in a.codecs.split(","):
            m, run = split_model(model, SplitSettings(n_remote=n, client=cfg, codec_name=name))
            MeshClient(cfg).close()
            comfy.model_management.unload_all_models()
            if CUDA:
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats(0)
            sample(m)  # warm-up: constants, connection
            out, total, step = sample(m)
            peak = peak_gb()
            same = torch.equal(out, ref)
            rel = ((out.float() - ref.float()).norm() / ref.float().norm()).item()
            st = run.last_stats
            rows.append(
                (f"split n={n} {name}", total, step, "bit-identical" if same else f"rel L2 {rel:.2e}",
                 f"{st.bytes_out / 1e6:.1f} / {st.bytes_in / 1e6:.2f}" if st else "?", f"{peak:.1f}")
            )  # fmt: skip
            print(f"# {name}: last step {st.line() if st else ''}", flush=True)
        if a.lora_rank:
            rows += lora_rows(comfy, model, a, n, cfg, sample, split_model, SplitSettings, MeshClient, lines)
        print(f"\n{a.model}, {a.res}x{a.res}, {a.steps} steps, cfg {a.cfg}, client cuda:0, server {server_dev} "
              f"({torch.cuda.get_device_name(0) if CUDA else 'CPU'}), torch {torch.__version__}\n")  # fmt: skip
        print("| run | total s | median step s | vs unsplit | MB out / in per call | client peak GB |")
        print("|---|---|---|---|---|---|")
        for r in rows:
            print(f"| {r[0]} | {r[1]:.3f} | {r[2]:.3f} | {r[3]} | {r[4]} | {r[5]} |")
        srv_steps = [ln for ln in lines if " step " in ln]
        print("\n# server:", srv_steps[-1].strip() if srv_steps else "no steps", flush=True)
    finally:
        proc.terminate()
        proc.wait(30)
        if os.environ.get("MESH_BENCH_KEEP") != "1" and a.model != "tiny":
            weights.unlink(missing_ok=True)


def lora_rows(comfy, model, a, n, cfg, sample, split_model, SplitSettings, MeshClient, lines):
    """A random rank-r LoRA on every linear layer of every block: unsplit vs forwarded."""
    comfy.model_management.unload_all_models()  # restore the real blocks (a split clone stubs them while loaded)
    g = torch.Generator(device=DEV).manual_seed(7)
    lora = {}
    dm = model.model.diffusion_model
    for name, mod in dm.named_modules():
        if (
            name.startswith(("double_blocks.", "single_blocks."))
            and hasattr(mod, "weight")
            and getattr(mod, "weight", None) is not None
            and mod.weight.ndim == 2
        ):
            out, inp = mod.weight.shape
            x = "diffusion_model." + name
            lora[f"{x}.lora_up.weight"] = (
                (torch.randn(out, a.lora_rank, generator=g, device=DEV) * 0.01)
                .to(torch.bfloat16 if CUDA else torch.float32)
                .cpu()
            )
            lora[f"{x}.lora_down.weight"] = (
                (torch.randn(a.lora_rank, inp, generator=g, device=DEV) / inp**0.5)
                .to(torch.bfloat16 if CUDA else torch.float32)
                .cpu()
            )
    patched = comfy.sd.load_lora_for_models(model, None, lora, 1.0, 0)[0]
    print(
        f"# LoRA r{a.lora_rank}: {len(lora) // 2} layers, {sum(t.numel() * t.element_size() for t in lora.values()) / 1e6:.1f} MB",
        flush=True,
    )
    comfy.model_management.unload_all_models()
    sample(patched)
    ref, total, step = sample(patched)
    rows = [(f"unsplit + LoRA r{a.lora_rank}", total, step, "-", "-", "-")]
    m, run = split_model(patched, SplitSettings(n_remote=n, client=cfg))
    MeshClient(cfg).close()
    comfy.model_management.unload_all_models()
    if CUDA:
        torch.cuda.empty_cache()
    first, ftotal, _ = sample(m)  # ships the LoRA set once, server unpacks it
    out, total, step = sample(m)
    same = torch.equal(out, ref)
    rel = ((out.float() - ref.float()).norm() / ref.float().norm()).item()
    blob_mb = run.lora[1].numel() / 1e6 if run.lora else 0
    rows.append((f"split n={n} raw + forwarded LoRA ({blob_mb:.1f} MB, first run {ftotal:.2f} s)", total, step,
                 "bit-identical" if same else f"rel L2 {rel:.2e}", "", ""))  # fmt: skip
    print("#", [ln.strip() for ln in lines if "client LoRA set" in ln], flush=True)
    return rows


if __name__ == "__main__":
    main()
