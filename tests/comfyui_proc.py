"""Processes for the tests that run the real programs: a headless ComfyUI with this pack (plus, if
asked, test-only node packs) loaded, and Daedalus started through the real CLI (``DaedalusProc``;
the model-free ``ToyDaedalus`` here, the real-weights ``Daedalus`` in comfy_support). The pack is
symlinked into a temporary custom_nodes folder named by an extra_model_paths YAML.
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

REPO = Path(__file__).resolve().parent.parent
FIXTURE_PACK = Path(__file__).resolve().parent / "fixtures" / "mesh_test_nodes"  # test-only nodes
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


class DaedalusProc:
    """``python -m comfyui_mesh.server *args --state-dir state_dir``, output collected by a background thread.

    ``port`` once READY; ``token`` the one written to ``state_dir`` (None with ``--no-auth``).
    """

    name = "Daedalus"

    def __init__(self, args: list[str], state_dir: Path, timeout: float = START_TIMEOUT):
        self.lines: list[str] = []
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "comfyui_mesh.server", *args, "--state-dir", str(state_dir)],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )  # fmt: skip
        ready = threading.Event()
        self.port = 0

        def pump() -> None:
            assert self.proc.stdout is not None
            for line in self.proc.stdout:
                self.lines.append(line)
                if not ready.is_set() and "READY listening on" in line:
                    self.port = int(line.split("listening on ")[1].split()[0].rsplit(":", 1)[1])
                    ready.set()
            ready.set()  # process ended: unblock the waiter

        threading.Thread(target=pump, daemon=True).start()
        if not ready.wait(timeout) or not self.port:
            stop(self.proc)
            raise RuntimeError(f"{self.name} did not start:\n" + "".join(self.lines))
        self.token = None if "--no-auth" in args else (state_dir / "token").read_text().strip()

    def log(self) -> str:
        return "".join(self.lines[-60:])

    def steps(self) -> list[str]:
        return [ln for ln in list(self.lines) if re.search(r"\bstep \d+ ", ln)]

    def stop(self) -> None:
        stop(self.proc)


class ToyDaedalus(DaedalusProc):
    """``python -m comfyui_mesh.server --toy`` with authentication on; ``port`` and ``token`` once READY."""

    name = "toy Daedalus"

    def __init__(self, state_dir: Path, n_blocks: int = 3):
        super().__init__(
            ["--toy", "--device", "cpu", "--port", "0", "--n-blocks", str(n_blocks)], state_dir, timeout=60
        )


class ComfyUI:
    """ComfyUI's main.py on the CPU with only this pack (as ``ComfyUI-Mesh``) and ``extra_packs``.

    The extra packs are copied (without ``__pycache__``), not linked, so ComfyUI writes nothing into
    tests/fixtures. Output goes to a log file, read back on failure.
    """

    def __init__(self, comfy: str, tmp: Path, extra_packs: tuple[Path, ...] = (), models: Path | None = None):
        nodes = tmp / "custom_nodes"
        nodes.mkdir(parents=True, exist_ok=True)
        (nodes / "ComfyUI-Mesh").symlink_to(REPO, target_is_directory=True)
        names = ["ComfyUI-Mesh"]
        for p in extra_packs:
            shutil.copytree(p, nodes / p.name, ignore=shutil.ignore_patterns("__pycache__"))
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

    def problem(self) -> str | None:
        """Why ComfyUI can't go on (it exited, or a node pack failed to import); None while it is fine."""
        if self.proc.poll() is not None:
            return f"ComfyUI exited with code {self.proc.returncode}"
        if "IMPORT FAILED" in self.log(10_000):
            return "a custom node pack failed to import"
        return None

    def _wait_for(self, node: str) -> str | None:
        """Wait until ComfyUI offers ``node``; None once it does, else why not."""
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            why = self.problem()
            if why:
                return why
            try:
                if node in self.request(f"/object_info/{node}", timeout=5)[1]:
                    return None
            except (urllib.error.URLError, ConnectionError, TimeoutError, ValueError):
                pass
            time.sleep(1.0)
        return f"ComfyUI did not offer node {node} within {START_TIMEOUT:.0f} s"

    def wait_ready(self, node: str = "MeshSplitFlux") -> None:
        """For fixtures: RuntimeError (with the log) unless ComfyUI offers ``node`` in time."""
        why = self._wait_for(node)
        if why:
            raise RuntimeError(f"{why}:\n{self.log()}")

    # For tests: the helpers below end the test with pytest.fail and the log's tail.

    def fail(self, why: str) -> None:
        import pytest

        pytest.fail(f"{why}\n--- ComfyUI log (tail) ---\n{self.log()}", pytrace=False)

    def check_alive(self) -> None:
        why = self.problem()
        if why:
            self.fail(why)

    def wait_for_node(self, node: str) -> None:
        why = self._wait_for(node)
        if why:
            self.fail(why)

    def get(self, path: str) -> dict:
        with urllib.request.urlopen(self.url + path, timeout=10) as r:
            return json.loads(r.read())

    def post(self, path: str, body: dict) -> dict:
        code, r = self.request(path, body)
        if code != 200:
            self.fail(f"POST {path} -> HTTP {code}: {json.dumps(r)}")
        return r

    def run_prompt(self, prompt: dict, timeout: float = RUN_TIMEOUT) -> dict:
        """Queue ``prompt``, wait for it and return its /history entry; fails the test unless it succeeded."""
        queued = self.post("/prompt", {"prompt": prompt, "client_id": uuid.uuid4().hex})
        if queued.get("node_errors"):
            self.fail(f"prompt rejected: {queued}")
        pid = queued["prompt_id"]
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout:
            self.check_alive()
            entry = self.get(f"/history/{pid}").get(pid)
            if entry and entry.get("status"):  # history gets the entry once the prompt has finished
                status = entry["status"]
                if status.get("status_str") != "success":
                    self.fail("prompt failed: " + json.dumps(status.get("messages"), indent=1)[-4000:])
                return entry
            time.sleep(0.5)
        self.fail(f"prompt {pid} did not finish within {timeout:.0f} s")
        raise AssertionError("unreachable")  # fail raises

    def stop(self) -> None:
        stop(self.proc)
        self._log.close()
