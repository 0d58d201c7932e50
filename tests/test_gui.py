"""The Daedalus window on a virtual X screen (Xvfb): start a model-free server by clicking Start,
see the status and the client count change when a real client connects, follow a client's
reconfigure, stop; a screenshot goes to the artifacts folder.

Skipped, with the reason printed, where Xvfb is missing (Debian: apt-get install xvfb xdotool
imagemagick). Clicks go through xdotool when it is installed, else through Tk's invoke().
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest
import torch

pytest.importorskip("tkinter", reason="this Python has no tkinter (Debian/Ubuntu: apt-get install python3-tk)")

REPO = Path(__file__).resolve().parent.parent
ARTIFACTS = Path(os.environ.get("MESH_ARTIFACTS_DIR", REPO / "artifacts"))


def _skip(reason: str) -> None:
    print(f"\nSKIP test_gui: {reason}")
    pytest.skip(reason)


@pytest.fixture(scope="module")
def display():
    xvfb = shutil.which("Xvfb")
    if not xvfb:
        _skip("Xvfb is not installed (Debian: apt-get install xvfb xdotool imagemagick)")
    n = next(i for i in range(91, 200) if not Path(f"/tmp/.X{i}-lock").exists())
    proc = subprocess.Popen(
        [xvfb, f":{n}", "-screen", "0", "1280x900x24", "-nolisten", "tcp"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    sock = Path(f"/tmp/.X11-unix/X{n}")
    deadline = time.monotonic() + 15
    while not sock.exists() and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.05)
    if not sock.exists():
        proc.kill()
        _skip(f"Xvfb did not start on :{n}")
    old = os.environ.get("DISPLAY")
    os.environ["DISPLAY"] = f":{n}"
    try:
        yield f":{n}"
    finally:
        if old is None:
            os.environ.pop("DISPLAY", None)
        else:
            os.environ["DISPLAY"] = old
        proc.terminate()
        proc.wait(10)


def pump(root, until, timeout: float = 20.0, what: str = "condition") -> None:
    """Run the Tk event loop until ``until()`` is true."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        root.update()
        if until():
            return
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


def click(root, button) -> str:
    """A real pointer click through X (xdotool) when available, else invoke()."""
    root.update()
    if shutil.which("xdotool"):
        x = button.winfo_rootx() + button.winfo_width() // 2
        y = button.winfo_rooty() + button.winfo_height() // 2
        subprocess.run(["xdotool", "mousemove", "--sync", str(x), str(y), "click", "1"], check=True, timeout=10)
        return "xdotool"
    button.invoke()
    return "invoke"


def screenshot(root, path: Path) -> Path:
    root.update()
    path.parent.mkdir(parents=True, exist_ok=True)
    if shutil.which("import"):
        subprocess.run(["import", "-window", "root", str(path)], check=True, timeout=30)
    else:
        from PIL import ImageGrab

        ImageGrab.grab(xdisplay=os.environ["DISPLAY"]).save(path)
    return path


def test_gui_starts_a_toy_server_counts_clients_follows_reconfigure_and_stops(display, tmp_path):
    import tkinter as tk

    from comfyui_mesh.config import ClientConfig
    from comfyui_mesh.server import gui
    from comfyui_mesh.server.toy import ToyModel
    from comfyui_mesh.transport import MeshClient

    state = tmp_path / "state"
    root = tk.Tk()
    app = gui.App(root, state, toy=True)
    client = None
    try:
        root.geometry("860x760+0+0")
        app.v["port"].set(0)  # any free port
        app.v["n_blocks"].set(3)
        app.add_lora("/loras/flux2-turbo.safetensors", 0.8)  # stored and handed to ServerConfig.loras
        pump(root, lambda: root.winfo_ismapped(), what="the window to map")
        assert app.status_label.cget("text") == "stopped"
        assert app.stop_button.instate(["disabled"])
        assert len(app.token) >= 32 and (state / "token").is_file()

        how = click(root, app.start_button)
        pump(
            root,
            lambda: "listening on" in app.status_label.cget("text"),
            what=f"the status to show the running server (Start clicked via {how})",
        )
        status = app.status_label.cget("text")
        assert "listening on 127.0.0.1:" in status and "toy-8x64 (toy), last 3 of 8 blocks" in status, status
        host, port = app.runner.server.address
        assert port > 0
        assert "clients 0" in app.stats_label.cget("text")

        client = MeshClient(ClientConfig(host=host, port=port, token=app.token), expect={"arch": "toy", "n_blocks": 3})
        ch = client.connect()
        assert (ch.arch, ch.n_blocks) == ("toy", 3)
        pump(root, lambda: "clients 1" in app.stats_label.cget("text"), what="the client count to reach 1")

        model, g = ToyModel(), torch.Generator().manual_seed(0)
        x, bias = torch.randn(1, 5, 64, generator=g), torch.randn(64, generator=g)
        out, _ = client.forward(
            arch="toy", n_blocks=3, coded={"x": model.run(x, bias, 0, 5)}, exact={}, consts={"bias": bias}, scalars={}
        )
        assert torch.equal(out["out"], model.run(x, bias))
        pump(root, lambda: "steps 1" in app.stats_label.cget("text"), what="the step stats")
        assert "forward" in app.stats_label.cget("text")

        # A client's Confirm: the server reloads in place and the window follows, no restart.
        client.reconfigure(5)
        pump(root, lambda: int(app.v["n_blocks"].get()) == 5, what="n_blocks to follow the reconfigure")
        assert "toy-8x64 (toy), last 5 of 8 blocks  (reconfigured by a client)" in app.status_label.cget("text")
        assert app.runner.phase == "running"
        saved = json.loads((state / gui.SETTINGS_FILE).read_text())
        assert saved["n_blocks"] == 5 and saved["loras"] == [["/loras/flux2-turbo.safetensors", 0.8]]
        assert app.runner.state.cfg.loras == (("/loras/flux2-turbo.safetensors", 0.8),)
        log_text = app.log_text.get("1.0", "end")
        assert "READY listening on" in log_text and "reconfiguring: n_blocks 3 -> 5" in log_text, log_text

        shot = screenshot(root, ARTIFACTS / "daedalus_gui.png")
        assert shot.stat().st_size > 10_000
        from PIL import Image

        with Image.open(shot) as im:
            crop = im.convert("RGB").crop((0, 0, 860, 760))
            assert len(crop.getcolors(1 << 20) or []) > 20, "the screenshot looks blank"
        print(f"\nGUI screenshot: {shot}")

        click(root, app.stop_button)
        pump(root, lambda: app.status_label.cget("text") == "stopped", what="the status to show the server stopped")
        assert app.status_label.cget("text") == "stopped"
        assert "clients 0" in app.stats_label.cget("text")
        assert not app.start_button.instate(["disabled"])
    finally:
        if client is not None:
            client.close()
        app.close()


