"""The n_blocks_remote suggestion of a real split: tiny FLUX.2 through a real Daedalus on the CPU.

Every remote call is timed, and at the generation's end the suggestion (balance.py) is logged, kept on
the run and sent once to the node UI in a ``mesh-stats`` event (a stand-in PromptServer), after the
per-step stats, with its fields filled from this run: the measured n, the range the server's model
allows, the calls it was made from, the mode (pipelined rows with CFG, or one call per step).
No figure is asserted beyond being measured (CPU timings on a shared machine are noise).
Then bench/split_balance.py: which suggestion "points toward the best", and the script's sweep on tiny
FLUX.2 over the link emulator.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch
from comfy_support import (
    COMFY,
    flux2_daedalus,
    needs_comfy,
    needs_narrow_flux2,
    split,
)
from comfyui_mesh import ui_events

N = 3  # of the tiny FLUX.2's 5 blocks (2 double, 3 single)
STEPS = 3


class FakePromptServer:
    def __init__(self):
        self.sent = []
        self.client_id = "browser-1"

    def send_sync(self, event, data, sid=None):
        self.sent.append((event, data))


@pytest.fixture(scope="module")
def flux(tmp_path_factory):
    d = tmp_path_factory.mktemp("balance_flux2")
    with flux2_daedalus(d, N) as (comfy, weights, srv):
        yield comfy, weights, srv


@pytest.fixture
def prompt_server(monkeypatch):
    ps = FakePromptServer()
    fake = types.ModuleType("server")
    fake.PromptServer = types.SimpleNamespace(instance=ps)
    monkeypatch.setitem(sys.modules, "server", fake)
    return ps


def sample(comfy, model, cfg=2.5):
    g = torch.Generator().manual_seed(1)
    noise = torch.randn(1, 128, 4, 6, generator=g)
    pos = [[torch.randn(1, 7, 64, generator=torch.Generator().manual_seed(2)), {}]]
    neg = [[torch.randn(1, 7, 64, generator=torch.Generator().manual_seed(3)), {}]]
    with torch.inference_mode():
        return comfy.sample.sample(
            model, noise, STEPS, cfg, "euler", "simple", pos, neg, torch.zeros(1, 128, 4, 6), seed=0
        )


def suggestions(ps):
    return [d["suggestion"] for e, d in ps.sent if e == "mesh-stats" and "suggestion" in d]


@needs_comfy
@needs_narrow_flux2
@pytest.mark.parametrize("rows", ["on", "off"])
def test_the_suggestion_reaches_the_node_ui_once_per_generation(flux, prompt_server, caplog, rows):
    comfy, _, srv = flux
    model = comfy.sd.load_diffusion_model(str(flux[1]))
    m, run = split(model, srv, N, samehost=False)
    run.settings.rows = rows
    run.settings.on_step = ui_events.step_reporter("9", "raw")
    run.settings.on_suggest = ui_events.suggestion_reporter("9")
    with caplog.at_level(logging.INFO, logger="comfyui_mesh"):
        sample(comfy, m)
    calls = STEPS * (2 if rows == "on" else 1)  # CFG: cond + uncond, one call per row when pipelined
    assert run.calls == calls
    events = [d for e, d in prompt_server.sent if e == "mesh-stats"]
    assert [d.get("call") for d in events[:-1]] == list(range(1, calls + 1))  # the steps' stats first
    (g,) = suggestions(prompt_server)
    assert events[-1] == {"node_id": "9", "suggestion": g}  # then the suggestion, once, at the end
    assert g["current"] == N and g["range"] == [1, 5] and 1 <= g["suggested"] <= 5
    assert g["changed"] == (g["suggested"] != N)
    assert g["mode"] == ("rows" if rows == "on" else "serial") and g["calls"] == calls
    assert g["client_ms"] > 0 and g["server_ms"] > 0 and g["link_ms"] >= 0
    assert g["step_s"] > 0 and 0 < g["new_step_s"] <= g["step_s"]
    assert g["bound"] in ("client", "server", "link")
    assert g["text"].startswith(f"n_blocks_remote {N} ") and "per step; est." in g["text"]
    assert run.suggestion is not None and run.suggestion.report() == g
    logged = [r.getMessage() for r in caplog.records if "per step; est." in r.getMessage()]
    assert logged == [f"ComfyUI-Mesh 127.0.0.1:{srv.port}: {g['text']}"]

    # The next generation is measured afresh: its own calls, its own (one) suggestion.
    prompt_server.sent.clear()
    sample(comfy, m)
    (again,) = suggestions(prompt_server)
    assert again["calls"] == calls and again["current"] == N


@needs_comfy
@needs_narrow_flux2
def test_no_ui_no_callback_still_keeps_the_suggestion_on_the_run(flux, monkeypatch):
    comfy, weights, srv = flux
    monkeypatch.delitem(sys.modules, "server", raising=False)
    model = comfy.sd.load_diffusion_model(str(weights))
    m, run = split(model, srv, N, samehost=False)
    assert run.suggestion is None and run.n_range is None
    sample(comfy, m, cfg=1.0)
    assert run.n_range == (1, 5)  # read from the connection the calls used
    s = run.suggestion
    assert s is not None and s.current.n == N and s.calls == STEPS and s.mode == "serial"
    assert len(run.timings) == STEPS and all(t.front_ms > 0 and t.server_ms > 0 for t in run.timings)


# ---------------------------------------------------------------------------- bench/split_balance.py

BENCH = Path(__file__).parents[1] / "bench"


def load_bench():
    spec = importlib.util.spec_from_file_location("split_balance", BENCH / "split_balance.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules["split_balance"] = mod
    spec.loader.exec_module(mod)
    return mod


def test_a_suggestion_points_toward_the_best_when_it_moves_its_way_or_stays_within_the_hysteresis():
    sb = load_bench()

    def run(n, step, suggested):
        return sb.Run(n, step, step, 1.0, 1.0, 1.0, "client", suggested, step, "")

    best = run(16, 0.100, 16)
    assert sb.toward(best, best)  # stays at the best
    assert sb.toward(run(8, 0.150, 12), best) and sb.toward(run(8, 0.150, 24), best)  # the right way (overshoot too)
    assert not sb.toward(run(8, 0.150, 4), best)  # the wrong way
    assert not sb.toward(run(8, 0.150, 8), best)  # stays, though 16 is a third faster
    assert sb.toward(run(24, 0.104, 24), best)  # stays: 16 is under 5 % faster
    assert not sb.toward(run(24, 0.104, 16 + 16), best)


@needs_comfy
@needs_narrow_flux2
def test_the_sweep_script_on_tiny_flux2(tmp_path):
    out = tmp_path / "out.json"
    cmd = [sys.executable, str(BENCH / "split_balance.py"), "--comfyui", COMFY, "--model", "tiny", "--res", "64",
           "--sweep", "1,3", "--steps", "3", "--repeats", "1", "--link", "1gbe", "--workdir", str(tmp_path),
           "--out", str(out)]  # fmt: skip
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    doc = json.loads(out.read_text())
    assert doc["settings"]["cfg"] == 2 and doc["settings"]["sweep"] == [1, 3]  # rows: FLUX.2 gets two rows
    runs = doc["runs"]
    assert [r["n"] for r in runs] == [1, 3] and doc["best"] in (1, 3)
    for r in runs:
        assert r["step_s"] > 0 and r["est_step_s"] > 0 and r["client_ms"] > 0 and r["server_ms"] > 0
        assert 1 <= r["suggested"] <= 5 and r["text"].startswith(f"n_blocks_remote {r['n']} ")
        assert "(rows" in r["text"]
    assert "toward the measured best" in p.stdout and "measured best: n=" in p.stdout


# ---------------------------------------------------------------------------- without ComfyUI


def test_one_calls_timing_from_its_marks_and_stats():
    from comfyui_mesh.icarus import _elapsed_ms, _mark, _timing
    from comfyui_mesh.transport import StepStats

    start = _mark(torch.device("cpu"))
    assert isinstance(start, float) and _elapsed_ms(start, start + 0.05) == pytest.approx(50.0)
    assert _elapsed_ms(start, object()) is None  # marks of different kinds: not comparable
    stats = StepStats(encode_ms=9.0, settle_ms=6.0, decode_ms=1.5, wait_ms=40.0)
    stats.server = {"decode": 2.0, "forward": 25.0, "encode": 3.0}
    t = _timing(start, start + 0.012, stats)
    assert t is not None
    assert t.front_ms == pytest.approx(12.0)
    assert t.coding_ms == pytest.approx(3.0 + 1.5)  # the wait for the front half is not coding
    assert (t.server_ms, t.server_coding_ms) == (25.0, 5.0)
    assert t.link_ms == pytest.approx(40.0 - 30.0)
    assert _timing(None, start, stats) is None


def test_the_suggestion_event_carries_the_report(prompt_server):
    from comfyui_mesh.balance import CallTiming, Setup, suggest

    s = suggest(
        [CallTiming(48.0, 0.0, 16.0, 0.0, 5.0)] * 3, Setup(n=16, total=40, lo=1, hi=40, mode="rows", rows=2, lanes=2)
    )
    ui_events.suggestion_reporter(12)(s)
    assert prompt_server.sent == [("mesh-stats", {"node_id": "12", "suggestion": s.report()})]
