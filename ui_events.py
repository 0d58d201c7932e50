"""Websocket events of the Icarus node UI (``web/mesh.js``), sent during a run.

``mesh-banner`` ``{node_id, level, text}``: a line under the node (ok, info, warn, error).
``mesh-stats`` ``{node_id, call, codec, bytes_out, bytes_in, ...}``: after every remote step, or
``{node_id, status}`` while a remote call is held up (``status``: e.g. "reconnecting to host:port…"),
or ``{node_id, suggestion}`` at a generation's end: the n_blocks_remote suggestion
(``balance.Suggestion.report``: current, suggested, changed, the sides' ms per step, text).

``record_split`` / ``splits_for``: the split each Icarus node last configured (its address and the
family it detected in its MODEL), which ``/mesh/status`` reports per node.

They go through ComfyUI's running ``PromptServer`` (looked up, never imported: outside a
running ComfyUI every send is a silent no-op). No aiohttp, no sockets; the HTTP routes
behind the same UI are in ``routes.py``.
"""

from __future__ import annotations

import logging
import sys
import threading
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

from .constants import MAX_RECORDED_SPLITS

log = logging.getLogger("comfyui_mesh")


def prompt_server() -> Any:
    """ComfyUI's PromptServer instance if this process is a running ComfyUI, else None (imports nothing)."""
    srv = sys.modules.get("server")
    return getattr(getattr(srv, "PromptServer", None), "instance", None)


def _send(event: str, data: dict[str, Any]) -> None:
    ps = prompt_server()
    if ps is None:
        return
    try:
        ps.send_sync(event, data, getattr(ps, "client_id", None))
    except Exception:  # the UI is a courtesy: never fail a run over it
        log.debug("ComfyUI-Mesh: could not send %s", event, exc_info=True)


def send_banner(node_id: Any, level: str, text: str) -> None:
    """Show ``text`` under the node (level: ok, info, warn, error); node_id may be a subgraph path 'a:b'."""
    _send("mesh-banner", {"node_id": str(node_id), "level": level, "text": text})


def step_reporter(node_id: Any, codec_name: str) -> Callable[[int, Any], None]:
    """A callback(call, StepStats) that sends ``mesh-stats`` for one node after every remote step."""

    def report(call: int, stats: Any) -> None:
        s = stats.server
        chosen = getattr(stats, "codec", None) or {}  # what was used (codec "auto" picks one per link)
        _send(
            "mesh-stats",
            {
                "node_id": str(node_id),
                "call": call,
                "codec": str(chosen.get("codec") or codec_name),
                "bytes_out": stats.bytes_out,
                "bytes_in": stats.bytes_in,
                "encode_ms": round(stats.encode_ms, 2),
                "round_trip_ms": round(stats.wait_ms, 2),
                "decode_ms": round(stats.decode_ms, 2),
                "server_forward_ms": round(float(s.get("forward", 0.0)), 2),
            },
        )

    return report


def status_reporter(node_id: Any) -> Callable[[str, str], None]:
    """A callback(level, text) for a remote call held up or recovered (``MeshClient.forward``'s
    ``on_status``): the node's banner shows ``text`` and its stats line the state ("reconnecting…")."""

    def report(level: str, text: str) -> None:
        send_banner(node_id, level, text)
        if level == "warn":
            _send("mesh-stats", {"node_id": str(node_id), "status": text.split(" (", 1)[0]})

    return report


def suggestion_reporter(node_id: Any) -> Callable[[Any], None]:
    """A callback(balance.Suggestion) that sends ``mesh-stats`` with the ``suggestion`` at a generation's
    end (the node shows its line; nothing changes by itself)."""

    def report(suggestion: Any) -> None:
        _send("mesh-stats", {"node_id": str(node_id), "suggestion": suggestion.report()})

    return report


# ---------------------------------------------------------------------------- splits the nodes configured
_SPLITS: OrderedDict[str, dict[str, Any]] = OrderedDict()
_SPLITS_LOCK = threading.Lock()


def record_split(node_id: Any, address: str, family: str, display: str, n_blocks: int) -> None:
    """Remember that node ``node_id`` split a ``family`` model for the server at ``address``."""
    entry = {"address": address, "family": family, "family_display": display, "n_blocks": int(n_blocks)}
    with _SPLITS_LOCK:
        _SPLITS.pop(str(node_id), None)
        _SPLITS[str(node_id)] = entry
        while len(_SPLITS) > MAX_RECORDED_SPLITS:
            _SPLITS.popitem(last=False)


def splits_for(address: str) -> dict[str, dict[str, Any]]:
    """node id -> {family, family_display, n_blocks} of the splits last configured against ``address``."""
    with _SPLITS_LOCK:
        return {
            node: {k: v for k, v in e.items() if k != "address"}
            for node, e in _SPLITS.items()
            if e["address"] == address
        }
