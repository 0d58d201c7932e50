"""Exact row pipelining (rows.py, icarus): a call of several rows runs as overlapped one-row calls.

The mechanics (cutting, joining, the bounded thread pipeline) without ComfyUI; then, with real
ComfyUI (COMFYUI_PATH) and real Daedalus processes on the CPU, a pipelined split is bit-identical
with raw / lossless / lossless-t to the unsplit model run the same way (row by row,
``icarus.row_by_row``): tiny FLUX.2 with CFG, batch 2 with CFG, tiny LTX-AV with CFG; ``auto`` stays
off on this host's loopback; a server refusing the second connection leaves one row in flight; and a
server killed mid-pipeline and restarted gives the uninterrupted output (the fake ComfyUI and the
stand-in server, as tests/test_resume.py).
"""

from __future__ import annotations

import logging
import signal
import threading

import pytest
import torch
from comfy_ltx_support import needs_ltxav
from comfy_support import Daedalus, flux2_daedalus, import_comfy, needs_comfy, needs_narrow_flux2, split
from comfyui_mesh import rows
from comfyui_mesh.config import ClientConfig
from comfyui_mesh.errors import LocalError
from comfyui_mesh.icarus import SplitSettings

OPTIONS = {"wrappers": {}, "cond_or_uncond": [0, 1], "sigmas": torch.tensor([0.5, 0.5, 0.5, 0.5]), "x": 1}


# ---------------------------------------------------------------------------- cutting and joining


def test_split_call_cuts_the_batched_tensors_and_passes_the_rest_whole():
    x = torch.arange(4 * 3.0).reshape(4, 3)
    ctx = torch.randn(4, 5, 2)
    one = torch.randn(1, 7)  # one row: broadcast to every row
    const = torch.randn(4, 2)  # a kwarg named constant: never cut, though its first dimension is B
    parts = rows.split_call(
        (x, torch.tensor([1.0, 2, 3, 4]), ctx, None, OPTIONS),
        {"y": [one, (ctx,)], "frame_rate": 25.0, "shapes": const, "n": 3},
        keep=("shapes",),
    )
    assert [p.index for p in parts] == [0, 1, 2, 3]
    # cond_or_uncond [0, 1] over 4 rows: two of cond (label 0), then two of uncond (label 1)
    assert [(p.label, p.sub) for p in parts] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    for r, p in enumerate(parts):
        a, k = p.args, p.kwargs
        assert torch.equal(a[0], x[r : r + 1]) and torch.equal(a[2], ctx[r : r + 1])
        assert a[1].tolist() == [r + 1.0] and a[3] is None
        o = a[4]
        assert o is not OPTIONS and o["cond_or_uncond"] == [p.label] and o["sigmas"].shape == (1,)
        assert o["wrappers"] is OPTIONS["wrappers"] and o["x"] == 1
        assert k["y"][0] is one and torch.equal(k["y"][1][0], ctx[r : r + 1]) and isinstance(k["y"][1], tuple)
        assert k["shapes"] is const and k["frame_rate"] == 25.0 and k["n"] == 3
    assert OPTIONS["cond_or_uncond"] == [0, 1] and OPTIONS["sigmas"].shape == (4,)  # the call's own untouched


def test_a_call_of_one_row_is_not_cut_and_one_without_options_has_no_labels():
    assert rows.split_call((torch.zeros(1, 3), OPTIONS), {}) == []
    assert rows.split_call(("not a tensor",), {}) == []
    parts = rows.split_call((torch.zeros(2, 3), None), {"o": {"k": torch.ones(2)}})
    assert [(p.label, p.sub) for p in parts] == [(None, 0), (None, 1)]
    assert all(p.args[1] is None and p.kwargs["o"]["k"].shape == (1,) for p in parts)


def test_join_rows_is_the_inverse_of_the_cut():
    v, a = torch.randn(3, 4, 2), torch.randn(3, 8)
    parts = rows.split_call(([v, a],), {})
    assert len(parts) == 3
    joined = rows.join_rows([p.args[0] for p in parts])
    assert isinstance(joined, list) and torch.equal(joined[0], v) and torch.equal(joined[1], a)
    assert torch.equal(rows.join_rows([v[i : i + 1] for i in range(3)]), v)
    with pytest.raises(TypeError, match="cannot join"):
        rows.join_rows(["x", "y"])


# ---------------------------------------------------------------------------- the pipeline


def _rows(n: int) -> list[rows.Row]:
    return [rows.Row(i, (), {}, None, i) for i in range(n)]


def test_the_next_row_runs_while_this_one_is_remote_and_outputs_come_back_in_order():
    """Row 0 cannot finish unless row 1 started while row 0 was 'remote' (after it was sent)."""
    started = [threading.Event() for _ in range(3)]
    lanes_seen = []

    def fn(row: rows.Row, lane: int, sent: threading.Event) -> int:
        started[row.index].set()
        lanes_seen.append((row.index, lane))
        assert torch.is_inference_mode_enabled()  # the caller's mode, carried into the row's thread
        sent.set()  # the seam went out
        if row.index + 1 < 3:
            assert started[row.index + 1].wait(30), "the next row did not start while this one was remote"
        return row.index * 10

    with torch.inference_mode():
        out = rows.run_rows(_rows(3), fn, lanes=2, device=torch.device("cpu"))
    assert out == [0, 10, 20]
    assert sorted(lanes_seen) == [(0, 0), (1, 1), (2, 0)]


