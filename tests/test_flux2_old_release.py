"""FLUX.2 split on ComfyUI releases that detect every FLUX.2 checkpoint as Dev (before 0.9: 48
heads of 128, so no narrow tiny model loads there). The smallest model such a release loads is
Dev-width: one double and one single block, 6144 wide (about 1.5 B parameters, ~3 GB in bf16).

Runs only with COMFYUI_PATH pointing at such a release (e.g. 0.3.75, the first with FLUX.2); skipped
on newer ones, where tests/test_flux2_split.py covers the same ground with a tiny model."""

from __future__ import annotations

import pytest
import torch
from comfy_support import NARROW_FLUX2, Daedalus, check_lora_after_split, import_comfy, kohya_lora, needs_comfy
from comfyui_mesh.tiny import FLUX2_TINY

pytestmark = [
    needs_comfy,
    pytest.mark.skipif(NARROW_FLUX2, reason="this ComfyUI loads narrow FLUX.2 models: tests/test_flux2_split.py"),
]

DEV_WIDTH_1_1 = {**FLUX2_TINY, "hidden_size": 6144, "num_heads": 48, "depth": 1, "depth_single_blocks": 1}


def sample(comfy, model):
    noise = torch.randn(1, 128, 2, 3, generator=torch.Generator().manual_seed(1))
    pooled = {"pooled_output": torch.zeros(1, 1)}  # these releases' Flux2 reads it (and ignores it: no vector_in)
    pos = [[torch.randn(1, 4, 64, generator=torch.Generator().manual_seed(2)), dict(pooled)]]
    neg = [[torch.randn(1, 4, 64, generator=torch.Generator().manual_seed(3)), dict(pooled)]]
    return comfy.sample.sample(model, noise, 1, 2.5, "euler", "simple", pos, neg, torch.zeros(1, 128, 2, 3), seed=0)


@pytest.fixture(scope="module")
def dev_width(tmp_path_factory):
    """A Dev-width FLUX.2 (bf16) and a Daedalus serving its single block."""
    from comfyui_mesh.tiny import make_flux2

    comfy = import_comfy()
    __import__("comfy.sample")
    d = tmp_path_factory.mktemp("flux2_old")
    weights = make_flux2(d / "flux2_dev_width.safetensors", config=DEV_WIDTH_1_1, dtype=torch.bfloat16)
    srv = Daedalus(weights, 1, d / "state")
    yield comfy, weights, srv
    srv.stop()


def test_dev_width_split_is_bit_identical_with_cfg(dev_width):
    from comfyui_mesh.config import ClientConfig
    from comfyui_mesh.icarus import SplitSettings, split_model

    comfy, weights, srv = dev_width
    model = comfy.sd.load_diffusion_model(str(weights))
    ref = sample(comfy, model)
    m, run = split_model(model, SplitSettings(n_remote=1, client=ClientConfig(port=srv.port, token=srv.token)))
    out = sample(comfy, m)
    assert run.calls == 1
    assert torch.equal(out, ref), f"max diff {(out - ref).abs().max()}"


def test_lora_on_the_original_after_a_split_run(dev_width):
    """A LoRA loaded onto the unsplit MODEL after a split run of it reaches every block (issue #17)."""
    comfy, weights, srv = dev_width

    model = comfy.sd.load_diffusion_model(str(weights))  # one copy: two of this width do not fit a 24 GB machine
    lora = kohya_lora(weights, ["single_blocks.0.linear2", "final_layer.linear", "double_blocks.0.img_attn.qkv"], 8)
    check_lora_after_split(model, None, lambda m: sample(comfy, m), srv, 1, lora)
