"""The node UI's Python side without ComfyUI: address validation, the status probe against real
sockets, the probe cache, websocket events, registration guards; and the install check."""

from __future__ import annotations

import asyncio
import json
import os
import re
import socket
import sys
import threading

import pytest
from comfyui_mesh import routes
from comfyui_mesh.config import ServerConfig
from comfyui_mesh.constants import SKEW_ENV
from comfyui_mesh.errors import LocalError
from comfyui_mesh.server.core import DaedalusServer, ServerState
from comfyui_mesh.server.toy import ToyBackend

TOKEN = "0123456789abcdef0123456789abcdef"


@pytest.fixture
def toy(request):
    auth = getattr(request, "param", True)
    st = ServerState(ServerConfig(port=0, device="cpu", n_blocks=3, auth=auth), lambda n: ToyBackend(n), TOKEN)
    events = []
    st.on_event = events.append
    srv = DaedalusServer(st)
    host, port = srv.start()
    yield host, port, events
    srv.shutdown()


@pytest.fixture(autouse=True)
def no_env_token(monkeypatch):
    monkeypatch.delenv("COMFYUI_MESH_TOKEN", raising=False)
    monkeypatch.delenv(routes.ALLOWED_HOSTS_ENV, raising=False)


def test_parse_address_accepts_hosts_and_ips_only(monkeypatch):
    assert routes.parse_address(" 192.168.0.18 ", "7777") == ("192.168.0.18", 7777)
    assert routes.parse_address("gpu-box.lan", 1) == ("gpu-box.lan", 1)
    assert routes.parse_address("[::1]", 65535) == ("::1", 65535)
    for host in ("", "http://x", "a b", "x/y", "user@host", "a..b", "-x", "x" * 300, None):
        with pytest.raises(LocalError):
            routes.parse_address(host, 7777)
    for port in (0, 65536, "x", None, -1):
        with pytest.raises(LocalError):
            routes.parse_address("127.0.0.1", port)
    monkeypatch.setenv(routes.ALLOWED_HOSTS_ENV, "gpu-box, 127.0.0.1")
    assert routes.parse_address("GPU-box", 7777) == ("GPU-box", 7777)
    with pytest.raises(LocalError, match="not in COMFYUI_MESH_ALLOWED_HOSTS"):
        routes.parse_address("10.0.0.9", 7777)


def test_probe_reads_the_challenge_without_logging_in(toy, monkeypatch):
    host, port, events = toy
    s = routes.probe(host, port)
    assert s["reachable"] and (s["arch"], s["n_blocks"], s["n_blocks_max"], s["model"]) == ("toy", 3, 8, "toy-8x64")
    assert s["state"] == "red" and s["auth_needed"] and not s["token_saved"] and "token needed" in s["error"]
    assert events == [], "a probe must not log in (no client event on the server)"
    monkeypatch.setenv("COMFYUI_MESH_TOKEN", TOKEN)
    s = routes.probe(host, port)
    assert s["state"] == "green" and s["error"] is None and s["token_env"] and not s["token_rejected"]
    assert events == [], "a status probe is no client session (nothing shown in the Daedalus window)"
    json.dumps(s)  # the route returns it as JSON


def test_probe_shows_a_rejected_token_in_amber(toy, monkeypatch):
    host, port, events = toy
    monkeypatch.setenv("COMFYUI_MESH_TOKEN", "f" * 32)
    s = routes.probe(host, port)
    assert s["state"] == "amber" and s["token_rejected"] and s["reachable"]
    assert s["error"].startswith("token rejected") and "Token… button" in s["error"]
    assert s["problems"][0] == s["error"]
    assert [e["kind"] for e in events] == ["auth_failed"]


def test_probe_shows_every_problem_and_the_first_as_the_error(toy, monkeypatch):
    from comfyui_mesh import handshake

    host, port, _ = toy
    monkeypatch.delenv(SKEW_ENV, raising=False)
    monkeypatch.setattr(handshake, "local_versions", lambda comfyui="": handshake.Versions("0.0.1", comfyui, "1.0.0"))
    s = routes.probe(host, port)
    assert s["state"] == "red" and len(s["problems"]) == 3 and s["error"] == s["problems"][0]
    assert s["problems"][0].startswith("server runs ComfyUI-Mesh") and s["problems"][0].endswith(
        "this ComfyUI 0.0.1: update both"
    )
    assert s["problems"][1].startswith("server runs torch") and "this side 1.0.0" in s["problems"][1]
    assert s["problems"][2].startswith("token needed")
    monkeypatch.setenv(SKEW_ENV, "1")  # relaxes the torch check only
    assert len(routes.probe(host, port)["problems"]) == 2


