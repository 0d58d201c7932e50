"""requirements.txt (read by ComfyUI-Manager) agrees with pyproject.toml: the dependencies plus the
[codecs] extra, torch left out (ComfyUI provides it; an installer must not swap the user's build)."""

from __future__ import annotations

import sys
from pathlib import Path

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

REPO = Path(__file__).resolve().parent.parent


def test_requirements_txt_is_pyproject_without_torch():
    project = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    wanted = [
        d for d in project["dependencies"] + project["optional-dependencies"]["codecs"] if not d.startswith("torch")
    ]
    lines = (REPO / "requirements.txt").read_text(encoding="utf-8").splitlines()
    listed = [ln.strip() for ln in lines if ln.strip() and not ln.lstrip().startswith("#")]
    assert sorted(listed) == sorted(wanted)
    assert not any(ln.startswith("torch") for ln in listed)
