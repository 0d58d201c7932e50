"""End to end through a real headless ComfyUI with Icarus LTX: a prompt runs through Daedalus and
matches the same prompt without the split, bit for bit (raw codec, CPU).

Skipped without COMFYUI_PATH. The same processes as test_comfyui_headless.py (comfy_support.Daedalus,
comfyui_proc.ComfyUI): Daedalus serving the last 2 of 3 blocks of a tiny random LTX-AV (LTX-2 style)
checkpoint, and ComfyUI's main.py with only this pack and the test-only node pack enabled
(tests/fixtures/mesh_test_nodes: random conditioning and an empty audio+video latent, since the
tiny model has no text encoder or audio VAE). Workflow: UNETLoader -> MeshSplitLTX ->
KSampler (CFG 2) -> LTXVSeparateAVLatent -> SaveLatent (video, audio).
"""

from __future__ import annotations

from pathlib import Path

import pytest
from comfy_ltx_support import make_ltx, needs_ltxav, style_config
from comfy_support import headless_stack, ksampler_node

CTX = style_config("ltx2")[1]  # the text-context width this ComfyUI's LTX-2 takes

pytestmark = needs_ltxav  # ComfyUI with LTX-AV (0.8.0 or newer)

MODEL_NAME = "tiny_ltxav.safetensors"


def workflow(daedalus_port: int | None, prefix: str) -> dict:
    """The prompt; ``daedalus_port`` None: the same graph without Icarus LTX."""
    model = ["2", 0] if daedalus_port else ["1", 0]
    g = {
        "1": {"class_type": "UNETLoader", "inputs": {"unet_name": MODEL_NAME, "weight_dtype": "default"}},
        "3": {"class_type": "MeshTestConditioning", "inputs": {"seed": 2, "tokens": 7, "width": CTX}},
        "4": {"class_type": "MeshTestConditioning", "inputs": {"seed": 3, "tokens": 7, "width": CTX}},
        "5": {"class_type": "MeshTestAVLatent", "inputs": {"frames": 2, "height": 2, "width": 3, "audio": 5}},
        "6": ksampler_node(model),
        "7": {"class_type": "LTXVSeparateAVLatent", "inputs": {"av_latent": ["6", 0]}},
        "8": {"class_type": "SaveLatent", "inputs": {"samples": ["7", 0], "filename_prefix": f"{prefix}/video"}},
        "9": {"class_type": "SaveLatent", "inputs": {"samples": ["7", 1], "filename_prefix": f"{prefix}/audio"}},
    }
    if daedalus_port:
        g["2"] = {
            "class_type": "MeshSplitLTX",
            "inputs": {
                "model": ["1", 0],
                "n_blocks_remote": 2,
                "remote_host": "127.0.0.1",
                "remote_port": daedalus_port,
                "codec_mode": "raw",
                "forward_client_loras": False,
            },
        }
    return g


@pytest.fixture
def stack(tmp_path):
    with headless_stack(tmp_path, lambda path: make_ltx(path, style="ltx2", seed=0), MODEL_NAME) as st:
        yield st


def saved(tmp: Path, entry: dict, node: str) -> Path:
    (item,) = entry["outputs"][node]["latents"]
    f = tmp / "out" / item.get("subfolder", "") / item["filename"]
    assert f.is_file() and f.stat().st_size > 0, f"missing output {f}"
    return f


def test_headless_comfyui_runs_icarus_ltx_and_matches_unsplit(stack):
    from safetensors.torch import load_file

    daedalus, comfy, tmp = stack
    comfy.wait_for_node("MeshSplitLTX")
    comfy.wait_for_node("MeshTestAVLatent")
    split = comfy.run_prompt(workflow(daedalus.port, "mesh_ltx_split"))
    steps = daedalus.steps()
    assert len(steps) == 2, "Daedalus should serve one call per step (cond + uncond batched):\n" + daedalus.log()
    plain = comfy.run_prompt(workflow(None, "mesh_ltx_plain"))
    assert len(daedalus.steps()) == 2, "the unsplit prompt must not reach Daedalus"
    for node in ("8", "9"):  # video, audio
        a = load_file(str(saved(tmp, split, node)))["latent_tensor"]
        b = load_file(str(saved(tmp, plain, node)))["latent_tensor"]
        assert a.shape == b.shape and a.abs().sum() > 0
        assert a.equal(b), f"node {node}: split differs from unsplit by {(a - b).abs().max()}"
