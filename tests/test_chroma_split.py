"""Chroma split through a real Daedalus process, with ComfyUI's own model classes (CPU).

A tiny random Chroma (tiny.py; loaded with ``tiny.load_chroma``, ComfyUI's detection with the
approximator widths read from the checkpoint, as Daedalus's loader reads them) split at one single
block, all singles, into the doubles and at every block: raw and lossless bit-identical to unsplit
with CFG; only the remote blocks' modulation rows cross; a forwarded LoRA; quant within budget; a
remote block the model skips is refused. Skipped without COMFYUI_PATH.
"""

from __future__ import annotations

import pytest
import torch
from comfy_support import (
    Daedalus,
    check_lora_after_split,
    import_comfy,
    kohya_lora,
    needs_comfy,
    needs_narrow_flux1,
    split,
)

pytestmark = [needs_comfy, needs_narrow_flux1]

H = 256  # tiny.CHROMA_TINY width


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from comfyui_mesh import tiny

    d = tmp_path_factory.mktemp("chroma")
    comfy = import_comfy()
    __import__("comfy.sample")
    weights = tiny.make_chroma(d / "tiny_chroma.safetensors", seed=0)
    srv = Daedalus(weights, 3, d / "state")
    yield comfy, weights, srv
    srv.stop()


def load(weights):
    from comfyui_mesh import tiny

    return tiny.load_chroma(weights)


def sample(comfy, model, cfg=3.0, steps=2):
    from comfyui_mesh import tiny

    i = tiny.flux1_inputs(pooled=None, guidance=0.0)
    return comfy.sample.sample(model, i["noise"], steps, cfg, "euler", "simple", i["positive"], i["negative"],
                               i["latent_image"], seed=0, disable_pbar=True)  # fmt: skip


def test_detected_as_chroma_on_both_sides(setup):
    from comfyui_mesh import arch
    from safetensors import safe_open

    _, weights, srv = setup
    with safe_open(str(weights), "pt") as f:
        keys = set(f.keys())
    assert arch.for_keys(keys).family == "chroma"
    assert arch.for_model(load(weights).model.diffusion_model).family == "chroma"
    assert any("Chroma" in ln for ln in srv.lines), srv.log()


@pytest.mark.parametrize("n", [1, 3, 4, 5])  # one single, all singles, into the doubles, every block
def test_raw_split_is_bit_identical_with_cfg(setup, n):
    comfy, weights, srv = setup
    model = load(weights)
    ref = sample(comfy, model)
    seen: list = []
    m, run = split(model, srv, n)
    client = run.client()
    real = client.forward

    def spy(**kw):
        seen.append({k: tuple(v.shape) for k, v in kw["exact"].items()})
        return real(**kw)

    client.forward = spy
    try:
        out = sample(comfy, m)
    finally:
        del client.forward
    assert run.calls == 2
    assert torch.equal(out, ref), f"n={n}: max diff {(out - ref).abs().max()}"
    # only the remote blocks' rows of the 344 modulation rows: 3 per single, 12 per double, 2 final
    singles, doubles = min(n, 3), max(n - 3, 0)
    assert seen[0] == {"mods": (2, 3 * singles + 12 * doubles + 2, H)}, seen


@pytest.mark.parametrize("name", ["lossless", "quant"])
def test_codecs(setup, name):
    comfy, weights, srv = setup
    model = load(weights)
    ref = sample(comfy, model)
    m, _ = split(model, srv, 5, codec=name)
    out = sample(comfy, m)
    if name == "lossless":
        assert torch.equal(out, ref)
    else:  # stated budget: quant at its default per-channel floor, 2 steps, CFG 3
        rel = ((out - ref).norm() / ref.norm()).item()
        assert 0 < rel < 5e-2, rel


def test_forwarded_lora_is_bit_identical(setup):
    comfy, weights, srv = setup
    g = torch.Generator().manual_seed(5)
    lora = {}
    for name, (o, i) in {"single_blocks.2.linear1": (7 * H, H), "double_blocks.1.img_attn.qkv": (3 * H, H),
                         "final_layer.linear": (64, H), "double_blocks.0.txt_attn.qkv": (3 * H, H)}.items():  # fmt: skip
        x = "diffusion_model." + name
        lora[f"{x}.lora_up.weight"] = torch.randn(o, 4, generator=g) * 0.05
        lora[f"{x}.lora_down.weight"] = torch.randn(4, i, generator=g) * 0.05
    model = comfy.sd.load_lora_for_models(load(weights), None, lora, 0.8, 0)[0]
    ref = sample(comfy, model)
    assert not torch.equal(ref, sample(comfy, load(weights)))
    m, run = split(model, srv, 4)
    assert run.lora is not None
    assert torch.equal(sample(comfy, m), ref)


def test_lora_on_the_original_after_a_split_run(setup):
    """A LoRA loaded onto the unsplit MODEL after a split run of it reaches every block (issue #17)."""
    comfy, weights, srv = setup
    layers = [
        "single_blocks.2.linear1",
        "double_blocks.1.img_attn.qkv",
        "final_layer.linear",
        "double_blocks.0.txt_attn.qkv",
    ]
    lora = kohya_lora(weights, layers, 6)
    check_lora_after_split(load(weights), lambda: load(weights), lambda m: sample(comfy, m), srv, 4, lora)


def test_a_skipped_remote_block_is_refused(setup):
    from comfyui_mesh.errors import LocalError

    comfy, weights, srv = setup
    model = load(weights)
    model.model.diffusion_model.skip_dit = [2]
    m, _ = split(model, srv, 2)
    with pytest.raises(LocalError, match="skipped"):
        sample(comfy, m, steps=1)
