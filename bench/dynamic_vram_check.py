"""Icarus under ComfyUI's dynamic VRAM (comfy-aimdo ``ModelPatcherDynamic``) and LTX block prefetch.

    python bench/dynamic_vram_check.py --comfyui PATH [--cpu]

On an NVIDIA GPU, ComfyUI's main.py turns dynamic VRAM on by default: it calls
``comfy_aimdo.control.init()`` before anything touches CUDA, then ``init_devices`` and makes
``ModelPatcherDynamic`` the patcher every loader returns. This script does the same start-up
steps, then for a FLUX.2 model (Klein 9B shapes) and an LTX-AV model (LTX-2.3 flags at full
widths, 10 blocks; its forward runs ComfyUI's block prefetch queue under dynamic VRAM) samples
unsplit and split (raw codec, a real Daedalus process on the same GPU), and checks that the
patcher really is dynamic and that the split output is bit-identical to the unsplit one.
Exit status 1 on a failed check. ``--cpu``: the same pipeline with tiny models on the CPU
(no dynamic VRAM there; a dry run of the script).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

T0 = time.perf_counter()


def say(msg: str) -> None:
    print(f"[{time.perf_counter() - T0:6.1f}s] {msg}", flush=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--comfyui", default=os.environ.get("COMFYUI_PATH", ""))
    ap.add_argument("--cpu", action="store_true")
    ap.add_argument("--workdir", default="/tmp/mesh-dyn")
    a = ap.parse_args()
    comfy_path = str(Path(a.comfyui).resolve())
    sys.path.insert(0, comfy_path)
    aimdo = None
    if not a.cpu:
        import comfy_aimdo.control as aimdo  # before torch creates a CUDA context, as main.py does

        try:
            aimdo.init(simple_vram_headroom=None)
        except TypeError:  # comfy-aimdo 0.4.9
            aimdo.init()

    import torch
    from comfyui_mesh import tiny

    tiny.import_comfy(comfy_path, cpu=a.cpu)
    import comfy.lora
    import comfy.memory_management
    import comfy.model_management as mm
    import comfy.model_patcher
    import comfy.sample
    import comfy.sd
    from comfy.cli_args import args as comfy_args
    from comfy.nested_tensor import NestedTensor
    from comfyui_mesh.config import ClientConfig
    from comfyui_mesh.icarus import SplitSettings, split_model

    if aimdo is not None:
        devices = list(mm.get_all_torch_devices())
        try:
            ok = aimdo.init_devices((d.index, int(comfy_args.vram_headroom * 1024**3)) for d in devices)
        except TypeError:
            ok = aimdo.init_devices(d.index for d in devices)
        if not ok:
            say("FAIL: comfy-aimdo did not initialise; dynamic VRAM unavailable here")
            return 1
        aimdo.set_log_info()  # main.py's default (--verbose INFO)
        comfy.model_patcher.CoreModelPatcher = comfy.model_patcher.ModelPatcherDynamic
        comfy.memory_management.aimdo_enabled = True
        say("dynamic VRAM on (comfy-aimdo initialised, ModelPatcherDynamic)")
    dev = "cpu" if a.cpu else "cuda:0"
    wd = Path(a.workdir)
    wd.mkdir(parents=True, exist_ok=True)
    failed: list[str] = []

    def check(name: str, ok: bool, detail: str = "") -> None:
        say(f"{'PASS' if ok else 'FAIL'} {name}{': ' + detail if detail else ''}")
        if not ok:
            failed.append(name)

    def server(weights: Path, n: int) -> tuple[subprocess.Popen, int]:
        cmd = [sys.executable, "-m", "comfyui_mesh.server", "--weights", str(weights), "--n-blocks", str(n),
               "--port", "0", "--device", dev, "--comfyui", comfy_path, "--state-dir", str(wd / "state"),
               "--no-auth"]  # fmt: skip
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        assert proc.stdout is not None
        lines = []
        for line in proc.stdout:
            lines.append(line)
            if "READY" in line:
                return proc, int(line.split("listening on ")[1].split()[0].rsplit(":", 1)[1])
        raise SystemExit("Daedalus did not start:\n" + "".join(lines[-30:]))

    def run_case(label: str, weights: Path, n: int, inputs: dict[str, Any], steps: int, cfg: float) -> None:
        proc, port = server(weights, n)
        try:
            with torch.inference_mode():
                model = comfy.sd.load_diffusion_model(str(weights))
            dynamic = bool(getattr(model, "is_dynamic", lambda: False)())
            say(f"{label}: patcher {type(model).__name__}, dynamic {dynamic}")
            if not a.cpu:
                check(f"{label}: ComfyUI loaded it with the dynamic patcher", dynamic)

            def sample(m: Any) -> Any:
                if not a.cpu:
                    torch.cuda.synchronize()
                t = time.perf_counter()
                with torch.inference_mode():
                    out = comfy.sample.sample(
                        m, inputs["noise"], steps, cfg, "euler", "simple", inputs["positive"], inputs["negative"],
                        inputs["latent_image"], seed=0, disable_pbar=True,
                    )  # fmt: skip
                if not a.cpu:
                    torch.cuda.synchronize()
                return out, time.perf_counter() - t

            ref, t_ref = sample(model)
            lora_keys = len(comfy.lora.model_lora_keys_unet(model.model, {}))
            m, run = split_model(model, SplitSettings(n_remote=n, client=ClientConfig(port=port), codec_name="raw"))
            if not a.cpu:
                mm.unload_all_models()
                torch.cuda.reset_peak_memory_stats(0)
            out, t_split = sample(m)
            peak = torch.cuda.max_memory_allocated(0) / 1e9 if not a.cpu else 0.0
            # issue #17: the split run put the original modules back into the tree it shares with the input
            # model, so a LoraLoader on the input model (its key map read from that tree) finds every weight
            stubs = [k for k, v in model.model.diffusion_model.named_modules() if type(v).__name__.endswith("Stub")]
            check(f"{label}: no stubs left in the shared module tree after the split run", not stubs, str(stubs[:3]))
            keys_after = len(comfy.lora.model_lora_keys_unet(model.model, {}))
            check(
                f"{label}: LoRA key map of the input model complete",
                keys_after == lora_keys,
                f"{keys_after}/{lora_keys}",
            )
            same = all(torch.equal(o, r) for o, r in zip(out.unbind(), ref.unbind(), strict=True))
            diff = max(
                (o.float() - r.float()).abs().max().item() for o, r in zip(out.unbind(), ref.unbind(), strict=True)
            )
            check(f"{label}: split n={n} raw == unsplit", same, f"max abs diff {diff:.3g}")
            say(f"{label}: unsplit {t_ref:.2f} s, split {t_split:.2f} s ({run.calls} remote calls), "
                f"client split peak {peak:.1f} GB alloc; {run.last_stats.line() if run.last_stats else ''}")  # fmt: skip
            # the split clone again after a reload, and the input model afterwards (weights restored)
            if not a.cpu:
                mm.unload_all_models()
            again, _ = sample(m)
            check(f"{label}: split again after an unload", all(torch.equal(o, r) for o, r in zip(again.unbind(), ref.unbind(), strict=True)))  # fmt: skip
            back, _ = sample(model)
            check(f"{label}: input model unaffected", all(torch.equal(o, r) for o, r in zip(back.unbind(), ref.unbind(), strict=True)))  # fmt: skip
        except Exception as e:  # report and go on to the next case
            import traceback

            traceback.print_exc()
            check(f"{label}: ran", False, f"{type(e).__name__}: {e}")
        finally:
            proc.terminate()
            proc.wait(30)
            mm.unload_all_models()
            mm.soft_empty_cache(True)

    # FLUX.2: Klein 9B shapes at 1024x1024 (tiny on --cpu)
    cfg_f, ctx, lat, txt = (tiny.FLUX2_TINY, 64, 4, 7) if a.cpu else (tiny.FLUX2_KLEIN_9B, 12288, 64, 512)
    wf = wd / ("flux_tiny.safetensors" if a.cpu else "klein9b.safetensors")
    if not wf.exists():
        say(f"writing {wf.name} ...")
        tiny.make_flux2(wf, config=cfg_f, dtype=torch.float32 if a.cpu else torch.bfloat16, device=dev)
    run_case("FLUX.2", wf, 3 if a.cpu else 12, tiny.flux2_inputs(h=lat, w=lat, txt=txt, ctx=ctx), 3, 2.0)
    if not a.cpu:
        wf.unlink()

    # LTX-AV 2.3-style, full widths, 10 blocks, 768x512x25 (tiny on --cpu)
    cfg_l = dict(tiny.LTXAV23_TINY if a.cpu else tiny.LTXAV23_FULL)
    if not a.cpu:
        cfg_l["num_layers"] = 10
    wl = wd / ("ltx_tiny.safetensors" if a.cpu else "ltx_wide10.safetensors")
    if not wl.exists():
        say(f"writing {wl.name} ...")
        tiny.make_ltxav(wl, seed=0, config=cfg_l, dtype=torch.float32 if a.cpu else torch.bfloat16, device=dev)
    w, h, frames = (64, 64, 17) if a.cpu else (768, 512, 25)
    f, audio = (frames - 1) // 8 + 1, max(1, round(frames / 25 * 25))
    g = torch.Generator().manual_seed(1)
    video, sound = (1, 128, f, h // 32, w // 32), (1, 8, audio, 16)
    c = cfg_l["cross_attention_dim"] + cfg_l["audio_cross_attention_dim"]
    ltx_inputs = {
        "noise": NestedTensor([torch.randn(video, generator=g), torch.randn(sound, generator=g)]),
        "latent_image": NestedTensor([torch.zeros(video), torch.zeros(sound)]),
        "positive": [[torch.randn(1, 64 if a.cpu else 256, c, generator=g), {"frame_rate": 25.0}]],
        "negative": [[torch.randn(1, 64 if a.cpu else 256, c, generator=g), {"frame_rate": 25.0}]],
    }
    run_case("LTX-AV", wl, 2 if a.cpu else 4, ltx_inputs, 3, 3.0)
    if not a.cpu:
        wl.unlink()
    say("OK" if not failed else f"FAILED: {failed}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
