"""bench/split_link.py's core in CI: a split through the link emulator (bench/linkemu.py) is still
bit-identical with raw, and the report has every column with the numbers it is made of.

Without ComfyUI: the stand-in FLUX.2 (tests/fake_dit.py) against an in-process Daedalus
(tests/seam_server.py), sampled by tests/fake_comfy.py. With COMFYUI_PATH: the script itself, tiny
FLUX.2 through ComfyUI and a real Daedalus process. No timing is asserted (figures: docs/BENCHMARKS.md).
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import fake_dit
import pytest
import torch
from comfy_support import COMFY, needs_comfy
from fake_comfy import FakeModelPatcher, sample
from seam_server import TOKEN, serve

BENCH = Path(__file__).parents[1] / "bench"


def load(name: str):
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod  # dataclasses look their module up
    spec.loader.exec_module(mod)
    return mod


split_link = load("split_link")
linkemu = sys.modules["linkemu"]

SIGMAS = torch.tensor([1.0, 0.7, 0.4, 0.1])  # three steps, one model call each (CFG batched)


def check_row(row, link_name: str) -> None:
    assert row.link == link_name and row.codec == "raw" and row.mode == "tcp"
    assert row.identical and row.rel_l2 == 0 and math.isinf(row.psnr_db)
    assert row.calls_per_step == 1 and row.mb_out > 0 and row.mb_in > 0
    link = linkemu.parse_link(link_name)
    wire = link.wire_s(round(row.mb_out * 1e6), round(row.mb_in * 1e6))
    assert row.wire_ms == pytest.approx(wire * 1e3, rel=1e-3)
    assert row.over_wire_ms == pytest.approx(row.overhead_ms - row.wire_ms)
    assert row.overhead_ms == pytest.approx((row.step_s - row.unsplit_step_s) * 1e3)
    assert row.step_s > 0 and row.round_trip_ms > 0 and row.server_forward_ms > 0


def test_split_through_an_emulated_link_is_bit_identical_with_raw(comfy_env):
    family, n = "flux2", 2
    model = FakeModelPatcher(fake_dit.BaseModel(fake_dit.build(family, 0)))
    noise, pos, neg = fake_dit.STANDINS[family].inputs()

    def run(m):
        t = time.perf_counter()
        out, _ = sample(m, noise, SIGMAS, pos, neg)
        total = time.perf_counter() - t
        return out, total, [total / (len(SIGMAS) - 1)] * (len(SIGMAS) - 2)

    lines: list[str] = []
    link_name = "200/400mbit@4ms"
    with serve(family, n) as srv:
        rows = split_link.measure(run, model, srv.address, TOKEN, n, [link_name], ["raw"], {"tcp": {}},
                                  say=lines.append)  # fmt: skip
        # every step crossed the emulated link: the server saw them, through the relay's connection
        assert srv.state.stats.steps == 2 * (len(SIGMAS) - 1)  # warm-up + timed run
    assert len(rows) == 1
    check_row(rows[0], link_name)
    assert any("unsplit" in ln for ln in lines) and any(link_name in ln for ln in lines)
    table = split_link.table(rows)
    head, rule, body = table.splitlines()
    assert head.count("|") == rule.count("|") == body.count("|")
    for col in ("overhead - wire ms", "wire ms/step", "MB out / in per call", "fidelity"):
        assert col in head
    assert "bit-identical" in body


def test_interleaved_runs_take_the_overhead_from_the_pairs(comfy_env):
    family, n = "flux2", 2
    model = FakeModelPatcher(fake_dit.BaseModel(fake_dit.build(family, 0)))
    noise, pos, neg = fake_dit.STANDINS[family].inputs()
    runs: list[tuple[bool, float]] = []  # (split?, the step time this run reports)
    fake = iter([0.30, 0.10, 0.50, 0.20, 0.90, 0.40, 0.31, 0.12] * 4)

    def run(m):
        out, _ = sample(m, noise, SIGMAS, pos, neg)
        step = next(fake)  # drifting times: what the pairs must cancel
        runs.append((m is not model, step))
        return out, step * (len(SIGMAS) - 1), [step] * (len(SIGMAS) - 2)

    lines: list[str] = []
    with serve(family, n) as srv:
        rows = split_link.measure(run, model, srv.address, TOKEN, n, ["direct"], ["raw"], {"tcp": {}},
                                  repeats=3, say=lines.append, interleave=True)  # fmt: skip
    # unsplit warm-up + 3 timed (the fidelity reference), split warm-up, then (unsplit, split) three times
    assert [sp for sp, _ in runs] == [False] * 4 + [True] + [False, True] * 3
    pairs = [(runs[i][1], runs[i + 1][1]) for i in (5, 7, 9)]
    diffs = sorted(b - a for a, b in pairs)
    r = rows[0]
    assert r.overhead_ms == pytest.approx(diffs[1] * 1e3)
    assert r.step_s == pytest.approx(sorted(b for _, b in pairs)[1])
    assert any("pairs" in ln for ln in lines)


def test_fidelity_figures():
    ref = torch.linspace(-1, 1, 1000)
    assert split_link.fidelity(ref.clone(), ref) == (True, 0.0, math.inf)
    assert not split_link.fidelity(ref.double(), ref)[0]  # same values, another dtype: not bit-identical
    noisy = ref + 0.01
    same, rel, psnr = split_link.fidelity(noisy, ref)
    assert not same and rel == pytest.approx(0.01 / float(ref.pow(2).mean().sqrt()), rel=1e-3)
    assert psnr == pytest.approx(10 * math.log10(2.0**2 / 1e-4), rel=1e-3)  # range 2, mse 1e-4
    nested = [ref, ref[:10]]
    assert split_link.fidelity([t.clone() for t in nested], nested)[0]


def test_modes_parse_to_settings_and_client_fields():
    modes = split_link.parse_modes("tcp,slow", ["slow:reply_codec=lossless,read_timeout_s=99"])
    assert modes == {"tcp": {"samehost": False}, "slow": {"reply_codec": "lossless", "read_timeout_s": 99}}
    # Python's spelling of booleans too: "False" is not a (truthy) string
    one = split_link.parse_modes("one", ["one:stream_slab_bytes=0,samehost=False,rows=false"])
    assert one == {"one": {"stream_slab_bytes": 0, "samehost": False, "rows": False}}
    with pytest.raises(SystemExit, match="neither"):
        split_link.parse_modes("x", ["x:bogus=1"])
    with pytest.raises(SystemExit, match="unknown mode"):
        split_link.parse_modes("nope")


@needs_comfy
def test_the_script_on_tiny_flux2_with_comfyui(tmp_path):
    out = tmp_path / "out.json"
    cmd = [sys.executable, str(BENCH / "split_link.py"), "--comfyui", COMFY, "--model", "tiny", "--res", "64",
           "--steps", "3", "--codecs", "raw", "--links", "1gbe", "--repeats", "1", "--workdir", str(tmp_path),
           "--selftest-mb", "2", "--out", str(out)]  # fmt: skip
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    doc = json.loads(out.read_text())
    assert doc["columns"] == split_link.COLUMNS
    assert doc["settings"]["links"]["1gbe"]["up_mbps"] == 1000
    assert [r["link"] for r in doc["linkemu_selftest"]] == ["direct loopback", "1gbe"]
    (row,) = doc["rows"]
    assert set(row) == set(split_link.COLUMNS)
    assert row["identical"] is True and row["psnr_db"] is None  # inf is not JSON
    assert row["link"] == "1gbe" and row["mb_out"] > 0 and row["wire_ms"] > 0
    assert "| 1gbe | raw | tcp |" in p.stdout and "bit-identical" in p.stdout
