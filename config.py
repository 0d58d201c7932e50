"""Typed configuration shared by the node, the CLI and the GUI."""

from __future__ import annotations

import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from .constants import (
    CONNECT_TIMEOUT_S,
    DEFAULT_BIND,
    DEFAULT_HOST,
    DEFAULT_PORT,
    HANDSHAKE_TIMEOUT_S,
    HEARTBEAT_INTERVAL_S,
    LIVENESS_TIMEOUT_S,
    MAX_CLIENTS,
    MAX_CODEC_STATE_BYTES,
    MAX_CODEC_STATE_TOTAL_BYTES,
    MAX_CONST_TOTAL_BYTES,
    MAX_DECODED_REQUEST_BYTES,
    MAX_INFLIGHT_BYTES,
    MAX_LORA_BYTES,
    MAX_PATCH_KV_BYTES,
    MAX_UNAUTHENTICATED,
    MAX_UNAUTHENTICATED_PER_ADDRESS,
    READ_TIMEOUT_S,
    RETRY_BACKOFF_MAX_S,
    RETRY_BACKOFF_S,
    RETRY_BUDGET_S,
    SAMEHOST_MAX_BYTES,
    SERVER_CONST_CACHE_BYTES,
    SERVER_IDLE_TIMEOUT_S,
    STREAM_MIN_BYTES,
    STREAM_SLAB_BYTES,
)
from .errors import LocalError


def _check_port(port: int) -> int:
    if not isinstance(port, int) or isinstance(port, bool) or not (0 <= port <= 65535):
        raise LocalError(f"port {port!r} must be an integer 0..65535")
    return port


@dataclass(frozen=True)
class ClientConfig:
    host: str = DEFAULT_HOST
    port: int = DEFAULT_PORT
    token: str | None = None  # None: no token (only works against a --no-auth server)
    connect_timeout_s: float = CONNECT_TIMEOUT_S  # seconds for TCP connect
    handshake_timeout_s: float = HANDSHAKE_TIMEOUT_S  # seconds for the hello/auth exchange
    read_timeout_s: float = READ_TIMEOUT_S  # seconds one request may wait for its reply (upper bound)
    # seconds without any frame (reply or heartbeat) from a server serving a request = it is gone (retried)
    liveness_timeout_s: float = LIVENESS_TIMEOUT_S
    retry_backoff_s: float = RETRY_BACKOFF_S  # seconds before the first reconnect of a failed model call
    retry_backoff_max_s: float = RETRY_BACKOFF_MAX_S  # the wait doubles up to this many seconds
    retry_budget_s: float = RETRY_BUDGET_S  # seconds a model call keeps retrying after its first failure
    client_name: str = "icarus"
    # The JSON file where the server id of each host:port is pinned on first use (auth.TokenStore: the
    # node's tokens.json); "" = nothing pinned.
    trust_file: str = ""
    # Accept a server that authenticates but does not encrypt (--no-encrypt) on a non-loopback address.
    allow_unencrypted: bool = False
    samehost: bool = True  # use the same-host fast path when the server proves it is on this host
    samehost_max_bytes: int = SAMEHOST_MAX_BYTES  # this side's shared-memory segment, at most
    # Streamed calls (docs/PROTOCOL.md §6.1): coded tensors travel as slabs of about this many raw
    # bytes, and the reply too, when a call's coded tensors add up to stream_min_bytes or more; 0 = off.
    stream_slab_bytes: int = STREAM_SLAB_BYTES
    stream_min_bytes: int = STREAM_MIN_BYTES
    # "auto": as many slabs (of at least stream_slab_bytes) as make the call fastest, from the measured
    # link rate and what this codec's slabs cost on this connection (streaming.best_parts): many for
    # raw, few or one for an entropy coder on a GPU (a cost per call); "fixed": slabs of stream_slab_bytes.
    stream_plan: str = "auto"

    def __post_init__(self) -> None:
        _check_port(self.port)
        if self.stream_slab_bytes < 0 or self.stream_min_bytes < 0:
            raise LocalError("stream_slab_bytes and stream_min_bytes are byte counts (0 or more)")
        if self.stream_plan not in ("auto", "fixed"):
            raise LocalError(f"stream_plan must be 'auto' or 'fixed', got {self.stream_plan!r}")
        if not self.host.strip():
            raise LocalError("remote_host is empty: enter the Daedalus machine's address, e.g. 192.168.0.18")
        for name in ("connect_timeout_s", "handshake_timeout_s", "read_timeout_s", "liveness_timeout_s"):
            if not getattr(self, name) > 0:
                raise LocalError(f"{name} must be > 0 seconds, got {getattr(self, name)!r}")
        for name in ("retry_backoff_s", "retry_backoff_max_s", "retry_budget_s"):
            if not getattr(self, name) >= 0:
                raise LocalError(f"{name} must be >= 0 seconds, got {getattr(self, name)!r}")

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"


def default_state_dir() -> Path:
    """Where Daedalus keeps its token and GUI settings (XDG on Linux/macOS, APPDATA on Windows)."""
    if os.name == "nt" and os.environ.get("APPDATA"):
        return Path(os.environ["APPDATA"]) / "comfyui-mesh" / "daedalus"
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "comfyui-mesh" / "daedalus"


