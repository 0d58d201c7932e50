"""The Daedalus window's non-Tk half: settings, checkpoint inspection, the in-process server on
worker threads, the log handler. Nothing here touches a widget: results go onto the window's queue.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import struct
import subprocess
import sys
import threading
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from .. import arch, auth
from ..config import ServerConfig
from ..constants import DEFAULT_BIND, DEFAULT_PORT
from ..errors import LocalError, MeshError
from .tokens import NamedTokens

log = logging.getLogger("daedalus")

SETTINGS_FILE = "gui_settings.json"


# ---------------------------------------------------------------------------- settings
@dataclass
class GuiSettings:
    """What the window remembers (JSON in the state folder). Unknown or bad keys are dropped."""

    weights: str = ""
    n_blocks: int = 4
    port: int = DEFAULT_PORT
    bind: str = DEFAULT_BIND
    device: str = "cuda:0"
    dtype: str = "auto"
    comfyui_path: str = ""
    auth: bool = True
    gpu_entropy: bool = True  # decode clients' nvCOMP ANS payloads (off: ask them for zstd)
    encrypt: bool = True  # seal frames after the handshake (off: --no-encrypt, same-host pairs)
    loras: list = field(default_factory=list)  # [[path, strength], ...]

    @classmethod
    def load(cls, path: Path) -> GuiSettings:
        s = cls()
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            return s
        except (OSError, ValueError) as e:
            log.warning("ignoring unreadable settings %s: %s", path, e)
            return s
        for f in fields(cls):
            if f.name in data and isinstance(data[f.name], type(getattr(s, f.name))):
                setattr(s, f.name, data[f.name])
        s.loras = [[str(p), float(w)] for p, w in s.loras if isinstance(p, str) and isinstance(w, (int, float))]
        return s

    def save(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(asdict(self), indent=1))
        os.replace(tmp, path)

    def server_config(self, state_dir: Path) -> ServerConfig:
        return ServerConfig(
            weights=self.weights,
            n_blocks=self.n_blocks,
            bind=self.bind,
            port=self.port,
            device=self.device,
            dtype=self.dtype,
            comfyui_path=self.comfyui_path,
            auth=self.auth,
            gpu_entropy=self.gpu_entropy,
            encrypt=self.encrypt,
            state_dir=str(state_dir),
            loras=tuple((p, w) for p, w in self.loras if p),
        )


# ---------------------------------------------------------------------------- checkpoint
@dataclass(frozen=True)
class ModelInfo:
    family: str
    display: str
    counts: dict
    total: int
    name: str = ""  # the file's name

    def describe(self) -> str:
        parts = ", ".join(f"{n} {g.replace('_', ' ')}" for g, n in self.counts.items())
        return f"family {self.display} ({self.family}): {self.total} blocks ({parts}); n_blocks 1..{self.total}"

    def n_blocks_problem(self, n: int) -> str | None:
        """Why ``n`` cannot be served from this model, with the fix; None when it can."""
        if 1 <= n <= self.total:
            return None
        return (
            f"n_blocks {n} is out of range: {self.name or 'this model'} ({self.display}) has {self.total} blocks; "
            f"choose 1..{self.total} (and the same n_blocks_remote on the Icarus node)"
        )


def inspect_checkpoint(path: str) -> ModelInfo:
    """Family and block counts from a .safetensors header alone (no tensor is read, nothing imported),
    recognised as the server's loader does (``arch.for_checkpoint``)."""
    p = Path(path)
    try:
        with p.open("rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            if not 2 <= n <= 100 << 20:
                raise LocalError(f"{p.name} is not a .safetensors file (header length {n})")
            header = json.loads(f.read(n))
    except (OSError, struct.error, ValueError) as e:
        raise LocalError(f"cannot read {p}: {e}") from None
    _, a, counts = arch.for_checkpoint(header)
    return ModelInfo(a.family, a.display, counts, sum(counts.values()), p.name)


def family_display(family: str) -> str:
    """A family's display name (the wire name for one without an adapter, e.g. the toy model)."""
    a = arch.REGISTRY.get(family)
    return a.display if a is not None else family


def listening_text(ready: dict[str, Any]) -> str:
    """The status line of a running server, from its "ready" event."""
    r = ready
    return (
        f"listening on {r.get('host')}:{r.get('port')} — {r.get('model')} ({r.get('family')}), "
        f"last {r.get('n_blocks')} of {r.get('max')} blocks"
    )


# ---------------------------------------------------------------------------- server on worker threads
class ServerRunner:
    """Starts and stops one in-process Daedalus; reports through ``events`` (never touches Tk)."""

    def __init__(self, events: queue.Queue, toy: bool = False):
        self.events = events
        self.toy = toy
        self.state: Any = None
        self.server: Any = None
        self.phase = "stopped"
        self.comfy_fixed: tuple[str, str] | None = None  # (device, ComfyUI path) of the first real load
        self._op = threading.Lock()

    def _status(self, phase: str, text: str) -> None:
        self.phase = phase
        self.events.put(("status", phase, text))

    def start(self, cfg: ServerConfig, token: str | None) -> None:
        threading.Thread(target=self._start, args=(cfg, token), name="daedalus-start", daemon=True).start()

    def stop(self) -> None:
        threading.Thread(target=self._stop, name="daedalus-stop", daemon=True).start()

    def restart(self, cfg: ServerConfig, token: str | None) -> None:
        def run() -> None:
            self._stop()
            self._start(cfg, token)

        threading.Thread(target=run, name="daedalus-restart", daemon=True).start()

    def _factory(self, cfg: ServerConfig):
        from .__main__ import make_factory

        if not self.toy:
            if not cfg.weights:
                raise LocalError("choose a model file first")
            fixed = (cfg.device, cfg.comfyui_path)
            if self.comfy_fixed is not None and self.comfy_fixed != fixed:
                raise LocalError(
                    "ComfyUI fixes its device and folder once per process: close this window and open it "
                    f"again to use {cfg.device} / {cfg.comfyui_path or 'the default ComfyUI'}"
                )
            self.comfy_fixed = fixed
        return make_factory(cfg, self.toy)

    def _start(self, cfg: ServerConfig, token: str | None) -> None:
        from .core import DaedalusServer, ServerState

        with self._op:
            if self.server is not None:
                return
            self._status("starting", "loading the back half…" if not self.toy else "starting the toy server…")
            try:
                sid = auth.load_or_create_server_id(cfg.server_id_path) if cfg.auth else None
                state = ServerState(
                    cfg,
                    self._factory(cfg),
                    token,
                    on_event=lambda e: self.events.put(("server", e)),
                    server_id=sid,
                    named=NamedTokens(cfg.state_path) if cfg.auth else None,
                )
                server = DaedalusServer(state)
                host, port = server.start()
            except MeshError as e:
                log.error("%s", e)
                self._status("error", str(e))
                return
            except Exception as e:  # a failed load must leave the window usable
                log.exception("start failed")
                self._status("error", f"{type(e).__name__}: {e}")
                return
            self.state, self.server = state, server
            b = state.backend
            log.info(
                "READY listening on %s:%d | %s %s | last %d of %d blocks on %s",
                host,
                port,
                b.arch,
                b.model_name,
                b.n_blocks,
                b.n_blocks_max,
                b.device,
            )
            ready = {"host": host, "port": port, "model": b.model_name, "n_blocks": b.n_blocks, "max": b.n_blocks_max,
                     "family": family_display(b.arch)}  # fmt: skip
            self.events.put(("ready", ready))
            self._status("running", listening_text(ready))

    def _stop(self) -> None:
        with self._op:
            server, state = self.server, self.state
            if server is None:
                return
            self._status("stopping", "stopping…")
            try:
                server.shutdown()
                state.close()
            except Exception:
                log.exception("error while stopping")
            self.server = self.state = None
            try:
                import torch

                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
            except Exception:
                pass
            log.info("stopped")
            self._status("stopped", "stopped")

    def reload_tokens(self) -> None:
        """The window changed the named tokens: the running server takes them now (not in a second)."""
        if self.state is not None:
            self.state.reload_tokens()

    def set_token(self, token: str | None) -> None:
        """A regenerated token takes effect for new connections at once (sessions of the old one close)."""
        if self.state is not None and self.state.cfg.auth:
            self.state.set_token(token)


class QueueLogHandler(logging.Handler):
    """Log records -> the window's queue: INFO and up from Daedalus, WARNING and up from the rest."""

    def __init__(self, events: queue.Queue):
        super().__init__(logging.INFO)
        self.events = events
        self.setFormatter(logging.Formatter("%(asctime)s  %(message)s", "%H:%M:%S"))

    def filter(self, record: logging.LogRecord) -> bool:
        return record.name.startswith("daedalus") or record.levelno >= logging.WARNING

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.events.put(("log", record.levelno, self.format(record)))
        except Exception:
            self.handleError(record)


def list_devices() -> list[dict[str, Any]]:
    """Devices from a child process (no CUDA context lands in this one); CPU only if that fails."""
    try:
        out = subprocess.run(
            [sys.executable, "-m", "comfyui_mesh.server.check", "--devices-json"],
            capture_output=True,
            text=True,
            timeout=60,
        )
        return json.loads(out.stdout.strip().splitlines()[-1])
    except (OSError, subprocess.SubprocessError, ValueError, IndexError):
        return [{"id": "cpu", "name": "CPU", "free_gib": None, "total_gib": None, "capability": ""}]


def human_bytes(n: float) -> str:
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{int(n)} B"