@pytest.mark.parametrize("toy", [False], indirect=True)
def test_probe_of_a_no_auth_server_is_green_without_a_token(toy):
    host, port, _ = toy
    s = routes.probe(host, port)
    assert s["state"] == "green" and s["auth"] == "none" and not s["auth_needed"]


def test_probe_reports_unreachable_and_foreign_servers():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]
    r = routes.probe("127.0.0.1", closed)
    assert r["state"] == "red" and not r["reachable"] and "nothing listens" in r["error"]

    srv = socket.create_server(("127.0.0.1", 0))
    port = srv.getsockname()[1]

    def answer_http() -> None:
        conn, _ = srv.accept()
        conn.recv(1024)
        conn.sendall(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n" + b"x" * 64)
        conn.close()

    t = threading.Thread(target=answer_http, daemon=True)
    t.start()
    r = routes.probe("127.0.0.1", port, timeout=2)
    srv.close()
    assert r["state"] == "red" and "did not answer like a Daedalus server" in r["error"]
    assert "HTTP" not in r["error"], "nothing a foreign server says is passed back"


def test_prober_caches_and_runs_one_probe_per_address():
    calls = []

    def slow_probe(host, port):
        calls.append((host, port))
        import time

        time.sleep(0.2)
        return {"state": "green", "address": f"{host}:{port}", "n": len(calls)}

    async def scenario():
        p = routes.Prober(ttl=60, max_cached=2, probe_fn=slow_probe)
        a, b = await asyncio.gather(p.status("H", 1), p.status("h", 1))
        assert len(calls) == 1 and a["n"] == b["n"] == 1 and not a["cached"]
        c = await p.status("H", 1)
        assert c["cached"] and len(calls) == 1
        d = await p.status("H", 1, refresh=True)
        assert d["n"] == 2
        await p.status("x", 2)
        await p.status("y", 3)
        assert len(p._cache) == 2 and ("h", 1) not in p._cache  # the oldest went
        p.forget("y", 3)
        assert ("y", 3) not in p._cache

    asyncio.run(scenario())


class FakePromptServer:
    def __init__(self):
        self.sent = []
        self.client_id = "browser-1"
        self.routes = None

    def send_sync(self, event, data, sid=None):
        self.sent.append((event, data, sid))


def test_importing_the_pack_outside_comfyui_registers_nothing():
    import comfyui_mesh

    assert comfyui_mesh._prompt_server() is None or "server" in sys.modules
    assert routes._REGISTERED is False


def test_register_adds_three_routes_once(monkeypatch):
    from aiohttp import web  # in the test extra: this runs in CI

    ps = FakePromptServer()
    ps.routes = web.RouteTableDef()
    monkeypatch.setattr(routes, "_REGISTERED", False)
    assert routes.register(ps) is True
    assert routes.register(ps) is False
    paths = sorted((r.method, r.path) for r in ps.routes)
    assert paths == [("POST", "/mesh/reconfigure"), ("POST", "/mesh/status"), ("POST", "/mesh/token")]


_ROW = re.compile(r"^\[\s*(\S+)\s*\] (\S+)\s+(.*)$")


def _rows(lines: list[str]) -> list[tuple[str, str, str]]:
    """(status, label, text) of each report line but the last (the verdict)."""
    rows = []
    for line in lines[:-1]:
        m = _ROW.match(line)
        assert m, line
        rows.append((m[1], m[2], m[3]))
    return rows


def _expected_torch_rows(check) -> list[tuple[str, str, str]]:
    import torch

    rows = [("ok", "torch", f"{torch.__version__}, CUDA build {torch.version.cuda or 'none (CPU build)'}")]
    if not torch.cuda.is_available():
        return rows + [("--", "CUDA", "not available: Daedalus can only run with --device cpu here")]
    rows.append(("ok", "CUDA", f"available, {torch.cuda.device_count()} device(s), driver OK"))
    return rows + [("ok", "GPU", f"{check.device_label(d)}, compute {d['capability']}") for d in check.devices()[:-1]]


def test_install_check_without_comfyui_reports_it_missing(monkeypatch, tmp_path, capsys):
    import importlib.util
    import platform

    from comfyui_mesh.constants import PACKAGE_VERSION
    from comfyui_mesh.server import check, loader

    monkeypatch.delenv("COMFYUI_PATH", raising=False)
    monkeypatch.setattr(loader, "_REPO", tmp_path / "a" / "pack")  # no ComfyUI beside or above the pack either
    lines: list[str] = []
    assert check.run_checks("/nonexistent/ComfyUI", echo=lines.append) is False
    rows = _rows(lines)
    pack = loader.Path(check.__file__).resolve().parent.parent
    assert rows[:2] == [
        ("--", "Python", f"{platform.python_version()} on {platform.system()} {platform.machine()}"),
        ("ok", "ComfyUI-Mesh", f"{PACKAGE_VERSION} at {pack}"),
    ]
    torch_rows = _expected_torch_rows(check)
    assert rows[2 : 2 + len(torch_rows)] == torch_rows
    status, label, text = rows[2 + len(torch_rows)]
    assert (status, label) == ("MISSING", "ComfyUI")
    assert text == (
        "cannot find ComfyUI: pass --comfyui /path/to/ComfyUI or set COMFYUI_PATH (looked in: /nonexistent/ComfyUI, "
        f"{tmp_path}, {tmp_path / 'a' / 'ComfyUI'}, {tmp_path / 'a' / 'pack' / 'ComfyUI'})"
    )
    codec_rows = rows[3 + len(torch_rows) :]
    assert [r[1] for r in codec_rows] == ["zstandard", "PyAV", "PyNvVideoCodec", "NVENC", "nvCOMP"]
    for (status, label, text), module in zip(
        codec_rows, ["zstandard", "av", "PyNvVideoCodec", None, "nvidia.nvcomp"], strict=True
    ):
        if module is None:
            continue
        try:
            present = importlib.util.find_spec(module) is not None
        except ModuleNotFoundError:  # a missing parent package (nvidia)
            present = False
        assert status == ("ok" if present else "--"), (label, text)
        assert present or text.startswith("not installed (optional: ")
    assert lines[-1] == "Fix the MISSING lines above (the install script does it), then run this check again."
    assert check.main(["--strict", "--comfyui", "/nonexistent/ComfyUI"]) == 1
    assert check.main(["--comfyui", "/nonexistent/ComfyUI"]) == 0  # without --strict a report only
    capsys.readouterr()


def test_install_check_without_optional_codecs_is_still_a_report(monkeypatch, capsys):
    from comfyui_mesh.server import check

    monkeypatch.setattr(check, "_version", lambda m: None)
    monkeypatch.setattr(check, "_load_library", lambda names: None)
    lines: list[tuple[str, str, str]] = []
    check.check_codecs(lines)
    assert lines == [
        ("--", "zstandard", "not installed (optional: lossless compression codecs)"),
        ("--", "PyAV", "not installed (optional: video codecs on the CPU)"),
        ("--", "PyNvVideoCodec", "not installed (optional: NVENC codec)"),
        ("--", "NVENC", "driver library not found: no hardware video encoding on this machine"),
        ("--", "nvCOMP", "not installed (optional: GPU compression)"),
    ]
    assert check.main(["--devices-json"]) == 0
    devs = json.loads(capsys.readouterr().out)
    assert devs[-1] == {"id": "cpu", "name": "CPU", "free_gib": None, "total_gib": None, "capability": ""}
    assert check.device_label(devs[-1]) == "cpu"


@pytest.mark.skipif(not os.environ.get("COMFYUI_PATH"), reason="needs a ComfyUI checkout: set COMFYUI_PATH")
def test_install_check_with_comfyui_says_daedalus_can_run():
    import subprocess

    from comfyui_mesh.server.loader import TESTED_COMFYUI, find_comfyui

    root = find_comfyui(os.environ["COMFYUI_PATH"])
    r = subprocess.run(
        [sys.executable, "-m", "comfyui_mesh.server.check", "--strict", "--comfyui", str(root)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    lines = r.stdout.splitlines()
    import torch

    cpu = "" if torch.cuda.is_available() else " --device cpu"  # the command this machine can run
    assert lines[-1] == "Daedalus can run here: python -m comfyui_mesh.server --weights <model.safetensors>" + cpu
    (comfy,) = [row for row in _rows(lines) if row[1] == "ComfyUI"]
    assert comfy[0] == "ok" and comfy[2].startswith(f"{root} version ") and comfy[2].endswith("model code imports")
    assert ("tested with" in comfy[2]) != comfy[2].startswith(f"{root} version {TESTED_COMFYUI},")


def _app_client():
    """An aiohttp app with the pack's routes, and a test client for it (no ComfyUI)."""
    from aiohttp import web
    from aiohttp.test_utils import TestClient, TestServer

    ps = FakePromptServer()
    ps.routes = web.RouteTableDef()
    routes._REGISTERED = False
    try:
        routes.register(ps)
    finally:
        routes._REGISTERED = False
    app = web.Application()
    app.add_routes(ps.routes)
    return TestClient(TestServer(app))


@pytest.mark.parametrize("path", ["/mesh/status", "/mesh/token", "/mesh/reconfigure"])
def test_routes_refuse_non_json_and_cross_origin_writes_themselves(path, monkeypatch, tmp_path):
    probes = []

    async def fake_status(host, port, refresh=False):
        probes.append((host, port))
        return {"state": "red", "reachable": False}

    monkeypatch.setattr(routes.PROBER, "status", fake_status)
    monkeypatch.setattr(routes, "save_token", lambda h, p, t: {"ok": True, "saved": True})
    monkeypatch.setattr(routes, "reconfigure", lambda h, p, n: {"ok": True, "n_blocks": n})
    body = {"host": "127.0.0.1", "port": 7777, "token": "ab" * 32, "n_blocks": 2}

    async def go():
        async with _app_client() as c:
            own = f"http://{c.server.host}:{c.server.port}"
            text = await c.post(path, data=json.dumps(body), headers={"Content-Type": "text/plain"})
            form = await c.post(path, data={"host": "127.0.0.1", "port": "7777"})
            other_port = await c.post(path, json=body, headers={"Origin": f"http://{c.server.host}:1"})
            other_site = await c.post(path, json=body, headers={"Sec-Fetch-Site": "cross-site"})
            get = await c.get(path + "?host=127.0.0.1&port=7777")
            ok = await c.post(path, json=body, headers={"Origin": own})
            plain = await c.post(path, json=body)  # not a browser: no Origin, no Sec-Fetch-Site
            return [
                (r.status, await r.json() if r.content_type == "application/json" else {})
                for r in (text, form, other_port, other_site, get, ok, plain)
            ]

    text, form, other_port, other_site, get, ok, plain = asyncio.run(go())
    assert text[0] == 400 and "application/json" in text[1]["error"]
    assert form[0] == 400 and "application/json" in form[1]["error"]
    assert other_port[0] == 403 and "cross-origin request refused" in other_port[1]["error"]
    assert other_site[0] == 403 and "cross-origin request refused" in other_site[1]["error"]
    assert get[0] == 405  # nothing acts on a GET
    assert ok[0] == 200 and plain[0] == 200
    assert "ab" * 32 not in json.dumps([ok[1], plain[1]])  # the token is never returned
    if path == "/mesh/status":
        assert probes == [("127.0.0.1", 7777)] * 2  # only the two accepted requests probed anything


def test_status_route_reports_each_nodes_split_family_per_address(monkeypatch):
    from comfyui_mesh import ui_events

    cached = {"state": "green", "reachable": True, "arch": "wan"}

    async def fake_status(host, port, refresh=False):
        return cached

    monkeypatch.setattr(routes.PROBER, "status", fake_status)
    monkeypatch.setattr(ui_events, "_SPLITS", type(ui_events._SPLITS)())
    # Wan 2.2's two experts against one Daedalus, and a FLUX.1 elsewhere
    ui_events.record_split("12", "127.0.0.1:7777", "wan", "Wan", 20)
    ui_events.record_split("13", "127.0.0.1:7777", "wan", "Wan", 20)
    ui_events.record_split("4", "10.0.0.2:7777", "flux1", "FLUX.1", 28)
    ui_events.record_split("13", "127.0.0.1:7777", "wan", "Wan", 16)  # a later run of the same node

    async def go():
        async with _app_client() as c:
            r = await c.post("/mesh/status", json={"host": "127.0.0.1", "port": 7777})
            return r.status, await r.json()

    code, body = asyncio.run(go())
    assert code == 200 and body["state"] == "green" and body["arch"] == "wan"  # the probe's fields stay
    assert body["splits"] == {
        "12": {"family": "wan", "family_display": "Wan", "n_blocks": 20},
        "13": {"family": "wan", "family_display": "Wan", "n_blocks": 16},
    }
    assert "splits" not in cached  # the probe cache is not changed by what nodes did


def test_recorded_splits_keep_the_newest_nodes(monkeypatch):
    from comfyui_mesh import ui_events
    from comfyui_mesh.constants import MAX_RECORDED_SPLITS

    monkeypatch.setattr(ui_events, "_SPLITS", type(ui_events._SPLITS)())
    for i in range(MAX_RECORDED_SPLITS + 2):
        ui_events.record_split(i, "h:1", "flux2", "FLUX.2", 4)
    ui_events.record_split(2, "h:1", "flux2", "FLUX.2", 5)  # used again: now the newest
    ui_events.record_split("x", "h:1", "flux2", "FLUX.2", 4)
    kept = ui_events.splits_for("h:1")
    assert len(kept) == MAX_RECORDED_SPLITS and "0" not in kept and "1" not in kept and "3" not in kept
    assert kept["2"]["n_blocks"] == 5 and list(kept)[-2:] == ["2", "x"]
