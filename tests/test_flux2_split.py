"""FLUX.2 split through a real Daedalus process, with ComfyUI's own model classes (CPU).

Skipped without COMFYUI_PATH. One server process serves every case; ``reconfigure``
moves the cut, which also exercises the server's in-process reload.
"""

from __future__ import annotations

import pytest
import torch
from comfy_support import Daedalus, import_comfy, make_flux2, needs_comfy, needs_narrow_flux2, split
from comfyui_mesh import codec

pytestmark = [needs_comfy, needs_narrow_flux2]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    d = tmp_path_factory.mktemp("flux2")
    weights = make_flux2(d / "tiny_flux2.safetensors", seed=0)
    other = make_flux2(d / "other_flux2.safetensors", seed=1)
    comfy = import_comfy()
    __import__("comfy.sample")

    srv = Daedalus(weights, 3, d / "state")
    yield comfy, weights, other, srv
    srv.stop()


def sample(comfy, model, cfg=2.5, steps=3):
    noise = torch.randn(1, 128, 4, 6, generator=torch.Generator().manual_seed(1))
    pos = [[torch.randn(1, 7, 64, generator=torch.Generator().manual_seed(2)), {}]]
    neg = [[torch.randn(1, 7, 64, generator=torch.Generator().manual_seed(3)), {}]]
    return comfy.sample.sample(model, noise, steps, cfg, "euler", "simple", pos, neg, torch.zeros(1, 128, 4, 6), seed=0)


@pytest.mark.parametrize("n", [1, 3, 4, 5])  # one single, all singles, into the doubles, every block
def test_raw_split_is_bit_identical_with_cfg(setup, n):
    comfy, weights, _, srv = setup
    model = comfy.sd.load_diffusion_model(str(weights))
    ref = sample(comfy, model)
    m, run = split(model, srv, n)
    out = sample(comfy, m)
    assert run.calls == 3
    assert torch.equal(out, ref), f"max diff {(out - ref).abs().max()}"
    # The seam state went over the wire, the constants only on the first call.
    assert run.last_stats is not None and run.last_stats.consts_sent == 0


@pytest.mark.parametrize("name", ["raw", "lossless", "lossless-t"])
def test_streamed_split_is_bit_identical(setup, name):
    """Seam tensors cut into token slabs (docs/PROTOCOL.md §6.1): the same sample as unsplit, bit for bit."""
    comfy, weights, _, srv = setup
    model = comfy.sd.load_diffusion_model(str(weights))
    ref = sample(comfy, model)
    stats: list = []
    m, run = split(
        model,
        srv,
        3,
        codec=name,
        stats=stats,
        stream_slab_bytes=1 << 10,
        stream_min_bytes=0,
        stream_plan="fixed",
        samehost=False,
    )  # over TCP: a same-host session does not stream
    out = sample(comfy, m)
    assert run.calls == 3 and all(s.slabs_out >= 2 for s in stats), [s.slabs_out for s in stats]
    assert torch.equal(out, ref), f"{name}: max diff {(out - ref).abs().max()}"


def test_int8_within_tolerance(setup):
    comfy, weights, _, srv = setup
    model = comfy.sd.load_diffusion_model(str(weights))
    ref = sample(comfy, model)
    m, _ = split(model, srv, 4, codec="int8")
    out = sample(comfy, m)
    # Stated budget: int8 per-channel at the seam keeps the 3-step sample within 1% relative L2.
    rel = ((out - ref).norm() / ref.norm()).item()
    assert 0 < rel < 1e-2, rel


# Stated budgets: relative L2 of the 3-step sample vs unsplit (tiny random model, CFG 2.5, whose few
# tokens make 8-bit HEVC tiles and 4-bit groups coarse); lossless codecs exact. ``auto`` may pick an
# exact codec on a fast link (loopback), so it may also be exact.
LOSSY_BUDGET = {"int8": 1e-2, "quant": 5e-2, "quant-t": 5e-2, "auto": 5e-2, "q4": 1.5e-1, "clip-sparse": 1e-2,
                "nvenc": 1.5e-1, "hevc-orig": 1e-1}  # fmt: skip


