"""The node UI's Python side without ComfyUI: address validation, the status probe against real
sockets, the probe cache, websocket events, registration guards; and the install check."""

from __future__ import annotations

import asyncio
import json
import socket
import sys
import threading

import pytest
from comfyui_mesh import routes
from comfyui_mesh.config import ServerConfig
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
    assert s["state"] == "green" and s["error"] is None and s["token_env"]
    json.dumps(s)  # the route returns it as JSON


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
    web = pytest.importorskip("aiohttp.web")
    ps = FakePromptServer()
    ps.routes = web.RouteTableDef()
    monkeypatch.setattr(routes, "_REGISTERED", False)
    assert routes.register(ps) is True
    assert routes.register(ps) is False
    paths = sorted((r.method, r.path) for r in ps.routes)
    assert paths == [("GET", "/mesh/status"), ("POST", "/mesh/reconfigure"), ("POST", "/mesh/token")]


def test_install_check_never_crashes_and_lists_devices(monkeypatch, capsys):
    from comfyui_mesh.server import check

    lines = []
    ok = check.run_checks("/nonexistent/ComfyUI", echo=lines.append)
    text = "\n".join(lines)
    for label in ("Python", "torch", "ComfyUI", "zstandard", "PyAV", "PyNvVideoCodec", "NVENC", "nvCOMP"):
        assert label in text, label
    assert isinstance(ok, bool)
    monkeypatch.setattr(check, "_version", lambda m: None)  # everything optional missing: still a report
    lines.clear()
    check.check_codecs(lines)
    assert all(status in (check.INFO, check.OK) for status, _, _ in lines)
    assert check.main(["--devices-json"]) == 0
    devs = json.loads(capsys.readouterr().out)
    assert devs[-1]["id"] == "cpu" and check.device_label(devs[-1]) == "cpu"
    assert check.main(["--strict", "--comfyui", "/nonexistent/ComfyUI"]) in (0, 1)