def test_named_tokens_from_the_window_take_effect_without_a_restart(display, tmp_path):
    import tkinter as tk

    from comfyui_mesh.config import ClientConfig
    from comfyui_mesh.errors import AuthError
    from comfyui_mesh.server import gui
    from comfyui_mesh.transport import MeshClient

    root = tk.Tk()
    app = gui.App(root, tmp_path / "state", toy=True)
    try:
        app.v["port"].set(0)
        app.v["n_blocks"].set(3)
        app.start()
        pump(root, lambda: app.runner.server is not None, what="the toy server to start")
        host, port = app.runner.server.address
        e = app.add_named_token("gpu-2", max_sessions=1)
        client = MeshClient(ClientConfig(host=host, port=port, token=e.token), expect={"arch": "toy", "n_blocks": 3})
        client.connect()
        pump(root, lambda: "clients 1 (gpu-2)" in app.stats_label.cget("text"), what="the client and its token name")
        app.open_tokens()  # the dialog lists it
        root.update()
        app.revoke_named_token("gpu-2")
        pump(root, lambda: "clients 0" in app.stats_label.cget("text"), what="the revoked token's session to close")
        with pytest.raises(AuthError):
            MeshClient(ClientConfig(host=host, port=port, token=e.token)).connect()
        client.close()
    finally:
        app.close()


def test_settings_round_trip_and_bad_files(tmp_path):
    from comfyui_mesh.server.gui import GuiSettings

    p = tmp_path / "s.json"
    s = GuiSettings(
        weights="/m/flux.safetensors",
        n_blocks=9,
        port=7000,
        device="cuda:1",
        gpu_entropy=False,
        loras=[["/l/a.safetensors", 0.5]],
    )
    s.save(p)
    assert GuiSettings.load(p) == s
    cfg = s.server_config(tmp_path)
    assert cfg.loras == (("/l/a.safetensors", 0.5),) and cfg.n_blocks == 9 and cfg.token_path == tmp_path / "token"
    assert cfg.gpu_entropy is False and GuiSettings().server_config(tmp_path).gpu_entropy is True
    p.write_text(json.dumps({"n_blocks": "many", "port": 7001, "unknown": 1, "loras": [["x", "strong"], ["y", 1]]}))
    got = GuiSettings.load(p)
    assert (got.n_blocks, got.port, got.loras) == (4, 7001, [["y", 1.0]])
    p.write_text("{broken")
    assert GuiSettings.load(p) == GuiSettings()


