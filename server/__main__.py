"""Daedalus command line: ``python -m comfyui_mesh.server --weights F --n-blocks N``."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import signal
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from .. import auth
from ..config import ServerConfig
from ..constants import DEFAULT_BIND, DEFAULT_PORT, PACKAGE_VERSION
from ..errors import LocalError, MeshError

if TYPE_CHECKING:
    from .core import BackendFactory

_PKG_ROOT = Path(__file__).resolve().parent.parent


def _guard_sys_path() -> None:
    """Never let our checkout's folder sit on sys.path: its server/ and protocol.py would
    shadow ComfyUI's top-level modules of the same names. Our code is imported through the
    installed package only."""
    sys.path[:] = [p for p in sys.path if Path(p or os.getcwd()).resolve() != _PKG_ROOT]


# The server's limits on the command line: (flag, ServerConfig field, metavar, help). Defaults
# come from ServerConfig (one source); fields in bytes are given in MB.
LIMITS = (
    ("--max-clients", "max_clients", None, "authenticated sessions served at once"),
    ("--max-request-mb", "max_decoded_request_bytes", "MB",
     "largest total size of one request's tensors once decoded (checked before decoding)"),
    ("--max-codec-state-mb", "max_codec_state_bytes", "MB", "temporal-codec references one client connection may hold"),
    ("--max-consts-mb", "const_cache_bytes", "MB", "cached per-generation constants of one client connection"),
    ("--max-inflight-mb", "max_inflight_bytes", "MB",
     "server-wide: frames being received plus the decoded tensors of requests being served, all clients"),
    ("--max-consts-total-mb", "max_const_total_bytes", "MB", "server-wide: every connection's cached constants"),
    ("--max-codec-state-total-mb", "max_codec_state_total_bytes", "MB",
     "server-wide: every connection's temporal-codec references"),
    ("--max-lora-mb", "max_lora_bytes", "MB", "server-wide: forwarded LoRA sets kept unpacked on the device"),
    ("--max-patch-kv-mb", "max_patch_kv_bytes", "MB",
     "server-wide: stale keys / values of patch-pipelined generations (per client and generation)"),
    ("--max-unauthenticated", "max_unauthenticated", None,
     "connections still in the handshake, all addresses (a new one pushes out the oldest)"),
    ("--max-unauthenticated-per-address", "max_unauthenticated_per_address", None,
     "connections still in the handshake from one source address"),
    ("--handshake-timeout", "handshake_timeout_s", "SECONDS", "the whole handshake must end this long after connect"),
    ("--idle-timeout", "idle_timeout_s", "SECONDS", "drop an authenticated client silent this long"),
    ("--heartbeat", "heartbeat_interval_s", "SECONDS",
     "while serving a request, send the client a PROGRESS frame this often (its sign of life)"),
    ("--samehost-max-mb", "samehost_max_bytes", "MB",
     "shared memory one same-host connection may take per direction (bigger messages go over TCP)"),
)  # fmt: skip


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m comfyui_mesh.server",
        description="Daedalus: ComfyUI-Mesh back-half server",
        epilog="named tokens (per person or machine, with limits): python -m comfyui_mesh.server tokens "
        "add NAME | revoke NAME | list (see its --help); a running server picks the changes up",
    )
    p.add_argument(
        "--weights",
        action="append",
        default=[],
        metavar="FILE",
        help="model checkpoint (.safetensors), the same file the ComfyUI loader uses; repeat it to serve several "
        "checkpoints of one family from this process (Wan 2.2's high- and low-noise experts: --weights HIGH "
        "--weights LOW), each client session bound to the one its model's fingerprint names",
    )
    p.add_argument("--n-blocks", type=int, default=4, help="blocks to serve, counted from the end of the model")
    p.add_argument("--bind", default=DEFAULT_BIND, help="listen address; 0.0.0.0 to accept LAN clients")
    p.add_argument("--port", type=int, default=DEFAULT_PORT)
    p.add_argument("--device", default="cuda:0", help="cuda:N or cpu")
    p.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float16", "float32"])
    p.add_argument("--comfyui", default="", help="ComfyUI checkout (default: $COMFYUI_PATH or a sibling folder)")
    p.add_argument("--no-auth", action="store_true", help="accept clients without a token (trusted networks only)")
    p.add_argument(
        "--no-encrypt",
        action="store_true",
        help="authenticate but do not encrypt frames (trusted same-host pairs: clients accept it on loopback only, "
        "or with COMFYUI_MESH_ALLOW_UNENCRYPTED=1)",
    )
    p.add_argument("--state-dir", default="", help="folder for the token and settings")
    p.add_argument("--regenerate-token", action="store_true", help="make a new token (old clients must update)")
    p.add_argument(
        "--lora",
        action="append",
        default=[],
        metavar="FILE[:STRENGTH]",
        help="server-side LoRA slot applied to the back half (repeatable; strength default 1.0)",
    )
    p.add_argument("--toy", action="store_true", help="serve a model-free toy back half (tests, demos)")
    for flag, name, metavar, help_text in LIMITS:
        default = getattr(ServerConfig, name)
        p.add_argument(
            flag,
            dest=name,
            type=type(default),
            default=default >> 20 if name.endswith("_bytes") else default,
            metavar=metavar,
            help=help_text,
        )
    p.add_argument(
        "--no-gpu-entropy",
        action="store_true",
        help="refuse nvCOMP ANS payloads (clients re-send with zstd): nvCOMP does not validate its "
        "bitstreams, so only trusted clients should send them",
    )
    p.add_argument(
        "--no-samehost",
        action="store_true",
        help="never offer the same-host fast path (clients on this host then send over TCP too)",
    )
    p.add_argument("-v", "--verbose", action="store_true")
    return p


def config_from_args(a: argparse.Namespace) -> ServerConfig:
    return ServerConfig(
        weights=a.weights[0] if a.weights else "",
        extra_weights=tuple(a.weights[1:]),
        n_blocks=a.n_blocks,
        bind=a.bind,
        port=a.port,
        device=a.device,
        dtype=a.dtype,
        comfyui_path=a.comfyui,
        auth=not a.no_auth,
        encrypt=not a.no_encrypt,
        state_dir=a.state_dir,
        **{name: getattr(a, name) << 20 if name.endswith("_bytes") else getattr(a, name) for _, name, _, _ in LIMITS},
        loras=tuple(_lora_arg(s) for s in a.lora),
        gpu_entropy=not a.no_gpu_entropy,
        samehost=not a.no_samehost,
    )


def _lora_arg(s: str) -> tuple[str, float]:
    path, sep, strength = s.rpartition(":")
    if sep and path and not path.endswith(("\\", "/")):
        try:
            return path, float(strength)
        except ValueError:
            pass  # a Windows drive letter or a colon in the name: no strength given
    return s, 1.0


def make_factory(cfg: ServerConfig, toy: bool) -> list[BackendFactory]:
    """One backend factory per checkpoint (``cfg.all_weights``; the toy: one). The checkpoints' forwarded
    LoRA sets share one server-wide budget (--max-lora-mb)."""
    from .check import device_problem

    problem = device_problem(cfg.device)
    if problem:
        raise LocalError(problem)
    if toy:
        from .toy import ToyBackend

        return [lambda n: ToyBackend(n, device=cfg.device)]
    from .budget import Budget
    from .loader import ComfyBackend

    loras = Budget("forwarded LoRA sets, all models", cfg.max_lora_bytes, "--max-lora-mb")

    def one(weights: str) -> BackendFactory:
        own = dataclasses.replace(cfg, weights=weights, extra_weights=())
        return lambda n: ComfyBackend(own, n, lora_pool=loras)

    return [one(w) for w in cfg.all_weights]


def main(argv: list[str] | None = None) -> int:
    _guard_sys_path()
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["tokens"]:  # named tokens: python -m comfyui_mesh.server tokens add|revoke|list
        from .tokens import cli

        try:
            return cli(argv[1:])
        except MeshError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
    a = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if a.verbose else logging.INFO,
        format="[daedalus] %(message)s",
        stream=sys.stdout,
    )
    log = logging.getLogger("daedalus")
    try:
        cfg = config_from_args(a)
        if not a.toy and not cfg.weights:
            raise MeshError("--weights is required (or --toy for a model-free test server)")
        token = None
        if cfg.auth:
            if a.regenerate_token:
                token = auth.regenerate_server_token(cfg.token_path)
                log.info("new token written to %s", cfg.token_path)
            else:
                token, created = auth.load_or_create_server_token(cfg.token_path)
                if created:
                    log.info("first start: made a new token in %s", cfg.token_path)
            log.info("token: %s  (paste it into the Icarus node, or set COMFYUI_MESH_TOKEN)", token)
        else:
            log.warning("authentication is OFF (--no-auth): anyone who can reach this port can use the GPU")
        from .budget import tune_allocator
        from .core import DaedalusServer, ServerState

        log.debug("%s", tune_allocator())
        log.info("ComfyUI-Mesh %s: loading the back half...", PACKAGE_VERSION)
        server_id = auth.load_or_create_server_id(cfg.server_id_path) if cfg.auth else None
        if server_id:
            log.info("server id %s (clients pin it for this address)", server_id)
        if cfg.auth and not cfg.encrypt:
            log.warning("encryption is OFF (--no-encrypt): frames cross the network in the clear")
        from .tokens import NamedTokens

        named = NamedTokens(cfg.state_path) if cfg.auth else None
        state = ServerState(cfg, make_factory(cfg, a.toy), token, server_id=server_id, named=named)
        server = DaedalusServer(state)
        host, port = server.start()
        b = state.backend
        names = " + ".join(x.model_name for x in state.backends)
        print(
            f"[daedalus] READY listening on {host}:{port} | {b.arch} {names} | last {b.n_blocks} of "
            f"{b.n_blocks_max} blocks on {b.device} | auth {'on' if token else 'OFF'}"
            f"{', encrypted' if token and cfg.encrypt else ''}",
            flush=True,
        )
        signal.signal(signal.SIGTERM, lambda *_: server._stop.set())
        try:
            server.serve_forever()
        except KeyboardInterrupt:
            pass
        log.info("stopped")
        return 0
    except MeshError as e:
        log.error("%s", e)
        return 2


if __name__ == "__main__":
    sys.exit(main())
