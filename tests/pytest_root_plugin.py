"""Collect the repository root as a plain directory, not as a Python package.

The root is the package ``comfyui_mesh`` under whatever folder name it was cloned into
(``ComfyUI-Mesh``): pytest would import its ``__init__.py`` under that folder name, which is
not importable. Tests import the installed ``comfyui_mesh`` instead."""

from __future__ import annotations

from pathlib import Path

import pytest


def pytest_collect_directory(path: Path, parent: pytest.Collector) -> pytest.Collector | None:
    if path == parent.config.rootpath and (path / "__init__.py").is_file():
        return pytest.Dir.from_parent(parent, path=path)
    return None