@pytest.mark.parametrize("name", sorted(c.name for c in codec.CODECS.values()))
def test_every_codec_end_to_end_through_the_split(setup, name):
    c = codec.by_name(name)
    why = c.available()
    if why:
        pytest.skip(f"codec {name} unavailable here: {why}")
    comfy, weights, _, srv = setup
    model = comfy.sd.load_diffusion_model(str(weights))
    ref = sample(comfy, model)
    m, run = split(model, srv, 3, codec=name)
    out = sample(comfy, m)
    assert run.calls == 3
    if c.lossless:
        assert torch.equal(out, ref), f"{name}: max diff {(out - ref).abs().max()}"
    else:
        rel = ((out - ref).norm() / ref.norm()).item()
        assert (0 if name == "auto" else 1e-9) <= rel < LOSSY_BUDGET[name], f"{name}: relative L2 {rel}"


def test_raising_and_lowering_n_without_restart_leaves_the_input_model_intact(setup):
    comfy, weights, _, srv = setup
    model = comfy.sd.load_diffusion_model(str(weights))
    ref = sample(comfy, model)
    for n in (5, 2, 4):
        m, _ = split(model, srv, n)
        assert torch.equal(sample(comfy, m), ref)
    assert torch.equal(sample(comfy, model), ref), "the unsplit input MODEL must be unaffected"
    assert sum(1 for _ in model.model.diffusion_model.single_blocks[2].parameters()) > 0


def test_model_moved_outside_inference_mode_keeps_its_fingerprint(setup):
    # ComfyUI loads under inference_mode and moves weights (GPU and back) outside it; such
    # parameters refuse views, and the fingerprint once read them as unknown: a false mismatch.
    comfy, weights, _, srv = setup
    with torch.inference_mode():
        model = comfy.sd.load_diffusion_model(str(weights))
    _, fresh = split(comfy.sd.load_diffusion_model(str(weights)), srv, 3)
    model.model.to(torch.float64)  # Module.to() outside inference mode, as an unload does
    model.model.to(torch.float32)
    _, run = split(model, srv, 3)  # connect() raises VersionMismatch on a fingerprint mismatch
    assert run.fingerprint == fresh.fingerprint


def test_seam_dump_debug_option_writes_what_codec_bench_reads(setup, tmp_path, monkeypatch):
    import importlib.util
    import sys
    from pathlib import Path

    from comfyui_mesh.constants import SEAM_DUMP_ENV

    comfy, weights, _, srv = setup
    monkeypatch.setenv(SEAM_DUMP_ENV, str(tmp_path / "dump" / "seam"))
    model = comfy.sd.load_diffusion_model(str(weights))
    m, run = split(model, srv, 3)
    sample(comfy, m)
    files = sorted((tmp_path / "dump").glob("seam-x-*.safetensors"))
    assert [f.name for f in files] == [f"seam-x-{i:04d}.safetensors" for i in range(run.calls)]
    spec = importlib.util.spec_from_file_location("codec_bench", Path(__file__).parents[1] / "bench" / "codec_bench.py")
    bench = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "codec_bench", bench)  # dataclasses look their module up
    spec.loader.exec_module(bench)
    steps = bench.load_steps(str(tmp_path / "dump" / "seam-x-*.safetensors"))
    assert len(steps) == run.calls and steps[0].ndim == 3 and steps[0].shape[0] == 2  # CFG: 2 rows


def test_remote_weights_leave_the_client(setup):
    comfy, weights, _, srv = setup
    model = comfy.sd.load_diffusion_model(str(weights))
    m, _ = split(model, srv, 4)
    sample(comfy, m, steps=1)
    assert m.model_size() < model.model_size()
    comfy.model_management.load_models_gpu([m])
    dm = m.model.diffusion_model
    assert sum(p.numel() for p in dm.single_blocks.parameters()) == 0
    assert sum(p.numel() for p in dm.double_blocks[1].parameters()) == 0
    assert sum(p.numel() for p in dm.double_blocks[0].parameters()) > 0


def test_other_checkpoint_is_refused_by_fingerprint(setup):
    from comfyui_mesh.errors import VersionMismatch

    comfy, _, other, srv = setup
    model = comfy.sd.load_diffusion_model(str(other))
    with pytest.raises(VersionMismatch, match="different back-half weights"):
        split(model, srv, 3)


def test_server_logged_steps(setup):
    *_, srv = setup
    steps = [ln for ln in srv.lines if " step " in ln]
    assert steps and "forward" in steps[-1] and "MB" in steps[-1]


