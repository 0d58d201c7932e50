"""Runs the node UI's JavaScript unit tests (tests/js/*.test.mjs) with Node's test runner."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def test_node_ui_logic_unit_tests():
    if not shutil.which("node"):
        print("\nSKIP JS tests: node is not installed")
        pytest.skip("node is not installed")
    r = subprocess.run(["node", "--test", "tests/js/"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
    assert "# fail 0" in r.stdout


def test_web_modules_parse():
    if not shutil.which("node"):
        pytest.skip("node is not installed")
    for f in sorted((REPO / "web").glob("*.js")):
        r = subprocess.run(["node", "--check", str(f)], capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, f"{f.name}: {r.stderr}"
