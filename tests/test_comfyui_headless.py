"""End to end through a real headless ComfyUI: the pack loads as a custom node and a prompt runs through Daedalus.

Skipped without COMFYUI_PATH. Two processes, both on the CPU: Daedalus serving the last 2 blocks of a
tiny random FLUX.2 checkpoint, and ComfyUI (main.py) with only this pack and a test-only node pack
(tests/fixtures/mesh_test_nodes, random conditioning: the tiny model has no text encoder) enabled.
The workflow UNETLoader -> MeshSplitFlux -> KSampler -> SaveLatent is queued over ComfyUI's HTTP API.
The processes are started by comfy_support.Daedalus and comfyui_proc.ComfyUI.
"""

from __future__ import annotations

import time

import pytest
from comfy_support import headless_stack, ksampler_node, make_flux2, needs_comfy, needs_narrow_flux2

pytestmark = [needs_comfy, needs_narrow_flux2]

MODEL_NAME = "tiny_flux2.safetensors"


def workflow(daedalus_port: int) -> dict:
    return {
        "1": {"class_type": "UNETLoader", "inputs": {"unet_name": MODEL_NAME, "weight_dtype": "default"}},
        "2": {
            "class_type": "MeshSplitFlux",
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
        "5": {"class_type": "EmptyFlux2LatentImage", "inputs": {"width": 64, "height": 96, "batch_size": 1}},
        "6": ksampler_node(["2", 0]),
        "7": {"class_type": "SaveLatent", "inputs": {"samples": ["6", 0], "filename_prefix": "mesh_headless/latent"}},
    }


@pytest.fixture
def stack(tmp_path):
    with headless_stack(tmp_path, lambda path: make_flux2(path, seed=0), MODEL_NAME) as st:
        yield st


def test_headless_comfyui_runs_icarus_through_daedalus(stack):
    daedalus, comfy, tmp = stack
    t0 = time.monotonic()
    comfy.wait_for_node("MeshSplitFlux")
    comfy.wait_for_node("MeshTestConditioning")
    print(f"\nComfyUI ready in {time.monotonic() - t0:.1f} s (Daedalus on port {daedalus.port})")

    t1 = time.monotonic()
    entry = comfy.run_prompt(workflow(daedalus.port))
    print(f"prompt ran in {time.monotonic() - t1:.1f} s")

    saved = entry["outputs"]["7"]["latents"]
    assert saved, entry["outputs"]
    for item in saved:
        f = tmp / "out" / item.get("subfolder", "") / item["filename"]
        assert f.is_file() and f.stat().st_size > 0, f"missing output {f}"

    steps = daedalus.steps()
    assert len(steps) >= 2, "Daedalus served fewer than 2 steps:\n" + daedalus.log()
    print(f"Daedalus served {len(steps)} steps; last: {steps[-1].strip()}")
