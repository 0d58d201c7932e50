"""Short runs of the fuzz and soak tools (bench/fuzz_server.py, bench/soak.py; issue 14 item 8) against
a real Daedalus subprocess (toy back half, CPU): no crash, hang, traceback or wrong answer. The long runs
and their figures are in docs/BENCHMARKS.md."""

from __future__ import annotations

import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench"


@pytest.fixture(scope="module")
def tools():
    sys.path.insert(0, str(BENCH))
    try:
        import fuzz_server
        import serverproc
        import soak

        yield SimpleNamespace(fuzz=fuzz_server, soak=soak, proc=serverproc)
    finally:
        sys.path.remove(str(BENCH))


def test_fuzz_short_run_finds_nothing(tools):
    r = tools.fuzz.run(frames=1500, procs=0, threads=3, hang_s=30.0)
    assert r["frames"] == 1500 and r["pre_auth"] and r["post_auth"]
    assert r["crashes"] == 0, r["server_tail"]
    assert r["hangs"] == 0, (r["probe_failures"], r["findings"])
    assert r["tracebacks"] == 0, (r["traceback_kinds"], r["server_tail"])
    assert r["forward_failed"] == 0, r["findings"]
    assert not r["rss_over_budget"], (r["rss_peak_mb"], r["rss_budget_mb"])
    assert r["probes"] > 0
    # the mutants reached the server's frame decoder, its handshake and its codecs, and valid ones were served
    for reply in ("error:bad_frame", "error:bad_request", "error:auth_failed", "Result", "Welcome"):
        assert r["replies"].get(reply, 0) > 0, r["replies"]


def test_soak_short_run_answers_right(tools):
    r = tools.soak.run(clients=3, steps=20, gen_steps=8)
    assert r["server_alive"] and r["tracebacks"] == 0
    assert r["errors"] == 0, [c["first_errors"] for c in r["per_client"]]
    assert r["answers"] == 60 and r["wrong"] == 0
    assert [c["codec"] for c in r["per_client"]] == ["raw", "lossless", "lossless-t"]


def test_soak_check_catches_a_server_with_other_weights(tools):
    # the answer check can fail: a back half with other weights (same arch and blocks) gives wrong answers
    from comfyui_mesh.config import ServerConfig
    from comfyui_mesh.server.core import DaedalusServer, ServerState
    from comfyui_mesh.server.toy import ToyBackend

    token = "ab" * 32
    srv = DaedalusServer(
        ServerState(ServerConfig(port=0, device="cpu", n_blocks=3), lambda n: ToyBackend(n, seed=1), token=token)
    )
    srv.start()
    try:
        r = tools.soak.client_run(0, SimpleNamespace(address=srv.address, token=token), "quant", "raw", 4, 2, 1e-5)
    finally:
        srv.shutdown()
    assert r["errors"] == 0 and r["answers"] == 4 and r["wrong"] == 4


def test_traceback_scan_counts_each_and_names_its_exception(tools, tmp_path):
    p = tools.proc.ServerProc.__new__(tools.proc.ServerProc)
    p.out_path, p.err_path = tmp_path / "out", tmp_path / "err"
    p.out_path.write_text(
        "[daedalus] step 1\nTraceback (most recent call last):\n  File x\n    y\nKeyError: 'x'\n"
        "Traceback (most recent call last):\n  File z\nValueError: bad\n"
    )
    p.err_path.write_text("Traceback (most recent call last):\n  File q\nKeyError: 'x'\n")
    n, kinds = p.tracebacks()
    assert n == 3 and kinds == ["KeyError: 'x' (x2)", "ValueError: bad (x1)"]
