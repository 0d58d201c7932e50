"""Shared-token authentication: HMAC-SHA256 challenge-response, token files.

The token never crosses the wire. Client and server each send a random nonce; the
client proves it knows the token with HMAC-SHA256(token, b"comfyui-mesh|icarus|" + client
nonce + b"|" + server nonce) and the server answers with the same over b"comfyui-mesh|daedalus|...",
so both sides are checked.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import secrets
import threading
from pathlib import Path

from .constants import NONCE_BYTES, TOKEN_BYTES, TOKEN_ENV
from .errors import LocalError


def new_token() -> str:
    return secrets.token_hex(TOKEN_BYTES)


def new_nonce() -> str:
    return secrets.token_hex(NONCE_BYTES)


def _mac(token: str, role: bytes, client_nonce: str, server_nonce: str) -> str:
    msg = b"comfyui-mesh|" + role + b"|" + client_nonce.encode() + b"|" + server_nonce.encode()
    return hmac.new(token.strip().encode(), msg, hashlib.sha256).hexdigest()


def client_proof(token: str, client_nonce: str, server_nonce: str) -> str:
    return _mac(token, b"icarus", client_nonce, server_nonce)


def server_proof(token: str, client_nonce: str, server_nonce: str) -> str:
    return _mac(token, b"daedalus", client_nonce, server_nonce)


MAC_CHARS = 2 * hashlib.sha256().digest_size  # a proof: lowercase hex SHA-256
NONCE_CHARS = 2 * NONCE_BYTES
_LOWER_HEX = frozenset("0123456789abcdef")


def is_hex(value: object, n_chars: int) -> bool:
    """``value`` is a str of exactly ``n_chars`` lowercase hex digits (what a nonce or a proof is on the
    wire). Anything else a peer sends there (another type, non-ASCII, a lone surrogate) is False."""
    return isinstance(value, str) and len(value) == n_chars and _LOWER_HEX.issuperset(value)


def check(expected: str, got: object) -> bool:
    """Constant-time comparison of a received proof; a malformed one is simply wrong, never an exception."""
    if not is_hex(got, MAC_CHARS):
        return False
    assert isinstance(got, str)
    return hmac.compare_digest(expected.encode(), got.encode())


def _write_private(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    try:
        os.unlink(tmp)  # a stale file would keep its (maybe world-readable) mode
    except FileNotFoundError:
        pass
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def load_or_create_server_token(path: Path) -> tuple[str, bool]:
    """The server's token, created (random, mode 0600) on first start. Returns (token, created)."""
    if path.exists():
        token = path.read_text().strip()
        if len(token) < 16:
            raise LocalError(f"token file {path} holds fewer than 16 characters; delete it to make a new token")
        return token, False
    token = new_token()
    _write_private(path, token + "\n")
    return token, True


def regenerate_server_token(path: Path) -> str:
    token = new_token()
    _write_private(path, token + "\n")
    return token


class TokenStore:
    """Icarus's per-server tokens, kept out of workflow files.

    A JSON file {"host:port": token} in ComfyUI's user folder. ``COMFYUI_MESH_TOKEN``
    overrides it for every server (handy for a single-server setup or headless runs).
    """

    def __init__(self, path: Path | None):
        self.path = path
        self._lock = threading.Lock()

    @staticmethod
    def key(host: str, port: int) -> str:
        return f"{host.strip().lower()}:{int(port)}"

    def _read(self) -> dict[str, str]:
        if self.path is None or not self.path.exists():
            return {}
        try:
            data = json.loads(self.path.read_text())
        except (OSError, ValueError) as e:
            raise LocalError(f"cannot read the token store {self.path}: {e}; fix or delete the file") from e
        return {str(k): str(v) for k, v in data.items()} if isinstance(data, dict) else {}

    def get(self, host: str, port: int) -> str | None:
        env = os.environ.get(TOKEN_ENV, "").strip()
        if env:
            return env
        with self._lock:
            return self._read().get(self.key(host, port))

    def set(self, host: str, port: int, token: str) -> None:
        if self.path is None:
            raise LocalError("no token store path is configured")
        with self._lock:
            data = self._read()
            if token:
                data[self.key(host, port)] = token.strip()
            else:
                data.pop(self.key(host, port), None)
            _write_private(self.path, json.dumps(data, indent=1, sort_keys=True))

    def has(self, host: str, port: int) -> bool:
        return bool(self.get(host, port))
