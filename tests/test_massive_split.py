"""Splits of tiny random models with PLANTED massive activations (``tiny.plant_massive``), as
trained FLUX.2 / LTX-AV checkpoints carry them: the seam really has them, raw stays bit-identical,
and the lossy codecs keep every seam channel above their floor, so the split output stays close.

Needs ComfyUI (COMFYUI_PATH); the LTX-AV part needs a ComfyUI with LTX-AV (0.8.0 or newer).
"""

from __future__ import annotations

import torch
from comfy_ltx_support import load, ltx_sample, make_ltx, needs_ltxav
from comfy_support import Daedalus, import_comfy, make_flux2, needs_comfy, needs_narrow_flux2, split
from comfyui_mesh import codec
from comfyui_mesh.constants import SEAM_DUMP_ENV
from comfyui_mesh.tiny import massive_rows
from comfyui_mesh.wirecodecs.fidelity import channel_snr_db, snr_from_cosine

MASSIVE = 4
GAIN = 100.0


def seam_tensors(tmp_path, stream):
    from safetensors.torch import load_file

    files = sorted(tmp_path.glob(f"seam-{stream}-*.safetensors"))
    assert files, f"no seam dumps for stream {stream}"
    return [t for f in files for t in load_file(str(f)).values()]


def assert_massive(seam, hidden):
    """The planted channels are hundreds of times the median channel's spread, on every token."""
    x = seam.float().reshape(-1, seam.shape[-1])
    std = x.std(0)
    rows = massive_rows(hidden, MASSIVE)
    assert float(std[rows].min()) > 20 * float(std.median()), (std[rows], std.median())


def assert_floor(seam, name, floor):
    """Coding the captured seam keeps every channel at or above the codec's floor."""
    wt = codec.encode(seam, "x", name, {"cosine": 0.999})
    y = codec.decode(wt, "cpu")
    assert float(channel_snr_db(seam, y).nan_to_num(nan=99.0).min()) >= floor


FLOORS = {"quant": snr_from_cosine(0.999), "q4": 15.0, "clip-sparse": 25.0}


@needs_comfy
@needs_narrow_flux2
def test_flux2_with_massive_channels(tmp_path, monkeypatch):
    comfy = import_comfy()
    __import__("comfy.sample")
    weights = make_flux2(tmp_path / "massive_flux2.safetensors", massive=MASSIVE, massive_gain=GAIN)
    srv = Daedalus(weights, 3, tmp_path / "state")
    try:
        model = comfy.sd.load_diffusion_model(str(weights))
        noise = torch.randn(1, 128, 4, 6, generator=torch.Generator().manual_seed(1))
        pos = [[torch.randn(1, 7, 64, generator=torch.Generator().manual_seed(2)), {}]]
        neg = [[torch.randn(1, 7, 64, generator=torch.Generator().manual_seed(3)), {}]]

        def sample(m):
            return comfy.sample.sample(m, noise, 3, 2.5, "euler", "simple", pos, neg, torch.zeros(1, 128, 4, 6), seed=0)

        ref = sample(model)
        monkeypatch.setenv(SEAM_DUMP_ENV, str(tmp_path / "seam"))
        m, _ = split(model, srv, 3, "raw")
        assert torch.equal(sample(m), ref)  # planted or not, raw is bit-identical
        monkeypatch.delenv(SEAM_DUMP_ENV)
        seams = seam_tensors(tmp_path, "x")
        hidden = seams[0].shape[-1]
        for s in seams:
            assert_massive(s, hidden)
            for name, floor in FLOORS.items():
                assert_floor(s, name, floor)
        for name in ("quant", "quant-t"):
            m, _ = split(model, srv, 3, name)
            out = sample(m)
            rel = float((out - ref).norm() / ref.norm())
            assert 0 < rel < 5e-2, f"{name}: relative L2 {rel}"
    finally:
        srv.stop()


@needs_ltxav
def test_ltxav_with_massive_channels_in_both_streams(tmp_path, monkeypatch):
    comfy = import_comfy()
    __import__("comfy.sample")
    weights = make_ltx(tmp_path / "massive_ltx.safetensors", massive=MASSIVE, massive_gain=GAIN)
    srv = Daedalus(weights, 2, tmp_path / "state")
    try:
        ref = ltx_sample(comfy, load(comfy, weights), "ltx2", audio=5)
        monkeypatch.setenv(SEAM_DUMP_ENV, str(tmp_path / "seam"))
        m, _ = split(load(comfy, weights), srv, 2, "raw")
        out = ltx_sample(comfy, m, "ltx2", audio=5)
        assert all(torch.equal(o, r) for o, r in zip(out, ref, strict=True))
        monkeypatch.delenv(SEAM_DUMP_ENV)
        for stream in ("vx", "ax"):
            seams = seam_tensors(tmp_path, stream)
            for s in seams:
                assert_massive(s, s.shape[-1])
                assert_floor(s, "quant", FLOORS["quant"])
        m, _ = split(load(comfy, weights), srv, 2, "quant-t")
        out = ltx_sample(comfy, m, "ltx2", audio=5)
        for o, r in zip(out, ref, strict=True):
            assert 0 < float((o - r).norm() / r.norm()) < 8e-2
    finally:
        srv.stop()
