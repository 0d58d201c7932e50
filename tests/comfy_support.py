"""Helpers for tests that need a real ComfyUI checkout (COMFYUI_PATH); skipped without it.

Builds tiny random-weight models with ComfyUI's own classes and saves them as safetensors.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest

COMFY = os.environ.get("COMFYUI_PATH", "")
HAVE_COMFY = bool(COMFY) and (Path(COMFY) / "comfy" / "sd.py").is_file()
needs_comfy = pytest.mark.skipif(
    not HAVE_COMFY, reason="needs a ComfyUI checkout: set COMFYUI_PATH (see README, 'Tests with ComfyUI')"
)


def import_comfy():
    """Import ComfyUI on the CPU (once per process)."""
    from comfyui_mesh.tiny import import_comfy as _imp

    return _imp(COMFY, cpu=True)


def make_flux2(path: Path, seed: int = 0, **overrides) -> Path:
    """Save a tiny random FLUX.2 checkpoint (ComfyUI key names) to ``path``."""
    from comfyui_mesh.tiny import FLUX2_TINY
    from comfyui_mesh.tiny import make_flux2 as _make

    import_comfy()
    return _make(path, seed=seed, config={**FLUX2_TINY, **overrides})


class Daedalus:
    def __init__(self, weights: Path, n_blocks: int, state_dir: Path, extra: list[str] | None = None):
        self.lines: list[str] = []
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "comfyui_mesh.server", "--weights", str(weights), "--n-blocks", str(n_blocks),
             "--port", "0", "--device", "cpu", "--comfyui", COMFY, "--state-dir", str(state_dir), *(extra or [])],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )  # fmt: skip
        for line in self.proc.stdout:
            self.lines.append(line)
            if "READY listening on" in line:
                self.port = int(line.split("listening on ")[1].split()[0].rsplit(":", 1)[1])
                break
        else:
            raise RuntimeError("Daedalus did not start:\n" + "".join(self.lines))
        threading.Thread(target=lambda: self.lines.extend(self.proc.stdout), daemon=True).start()
        self.token = (state_dir / "token").read_text().strip()

    def stop(self):
        self.proc.terminate()
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)

    def steps(self) -> list[str]:
        return [ln for ln in self.lines if " step " in ln]
