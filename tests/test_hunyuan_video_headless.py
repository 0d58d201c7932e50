"""End to end through a real headless ComfyUI with the generic Icarus node (``MeshSplitFlux``) on a video
family: HunyuanVideo 1.5 (tiny random, 3 double blocks, Daedalus serving the last 2). The prompt
runs through Daedalus and matches the same prompt without the split, bit for bit (raw codec, CPU).

Skipped without COMFYUI_PATH. Workflow: UNETLoader ->
MeshSplitFlux -> KSampler (CFG 2) on ComfyUI's own EmptyHunyuanVideo15Latent -> SaveLatent; the
conditioning comes from the test-only node pack (the tiny model has no text encoder).
"""

from __future__ import annotations

from pathlib import Path

import pytest
from comfy_support import headless_stack, ksampler_node, needs_comfy

pytestmark = [needs_comfy]

MODEL_NAME = "tiny_hunyuan_video15.safetensors"


def workflow(daedalus_port: int | None, prefix: str) -> dict:
    """The prompt; ``daedalus_port`` None: the same graph without Icarus."""
    model = ["2", 0] if daedalus_port else ["1", 0]
    cond = {"tokens": 7, "width": 64, "pooled": 1}
    g = {
        "1": {"class_type": "UNETLoader", "inputs": {"unet_name": MODEL_NAME, "weight_dtype": "default"}},
        "3": {"class_type": "MeshTestConditioning", "inputs": {"seed": 2, **cond}},
        "4": {"class_type": "MeshTestConditioning", "inputs": {"seed": 3, **cond}},
        "5": {"class_type": "EmptyHunyuanVideo15Latent", "inputs": {"width": 64, "height": 48, "length": 5, "batch_size": 1}},
        "6": ksampler_node(model),
        "8": {"class_type": "SaveLatent", "inputs": {"samples": ["6", 0], "filename_prefix": f"{prefix}/video"}},
    }  # fmt: skip
    if daedalus_port:
        g["2"] = {
            "class_type": "MeshSplitFlux",  # the generic Icarus node (every registered family)
            "inputs": {
                "model": ["1", 0],
                "n_blocks_remote": 2,
                "remote_host": "127.0.0.1",
                "remote_port": daedalus_port,
                "codec_mode": "raw",
                "codec_qp": 18,
                "codec_lossless": False,
                "codec_tile_dim": 8,
                "forward_client_loras": False,
            },
        }
    return g


@pytest.fixture
def stack(tmp_path):
    from comfy_support import import_comfy
    from comfyui_mesh.tiny import make_hunyuan_video

    import_comfy()  # the builder reads ComfyUI's classes (shapes only)
    with headless_stack(tmp_path, lambda path: make_hunyuan_video(path, seed=0), MODEL_NAME) as st:
        yield st


def saved(tmp: Path, entry: dict, node: str) -> Path:
    (item,) = entry["outputs"][node]["latents"]
    f = tmp / "out" / item.get("subfolder", "") / item["filename"]
    assert f.is_file() and f.stat().st_size > 0, f"missing output {f}"
    return f


def test_headless_comfyui_runs_icarus_on_hunyuan_video_and_matches_unsplit(stack):
    from safetensors.torch import load_file

    daedalus, comfy, tmp = stack
    comfy.wait_for_node("MeshSplitFlux")
    comfy.wait_for_node("MeshTestConditioning")
    split = comfy.run_prompt(workflow(daedalus.port, "mesh_hyv_split"))
    assert len(daedalus.steps()) >= 2, "Daedalus should serve the sampling steps:\n" + daedalus.log()
    served = len(daedalus.steps())
    plain = comfy.run_prompt(workflow(None, "mesh_hyv_plain"))
    assert len(daedalus.steps()) == served, "the unsplit prompt must not reach Daedalus"
    a = load_file(str(saved(tmp, split, "8")))["latent_tensor"]
    b = load_file(str(saved(tmp, plain, "8")))["latent_tensor"]
    assert a.shape == b.shape and a.abs().sum() > 0
    assert a.equal(b), f"split differs from unsplit by {(a - b).abs().max()}"
