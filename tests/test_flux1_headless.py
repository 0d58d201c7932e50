"""An image family other than FLUX.2 end to end through a real headless ComfyUI (issue 17).

Skipped without COMFYUI_PATH. Daedalus serves the last 2 blocks of a tiny random FLUX.1 dev
checkpoint; ComfyUI (main.py, this pack and the test-only node pack) runs UNETLoader -> Icarus
(``MeshSplitFlux``, the node that takes every registered family) -> KSampler -> SaveLatent over its
HTTP API, with FLUX.1's 16-channel SD3-style empty latent and the dev model's default guidance.
"""

from __future__ import annotations

import pytest
from comfy_support import headless_stack, ksampler_node, needs_comfy, needs_narrow_flux1

pytestmark = [needs_comfy, needs_narrow_flux1]

MODEL_NAME = "tiny_flux1_dev.safetensors"
NODE = "MeshSplitFlux"  # the generic Icarus node (every registered family)


def workflow(daedalus_port: int) -> dict:
    return {
        "1": {"class_type": "UNETLoader", "inputs": {"unet_name": MODEL_NAME, "weight_dtype": "default"}},
        "2": {
            "class_type": NODE,
            "inputs": {
                "model": ["1", 0],
                "n_blocks_remote": 2,
                "remote_host": "127.0.0.1",
                "remote_port": daedalus_port,
                "codec_mode": "raw",
                "codec_qp": 18,
                "codec_lossless": False,
                "codec_tile_dim": 8,
                "forward_client_loras": True,
            },
        },
        "3": {"class_type": "MeshTestConditioning", "inputs": {"seed": 2, "tokens": 7, "width": 64}},
        "4": {"class_type": "MeshTestConditioning", "inputs": {"seed": 3, "tokens": 7, "width": 64}},
        "5": {"class_type": "EmptySD3LatentImage", "inputs": {"width": 64, "height": 96, "batch_size": 1}},
        "6": ksampler_node(["2", 0]),
        "7": {"class_type": "SaveLatent", "inputs": {"samples": ["6", 0], "filename_prefix": "mesh_headless/latent"}},
    }


def make_weights(path):
    from comfy_support import import_comfy
    from comfyui_mesh import tiny

    import_comfy()
    return tiny.make_flux1(path, seed=0)


@pytest.fixture
def stack(tmp_path):
    with headless_stack(tmp_path, make_weights, MODEL_NAME) as st:
        yield st


def test_headless_comfyui_splits_flux1_through_daedalus(stack):
    daedalus, comfy, tmp = stack
    comfy.wait_for_node(NODE)
    comfy.wait_for_node("MeshTestConditioning")
    entry = comfy.run_prompt(workflow(daedalus.port))
    saved = entry["outputs"]["7"]["latents"]
    assert saved, entry["outputs"]
    for item in saved:
        f = tmp / "out" / item.get("subfolder", "") / item["filename"]
        assert f.is_file() and f.stat().st_size > 0, f"missing output {f}"
    assert any("FLUX.1" in ln for ln in daedalus.lines), daedalus.log()
    steps = daedalus.steps()
    assert len(steps) >= 2, "Daedalus served fewer than 2 steps:\n" + daedalus.log()