@dataclass(frozen=True)
class ServerConfig:
    weights: str = ""  # path to the model checkpoint (.safetensors)
    # More checkpoints served beside ``weights`` by the same process (--weights repeated), e.g. Wan 2.2's
    # low-noise expert beside its high-noise one: same family, same n_blocks; a session is bound to the
    # one its HELLO's fingerprint names (docs/PROTOCOL.md §5.4).
    extra_weights: tuple[str, ...] = ()
    n_blocks: int = 4  # back-half blocks to serve, counted from the end of the model
    bind: str = DEFAULT_BIND  # address to listen on; 0.0.0.0 for LAN clients
    port: int = DEFAULT_PORT  # 0 picks a free port (tests)
    device: str = "cuda:0"  # torch device for the back half
    dtype: str = "auto"  # auto | bfloat16 | float16 | float32 (compute/storage dtype)
    comfyui_path: str = ""  # ComfyUI checkout; "" = COMFYUI_PATH or a sibling folder
    auth: bool = True  # False only with the explicit --no-auth flag
    # Seal every frame after the handshake (AES-256-GCM, keys from the token); False (--no-encrypt) only
    # for trusted same-host pairs: clients accept it on loopback or when their user allows it.
    encrypt: bool = True
    state_dir: str = ""  # token + settings folder; "" = default_state_dir()
    max_clients: int = MAX_CLIENTS  # authenticated sessions at once (GPU work is serialized)
    idle_timeout_s: float = SERVER_IDLE_TIMEOUT_S  # seconds before a silent authenticated client is dropped
    heartbeat_interval_s: float = HEARTBEAT_INTERVAL_S  # seconds between PROGRESS frames while serving a request
    handshake_timeout_s: float = HANDSHAKE_TIMEOUT_S  # seconds from accept to WELCOME (a deadline)
    max_unauthenticated: int = MAX_UNAUTHENTICATED  # connections still in the handshake, all addresses
    max_unauthenticated_per_address: int = MAX_UNAUTHENTICATED_PER_ADDRESS  # ... from one source address
    const_cache_bytes: int = SERVER_CONST_CACHE_BYTES  # per-connection constants cache
    max_decoded_request_bytes: int = MAX_DECODED_REQUEST_BYTES  # one request's tensors, decoded
    max_codec_state_bytes: int = MAX_CODEC_STATE_BYTES  # temporal references held per connection
    # Server-wide budgets (all connections together), bytes: server/budget.py.
    max_inflight_bytes: int = MAX_INFLIGHT_BYTES  # frames being received + decoded requests being served
    max_const_total_bytes: int = MAX_CONST_TOTAL_BYTES  # every connection's constants caches
    max_codec_state_total_bytes: int = MAX_CODEC_STATE_TOTAL_BYTES  # every connection's temporal references
    max_lora_bytes: int = MAX_LORA_BYTES  # forwarded LoRA sets kept unpacked by the back half
    max_patch_kv_bytes: int = MAX_PATCH_KV_BYTES  # stale keys / values of pipelined generations (patchpipe)
    loras: tuple = field(default_factory=tuple)  # ((path, strength), ...) server-side LoRA slots
    # Decode clients' nvCOMP ANS payloads on the GPU. nvCOMP does not validate its bitstreams, so a
    # client holding the token could fault the GPU with crafted bytes; False asks clients for zstd.
    gpu_entropy: bool = True
    # Same-host fast path: offer it (clients on this host then move the seam through shared memory /
    # CUDA IPC), and the most bytes one connection's segment may take on each side.
    samehost: bool = True
    samehost_max_bytes: int = SAMEHOST_MAX_BYTES

    def __post_init__(self) -> None:
        _check_port(self.port)
        if self.n_blocks < 0:
            raise LocalError(f"n_blocks must be >= 0, got {self.n_blocks}")
        if self.dtype not in ("auto", "bfloat16", "float16", "float32"):
            raise LocalError(f"dtype {self.dtype!r} must be auto, bfloat16, float16 or float32")
        object.__setattr__(self, "extra_weights", tuple(str(w) for w in self.extra_weights))
        if self.extra_weights and not self.weights:
            raise LocalError("extra_weights given without weights: the first --weights is the main checkpoint")
        seen: set[str] = set()
        for w in self.all_weights:
            key = os.path.normcase(os.path.abspath(w))
            if key in seen:
                raise LocalError(f"checkpoint {w} is given twice in --weights: name each checkpoint once")
            seen.add(key)
        for name in (
            "max_clients",
            "max_unauthenticated",
            "max_unauthenticated_per_address",
            "max_decoded_request_bytes",
            "const_cache_bytes",
            "max_codec_state_bytes",
            "max_inflight_bytes",
            "max_const_total_bytes",
            "max_codec_state_total_bytes",
            "max_lora_bytes",
            "max_patch_kv_bytes",
            "samehost_max_bytes",
        ):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise LocalError(f"{name} must be an integer >= 1, got {v!r}")
        for name in ("idle_timeout_s", "handshake_timeout_s", "heartbeat_interval_s"):
            if not getattr(self, name) > 0:
                raise LocalError(f"{name} must be > 0 seconds, got {getattr(self, name)!r}")

    @property
    def all_weights(self) -> tuple[str, ...]:
        """Every checkpoint this server loads, the main one first; () when none is set (--toy)."""
        return (self.weights, *self.extra_weights) if self.weights else ()

    @property
    def state_path(self) -> Path:
        return Path(self.state_dir) if self.state_dir else default_state_dir()

    @property
    def token_path(self) -> Path:
        return self.state_path / "token"

    @property
    def server_id_path(self) -> Path:
        return self.state_path / "server_id"

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ServerConfig:
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise LocalError(f"unknown server settings {sorted(unknown)}; known: {sorted(known)}")
        return cls(**d)