def record_frames(monkeypatch, client):
    """Per remote call: (Forward.stream, frame type "i"/"p" of each coded tensor, or None when stateless)."""
    seen = []
    real = client._encode_coded

    def spy(coded, codec_name, codec_params, stream, stats):
        done = real(coded, codec_name, codec_params, stream, stats)
        seen.append((dict(stream or {}), [wt.meta.get("f") for wt in done.whole]))
        return done

    monkeypatch.setattr(client, "_encode_coded", spy)
    return seen


@pytest.mark.parametrize("name", ["lossless-t", "quant-t"])
def test_each_generation_starts_its_temporal_stream_with_a_keyframe(setup, monkeypatch, name):
    comfy, weights, _, srv = setup
    model = comfy.sd.load_diffusion_model(str(weights))
    ref = sample(comfy, model)
    m, run = split(model, srv, 3, codec=name)
    seen = record_frames(monkeypatch, run.client())
    outs = [sample(comfy, m), sample(comfy, m)]
    assert run.calls == 3 and run.generations == 2  # the counter starts again with every generation
    assert run.generation is None and run.client()._codec_state == {}  # closed: the stream state is dropped
    assert len(seen) == 6
    gens = [s["gen"] for s, _ in seen]
    assert gens[0] == gens[1] == gens[2] != gens[3] == gens[4] == gens[5] and gens[0] is not None
    assert all(sorted(s["cond"]) == [0, 1] for s, _ in seen)  # CFG: cond and uncond rows in one call
    frames = [f for _, fs in seen for f in fs]
    assert frames[0] == frames[3] == "i", frames  # every generation opens with a keyframe
    if name == "quant-t":  # (lossless-t codes intra whenever that is smaller, as on this tiny random model)
        assert frames == ["i", "p", "p", "i", "p", "p"], frames  # keyint 16: only a new generation restarts it
    for out in outs:
        if name == "lossless-t":
            assert torch.equal(out, ref), f"max diff {(out - ref).abs().max()}"
        else:
            assert ((out - ref).norm() / ref.norm()).item() < LOSSY_BUDGET["quant-t"]


@pytest.mark.parametrize("name", ["lossless-t", "quant-t"])
def test_cond_and_uncond_as_separate_calls_keep_separate_streams(setup, monkeypatch, name):
    comfy, weights, _, srv = setup
    # ComfyUI batches cond and uncond when memory allows; too little free memory makes it one row per call.
    monkeypatch.setattr(comfy.model_patcher.ModelPatcher, "get_free_memory", lambda *a, **k: 1)
    model = comfy.sd.load_diffusion_model(str(weights))
    ref = sample(comfy, model)  # unbatched too: a batch of one computes other float roundings than two
    m, run = split(model, srv, 3, codec=name)
    seen = record_frames(monkeypatch, run.client())
    out = sample(comfy, m)
    conds = [tuple(s["cond"]) for s, _ in seen]
    if len(seen) != 6 or set(conds) != {(0,), (1,)}:
        pytest.skip(f"this ComfyUI still batched cond and uncond: {conds}")
    if name == "lossless-t":
        assert torch.equal(out, ref), f"max diff {(out - ref).abs().max()}"
        return
    assert ((out - ref).norm() / ref.norm()).item() < LOSSY_BUDGET["quant-t"]
    first: set[tuple[int, ...]] = set()
    for (_, fs), c in zip(seen, conds, strict=True):
        assert fs == ["p" if c in first else "i"], (c, fs)  # each row's stream opens with its own keyframe
        first.add(c)


@pytest.mark.parametrize("codec_name", ["raw", "lossless"])
@pytest.mark.parametrize("path", ["samehost", "tcp"])
def test_bit_identical_through_each_path(setup, monkeypatch, path, codec_name):
    """Client and Daedalus share this host: the seam goes through shared memory (docs/PROTOCOL.md §11),
    or over TCP when the client turns the fast path off; both exact."""
    comfy, weights, _, srv = setup
    model = comfy.sd.load_diffusion_model(str(weights))
    ref = sample(comfy, model)
    monkeypatch.setenv("COMFYUI_MESH_SAMEHOST", "1" if path == "samehost" else "0")
    stats: list = []
    m, _ = split(model, srv, 3, codec=codec_name, stats=stats)
    assert torch.equal(sample(comfy, m), ref)
    assert stats and all(s.via == path for s in stats)
    if path == "samehost":
        assert all(s.bytes_out < 8192 for s in stats), [s.bytes_out for s in stats]
