"""Daedalus's first errors: one line that names the fix, no traceback, nothing started."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from comfyui_mesh.errors import LocalError
from comfyui_mesh.server.check import device_problem, run_checks
from comfyui_mesh.server.toy import ToyBackend

no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message of a machine without CUDA")


def daedalus(*args: str, tmp_path) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "comfyui_mesh.server", "--port", "0", "--state-dir", str(tmp_path), *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120)


def test_cpu_is_always_fine():
    assert device_problem("cpu") is None


@pytest.mark.parametrize("device", ["mps", "cuda:x", "gpu0"])
def test_unknown_devices_name_the_accepted_forms(device):
    problem = device_problem(device) or ""
    assert f"--device {device}" in problem and ("cuda:N" in problem or "cuda:0" in problem)


@no_cuda
def test_no_cuda_names_device_cpu():
    problem = device_problem("cuda:0") or ""
    assert "no CUDA device here" in problem and "use --device cpu" in problem and torch.__version__ in problem


@no_cuda
def test_server_without_cuda_stops_with_one_line(tmp_path):
    r = daedalus("--toy", tmp_path=tmp_path)  # --device defaults to cuda:0
    assert r.returncode == 2
    out = r.stdout + r.stderr
    assert "Traceback" not in out and "READY" not in out
    errors = [ln for ln in out.splitlines() if "no CUDA device" in ln]
    assert len(errors) == 1 and "--device cpu" in errors[0]


def test_n_blocks_beyond_the_model_is_refused_with_the_range(tmp_path):
    with pytest.raises(LocalError, match=r"choose 1\.\.8"):
        ToyBackend(9)
    with pytest.raises(LocalError, match=r"choose 1\.\.8"):
        ToyBackend(0)
    r = daedalus("--toy", "--device", "cpu", "--n-blocks", "9", tmp_path=tmp_path)
    assert r.returncode == 2 and "choose 1..8" in r.stdout and "Traceback" not in r.stdout + r.stderr


@no_cuda
def test_install_check_suggests_the_command_this_machine_can_run():
    lines: list[str] = []
    ok = run_checks("", echo=lines.append)
    suggestion = [ln for ln in lines if ln.startswith("Daedalus can run here")]
    if ok:
        assert suggestion == [
            "Daedalus can run here: python -m comfyui_mesh.server --weights <model.safetensors> --device cpu"
        ]
    else:
        assert not suggestion and lines[-1].startswith("Fix the MISSING lines above")


def test_the_window_without_tk_says_how_to_get_it_or_run_without_it():
    """A Python built without Tk (Debian's python3 without python3-tk): one line naming the fix."""
    code = (
        "import sys, runpy; sys.modules['tkinter'] = None; "
        "runpy.run_module('comfyui_mesh.server.gui', run_name='__main__', alter_sys=True)"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    assert "python3-tk" in r.stderr and "python -m comfyui_mesh.server --weights" in r.stderr
