"""End to end through a real headless ComfyUI: the pack loads as a custom node and a prompt runs through Daedalus.

Skipped without COMFYUI_PATH. Two processes, both on the CPU: Daedalus serving the last 2 blocks of a
tiny random FLUX.2 checkpoint, and ComfyUI (main.py) with only this pack and a test-only node pack
(tests/fixtures/mesh_test_nodes, random conditioning: the tiny model has no text encoder) enabled.
The workflow UNETLoader -> MeshSplitFlux -> KSampler -> SaveLatent is queued over ComfyUI's HTTP API.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import pytest
from comfy_support import COMFY, make_flux2, needs_comfy

pytestmark = needs_comfy

REPO = Path(__file__).resolve().parent.parent  # the pack's root (also the comfyui_mesh package)
FIXTURE_PACK = Path(__file__).resolve().parent / "fixtures" / "mesh_test_nodes"
MODEL_NAME = "tiny_flux2.safetensors"
START_TIMEOUT = 120.0
RUN_TIMEOUT = 90.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop(proc: subprocess.Popen | None) -> None:
    if proc is None or proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)


class Daedalus:
    """The server process; its output is collected by a background thread."""

    def __init__(self, weights: Path, n_blocks: int, state_dir: Path):
        self.lines: list[str] = []
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "comfyui_mesh.server", "--weights", str(weights), "--n-blocks", str(n_blocks),
             "--port", "0", "--device", "cpu", "--no-auth", "--comfyui", COMFY, "--state-dir", str(state_dir)],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )  # fmt: skip
        ready = threading.Event()
        self.port = 0

        def pump() -> None:
            for line in self.proc.stdout:
                self.lines.append(line)
                if not ready.is_set() and "READY listening on" in line:
                    self.port = int(line.split("listening on ")[1].split()[0].rsplit(":", 1)[1])
                    ready.set()
            ready.set()  # process ended: unblock the waiter

        threading.Thread(target=pump, daemon=True).start()
        if not ready.wait(START_TIMEOUT) or not self.port:
            stop(self.proc)
            raise RuntimeError("Daedalus did not start:\n" + self.log())

    def log(self) -> str:
        return "".join(self.lines[-60:])

    def steps(self) -> list[str]:
        return [ln for ln in list(self.lines) if re.search(r"\bstep \d+ ", ln)]


class ComfyUI:
    """ComfyUI's main.py, output in a log file (read back on failure)."""

    def __init__(self, tmp: Path, yaml_path: Path):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = tmp / "comfyui.log"
        for d in ("out", "user", "temp"):
            (tmp / d).mkdir(exist_ok=True)
        self._log = open(self.log_path, "w")  # closed in stop()
        self.proc = subprocess.Popen(
            [sys.executable, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(self.port),
             "--disable-all-custom-nodes", "--whitelist-custom-nodes", "ComfyUI-Mesh", "mesh_test_nodes",
             "--extra-model-paths-config", str(yaml_path), "--output-directory", str(tmp / "out"),
             "--user-directory", str(tmp / "user"), "--temp-directory", str(tmp / "temp"),
             "--database-url", "sqlite:///:memory:", "--disable-api-nodes"],
            cwd=COMFY, stdout=self._log, stderr=subprocess.STDOUT, text=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )  # fmt: skip

    def log(self, tail: int = 80) -> str:
        try:
            return "".join(self.log_path.read_text(errors="replace").splitlines(keepends=True)[-tail:])
        except OSError:
            return "(no log)"

    def fail(self, why: str) -> None:
        pytest.fail(f"{why}\n--- ComfyUI log (tail) ---\n{self.log()}", pytrace=False)

    def get(self, path: str) -> dict:
        with urllib.request.urlopen(self.url + path, timeout=10) as r:
            return json.loads(r.read())

    def post(self, path: str, body: dict) -> dict:
        req = urllib.request.Request(
            self.url + path, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
        )
        try:
            with urllib.request.urlopen(req, timeout=30) as r:
                return json.loads(r.read())
        except urllib.error.HTTPError as e:
            self.fail(f"POST {path} -> HTTP {e.code}: {e.read().decode(errors='replace')}")
            raise  # unreachable: fail raises

    def check_alive(self) -> None:
        if self.proc.poll() is not None:
            self.fail(f"ComfyUI exited with code {self.proc.returncode}")
        if "IMPORT FAILED" in self.log(tail=10_000):
            self.fail("a custom node pack failed to import")

    def wait_for_node(self, node: str) -> None:
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            self.check_alive()
            try:
                if node in self.get(f"/object_info/{node}"):
                    return
            except (urllib.error.URLError, ConnectionError, TimeoutError, json.JSONDecodeError):
                pass
            time.sleep(1.0)
        self.fail(f"ComfyUI did not offer node {node} within {START_TIMEOUT:.0f} s")

    def stop(self) -> None:
        stop(self.proc)
        self._log.close()


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
        "3": {"class_type": "MeshTestConditioning", "inputs": {"seed": 2, "tokens": 7}},
        "4": {"class_type": "MeshTestConditioning", "inputs": {"seed": 3, "tokens": 7}},
        "5": {"class_type": "EmptyFlux2LatentImage", "inputs": {"width": 64, "height": 96, "batch_size": 1}},
        "6": {
            "class_type": "KSampler",
            "inputs": {
                "model": ["2", 0],
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
        "7": {"class_type": "SaveLatent", "inputs": {"samples": ["6", 0], "filename_prefix": "mesh_headless/latent"}},
    }


@pytest.fixture
def stack(tmp_path):
    """Lay out models and custom nodes in tmp_path, start Daedalus and ComfyUI; always stop both."""
    models = tmp_path / "models" / "diffusion_models"
    models.mkdir(parents=True)
    weights = make_flux2(models / MODEL_NAME, seed=0)
    nodes = tmp_path / "custom_nodes"
    nodes.mkdir()
    (nodes / "ComfyUI-Mesh").symlink_to(REPO, target_is_directory=True)
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


def test_headless_comfyui_runs_icarus_through_daedalus(stack):
    daedalus, comfy, tmp = stack
    t0 = time.monotonic()
    comfy.wait_for_node("MeshSplitFlux")
    comfy.wait_for_node("MeshTestConditioning")
    print(f"\nComfyUI ready in {time.monotonic() - t0:.1f} s (Daedalus on port {daedalus.port})")

    queued = comfy.post("/prompt", {"prompt": workflow(daedalus.port), "client_id": uuid.uuid4().hex})
    if queued.get("node_errors"):
        comfy.fail(f"prompt rejected: {queued}")
    pid = queued["prompt_id"]

    t1 = time.monotonic()
    entry = None
    while time.monotonic() - t1 < RUN_TIMEOUT:
        comfy.check_alive()
        entry = comfy.get(f"/history/{pid}").get(pid)
        if entry and entry.get("status"):  # history gets the entry once the prompt has finished
            break
        time.sleep(0.5)
    else:
        comfy.fail(f"prompt {pid} did not finish within {RUN_TIMEOUT:.0f} s")
    print(f"prompt ran in {time.monotonic() - t1:.1f} s")

    status = entry["status"]
    if status.get("status_str") != "success":
        comfy.fail("prompt failed: " + json.dumps(status.get("messages"), indent=1)[-4000:])

    saved = entry["outputs"]["7"]["latents"]
    assert saved, entry["outputs"]
    for item in saved:
        f = tmp / "out" / item.get("subfolder", "") / item["filename"]
        assert f.is_file() and f.stat().st_size > 0, f"missing output {f}"

    steps = daedalus.steps()
    assert len(steps) >= 2, "Daedalus served fewer than 2 steps:\n" + daedalus.log()
    print(f"Daedalus served {len(steps)} steps; last: {steps[-1].strip()}")
