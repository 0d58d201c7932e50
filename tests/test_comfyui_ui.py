"""The node UI against a real headless ComfyUI with this pack loaded (skipped without COMFYUI_PATH):

* the pack's routes (/mesh/status, /mesh/token, /mesh/reconfigure) against a running toy Daedalus;
* a real browser (Debian's chromium driven by playwright-core; skipped without them): the example
  workflow loads, the Icarus node's light turns green, the Confirm flow reconfigures the server,
  queueing is blocked meanwhile, and a banner sent from Python shows under the node. Screenshots
  go to the artifacts folder.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import uuid
from pathlib import Path

import pytest
from comfy_support import COMFY, needs_comfy, needs_narrow_flux2

pytestmark = [needs_comfy, needs_narrow_flux2]

REPO = Path(__file__).resolve().parent.parent
ARTIFACTS = Path(os.environ.get("MESH_ARTIFACTS_DIR", REPO / "artifacts"))
TINY_MODEL = "tiny_flux2.safetensors"


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    from comfy_support import make_flux2
    from comfyui_proc import ComfyUI, ToyDaedalus

    tmp = tmp_path_factory.mktemp("ui")
    models = tmp / "models"
    models.mkdir()
    make_flux2(models / TINY_MODEL, seed=0)  # for the banner test: a real FLUX.2 the toy server won't match
    daedalus = comfy = None
    try:
        daedalus = ToyDaedalus(tmp / "state", n_blocks=3)
        comfy = ComfyUI(COMFY, tmp, models=models)
        comfy.wait_ready()
        yield daedalus, comfy
    finally:
        if comfy is not None:
            comfy.stop()
        if daedalus is not None:
            daedalus.stop()


def status(comfy, port: int, host: str = "127.0.0.1", refresh: bool = True) -> tuple[int, dict]:
    return comfy.request("/mesh/status", {"host": host, "port": port, "refresh": refresh})


def test_routes_probe_save_the_token_and_reconfigure(stack):
    daedalus, comfy = stack
    p = daedalus.port
    code, s = status(comfy, p)
    assert code == 200 and s["reachable"] and s["state"] == "red", s
    assert (s["arch"], s["n_blocks"], s["n_blocks_max"], s["auth_needed"], s["token_saved"]) == (
        "toy",
        3,
        8,
        True,
        False,
    )
    assert "token needed" in s["error"]
    assert status(comfy, p, refresh=False)[1]["cached"] is True

    code, s = comfy.request("/api/mesh/status", {"host": "127.0.0.1", "port": p})  # the frontend's prefix works too
    assert code == 200 and s["n_blocks"] == 3

    for bad in ("http://evil/", "a b", "", "x/../y"):
        assert status(comfy, p, host=bad)[0] == 400, bad
    assert comfy.request("/mesh/status", {"host": "127.0.0.1", "port": 0})[0] == 400
    from comfyui_proc import free_port

    code, s = status(comfy, free_port())
    assert code == 200 and s["state"] == "red" and not s["reachable"] and "nothing listens" in s["error"]

    code, r = comfy.request("/mesh/token", {"host": "127.0.0.1", "port": p, "token": "f" * 64})
    assert code == 200 and r["saved"] and r["verified"] is False and "rejected" in r["message"], r
    assert "f" * 64 not in json.dumps(r)
    code, r = comfy.request("/mesh/token", {"host": "127.0.0.1", "port": p, "token": daedalus.token})
    assert code == 200 and r["verified"] is True, r
    assert daedalus.token not in json.dumps(r)
    stored = json.loads((comfy.user_dir / "comfyui-mesh" / "tokens.json").read_text())
    pins = stored.pop("server_ids", {})  # the verified connection pinned the server's id in the same file
    assert stored == {f"127.0.0.1:{p}": daedalus.token} and list(pins) == [f"127.0.0.1:{p}"], (stored, pins)
    code, s = status(comfy, p)
    assert s["state"] == "green" and s["token_saved"] and s["error"] is None, s

    code, r = comfy.request("/mesh/reconfigure", {"host": "127.0.0.1", "port": p, "n_blocks": 5})
    assert code == 200 and r["ok"] and r["n_blocks"] == 5 and r["status"]["n_blocks"] == 5, r
    code, r = comfy.request("/mesh/reconfigure", {"host": "127.0.0.1", "port": p, "n_blocks": 99})
    assert code == 502 and "out of range" in r["error"], r
    assert comfy.request("/mesh/reconfigure", {"host": "127.0.0.1", "port": p, "n_blocks": "5"})[0] == 400
    assert comfy.request("/mesh/reconfigure", {"host": "127.0.0.1", "port": p, "n_blocks": 3})[1]["n_blocks"] == 3
    assert comfy.request("/mesh/token", {"host": "127.0.0.1", "port": p, "token": "two words"})[0] == 400


def _browser_missing() -> str | None:
    if not shutil.which("node"):
        return "node is not installed"
    if not (REPO / "node_modules" / "playwright-core").is_dir():
        return "playwright-core is not installed: run npm ci in the repository root"
    if not Path(os.environ.get("CHROMIUM", "/usr/bin/chromium")).exists():
        return "chromium is not installed (Debian: apt-get install chromium)"
    return None


def test_browser_icarus_node_light_confirm_queue_block_and_banner(stack, tmp_path):
    missing = _browser_missing()
    if missing:
        print(f"\nSKIP browser test: {missing}")
        pytest.skip(missing)
    daedalus, comfy = stack
    p = daedalus.port
    comfy.request("/mesh/token", {"host": "127.0.0.1", "port": p, "token": daedalus.token})
    assert comfy.request("/mesh/reconfigure", {"host": "127.0.0.1", "port": p, "n_blocks": 3})[0] == 200
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    banner_prompt = {
        "1": {"class_type": "UNETLoader", "inputs": {"unet_name": TINY_MODEL, "weight_dtype": "default"}},
        "ICARUS": {
            "class_type": "MeshSplitFlux",
            "inputs": {"model": ["1", 0], "n_blocks_remote": 2, "remote_host": "127.0.0.1", "remote_port": p,
                       "codec_mode": "raw", "codec_qp": 18, "codec_lossless": False, "codec_tile_dim": 8,
                       "forward_client_loras": True},
        },
        "3": {"class_type": "ModelSave", "inputs": {"model": ["ICARUS", 0], "filename_prefix": "mesh_ui/never"}},
    }  # fmt: skip
    env = {
        **os.environ,
        "COMFY_URL": comfy.url,
        "DAEDALUS_PORT": str(p),
        "WORKFLOW": str(REPO / "workflows" / "flux2-klein-9b.json"),
        "BANNER_PROMPT": json.dumps(banner_prompt),
        "ARTIFACTS": str(ARTIFACTS),
        "CLIENT_ID": uuid.uuid4().hex,
    }
    r = subprocess.run(
        ["node", str(REPO / "tests" / "browser" / "icarus_node.mjs")],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=240,
    )  # fmt: skip
    print(r.stdout[-4000:])
    assert r.returncode == 0, f"browser script failed:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}\n{comfy.log(40)}"
    result = json.loads(r.stdout.strip().splitlines()[-1])
    assert result["light"] == "green" and f"127.0.0.1:{p} · server n=3/8" in result["text"], result
    assert result["confirm_visible"] and "n_blocks=5" in result["confirm_button"], result
    assert "Queueing is blocked" in result["queue_error"], result
    assert result["after_confirm_text"].endswith("server n=5/8") and not result["confirm_visible_after"], result
    assert "serves a toy model" in result["banner"] and result["banner_level_color"], result
    for shot in result["screenshots"]:
        assert Path(shot).stat().st_size > 10_000, shot
