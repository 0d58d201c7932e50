"""Install check: what works on this machine. ``python -m comfyui_mesh.server.check``

Prints one line per item (torch and CUDA, GPUs, ComfyUI import and version, PyNvVideoCodec and
NVENC, nvCOMP, zstandard, PyAV). Never crashes on a missing piece: that is what it reports.
Exit code 0, or 1 with ``--strict`` when something Daedalus cannot run without is missing.

``--devices-json`` prints only the torch devices as JSON (the GUI runs this in a child process,
so listing GPUs never puts a CUDA context on a card ComfyUI may be using).
"""

from __future__ import annotations

import argparse
import ctypes
import importlib
import json
import os
import platform
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

OK, MISSING, INFO = "ok", "MISSING", "--"


def _version(module: str) -> str | None:
    try:
        m = importlib.import_module(module)
    except Exception:  # any import failure is a finding, not a crash
        return None
    return str(getattr(m, "__version__", "") or getattr(m, "VERSION", "") or "present")


def devices() -> list[dict[str, Any]]:
    """torch's CUDA devices (name, free/total GiB) plus the CPU. Empty CUDA list when torch or CUDA is absent."""
    out: list[dict[str, Any]] = []
    try:
        import torch

        if torch.cuda.is_available():
            for i in range(torch.cuda.device_count()):
                p = torch.cuda.get_device_properties(i)
                try:
                    free, total = torch.cuda.mem_get_info(i)
                except RuntimeError:
                    free, total = -1, p.total_memory
                out.append(
                    {
                        "id": f"cuda:{i}",
                        "name": p.name,
                        "free_gib": round(free / 2**30, 1) if free >= 0 else None,
                        "total_gib": round(total / 2**30, 1),
                        "capability": f"{p.major}.{p.minor}",
                    }
                )
    except Exception:  # no torch, a broken driver: the GUI still offers the CPU
        pass
    out.append({"id": "cpu", "name": "CPU", "free_gib": None, "total_gib": None, "capability": ""})
    return out


def device_label(d: dict[str, Any]) -> str:
    if d["id"] == "cpu":
        return "cpu"
    free = f"{d['free_gib']:.1f}" if d.get("free_gib") is not None else "?"
    return f"{d['id']}  {d['name']}  ({free} / {d['total_gib']:.1f} GiB free)"


def _load_library(names: list[str]) -> str | None:
    for n in names:
        try:
            ctypes.CDLL(n)
            return n
        except OSError:
            continue
    return None


def device_problem(device: str) -> str | None:
    """Why Daedalus cannot run on ``device`` here, with the fix; None when it can."""
    import torch

    if device == "cpu":
        return None
    if not device.startswith("cuda"):
        return f"--device {device}: Daedalus runs on cuda:N or cpu"
    try:
        index = int(device.split(":", 1)[1]) if ":" in device else 0
    except ValueError:
        return f"--device {device}: write cuda:N (N a GPU number) or cpu"
    if not torch.cuda.is_available():
        build = f"CUDA {torch.version.cuda} build" if torch.version.cuda else "a CPU-only build"
        return (
            f"no CUDA device here (torch {torch.__version__} is {build}, and it sees no NVIDIA GPU): "
            "use --device cpu (slow), or check the driver / install torch's CUDA build"
        )
    count = torch.cuda.device_count()
    if index >= count:
        return f"--device {device}: this machine has {count} CUDA device(s), cuda:0..cuda:{count - 1}"
    return None


def check_torch(lines: list[tuple[str, str, str]]) -> bool:
    try:
        import torch
    except Exception as e:
        lines.append((MISSING, "torch", f"not importable ({type(e).__name__}: {e}); run the install script"))
        return False
    cuda = torch.version.cuda or "none (CPU build)"
    lines.append((OK, "torch", f"{torch.__version__}, CUDA build {cuda}"))
    if torch.cuda.is_available():
        lines.append((OK, "CUDA", f"available, {torch.cuda.device_count()} device(s), driver OK"))
    else:
        lines.append((INFO, "CUDA", "not available: Daedalus can only run with --device cpu here"))
    for d in devices():
        if d["id"] != "cpu":
            lines.append((OK, "GPU", f"{device_label(d)}, compute {d['capability']}"))
    return True


