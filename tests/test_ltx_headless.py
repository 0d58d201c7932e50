"""End to end through a real headless ComfyUI with Icarus LTX: a prompt runs through Daedalus and
matches the same prompt without the split, bit for bit (raw codec, CPU).

Skipped without COMFYUI_PATH. Reuses the processes of test_comfyui_headless.py: Daedalus serving
the last 2 of 3 blocks of a tiny random LTX-AV (LTX-2 style) checkpoint, and ComfyUI's main.py
with only this pack and a test-only node pack enabled (tests/fixtures/mesh_test_nodes_ltx, laid
out under the name that launcher enables: random conditioning and an empty audio+video latent,
since the tiny model has no text encoder or audio VAE). Workflow: UNETLoader -> MeshSplitLTX ->
KSampler (CFG 2) -> LTXVSeparateAVLatent -> SaveLatent (video, audio).
"""

from __future__ import annotations

import json
import shutil
import time
import uuid
from pathlib import Path

import pytest
from comfy_ltx_support import make_ltx
from comfy_support import needs_comfy
from test_comfyui_headless import REPO, RUN_TIMEOUT, ComfyUI, Daedalus, stop

pytestmark = needs_comfy

FIXTURE_PACK = Path(__file__).resolve().parent / "fixtures" / "mesh_test_nodes_ltx"
MODEL_NAME = "tiny_ltxav.safetensors"


def workflow(daedalus_port: int | None, prefix: str) -> dict:
    """The prompt; ``daedalus_port`` None: the same graph without Icarus LTX."""
    model = ["2", 0] if daedalus_port else ["1", 0]
    g = {
        "1": {"class_type": "UNETLoader", "inputs": {"unet_name": MODEL_NAME, "weight_dtype": "default"}},
        "3": {"class_type": "MeshTestLTXConditioning", "inputs": {"seed": 2, "tokens": 7, "width": 64}},
        "4": {"class_type": "MeshTestLTXConditioning", "inputs": {"seed": 3, "tokens": 7, "width": 64}},
        "5": {"class_type": "MeshTestAVLatent", "inputs": {"frames": 2, "height": 2, "width": 3, "audio": 5}},
        "6": {
            "class_type": "KSampler",
            "inputs": {
                "model": model,
                "seed": 0,
                "steps": 2,
                "cfg": 2.0,
                "sampler_name": "euler",
                "scheduler": "simple",
                "positive": ["3", 0],
                "negative": ["4", 0],
                "latent_image": ["5", 0],
                "denoise": 1.0,
            },
        },
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
    models = tmp_path / "models" / "diffusion_models"
    models.mkdir(parents=True)
    weights = make_ltx(models / MODEL_NAME, style="ltx2", seed=0)
    nodes = tmp_path / "custom_nodes"
    nodes.mkdir()
    (nodes / "ComfyUI-Mesh").symlink_to(REPO, target_is_directory=True)
    # the launcher enables the test pack by the name "mesh_test_nodes"
    shutil.copytree(FIXTURE_PACK, nodes / "mesh_test_nodes", ignore=shutil.ignore_patterns("__pycache__"))
    yaml_path = tmp_path / "extra_model_paths.yaml"
    yaml_path.write_text(f"mesh_test:\n    custom_nodes: {nodes}\n    diffusion_models: {models}\n")
    daedalus = comfy = None
    try:
        daedalus = Daedalus(weights, 2, tmp_path / "state")
        comfy = ComfyUI(tmp_path, yaml_path)
        yield daedalus, comfy, tmp_path
    finally:
        if comfy is not None:
            comfy.stop()
        if daedalus is not None:
            stop(daedalus.proc)


def run_prompt(comfy: ComfyUI, prompt: dict) -> dict:
    queued = comfy.post("/prompt", {"prompt": prompt, "client_id": uuid.uuid4().hex})
    if queued.get("node_errors"):
        comfy.fail(f"prompt rejected: {queued}")
    pid = queued["prompt_id"]
    t0 = time.monotonic()
    while time.monotonic() - t0 < RUN_TIMEOUT:
        comfy.check_alive()
        entry = comfy.get(f"/history/{pid}").get(pid)
        if entry and entry.get("status"):
            status = entry["status"]
            if status.get("status_str") != "success":
                comfy.fail("prompt failed: " + json.dumps(status.get("messages"), indent=1)[-4000:])
            return entry
        time.sleep(0.5)
    comfy.fail(f"prompt {pid} did not finish within {RUN_TIMEOUT:.0f} s")
    raise AssertionError("unreachable")


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
    split = run_prompt(comfy, workflow(daedalus.port, "mesh_ltx_split"))
    steps = daedalus.steps()
    assert len(steps) == 2, "Daedalus should serve one call per step (cond + uncond batched):\n" + daedalus.log()
    plain = run_prompt(comfy, workflow(None, "mesh_ltx_plain"))
    assert len(daedalus.steps()) == 2, "the unsplit prompt must not reach Daedalus"
    for node in ("8", "9"):  # video, audio
        a = load_file(str(saved(tmp, split, node)))["latent_tensor"]
        b = load_file(str(saved(tmp, plain, node)))["latent_tensor"]
        assert a.shape == b.shape and a.abs().sum() > 0
        assert a.equal(b), f"node {node}: split differs from unsplit by {(a - b).abs().max()}"
