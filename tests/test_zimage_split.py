"""Z-Image (and Lumina 2) split through a real Daedalus process, with ComfyUI's own classes (CPU).

ComfyUI's detection knows a NextDiT only at its released widths, so the smallest loadable Z-Image is
3840 wide (tiny.ZIMAGE_TINY: 2 layers + the 4 refiner layers, ~1 B parameters): the model is loaded
once per module and sampled for 2 steps at a few tokens. Skipped without COMFYUI_PATH.
"""

from __future__ import annotations

import pytest
import torch
from comfy_support import Daedalus, check_lora_after_split, import_comfy, kohya_lora, needs_comfy, split

pytestmark = [needs_comfy]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from comfyui_mesh.tiny import make_zimage

    comfy = import_comfy()
    __import__("comfy.sample")
    d = tmp_path_factory.mktemp("zimage")
    weights = make_zimage(d / "tiny_zimage.safetensors", seed=0)
    srv = Daedalus(weights, 2, d / "state")
    model = comfy.sd.load_diffusion_model(str(weights))
    yield comfy, model, srv, weights
    srv.stop()


def sample(comfy, model, cfg=1.0, neg_txt=None):
    from comfyui_mesh.tiny import zimage_inputs

    i = zimage_inputs(neg_txt=neg_txt)
    return comfy.sample.sample(
        model, i["noise"], 2, cfg, "euler", "simple", i["positive"], i["negative"], i["latent_image"], seed=0
    )


def test_detected_as_zimage(setup):
    comfy, model, _, _ = setup
    assert type(model.model.model_config).__name__ == "ZImage"
    assert len(model.model.diffusion_model.noise_refiner) == 2 and len(model.model.diffusion_model.layers) == 2


# the last layer; every layer (the refiners stay local: they run first)
@pytest.mark.parametrize(("n", "codec"), [(1, "raw"), (2, "raw"), (2, "lossless")])
def test_turbo_split_is_bit_identical(setup, n, codec):
    comfy, model, srv, _ = setup
    ref = sample(comfy, model)
    m, run = split(model, srv, n, codec=codec)
    out = sample(comfy, m)
    assert run.calls == 2  # cfg 1 (Turbo): one call per step
    assert torch.equal(out, ref), f"max diff {(out - ref).abs().max()}"


def test_cfg_split_is_bit_identical(setup):
    """Z-Image Base samples with CFG. A negative prompt of another length (40 tokens: 64 once padded)
    keeps cond and uncond in separate model calls on both sides: whether ComfyUI batches equal-length
    ones depends on the free memory it sees, and a batched and an unbatched run differ in the last
    bits. (Batched CFG is covered by the Lumina 2 case.)"""
    comfy, model, srv, _ = setup
    ref = sample(comfy, model, cfg=4.0, neg_txt=40)
    m, run = split(model, srv, 2)
    out = sample(comfy, m, cfg=4.0, neg_txt=40)
    assert run.calls == 4
    assert torch.equal(out, ref), f"max diff {(out - ref).abs().max()}"


def test_int8_at_its_floor(setup):
    comfy, model, srv, _ = setup
    ref = sample(comfy, model)
    m, _ = split(model, srv, 2, codec="int8")
    out = sample(comfy, m)
    rel = ((out - ref).norm() / ref.norm()).item()
    assert 0 < rel < 1e-2, rel


def test_forwarded_lora_matches_unsplit(setup):
    from safetensors import safe_open

    comfy, model, srv, weights = setup  # the shared model, split by the tests before (issue #17)
    g = torch.Generator().manual_seed(7)
    lora = {}
    with safe_open(weights, framework="pt") as f:
        shapes = {k: f.get_slice(k).get_shape() for k in f.keys()}
    for layer in ("layers.0.attention.qkv", "layers.1.attention.qkv", "layers.1.feed_forward.w2", "final_layer.linear"):
        out_f, in_f = shapes[f"{layer}.weight"]
        name = "lora_unet_" + layer.replace(".", "_")  # Kohya names: every release maps them
        lora[f"{name}.lora_up.weight"] = 0.02 * torch.randn(out_f, 4, generator=g)
        lora[f"{name}.lora_down.weight"] = 0.02 * torch.randn(4, in_f, generator=g)
        lora[f"{name}.alpha"] = torch.tensor(2.0)
    patched = comfy.sd.load_lora_for_models(model, None, lora, 0.8, 0)[0]
    ref = sample(comfy, patched)
    assert not torch.equal(ref, sample(comfy, model)), "the LoRA must change the sample"
    m, run = split(patched, srv, 1)
    assert run.lora is not None
    out = sample(comfy, m)
    assert torch.equal(out, ref), f"max diff {(out - ref).abs().max()}"


def test_lora_on_the_original_after_a_split_run(setup):
    """A LoRA loaded onto the shared, unsplit model after a split run of it reaches every block (issue #17)."""
    comfy, model, srv, weights = setup
    lora = kohya_lora(weights, ["layers.0.attention.qkv", "layers.1.feed_forward.w2", "final_layer.linear"], 8, 0.02)
    check_lora_after_split(
        model, lambda: comfy.sd.load_diffusion_model(str(weights)), lambda m: sample(comfy, m), srv, 1, lora
    )


def test_per_layer_model_patches_are_refused(setup):
    """A model patch ComfyUI runs after every layer (Z-Image Fun ControlNet) cannot cross the split."""
    from comfyui_mesh.errors import LocalError

    comfy, model, srv, _ = setup
    m, _ = split(model, srv, 1)
    m = m.clone()
    m.set_model_double_block_patch(lambda args: {})
    with pytest.raises(LocalError, match="cannot cross the split"):
        sample(comfy, m)


def test_lumina2_uses_the_same_adapter(tmp_path):
    """Lumina 2 (2304 wide, grouped KV heads, no pad tokens) is the same class: split with CFG, bit-identical."""
    from comfyui_mesh.tiny import LUMINA2_TINY, make_zimage

    comfy = import_comfy()
    __import__("comfy.sample")
    weights = make_zimage(tmp_path / "tiny_lumina2.safetensors", seed=4, config=LUMINA2_TINY)
    srv = Daedalus(weights, 2, tmp_path / "state")
    try:
        model = comfy.sd.load_diffusion_model(str(weights))
        assert type(model.model.model_config).__name__ == "Lumina2"
        ref = sample(comfy, model, cfg=4.0)
        m, run = split(model, srv, 2)
        out = sample(comfy, m, cfg=4.0)
        assert run.calls == 2
        assert torch.equal(out, ref), f"max diff {(out - ref).abs().max()}"
    finally:
        srv.stop()
