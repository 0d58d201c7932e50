"""FLUX.1 split through a real Daedalus process, with ComfyUI's own model classes (CPU).

Tiny random FLUX.1 dev (guidance embedding, pooled text ``y``) and schnell checkpoints (tiny.py),
split at one single block, all singles, into the doubles and at every block: raw and lossless are
bit-identical to the unsplit model with CFG, with a Kontext reference image too; a LoRA loaded before
Icarus is forwarded; the quant codec keeps every seam channel above its floor. Skipped without
COMFYUI_PATH; also runs against the oldest supported checkout (ComfyUI 0.3.75, no ``img_slice``).
"""

from __future__ import annotations

import pytest
import torch
from comfy_support import NARROW_FLUX1, Daedalus, check_lora_after_split, import_comfy, kohya_lora, needs_comfy, split

H = 256  # tiny.FLUX1_TINY width


pytestmark = [needs_comfy]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from comfyui_mesh import tiny

    if not NARROW_FLUX1:
        pytest.skip("this ComfyUI detects FLUX.1 only at the released width (24 heads)")
    d = tmp_path_factory.mktemp("flux1")
    comfy = import_comfy()
    __import__("comfy.sample")
    weights = tiny.make_flux1(d / "tiny_flux1_dev.safetensors", seed=0)
    srv = Daedalus(weights, 3, d / "state")
    yield comfy, weights, srv, d
    srv.stop()


def sample(comfy, model, cfg=2.0, steps=2, **inputs):
    from comfyui_mesh import tiny

    i = tiny.flux1_inputs(**inputs)
    return comfy.sample.sample(model, i["noise"], steps, cfg, "euler", "simple", i["positive"], i["negative"],
                               i["latent_image"], seed=0, disable_pbar=True)  # fmt: skip


def load(comfy, weights):
    return comfy.sd.load_diffusion_model(str(weights))


def test_detected_as_flux1_on_both_sides(setup):
    from comfyui_mesh import arch
    from safetensors import safe_open

    comfy, weights, srv, _ = setup
    with safe_open(str(weights), "pt") as f:
        keys = set(f.keys())
    assert arch.for_keys(keys).family == "flux1"
    model = load(comfy, weights)
    assert arch.for_model(model.model.diffusion_model).family == "flux1"
    assert model.model.diffusion_model.params.guidance_embed  # dev
    assert any("FLUX.1" in ln for ln in srv.lines), srv.log()


# one single block, all singles, into the doubles, every block (2 double + 3 single)
@pytest.mark.parametrize("n", [1, 3, 4, 5])
def test_dev_raw_split_is_bit_identical_with_guidance_and_cfg(setup, n):
    comfy, weights, srv, _ = setup
    model = load(comfy, weights)
    ref = sample(comfy, model)
    m, run = split(model, srv, n)
    out = sample(comfy, m)
    assert run.calls == 2 and run.plan.n_remote == n
    assert torch.equal(out, ref), f"n={n}: max diff {(out - ref).abs().max()}"
    assert run.last_stats is not None and run.last_stats.consts_sent == 0  # pe went once per generation
    if n != 5:
        return
    # the guidance value reaches the remote blocks: another guidance gives another sample
    other = sample(comfy, m, guidance=6.0)
    assert not torch.equal(other, out)
    assert torch.equal(other, sample(comfy, model, guidance=6.0))


@pytest.mark.parametrize("n", [2, 4, 5])
def test_kontext_reference_image_is_bit_identical(setup, n):
    comfy, weights, srv, _ = setup
    model = load(comfy, weights)
    ref = sample(comfy, model, ref=(4, 4))
    assert not torch.equal(ref, sample(comfy, model)), "the reference latent must change the sample"
    seen: list = []
    m, run = split(model, srv, n)
    client = run.client()
    real = client.forward

    def spy(**kw):
        seen.append((dict(kw["scalars"]), {k: tuple(v.shape) for k, v in kw["coded"].items()}))
        return real(**kw)

    client.forward = spy
    try:
        out = sample(comfy, m, ref=(4, 4))
    finally:
        del client.forward
    assert torch.equal(out, ref), f"n={n}: max diff {(out - ref).abs().max()}"
    # the 4 reference tokens (4x4 latent, patch 2) cross with the seam state; only the 6 main ones come back
    scalars, shapes = seen[0]
    assert scalars["img_len"] == 6
    tokens = shapes["img"][1] if "img" in shapes else shapes["x"][1] - scalars["txt_len"]
    assert tokens == 6 + 4


@pytest.mark.parametrize("name", ["lossless", "lossless-t"])
def test_lossless_codecs_are_bit_identical(setup, name):
    comfy, weights, srv, _ = setup
    model = load(comfy, weights)
    ref = sample(comfy, model)
    m, _ = split(model, srv, 5, codec=name)
    assert torch.equal(sample(comfy, m), ref)


