"""bench/split_pipeline.py: its defaults over split_link's, and (with COMFYUI_PATH) the script on tiny
FLUX.2 with CFG through the link emulator: the batched mode makes one call per step, the pipelined
mode one per row and is bit-identical to the unsplit model run row by row. No timing is asserted
(figures: docs/BENCHMARKS.md)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

from comfy_support import COMFY, needs_comfy

BENCH = Path(__file__).parents[1] / "bench"


def load(name: str):
    spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


def test_defaults_come_first_so_given_options_win():
    sp = load("split_pipeline")
    args = sp.arguments(["--model", "klein9b", "--links", "2.5gbe"])
    assert args[: len(sp.DEFAULTS)] == sp.DEFAULTS
    assert args[-2:] == ["--links", "2.5gbe"] and ["--cfg", "2"] == args[len(sp.DEFAULTS) : len(sp.DEFAULTS) + 2]
    assert "--cfg" not in sp.arguments(["--model", "ltx23"])  # LTX-AV: split_link's CFG 3
    assert sp.arguments(["--cfg", "1.5"]).count("--cfg") == 1
    lanes = sp.arguments(["--row-lanes", "3", "--steps", "2"])
    assert "rows:samehost=false,rows=on,row_lanes=3" in lanes and "--row-lanes" not in lanes
    assert lanes[-2:] == ["--steps", "2"]
    patch = sp.arguments(["--model", "klein9b", "--patches", "2,4", "--patch-warmup", "3", "--steps", "8"])
    assert patch[-2:] == ["--steps", "8"] and "--patches" not in patch and "--patch-warmup" not in patch
    assert patch[patch.index("--cfg") + 1] == "1"  # one-row calls: patch pipelining cuts those
    assert patch[patch.index("--modes", len(sp.DEFAULTS)) + 1] == "batched,patch2,patch4"
    assert "patch4:samehost=false,rows=off,patches=4,patch_warmup=3" in patch
    split_modes = sys.modules["split_link"].parse_modes
    assert split_modes("patch2", ["patch2:samehost=false,rows=off,patches=2,patch_warmup=2"]) == {
        "patch2": {"samehost": False, "rows": "off", "patches": 2, "patch_warmup": 2}
    }
    modes = split_modes("batched,rows", ["rows:samehost=false,rows=on,row_lanes=3"])
    assert modes == {
        "batched": {"samehost": False, "rows": "off"},
        "rows": {"samehost": False, "rows": "on", "row_lanes": 3},
    }


@needs_comfy
def test_the_script_on_tiny_flux2_with_cfg(tmp_path):
    out = tmp_path / "out.json"
    cmd = [sys.executable, str(BENCH / "split_pipeline.py"), "--comfyui", COMFY, "--model", "tiny", "--res", "64",
           "--steps", "3", "--codecs", "raw", "--repeats", "1", "--workdir", str(tmp_path), "--selftest-mb", "0",
           "--out", str(out)]  # fmt: skip
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=env)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    doc = json.loads(out.read_text())
    assert doc["settings"]["cfg"] == 2 and doc["settings"]["links"]["1gbe"]["up_mbps"] == 1000
    by_mode = {r["mode"]: r for r in doc["rows"]}
    assert set(by_mode) == {"batched", "rows"}
    batched, rows = by_mode["batched"], by_mode["rows"]
    assert batched["calls_per_step"] == 1 and rows["calls_per_step"] == 2  # cond + uncond: two rows
    assert batched["identical"] is True and batched["reference"] == "unsplit"
    assert rows["identical"] is True and rows["reference"] == "unsplit row by row"
    assert rows["speedup"] > 0 and rows["wire_ms"] > 0
    assert "unsplit / split" in p.stdout and "vs unsplit row by row" in p.stdout
