"""The ComfyUI-level tests skip with the exact fix when ComfyUI or its requirements are missing."""

from __future__ import annotations

from comfy_support import comfy_skip_reason, missing_requirements


def fake_comfy(tmp_path, requirements: str):
    (tmp_path / "comfy").mkdir()
    (tmp_path / "comfy" / "sd.py").write_text("")
    (tmp_path / "requirements.txt").write_text(requirements)
    return str(tmp_path)


def test_no_path_names_the_variable():
    assert "set COMFYUI_PATH" in (comfy_skip_reason("") or "")


def test_wrong_folder_is_named(tmp_path):
    reason = comfy_skip_reason(str(tmp_path)) or ""
    assert str(tmp_path) in reason and "not a ComfyUI checkout" in reason


def test_missing_requirements_give_the_pip_command(tmp_path):
    comfy = fake_comfy(
        tmp_path,
        "torch\nnot-a-real-package-mesh>=1.0\npytest\n\n#non essential dependencies:\nalso-not-real-mesh\n",
    )
    assert missing_requirements(comfy) == ["not-a-real-package-mesh"]
    reason = comfy_skip_reason(comfy) or ""
    assert "not-a-real-package-mesh" in reason and "also-not-real-mesh" not in reason
    assert f'pip install -r "{tmp_path / "requirements.txt"}"' in reason


def test_complete_checkout_runs(tmp_path):
    assert comfy_skip_reason(fake_comfy(tmp_path, "torch\npytest\n")) is None