def check_comfyui(lines: list[tuple[str, str, str]], path: str) -> bool:
    try:
        from .loader import TESTED_COMFYUI, find_comfyui

        root = find_comfyui(path)
    except Exception as e:
        lines.append((MISSING, "ComfyUI", str(e)))
        return False
    version = "unknown"
    vfile = root / "comfyui_version.py"
    if vfile.is_file():
        for line in vfile.read_text(errors="replace").splitlines():
            if line.startswith("__version__"):
                version = line.split("=", 1)[1].strip().strip("\"'")
    note = "" if version == TESTED_COMFYUI else f" (tested with {TESTED_COMFYUI})"
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    try:
        import torch

        cli = importlib.import_module("comfy.cli_args")
        if not torch.cuda.is_available():
            cli.args.cpu = True  # else ComfyUI's device setup expects a GPU
        importlib.import_module("comfy.model_detection")
        importlib.import_module("comfy.ldm.flux.model")
    except Exception as e:
        lines.append((MISSING, "ComfyUI", f"{root} version {version}: import failed: {type(e).__name__}: {e}"))
        return False
    lines.append((OK, "ComfyUI", f"{root} version {version}{note}, model code imports"))
    return True


def check_codecs(lines: list[tuple[str, str, str]]) -> None:
    for module, label, why in (
        ("zstandard", "zstandard", "lossless compression codecs"),
        ("av", "PyAV", "video codecs on the CPU"),
    ):
        v = _version(module)
        lines.append((OK, label, v) if v else (INFO, label, f"not installed (optional: {why})"))
    v = _version("PyNvVideoCodec")
    lines.append((OK, "PyNvVideoCodec", v) if v else (INFO, "PyNvVideoCodec", "not installed (optional: NVENC codec)"))
    lib = _load_library(["nvEncodeAPI64.dll"] if os.name == "nt" else ["libnvidia-encode.so.1", "libnvidia-encode.so"])
    if lib:
        lines.append((OK, "NVENC", f"driver library {lib} loads"))
    else:
        lines.append((INFO, "NVENC", "driver library not found: no hardware video encoding on this machine"))
    v = _version("nvidia.nvcomp")
    lines.append((OK, "nvCOMP", v) if v else (INFO, "nvCOMP", "not installed (optional: GPU compression)"))


def run_checks(comfyui_path: str = "", echo: Callable[[str], None] = print) -> bool:
    """Print the report; True when the essentials (torch, ComfyUI) work."""
    lines: list[tuple[str, str, str]] = []
    from ..constants import PACKAGE_VERSION

    lines.append((INFO, "Python", f"{platform.python_version()} on {platform.system()} {platform.machine()}"))
    lines.append((OK, "ComfyUI-Mesh", f"{PACKAGE_VERSION} at {Path(__file__).resolve().parent.parent}"))
    ok_torch = check_torch(lines)
    ok_comfy = check_comfyui(lines, comfyui_path) if ok_torch else False
    check_codecs(lines)
    width = max(len(label) for _, label, _ in lines)
    for status, label, text in lines:
        echo(f"[{status:^7}] {label:<{width}}  {text}")
    if ok_torch and ok_comfy:
        cpu_only = device_problem("cuda:0") is not None
        echo(
            "Daedalus can run here: python -m comfyui_mesh.server --weights <model.safetensors>"
            + (" --device cpu" if cpu_only else "")
        )
    else:
        echo("Fix the MISSING lines above (the install script does it), then run this check again.")
    return ok_torch and ok_comfy


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m comfyui_mesh.server.check", description=__doc__.splitlines()[0])
    p.add_argument("--comfyui", default="", help="ComfyUI checkout (default: $COMFYUI_PATH or a sibling folder)")
    p.add_argument("--strict", action="store_true", help="exit 1 when torch or ComfyUI is missing")
    p.add_argument("--devices-json", action="store_true", help="print the torch devices as JSON and exit")
    a = p.parse_args(argv)
    if a.devices_json:
        print(json.dumps(devices()))
        return 0
    ok = run_checks(a.comfyui)
    return 1 if a.strict and not ok else 0


if __name__ == "__main__":
    sys.exit(main())
