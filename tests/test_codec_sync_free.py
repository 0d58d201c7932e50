"""The quant codecs' GPU paths without host round trips (``channels.sync_free``) code exactly what the
CPU paths do: run here on the CPU with the switch forced, byte for byte against the default paths."""

from __future__ import annotations

import pytest
import torch
from comfyui_mesh import codec
from comfyui_mesh.wirecodecs import channels, quant
from comfyui_mesh.wirecodecs.base import run_stages
from comfyui_mesh.wirecodecs.fidelity import channel_snr_db


def _seam(seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, 700, 256, generator=g)
    x[..., 3] = x[..., 3] * 400 + 90  # a massive channel
    x[..., 9] *= 1e-9  # a constant one
    x[..., 10:40] = torch.randint(0, 3, (1, 700, 30), generator=g).float()  # lumpy: these miss and requantize
    ramp = torch.linspace(-30, 30, 700)[None, :, None]
    x[..., 40:80] = ramp * torch.rand(1, 1, 40, generator=g) + 0.01 * x[..., 40:80]  # smooth: delta-coded rows
    x[0, 5, 7] = float("inf")
    x[0, 6, 8] = float("nan")
    return x.to(torch.bfloat16)


def _frames(name: str, monkeypatch: pytest.MonkeyPatch, forced: bool) -> list[tuple[bytes, dict]]:
    with monkeypatch.context() as m:
        if forced:
            m.setattr(channels, "sync_free", lambda t: True)
        state: dict = {}
        x = _seam()
        out = []
        for k in range(3):  # a keyframe, then P-frames for the temporal codec
            wt = codec.encode((x.float() * (1 + 0.01 * k)).to(torch.bfloat16), "x", name, {"backend": "zstd"}, state)
            meta = dict(wt.meta)
            meta.pop("g", None)  # a temporal codec's GOP id is random
            out.append((bytes(wt.data), meta))
        return out


@pytest.mark.parametrize("name", ["quant", "quant-t"])
def test_sync_free_paths_code_the_same_bytes(name, monkeypatch):
    assert _frames(name, monkeypatch, forced=True) == _frames(name, monkeypatch, forced=False)


def test_the_seam_exercises_every_sync_free_branch(monkeypatch):
    """Rows are delta-coded, non-finite values are replaced, channels miss their floor and are
    requantized: the equality above covers those branches, not only the common path."""
    z = channels.channel_major(_seam())
    assert bool(torch.isfinite(z).all())
    mu, var = quant.centered_var(z)
    _, scales, q, _ = run_stages(quant.staged_standardized_steps(z.clone(), var, 27.0, mu, None, torch.bfloat16))
    live = var.sqrt() >= quant.MIN_CHANNEL_STD
    first = var.sqrt().float().to(torch.bfloat16)
    assert int(((scales != first) & live).sum()) > 0, "no channel was requantized"
    sym = q.to(torch.int32)
    s = max(1, (sym.shape[1] - 1) // quant.SAMPLE_PAIRS)
    a, b = sym[:, 0 : sym.shape[1] - 1 : s], sym[:, 1::s]
    assert bool(((b - a).abs().sum(1) * 20 < b.abs().sum(1) * 19).any()), "no row is delta-coded"


@pytest.mark.parametrize("name", ["quant", "quant-t"])
def test_sync_free_paths_keep_every_channel_floor(name, monkeypatch):
    monkeypatch.setattr(channels, "sync_free", lambda t: True)
    x = _seam(1)
    x[0, 5, 7] = 0.0
    x[0, 6, 8] = 0.0
    wt = codec.encode(x, "x", name, {"backend": "zstd"}, {})
    y = codec.decode(wt, "cpu", {})
    snr = channel_snr_db(x.float(), y.float())
    assert float(snr[torch.isfinite(snr)].min()) >= 27.0 - 1e-6


@pytest.mark.parametrize("name", ["quant", "quant-t"])
def test_the_first_stage_queues_without_a_host_round_trip(name, monkeypatch):
    """``staged_encode``'s first stage only queues work: with a GPU, CUDA's sync debug mode raises at a
    host round trip inside it; without one (the switch forced) the stages still code frames that
    decode within the floor, a P-frame too."""
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    if dev == "cpu":
        monkeypatch.setattr(channels, "sync_free", lambda t: True)
    x = _seam(2).to(dev)
    x[0, 5, 7] = 0.0
    x[0, 6, 8] = 0.0
    params = {"backend": "ans" if dev == "cuda" and codec.by_name("quant").available() is None else "zstd"}
    codec.encode(x, "warm-up", name, params, {})  # a process's first call makes its small constants (a copy)
    enc_state: dict = {}
    dec_state: dict = {}
    for k in range(2):
        y = (x.float() * (1 + 0.01 * k)).to(torch.bfloat16)
        gen = codec.staged_encode(y, "x", name, params, enc_state)
        if dev == "cuda":
            torch.cuda.synchronize()
            torch.cuda.set_sync_debug_mode("error")
        try:
            next(gen)
        finally:
            if dev == "cuda":
                torch.cuda.set_sync_debug_mode("default")
        wt = run_stages(gen)
        if name == "quant-t":
            assert wt.meta["f"] == ("i" if k == 0 else "p")
        back = codec.decode(wt, dev, dec_state)
        snr = channel_snr_db(y.float().cpu(), back.float().cpu())
        assert float(snr[torch.isfinite(snr)].min()) >= 27.0 - 1e-6


def test_auto_stages_the_codec_it_picks():
    """``auto`` resolves its codec when called and hands over that codec's stages: the staged and the
    one-go payloads are the chosen codec's, and decode alike."""
    x = _seam(3)
    x[0, 5, 7] = 0.0
    x[0, 6, 8] = 0.0
    params = {"link_bps": 125e6, "backend": "zstd"}
    gen = codec.staged_encode(x, "x", "auto", params, {})
    next(gen)
    staged = run_stages(gen)
    whole = codec.encode(x, "x", "auto", params, {})
    assert staged.codec == whole.codec != codec.by_name("auto").wire_id
    assert torch.equal(codec.decode(staged, "cpu", {}), codec.decode(whole, "cpu", {}))
