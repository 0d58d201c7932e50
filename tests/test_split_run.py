"""icarus.SplitRun's per-generation scope (what the OUTER_SAMPLE wrapper opens and closes), no ComfyUI."""

from __future__ import annotations

import pytest
import torch
from comfyui_mesh import arch
from comfyui_mesh.config import ClientConfig
from comfyui_mesh.icarus import SplitRun, SplitSettings


class Client:
    def __init__(self):
        self.ended: list[str | None] = []  # the generations whose streams were ended

    def end_stream(self, gen=None):
        self.ended.append(gen)


def make_run(monkeypatch) -> tuple[SplitRun, Client]:
    adapter = arch.get("flux2")
    plan = adapter.plan({"double_blocks": 2, "single_blocks": 3}, 2)
    run = SplitRun(adapter, plan, SplitSettings(n_remote=2, client=ClientConfig()), "fp")
    client = Client()
    monkeypatch.setattr(run, "client", lambda: client)
    return run, client


def test_each_generation_gets_a_fresh_scope_and_closes_its_stream(monkeypatch):
    run, client = make_run(monkeypatch)
    seen = []

    def sampler(tag):
        seen.append((tag, run.generation, run.calls))
        run.calls += 3
        run.adapter_state["x"] = tag
        run.memo.tensor("pe", torch.ones(2))
        run._used.append(client)  # what seam_hook records for the client it sent to
        return tag

    assert run.outer_sample_wrapper(sampler, "a") == "a"
    assert run.outer_sample_wrapper(sampler, "b") == "b"
    (_, gen_a, calls_a), (_, gen_b, calls_b) = seen
    assert calls_a == calls_b == 0 and gen_a and gen_b and gen_a != gen_b
    assert run.generations == 2 and run.generation is None and client.ended == [gen_a, gen_b]
    assert run.adapter_state == {} and run.memo.tensor("pe", torch.ones(2)) is not None and run.memo.hits == 0


def test_a_failing_run_still_ends_its_stream_and_nested_runs_share_the_outer_scope(monkeypatch):
    run, client = make_run(monkeypatch)

    gens = []

    def inner():
        gens.append(run.generation)
        return run.outer_sample_wrapper(lambda: (run._used.append(client), run.generation == gens[0])[1])

    assert run.outer_sample_wrapper(inner) is True
    assert client.ended == gens and run.generations == 1  # ended once, by the outer run

    def boom():
        gens.append(run.generation)
        run._used.append(client)
        raise RuntimeError("interrupted")

    with pytest.raises(RuntimeError):
        run.outer_sample_wrapper(boom)
    assert client.ended == gens and run.generation is None


def test_stream_names_the_generation_and_the_cfg_rows(monkeypatch):
    run, _ = make_run(monkeypatch)
    run.begin_generation()
    opts = {"transformer_options": {"cond_or_uncond": [1, 0]}}
    assert run.stream(opts) == {"gen": run.generation, "cond": [1, 0]}
    assert run.stream({"transformer_options": {"cond_or_uncond": [0]}})["cond"] == [0]
    assert run.stream({}) == {"gen": run.generation, "cond": None}
    run.end_generation()
    assert run.stream(opts)["gen"] is None  # outside a generation (no OUTER_SAMPLE): one stream as before
