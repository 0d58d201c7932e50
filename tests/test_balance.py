"""balance.py: the n_blocks_remote suggestion from measured per-call times (pure: no torch, no ComfyUI).

The figures are chosen so the best block count can be worked out by hand: 40 blocks, measured at 16
remote; the client takes 2 ms a block (48 ms for its 24), the server 1 ms (16 ms for its 16).
"""

from __future__ import annotations

import pytest
from comfyui_mesh.balance import CallTiming, Setup, estimate, suggest, typical
from comfyui_mesh.errors import LocalError


def calls(front=48.0, server=16.0, link=5.0, coding=0.0, server_coding=0.0, n=3) -> list[CallTiming]:
    return [CallTiming(front, coding, server, server_coding, link) for _ in range(n)]


def rows_setup(**over) -> Setup:
    return Setup(**{"n": 16, "total": 40, "lo": 1, "hi": 40, "mode": "rows", "rows": 2, "lanes": 2, **over})


def test_rows_balance_the_two_sides():
    # C(k) = 2 (40 - k), S(k) = k; a step of two pipelined rows: C + L + S + max(C, L, S).
    s = suggest(calls(), rows_setup())
    assert s is not None and s.changed
    assert s.best.n == 27  # C 26, S 27: 26 + 5 + 27 + 27 = 85 ms (k = 26: 28 + 5 + 26 + 28 = 87)
    assert s.best.step_ms == pytest.approx(85.0)
    assert s.current.step_ms == pytest.approx(48 + 5 + 16 + 48)
    assert (s.current.client_ms, s.current.server_ms, s.current.link_ms) == (96.0, 32.0, 10.0)  # per step: 2 rows
    assert s.current.bound == "client"
    assert s.line() == (
        "n_blocks_remote 16 -> 27: client 96 ms, server 32 ms, link 10 ms per step; est. 0.117 -> 0.085 s/step (rows)"
    )


def test_serial_puts_every_block_it_may_on_the_faster_side():
    # One call at a time: C + L + S = 2 (40 - k) + k + 5, falling with k: the server (faster) takes all.
    fast_server = suggest(calls(), rows_setup(mode="serial", rows=1))
    assert fast_server is not None and fast_server.best.n == 40
    assert fast_server.best.step_ms == pytest.approx(45.0) and fast_server.current.step_ms == pytest.approx(69.0)
    # A server 4x slower per block (4 ms against the client's 2): the client takes all it may.
    slow_server = suggest(calls(server=64.0), rows_setup(mode="serial", rows=1))
    assert slow_server is not None and slow_server.best.n == 1
    # The same figures pipelined balance instead: C = 2 (40 - k) = S = 4 k at k ~ 13.
    piped = suggest(calls(server=64.0), rows_setup())
    assert piped is not None and piped.best.n == 13


def test_the_range_clamps_the_suggestion():
    s = suggest(calls(), rows_setup(mode="serial", rows=1, hi=30))
    assert s is not None and s.best.n == 30 and s.hi == 30
    s = suggest(calls(), rows_setup(lo=20, hi=24))  # the balance point (27) is out of range: its nearest edge
    assert s is not None and s.best.n == 24
    assert s.report()["range"] == [20, 24]


def test_a_link_bound_step_keeps_n_and_says_so():
    # 400 ms of link per row: k only moves C + S (80 - k ms) against 2 L = 800 ms: under 5 % at best.
    s = suggest(calls(link=400.0), rows_setup())
    assert s is not None and not s.changed and s.best is s.current
    assert s.current.bound == "link"
    assert s.line().startswith("n_blocks_remote 16 stays: client 96 ms, server 32 ms, link 800 ms per step")
    assert "the link bounds the step" in s.line()


def test_hysteresis_ignores_a_gain_under_the_threshold():
    near = suggest(calls(front=28.0, server=26.0), rows_setup(n=26))  # 1 ms a block each side... at 26 of 40
    assert near is not None
    # C(k) = 2 (40 - k), S(k) = k again (28 ms / 14 blocks, 26 ms / 26 blocks): 27 is 2.3 % faster only
    assert near.current.step_ms == pytest.approx(87.0)
    assert not near.changed and "no n in 1..40 is 5% faster" in near.line()
    eager = suggest(calls(front=28.0, server=26.0), rows_setup(n=26), min_gain=0.0)
    assert eager is not None and eager.best.n == 27


