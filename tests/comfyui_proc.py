"""Processes for the UI tests: a headless ComfyUI with this pack (and nothing else) loaded, and a
model-free Daedalus started through the real CLI. Same approach as test_comfyui_headless.py:
the pack is symlinked into a temporary custom_nodes folder named by an extra_model_paths YAML.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
START_TIMEOUT = 120.0


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


class ToyDaedalus:
    """``python -m comfyui_mesh.server --toy`` with authentication on; ``port`` and ``token`` once READY."""

    def __init__(self, state_dir: Path, n_blocks: int = 3):
        self.lines: list[str] = []
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "comfyui_mesh.server", "--toy", "--device", "cpu", "--port", "0",
             "--n-blocks", str(n_blocks), "--state-dir", str(state_dir)],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )  # fmt: skip
        ready = threading.Event()
        self.port = 0

        def pump() -> None:
            assert self.proc.stdout is not None
            for line in self.proc.stdout:
                self.lines.append(line)
                if "READY listening on" in line:
                    self.port = int(line.split("listening on ")[1].split()[0].rsplit(":", 1)[1])
                    ready.set()
            ready.set()

        threading.Thread(target=pump, daemon=True).start()
        if not ready.wait(60) or not self.port:
            stop(self.proc)
            raise RuntimeError("toy Daedalus did not start:\n" + "".join(self.lines))
        self.token = (state_dir / "token").read_text().strip()

    def stop(self) -> None:
        stop(self.proc)


class ComfyUI:
    """ComfyUI's main.py on the CPU with only this pack (as ``ComfyUI-Mesh``) and ``extra_packs``."""

    def __init__(self, comfy: str, tmp: Path, extra_packs: tuple[Path, ...] = (), models: Path | None = None):
        nodes = tmp / "custom_nodes"
        nodes.mkdir(parents=True, exist_ok=True)
        (nodes / "ComfyUI-Mesh").symlink_to(REPO, target_is_directory=True)
        names = ["ComfyUI-Mesh"]
        for p in extra_packs:
            (nodes / p.name).symlink_to(p, target_is_directory=True)
            names.append(p.name)
        yaml = tmp / "extra_model_paths.yaml"
        lines = ["mesh_ui_test:", f"    custom_nodes: {nodes}"]
        if models is not None:
            lines.append(f"    diffusion_models: {models}")
        yaml.write_text("\n".join(lines) + "\n")
        for d in ("out", "user/default", "temp"):
            (tmp / d).mkdir(parents=True, exist_ok=True)
        # The frontend's first-visit extras (tour, template browser) would cover the graph in screenshots.
        settings = {"Comfy.TutorialCompleted": True, "Comfy.Workflow.ShowMissingModelsWarning": False,
                    "Comfy.Workflow.ShowMissingNodesWarning": False, "Comfy.InstalledVersion": "1.45.21"}  # fmt: skip
        (tmp / "user/default/comfy.settings.json").write_text(json.dumps(settings))
        self.user_dir = tmp / "user"
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = tmp / "comfyui.log"
        self._log = open(self.log_path, "w")  # closed in stop()
        self.proc = subprocess.Popen(
            [sys.executable, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(self.port),
             "--disable-all-custom-nodes", "--whitelist-custom-nodes", *names,
             "--extra-model-paths-config", str(yaml), "--output-directory", str(tmp / "out"),
             "--user-directory", str(self.user_dir), "--temp-directory", str(tmp / "temp"),
             "--database-url", "sqlite:///:memory:", "--disable-api-nodes"],
            cwd=comfy, stdout=self._log, stderr=subprocess.STDOUT, text=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1", "COMFYUI_MESH_TOKEN": ""},
        )  # fmt: skip

    def log(self, tail: int = 80) -> str:
        try:
            return "".join(self.log_path.read_text(errors="replace").splitlines(keepends=True)[-tail:])
        except OSError:
            return "(no log)"

    def request(self, path: str, body: dict | None = None, timeout: float = 30) -> tuple[int, dict]:
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(self.url + path, data=data, headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read() or b"{}")

    def wait_ready(self, node: str = "MeshSplitFlux") -> None:
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"ComfyUI exited with {self.proc.returncode}:\n{self.log()}")
            if "IMPORT FAILED" in self.log(10_000):
                raise RuntimeError("a custom node pack failed to import:\n" + self.log())
            try:
                if node in self.request(f"/object_info/{node}", timeout=5)[1]:
                    return
            except (urllib.error.URLError, ConnectionError, TimeoutError, ValueError):
                pass
            time.sleep(1.0)
        raise RuntimeError(f"ComfyUI did not offer {node} within {START_TIMEOUT:.0f} s:\n{self.log()}")

    def stop(self) -> None:
        stop(self.proc)
        self._log.close()
