"""Launchers and installers: syntax (bash -n, shellcheck when installed), dry-run output, and
static checks of the Windows .bat twins (cmd cannot run here: see the notes in each test)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SCRIPTS = REPO / "scripts"
SH = sorted(SCRIPTS.glob("*.sh"))
BAT = sorted(SCRIPTS.glob("*.bat"))
LAUNCHERS = ["daedalus", "daedalus_gpu0", "daedalus_gpu1", "daedalus_cpu", "daedalus_gui", "install", "update"]


def dry(script: str, *args: str, env: dict | None = None, cwd: Path | None = None) -> str:
    e = {k: v for k, v in os.environ.items() if not k.startswith(("MESH_", "COMFYUI_", "CUDA_VISIBLE"))}
    e.update({"MESH_DRY_RUN": "1", **(env or {})})
    r = subprocess.run(
        ["bash", str((cwd or SCRIPTS) / f"{script}.sh"), *args], env=e, capture_output=True, text=True, timeout=60
    )
    assert r.returncode == 0, f"{script}.sh failed ({r.returncode}):\n{r.stdout}\n{r.stderr}"
    return r.stdout


def commands(out: str) -> list[str]:
    return [ln[2:] for ln in out.splitlines() if ln.startswith("+ ")]


def test_every_launcher_exists_for_both_shells():
    for name in LAUNCHERS:
        assert (SCRIPTS / f"{name}.sh").is_file(), name
        assert (SCRIPTS / f"{name}.bat").is_file(), name


@pytest.mark.parametrize("path", SH, ids=[p.name for p in SH])
def test_bash_syntax(path):
    r = subprocess.run(["bash", "-n", str(path)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def test_shellcheck():
    if not shutil.which("shellcheck"):
        print("\nSKIP shellcheck: not installed (Debian: apt-get install shellcheck)")
        pytest.skip("shellcheck is not installed")
    r = subprocess.run(["shellcheck", "-x", *map(str, SH)], capture_output=True, text=True, cwd=SCRIPTS)
    assert r.returncode == 0, r.stdout + r.stderr


def test_headless_launchers_dry_run(tmp_path):
    venv = tmp_path / "venv"
    env = {"MESH_VENV": str(venv), "COMFYUI_PATH": str(tmp_path / "nowhere")}
    out = dry(
        "daedalus", "--max-clients", "2", env={**env, "MESH_WEIGHTS": "/m/klein.safetensors", "MESH_BIND": "0.0.0.0"}
    )
    (cmd,) = commands(out)[-1:]
    assert cmd.startswith(f"{venv}/bin/python -m comfyui_mesh.server ")
    for part in ("--n-blocks 4", "--port 7777", "--bind 0.0.0.0", "--weights /m/klein.safetensors", "--max-clients 2"):
        assert part in cmd, (part, cmd)
    gpu1 = dry("daedalus_gpu1", env=env)
    assert "+ export CUDA_VISIBLE_DEVICES=1" in gpu1 and "--device cuda:0" in commands(gpu1)[-1]
    gpu0 = dry("daedalus_gpu0", env=env)
    assert "+ export CUDA_VISIBLE_DEVICES=0" in gpu0 and "--device cuda:0" in commands(gpu0)[-1]
    cpu = dry("daedalus_cpu", env={**env, "MESH_N_BLOCKS": "6"})
    assert "--device cpu" in commands(cpu)[-1] and "--n-blocks 6" in commands(cpu)[-1]
    gui = dry("daedalus_gui", "--toy", env=env)
    assert commands(gui)[-1] == f"{venv}/bin/python -m comfyui_mesh.server.gui --toy"


def test_launchers_refuse_without_an_install(tmp_path):
    e = {k: v for k, v in os.environ.items() if not k.startswith(("MESH_", "COMFYUI_"))}
    r = subprocess.run(
        ["bash", str(SCRIPTS / "daedalus.sh")], env={**e, "MESH_VENV": str(tmp_path / "none")},
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert r.returncode == 2 and "run scripts/install.sh first" in r.stderr


def test_install_dry_run_clones_the_pinned_release_when_no_comfyui_is_around(tmp_path):
    repo = tmp_path / "repo"  # a checkout with no ComfyUI around it and none recorded
    shutil.copytree(SCRIPTS, repo / "scripts")
    venv = tmp_path / "venv"
    out = dry("install", env={"MESH_VENV": str(venv), "PATH": os.environ["PATH"]}, cwd=repo / "scripts")
    cmds = commands(out)
    assert cmds[0] == f"python3 -m venv {venv}"
    assert f"git clone --depth 1 --branch v0.28.0 https://github.com/Comfy-Org/ComfyUI {repo}/.vendor/ComfyUI" in cmds
    (torch,) = [c for c in cmds if c.startswith(f"{venv}/bin/python -m pip install torch torchvision torchaudio")]
    if not shutil.which("nvidia-smi"):  # no NVIDIA driver: the CPU build, not Linux's default CUDA wheel
        assert torch.endswith("--index-url https://download.pytorch.org/whl/cpu")
    assert any(c.endswith(f"-m pip install -r {venv}/comfyui-requirements.txt") for c in cmds)
    assert any("-m pip install -e" in c and "[codecs" in c for c in cmds)
    assert cmds[-1] == f"{venv}/bin/python -m comfyui_mesh.server.check --comfyui {repo}/.vendor/ComfyUI"
    steps = [ln for ln in out.splitlines() if re.match(r"\[mesh\] \d/6 ", ln)]
    assert [s.split()[1] for s in steps] == [f"{i}/6" for i in range(1, 7)]


def test_install_dry_run_reuses_comfyui_and_torch(tmp_path):
    """An existing venv with torch and an existing ComfyUI: nothing is recreated, torch is kept."""
    comfy = Path(os.environ.get("COMFYUI_PATH", "")) if os.environ.get("COMFYUI_PATH") else None
    if comfy is None or not (comfy / "comfy" / "sd.py").is_file():
        comfy = tmp_path / "ComfyUI"
        (comfy / "comfy").mkdir(parents=True)
        (comfy / "comfy" / "sd.py").write_text("")
        (comfy / "main.py").write_text("")
        (comfy / "requirements.txt").write_text("torch\ntorchsde\ntorchvision\nnumpy>=1.25\n")
    venv = Path(sys.prefix)  # this interpreter's venv (it has torch)
    out = dry("install", env={"MESH_VENV": str(venv), "COMFYUI_PATH": str(comfy), "PATH": os.environ["PATH"]})
    cmds = commands(out)
    assert "exists, kept" in out and not any(" -m venv " in c for c in cmds)
    assert "kept:" in out and not any("install torch" in c for c in cmds)
    assert f"using {comfy}" in out and not any(c.startswith("git clone") for c in cmds)


def test_update_dry_run_leaves_a_users_comfyui_alone(tmp_path):
    comfy = tmp_path / "MyComfyUI"
    (comfy / "comfy").mkdir(parents=True)
    (comfy / "comfy" / "sd.py").write_text("")
    (comfy / "main.py").write_text("")
    out = dry("update", env={"MESH_VENV": str(tmp_path / "v"), "COMFYUI_PATH": str(comfy)})
    assert "is yours" in out and not any("checkout" in c for c in commands(out))
    assert commands(out)[-1].endswith(f"-m comfyui_mesh.server.check --comfyui {comfy}")


@pytest.mark.parametrize("path", BAT, ids=[p.name for p in BAT])
def test_bat_static(path):
    """cmd.exe is not available here; these catch the usual breakages of .bat files."""
    raw = path.read_bytes()
    assert b"\r\n" in raw and raw.count(b"\n") == raw.count(b"\r\n"), "a .bat needs CRLF line endings"
    text = raw.decode("ascii")  # no code page surprises in cmd
    lines = text.splitlines()
    if path.name != "_common.bat":
        assert lines[0] == "@echo off" and "setlocal" in lines, "launchers start with @echo off + setlocal"
    labels = {ln[1:].split()[0].lower() for ln in lines if ln.startswith(":") and not ln.startswith("::")}
    for target in re.findall(r"goto :?(\w+)", text, flags=re.I):
        assert target.lower() in labels | {"eof"}, f"goto {target} has no label"
    depth = 0
    for ln in lines:
        if ln.lstrip().lower().startswith(("rem", "@rem", "echo")):
            continue
        depth += ln.count("(") - ln.count(")")
        assert depth >= 0, f"unbalanced ')' in {ln!r}"
    assert depth == 0, "unbalanced parentheses"
    for ln in lines:  # every program it runs goes through %RUN% so MESH_DRY_RUN=1 only prints
        s = ln.strip()
        if re.match(r'^"%PY%"|^"%PYW%"|^git |^start |^%BASE_PY%', s, flags=re.I):
            assert path.name == "install.bat" and "import torch" in s, f"not dry-run aware: {s}"
    if path.name != "_common.bat":
        assert 'call "%~dp0' in text


def test_bat_and_sh_share_defaults():
    common_sh = (SCRIPTS / "_common.sh").read_text()
    common_bat = (SCRIPTS / "_common.bat").read_text()
    tag = re.search(r"COMFYUI_TAG:-(v[\d.]+)", common_sh).group(1)
    assert f"COMFYUI_TAG={tag}" in common_bat
    for name in ("daedalus", "install"):
        sh, bat = (SCRIPTS / f"{name}.sh").read_text(), (SCRIPTS / f"{name}.bat").read_text()
        for module in re.findall(r"comfyui_mesh\.server(?:\.\w+)?", sh):
            assert module in bat, (name, module)