def test_equal_estimates_keep_the_nearest_n():
    # Serial, both sides 1 ms a block: every k costs the same; nothing to gain, nothing suggested.
    s = suggest(calls(front=24.0, server=16.0), rows_setup(mode="serial", rows=1), min_gain=0.0)
    assert s is not None and s.best.n == 16


def test_one_row_in_flight_paces_at_the_link_and_server_together():
    two = estimate(typical(calls()), rows_setup(), 30)  # C 20, L 5, S 30: pace max(C, L, S) = 30
    one = estimate(typical(calls()), rows_setup(lanes=1), 30)  # pace max(C, L + S) = 35
    assert two.step_ms == pytest.approx(20 + 5 + 30 + 30)
    assert one.step_ms == pytest.approx(20 + 5 + 30 + 35)


def test_coding_and_the_link_do_not_move_with_n():
    t = typical(calls(coding=3.0, server_coding=2.0))
    a, b = estimate(t, rows_setup(mode="serial", rows=1), 10), estimate(t, rows_setup(mode="serial", rows=1), 30)
    assert a.client_ms == pytest.approx(2 * 30 + 3) and b.client_ms == pytest.approx(2 * 10 + 3)
    assert a.server_ms == pytest.approx(10 + 2) and b.server_ms == pytest.approx(30 + 2)
    assert a.link_ms == b.link_ms == 5.0


def test_every_block_remote_spreads_nothing_over_no_local_blocks():
    # n == total: the front half is the embedders alone (kept), a block moved back costs what it does there.
    t = typical(calls(front=4.0, server=40.0))
    e = estimate(t, rows_setup(n=40, mode="serial", rows=1), 30)
    assert e.client_ms == pytest.approx(4.0 + 10 * 1.0) and e.server_ms == pytest.approx(30.0)


def test_the_first_call_is_left_out_and_too_few_calls_suggest_nothing():
    warm = CallTiming(front_ms=900.0, coding_ms=50.0, server_ms=700.0, server_coding_ms=9.0, link_ms=300.0)
    t = typical([warm, *calls(n=2)])
    assert (t.front_ms, t.server_ms, t.link_ms) == (48.0, 16.0, 5.0)
    assert typical([warm, *calls(n=1)]).front_ms == pytest.approx((900 + 48) / 2)  # two calls: both count
    assert suggest(calls(n=1), rows_setup()) is None
    with pytest.raises(LocalError, match="no remote calls"):
        typical([])


def test_the_report_is_json_with_the_line():
    import json

    s = suggest(calls(), rows_setup())
    assert s is not None
    rep = json.loads(json.dumps(s.report()))
    assert rep["current"] == 16 and rep["suggested"] == 27 and rep["changed"] is True and rep["mode"] == "rows"
    assert rep["step_s"] == pytest.approx(0.117) and rep["new_step_s"] == pytest.approx(0.085)
    assert rep["bound"] == "client" and rep["calls"] == 3 and rep["text"] == s.line()


@pytest.mark.parametrize(
    "over, match",
    [({"n": 0}, "outside 1..40"), ({"n": 41}, "outside"), ({"hi": 41}, "not within"), ({"lo": 5, "hi": 4}, "not within"),
     ({"mode": "both"}, "not a schedule"), ({"rows": 0}, "not a schedule")],
)  # fmt: skip
def test_a_setup_that_cannot_be_is_refused(over, match):
    with pytest.raises(LocalError, match=match):
        rows_setup(**over)


def test_balance_imports_neither_torch_nor_comfy():
    import ast
    from pathlib import Path

    from comfyui_mesh import balance

    tree = ast.parse(Path(balance.__file__).read_text())
    names = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    names |= {n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    assert not {x.split(".")[0] for x in names} & {"torch", "comfy", "numpy"}, names