def test_quant_at_its_floor(setup, tmp_path, monkeypatch):
    """quant keeps every seam channel at or above its per-channel floor (27 dB by default), so the
    2-step sample stays within 5% relative L2 of the unsplit one."""
    from comfyui_mesh import codec
    from comfyui_mesh.constants import DEFAULT_SNR_DB, SEAM_DUMP_ENV
    from comfyui_mesh.wirecodecs.fidelity import channel_snr_db
    from safetensors.torch import load_file

    comfy, weights, srv, _ = setup
    model = load(comfy, weights)
    ref = sample(comfy, model)
    monkeypatch.setenv(SEAM_DUMP_ENV, str(tmp_path / "seam"))
    m, _ = split(model, srv, 3, codec="quant")
    out = sample(comfy, m)
    rel = ((out - ref).norm() / ref.norm()).item()
    assert 0 < rel < 5e-2, rel
    seams = [t for f in sorted(tmp_path.glob("seam-x-*.safetensors")) for t in load_file(str(f)).values()]
    assert len(seams) == 2
    for seam in seams:
        y = codec.decode(codec.encode(seam, "x", "quant", {}), "cpu")
        assert float(channel_snr_db(seam, y).nan_to_num(nan=99.0).min()) >= DEFAULT_SNR_DB - 1e-6


def lora(seed: int = 7, scale: float = 0.05) -> dict[str, torch.Tensor]:
    """A LoRA on remote blocks (n=4: all singles + double 1, with its modulation) and one local layer."""
    g = torch.Generator().manual_seed(seed)
    layers = {"single_blocks.2.linear1": (7 * H, H), "double_blocks.1.img_mod.lin": (6 * H, H),
              "final_layer.adaLN_modulation.1": (2 * H, H), "double_blocks.0.img_attn.qkv": (3 * H, H)}  # fmt: skip
    out = {}
    for name, (o, i) in layers.items():
        x = "diffusion_model." + name
        out[f"{x}.lora_up.weight"] = torch.randn(o, 4, generator=g) * scale
        out[f"{x}.lora_down.weight"] = torch.randn(4, i, generator=g) * scale
        out[f"{x}.alpha"] = torch.tensor(2.0)
    return out


def test_forwarded_lora_is_bit_identical(setup):
    comfy, weights, srv, _ = setup
    model = comfy.sd.load_lora_for_models(load(comfy, weights), None, lora(), 0.8, 0)[0]
    ref = sample(comfy, model)
    assert not torch.equal(ref, sample(comfy, load(comfy, weights)))
    m, run = split(model, srv, 4)
    assert run.lora is not None
    assert torch.equal(sample(comfy, m), ref)


def test_lora_on_the_original_after_a_split_run(setup):
    """A LoRA loaded onto the unsplit MODEL after a split run of it reaches every block (issue #17)."""
    comfy, weights, srv, _ = setup
    layers = [
        "single_blocks.2.linear1",
        "double_blocks.1.img_mod.lin",
        "final_layer.linear",
        "double_blocks.0.img_attn.qkv",
    ]
    check_lora_after_split(
        load(comfy, weights),
        lambda: load(comfy, weights),
        lambda m: sample(comfy, m),
        srv,
        4,
        kohya_lora(weights, layers, 8),
    )


def test_schnell_split_at_every_block_is_bit_identical(setup):
    from comfyui_mesh import tiny

    comfy, _, _, d = setup
    weights = tiny.make_flux1(d / "tiny_flux1_schnell.safetensors", seed=3, config=tiny.FLUX1_SCHNELL_TINY)
    srv = Daedalus(weights, 5, d / "state_schnell")
    try:
        model = load(comfy, weights)
        assert not model.model.diffusion_model.params.guidance_embed
        ref = sample(comfy, model, cfg=1.0, guidance=None)
        m, run = split(model, srv, 5)
        assert torch.equal(sample(comfy, m, cfg=1.0, guidance=None), ref)
        assert run.calls == 2
    finally:
        srv.stop()


@pytest.mark.skipif(NARROW_FLUX1, reason="this ComfyUI loads narrow FLUX.1 models: the tests above cover it")
def test_dev_width_split_on_releases_that_detect_released_widths(tmp_path):
    """ComfyUI < 0.9: a 3072-wide FLUX.1 dev, 1 double + 1 single block (about 0.5 B parameters, bf16),
    split at every block and at the single one, with guidance, CFG and a Kontext reference image."""
    from comfyui_mesh import tiny

    comfy = import_comfy()
    __import__("comfy.sample")
    config = {**tiny.FLUX1_TINY, "hidden_size": 3072, "num_heads": 24, "depth": 1, "depth_single_blocks": 1}
    weights = tiny.make_flux1(tmp_path / "flux1_dev_width.safetensors", config=config, dtype=torch.bfloat16)
    srv = Daedalus(weights, 2, tmp_path / "state")
    try:
        model = load(comfy, weights)
        ref = sample(comfy, model, steps=1, ref=(2, 2))
        for n in (2, 1):
            m, run = split(model, srv, n)
            assert torch.equal(sample(comfy, m, steps=1, ref=(2, 2)), ref), f"n={n}"
            assert run.calls == 1
    finally:
        srv.stop()