def test_rows_alive_at_once_are_bounded_by_the_lanes():
    alive, peak, lock = [0], [0], threading.Lock()

    def fn(row: rows.Row, lane: int, sent: threading.Event) -> int:
        with lock:
            alive[0] += 1
            peak[0] = max(peak[0], alive[0])
        sent.set()
        threading.Event().wait(0.05)
        with lock:
            alive[0] -= 1
        return row.index

    assert rows.run_rows(_rows(6), fn, lanes=1, device=None) == list(range(6))
    assert 1 <= peak[0] <= 2  # one in flight + the next one's front half


def test_the_first_failure_in_row_order_is_raised_after_every_row_thread_ended():
    before = {t.name for t in threading.enumerate()}

    def fn(row: rows.Row, lane: int, sent: threading.Event) -> int:
        if row.index == 1:
            raise ValueError("row 1 broke")
        sent.set()
        return row.index

    with pytest.raises(ValueError, match="row 1 broke"):
        rows.run_rows(_rows(4), fn, lanes=2, device=None)
    left = {t.name for t in threading.enumerate()} - before
    assert not any(n.startswith("comfyui-mesh-row") for n in left), left


def test_split_settings_refuse_unknown_row_modes():
    cfg = ClientConfig(port=1)
    with pytest.raises(LocalError, match="row pipelining"):
        SplitSettings(n_remote=1, client=cfg, rows="maybe")
    with pytest.raises(LocalError, match="row_lanes"):
        SplitSettings(n_remote=1, client=cfg, row_lanes=0)


# ---------------------------------------------------------------------------- real ComfyUI, real Daedalus


@pytest.fixture(scope="module")
def flux(tmp_path_factory):
    d = tmp_path_factory.mktemp("rows_flux2")
    with flux2_daedalus(d, 3) as (comfy, weights, srv):
        yield comfy, weights, srv, d


def flux_sample(comfy, model, batch=1, cfg=2.5, steps=3):
    g = torch.Generator().manual_seed(1)
    noise = torch.randn(batch, 128, 4, 6, generator=g)
    pos = [[torch.randn(1, 7, 64, generator=torch.Generator().manual_seed(2)), {}]]
    neg = [[torch.randn(1, 7, 64, generator=torch.Generator().manual_seed(3)), {}]]
    with torch.inference_mode():
        return comfy.sample.sample(
            model, noise, steps, cfg, "euler", "simple", pos, neg, torch.zeros(batch, 128, 4, 6), seed=0
        )


def _decisions(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if "row pipelining" in r.getMessage()]


@needs_comfy
@needs_narrow_flux2
@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize("codec_name", ["raw", "lossless", "lossless-t"])
def test_pipelined_flux2_with_cfg_is_bit_identical_to_unsplit_row_by_row(flux, caplog, batch, codec_name):
    from comfyui_mesh.icarus import row_by_row

    comfy, weights, srv, _ = flux
    model = comfy.sd.load_diffusion_model(str(weights))
    ref = flux_sample(comfy, row_by_row(model), batch)
    m, run = split(model, srv, 3, codec=codec_name, samehost=False)
    run.settings.rows = "on"
    with caplog.at_level(logging.INFO, logger="comfyui_mesh"):
        out = flux_sample(comfy, m, batch)
    assert torch.equal(out, ref), f"max diff {(out - ref).abs().max()}"
    assert run.calls == 3 * 2 * batch  # every row of every step went as a call of its own
    said = _decisions(caplog)
    assert len(said) == 1 and "on, 2 row(s) in flight" in said[0] and f"({2 * batch} rows per call)" in said[0]


@needs_comfy
@needs_narrow_flux2
def test_auto_stays_off_on_this_hosts_loopback_and_off_is_batched(flux, caplog):
    comfy, weights, srv, _ = flux
    model = comfy.sd.load_diffusion_model(str(weights))
    ref = flux_sample(comfy, model)
    m, run = split(model, srv, 3, samehost=False)
    assert run.settings.rows == "auto"
    with caplog.at_level(logging.INFO, logger="comfyui_mesh"):
        assert torch.equal(flux_sample(comfy, m), ref)  # batched: bit-identical to batched unsplit
        assert run.calls == 3
        said = _decisions(caplog)
        assert len(said) == 1 and "off" in said[0] and "loopback" in said[0]
        caplog.clear()
        m2, run2 = split(model, srv, 3, samehost=True)
        assert torch.equal(flux_sample(comfy, m2), ref) and run2.calls == 3
        assert "same-host fast path" in _decisions(caplog)[0]
        caplog.clear()
        m3, run3 = split(model, srv, 3, samehost=False)
        run3.settings.rows = "off"
        assert torch.equal(flux_sample(comfy, m3), ref) and run3.calls == 3
        assert _decisions(caplog) == []  # off: nothing to decide


