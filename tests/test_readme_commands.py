"""The README's install and test commands, run as a user would: in a fresh clone whose folder is
named ``ComfyUI-Mesh`` (not a Python identifier), into a Python that already has torch (ComfyUI's).

Skipped only when the package index cannot be reached (the editable install builds with setuptools)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
NESTED = "COMFYUI_MESH_README_TEST"  # set in the nested run: the suite inside must not start this test again


def readme_block(heading: str) -> list[str]:
    """The command lines of the first ```bash block after ``heading`` (comments dropped)."""
    text = (REPO / "README.md").read_text(encoding="utf-8")
    after = text.split(heading, 1)[1]
    block = re.search(r"```bash\n(.*?)```", after, re.S)
    assert block, f"README: no bash block after {heading!r}"
    return [ln.split("  #")[0].strip() for ln in block.group(1).splitlines() if ln.strip() and not ln.startswith("#")]


def index_reachable(tmp: Path) -> bool:
    r = subprocess.run(
        [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "-d", str(tmp), "setuptools>=68"],
        capture_output=True,
        timeout=120,
    )
    return r.returncode == 0


def test_readme_names_the_folder_and_the_extras():
    cmds = readme_block("### Install")
    assert cmds[0] == "cd ComfyUI/custom_nodes"
    assert re.fullmatch(r"git clone (\S+|<this repository>) ComfyUI-Mesh", cmds[1])  # URL: see the closing note
    assert cmds[2] == 'python -m pip install -e "ComfyUI-Mesh[codecs]"'
    assert readme_block("## Tests") == ["bash scripts/test.sh"]


@pytest.mark.skipif(bool(os.environ.get(NESTED)), reason="inside the README test's own run")
@pytest.mark.skipif(shutil.which("git") is None, reason="needs git")
def test_readme_install_and_test_commands_in_a_fresh_comfyui_mesh_folder(tmp_path):
    if not index_reachable(tmp_path / "probe"):
        pytest.skip("the package index cannot be reached (the editable install needs setuptools from it)")
    nodes = tmp_path / "ComfyUI" / "custom_nodes"
    nodes.mkdir(parents=True)
    # ComfyUI's Python: a fresh venv that sees this interpreter's packages (torch) through a .pth file
    py = tmp_path / "comfy-python"
    subprocess.run([sys.executable, "-m", "venv", str(py)], check=True, timeout=120)
    site = next((py / "lib").glob("python3*/site-packages"))
    (site / "outer.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    python = str(py / "bin" / "python")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "CI", "COMFYUI_PATH")}
    env.update({"PATH": f"{py / 'bin'}:{env['PATH']}", NESTED: "1"})

    _, clone, install = readme_block("### Install")
    clone = clone.split()[:2] + [str(REPO), "ComfyUI-Mesh"]  # the local repository stands in for the URL
    subprocess.run(clone, cwd=nodes, check=True, timeout=120, capture_output=True)
    r = subprocess.run(install.replace("python ", f"{python} ", 1), shell=True, cwd=nodes, env=env,
                       capture_output=True, text=True, timeout=600)  # fmt: skip
    assert r.returncode == 0, r.stdout + r.stderr
    where = subprocess.run([python, "-c", "import comfyui_mesh, zstandard; print(comfyui_mesh.__file__)"],
                           cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)  # fmt: skip
    assert where.stdout.strip() == str(nodes / "ComfyUI-Mesh" / "__init__.py"), where.stdout + where.stderr

    # The README's test command in that folder (one test file: the whole suite is what CI runs)
    (test_cmd,) = readme_block("## Tests")
    env["MESH_VENV"] = str(py)
    r = subprocess.run(f"{test_cmd} tests/test_protocol.py", shell=True, cwd=nodes / "ComfyUI-Mesh", env=env,
                       capture_output=True, text=True, timeout=900)  # fmt: skip
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-4000:]
    assert re.search(r"\d+ passed", out) and "error" not in out.splitlines()[-1].lower(), out[-2000:]