def test_inspect_checkpoint_reads_family_and_block_counts_from_the_header(tmp_path):
    from comfyui_mesh.errors import LocalError
    from comfyui_mesh.server.gui import inspect_checkpoint
    from safetensors.torch import save_file

    keys = ["img_in.weight", "double_stream_modulation_img.lin.weight", "final_layer.linear.weight"]
    keys += [f"double_blocks.{i}.img_attn.qkv.weight" for i in range(2)]
    keys += [f"single_blocks.{i}.linear1.weight" for i in range(3)]
    save_file({"model.diffusion_model." + k: torch.zeros(1) for k in keys}, str(tmp_path / "f.safetensors"))
    info = inspect_checkpoint(str(tmp_path / "f.safetensors"))
    assert (info.family, info.total, info.counts) == ("flux2", 5, {"double_blocks": 2, "single_blocks": 3})
    assert info.describe().startswith("family FLUX.2 (flux2): 5 blocks") and "n_blocks 1..5" in info.describe()
    assert info.n_blocks_problem(1) is None and info.n_blocks_problem(5) is None
    for n in (0, 6):
        msg = info.n_blocks_problem(n)
        assert msg is not None and f"n_blocks {n} is out of range" in msg and "f.safetensors (FLUX.2) has 5 blocks"
        assert msg is not None and "choose 1..5" in msg, msg
    (tmp_path / "bad.safetensors").write_bytes(b"\xff" * 16)
    with pytest.raises(LocalError, match="not a .safetensors"):
        inspect_checkpoint(str(tmp_path / "bad.safetensors"))
    save_file({"foo.weight": torch.zeros(1)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(LocalError, match="not a model ComfyUI-Mesh can split"):
        inspect_checkpoint(str(tmp_path / "other.safetensors"))


def test_entry_point_opens_the_window_and_autostarts_a_toy_server(display, tmp_path):
    import sys

    state = tmp_path / "state"
    state.mkdir()
    (state / "gui_settings.json").write_text(json.dumps({"port": 0, "device": "cpu", "n_blocks": 2}))
    proc = subprocess.Popen(
        [sys.executable, "-m", "comfyui_mesh.server.gui", "--toy", "--start", "--state-dir", str(state)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    lines = []
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            lines.append(line)
            if "READY listening on" in line:
                break
        assert any("READY listening on 127.0.0.1:" in ln and "last 2 of 8" in ln for ln in lines), "".join(lines)
        r = subprocess.run(["xdotool", "search", "--name", "Daedalus"], capture_output=True, text=True) if shutil.which(
            "xdotool"
        ) else None  # fmt: skip
        if r is not None:
            assert r.stdout.strip(), "no window titled Daedalus on the X display"
    finally:
        proc.terminate()
        proc.wait(15)


def _header_only(path: Path, keys: list[str]) -> Path:
    """A .safetensors file holding only a header (what the window reads) for ``keys``."""
    head = json.dumps({k: {"dtype": "F32", "shape": [0], "data_offsets": [0, 0]} for k in keys}).encode()
    path.write_bytes(len(head).to_bytes(8, "little") + head)
    return path


# checkpoint key sets of families other than FLUX.2 (the keys each adapter's detect_keys looks at)
WAN_KEYS = ["patch_embedding.weight", "text_embedding.0.weight", "head.head.weight", "head.modulation"] + [
    f"blocks.{i}.self_attn.q.weight" for i in range(4)
]


@pytest.mark.parametrize("prefix", ["", "diffusion_model.", "model.diffusion_model."])
def test_the_window_recognises_a_model_as_the_server_loader_does(tmp_path, prefix):
    from comfyui_mesh import arch
    from comfyui_mesh.server.gui_runner import inspect_checkpoint

    keys = [prefix + k for k in WAN_KEYS] + ["text_encoders.t5.weight", "vae.decoder.weight"]
    got = arch.for_checkpoint(keys + ["__metadata__"])
    assert (got[0], got[1].family, got[2]) == (prefix, "wan", {"blocks": 4})
    info = inspect_checkpoint(str(_header_only(tmp_path / "wan.safetensors", keys)))
    assert (info.family, info.display, info.total, info.name) == ("wan", got[1].display, 4, "wan.safetensors")
    assert "n_blocks 7 is out of range" in (info.n_blocks_problem(7) or "")


def test_the_window_shows_the_family_and_checks_n_blocks_against_it(display, tmp_path):
    import tkinter as tk

    from comfyui_mesh.server import gui

    weights = _header_only(tmp_path / "wan.safetensors", WAN_KEYS)
    root = tk.Tk()
    app = gui.App(root, tmp_path / "state")
    try:
        app.v["n_blocks"].set(3)
        app.v["weights"].set(str(weights))
        app.inspect_model()
        pump(root, lambda: app.model_info is not None, what="the model file to be inspected")
        assert app.model_label.cget("text").startswith("family Wan"), app.model_label.cget("text")
        assert "1..4" in app.n_range.cget("text") and str(app.n_spin.cget("to")) in ("4", "4.0")
        app.v["n_blocks"].set(9)  # typing a value re-checks it at once
        root.update()
        assert "n_blocks 9 is out of range: wan.safetensors" in app.n_range.cget("text")
        app.start()  # refused before anything loads, with the same message
        assert "choose 1..4" in app.status_label.cget("text") and app.runner.phase == "stopped"
        app.v["n_blocks"].set(4)
        root.update()
        assert "out of range" not in app.n_range.cget("text")
    finally:
        app.close()
