"""Websocket events of the node UI (banners, step stats): sent only inside a running ComfyUI."""

from __future__ import annotations

import sys
import types

from comfyui_mesh import ui_events
from comfyui_mesh.transport import StepStats


class FakePromptServer:
    def __init__(self):
        self.sent = []
        self.client_id = "browser-1"

    def send_sync(self, event, data, sid=None):
        self.sent.append((event, data, sid))


def test_banners_and_stats_reach_the_prompt_server_only_when_there_is_one(monkeypatch):
    monkeypatch.delitem(sys.modules, "server", raising=False)
    assert ui_events.prompt_server() is None
    ui_events.send_banner("12:5", "error", "nothing here")  # no ComfyUI: a silent no-op
    ps = FakePromptServer()
    fake = types.ModuleType("server")
    fake.PromptServer = types.SimpleNamespace(instance=ps)
    monkeypatch.setitem(sys.modules, "server", fake)
    ui_events.send_banner("12:5", "error", "cannot reach it")
    stats = StepStats(bytes_out=5_000_000, bytes_in=4_000_000, encode_ms=1.234, wait_ms=130.0, decode_ms=2.0)
    stats.server = {"forward": 80.5}
    ui_events.step_reporter(7, "raw")(3, stats)
    assert ps.sent[0] == ("mesh-banner", {"node_id": "12:5", "level": "error", "text": "cannot reach it"}, "browser-1")
    event, data, sid = ps.sent[1]
    assert event == "mesh-stats" and sid == "browser-1"
    assert data == {"node_id": "7", "call": 3, "codec": "raw", "bytes_out": 5_000_000, "bytes_in": 4_000_000,
                    "encode_ms": 1.23, "round_trip_ms": 130.0, "decode_ms": 2.0, "server_forward_ms": 80.5}  # fmt: skip
    ps.send_sync = lambda *a: (_ for _ in ()).throw(RuntimeError("ws closed"))
    ui_events.send_banner("1", "info", "never raises")
    assert len(ps.sent) == 2


def test_a_held_up_call_shows_in_the_banner_and_the_stats_line(monkeypatch):
    ps = FakePromptServer()
    fake = types.ModuleType("server")
    fake.PromptServer = types.SimpleNamespace(instance=ps)
    monkeypatch.setitem(sys.modules, "server", fake)
    report = ui_events.status_reporter("4")
    report("warn", "reconnecting to 10.0.0.2:7777… (try 2, 1 s of 60 s): connection refused")
    report("ok", "reconnected to 10.0.0.2:7777 after 3 s")
    assert [(e, d) for e, d, _ in ps.sent] == [
        ("mesh-banner", {"node_id": "4", "level": "warn",
                         "text": "reconnecting to 10.0.0.2:7777… (try 2, 1 s of 60 s): connection refused"}),
        ("mesh-stats", {"node_id": "4", "status": "reconnecting to 10.0.0.2:7777…"}),
        ("mesh-banner", {"node_id": "4", "level": "ok", "text": "reconnected to 10.0.0.2:7777 after 3 s"}),
    ]  # fmt: skip


def test_ui_events_import_no_network_modules():
    import ast
    from pathlib import Path

    tree = ast.parse(Path(ui_events.__file__).read_text())
    names = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    names |= {n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    assert not names & {"aiohttp", "socket", "asyncio"}, names