@needs_comfy
@needs_narrow_flux2
def test_a_server_refusing_the_second_connection_leaves_one_row_in_flight(flux, caplog):
    from comfyui_mesh.icarus import row_by_row

    comfy, weights, _, d = flux
    one = Daedalus(weights, 3, d / "state_one", extra=["--max-clients", "1"])
    try:
        model = comfy.sd.load_diffusion_model(str(weights))
        ref = flux_sample(comfy, row_by_row(model))
        m, run = split(model, one, 3, samehost=False)
        run.settings.rows = "on"
        with caplog.at_level(logging.INFO, logger="comfyui_mesh"):
            out = flux_sample(comfy, m)
        assert torch.equal(out, ref) and run.calls == 6
        said = _decisions(caplog)
        assert len(said) == 1 and "on, 1 row(s) in flight" in said[0] and "connection 2 refused" in said[0]
    finally:
        one.stop()


@pytest.fixture(scope="module")
def ltx(tmp_path_factory):
    from comfy_ltx_support import STYLES, make_ltx

    style = STYLES[-1]  # the newest style this ComfyUI builds (LTX-2.3 where it can)
    d = tmp_path_factory.mktemp("rows_ltx")
    comfy = import_comfy()
    __import__("comfy.sample")
    weights = make_ltx(d / f"tiny_{style}.safetensors", style=style, seed=0)
    srv = Daedalus(weights, 2, d / "state")
    try:
        yield comfy, weights, srv, style
    finally:
        srv.stop()


@needs_ltxav
@pytest.mark.parametrize("codec_name", ["raw", "lossless"])
def test_pipelined_ltxav_with_cfg_is_bit_identical_to_unsplit_row_by_row(ltx, codec_name):
    from comfy_ltx_support import load, ltx_sample
    from comfyui_mesh.icarus import row_by_row

    comfy, weights, srv, style = ltx
    model = load(comfy, weights)
    ref = ltx_sample(comfy, row_by_row(model), style, audio=5)
    m, run = split(model, srv, 2, codec=codec_name, samehost=False)
    run.settings.rows = "on"
    out = ltx_sample(comfy, m, style, audio=5)
    assert run.calls == 2 * 2  # 2 steps, cond and uncond each a call
    assert len(out) == len(ref) == 2
    for o, r in zip(out, ref, strict=True):
        assert torch.equal(o, r), f"max diff {(o - r).abs().max()}"
    assert out[1].abs().sum() > 0  # the audio stream came back


# ---------------------------------------------------------------------------- a cut mid-pipeline


@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="POSIX signals")
@pytest.mark.parametrize("codec_name", ["raw", "lossless-t"])
def test_a_server_killed_mid_pipeline_and_restarted_gives_the_uninterrupted_output(comfy_env, tmp_path, codec_name):
    """kill -9 inside a row of the second pipelined model call, restart on the same port: both lanes
    reconnect (new sessions: constants and keyframes again) and the output equals an uninterrupted
    pipelined run's."""
    import fake_dit
    from comfyui_mesh.icarus import split_model
    from comfyui_mesh.transport import drop_pooled
    from fake_comfy import sample
    from seam_server import TOKEN
    from test_resume import _patcher_with_lora, _ready_line, _reaped, _sample_while_restarted, _stand_in_server

    sigmas = torch.tensor([1.0, 0.8, 0.6, 0.4, 0.2])  # four model calls, two rows each
    rows_per_run = 2 * (len(sigmas) - 1)
    noise, pos, neg = fake_dit.STANDINS["flux2"].inputs()
    log = tmp_path / "daedalus.log"
    first = _stand_in_server(log, "--die-in-call", str(rows_per_run + 3))  # a row of the 2nd call of run 2
    second = _stand_in_server(log, "--standby")
    statuses: list[tuple[str, str]] = []
    with _reaped([first, second]):
        port = int(_ready_line(first).split()[1])
        _ready_line(second, word="STANDBY")
        cfg = ClientConfig(
            host="127.0.0.1", port=port, token=TOKEN, retry_backoff_s=0.2, retry_backoff_max_s=1.0, retry_budget_s=120
        )
        settings = SplitSettings(
            n_remote=2, client=cfg, codec_name=codec_name, rows="on", on_status=lambda lv, t: statuses.append((lv, t))
        )
        try:
            m, run = split_model(_patcher_with_lora("flux2"), settings)
            ref, _ = sample(m, noise, sigmas, pos, neg)
            assert not statuses and first.poll() is None and run.calls == rows_per_run
            out, _ = _sample_while_restarted(first, second, port, lambda: sample(m, noise, sigmas, pos, neg))
        finally:
            drop_pooled("127.0.0.1", port)
        assert first.returncode == -signal.SIGKILL and second.poll() is None
        assert torch.equal(out, ref)
        assert run.calls == rows_per_run
        assert any(level == "warn" and "reconnecting" in text for level, text in statuses)
