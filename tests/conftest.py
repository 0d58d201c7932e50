"""Shared fixtures. ``comfy_env``: the fake ComfyUI of tests/fake_comfy.py for one test (or the
real one, where COMFYUI_PATH configures it); requested explicitly, so other tests never see it."""

from __future__ import annotations

import pytest


@pytest.fixture
def comfy_env(monkeypatch, tmp_path):
    import fake_comfy

    monkeypatch.delenv("COMFYUI_MESH_TOKEN", raising=False)
    monkeypatch.delenv("COMFYUI_MESH_SEAM_DUMP", raising=False)
    return fake_comfy.install(monkeypatch, tmp_path / "user")
