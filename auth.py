"""Shared-token authentication: HMAC-SHA256 proofs bound to both identities, token files, pins.

The token never crosses the wire. HELLO names it by a key id (a hash prefix, ``key_id``); the server
proves first, in CHALLENGE, with HMAC-SHA256(token, b"comfyui-mesh|daedalus|v3|" + the transcript),
and the client answers in AUTH with the same over b"comfyui-mesh|icarus|v3|" only after checking it:
a host that cannot prove it knows the token never sees anything computed from it but the key id.
The transcript (``Transcript``) is both nonces, the server id, the key id, the client name and the
link mode, so a proof made for one connection, server, client or link mode is worth nothing in
another (docs/PROTOCOL.md §5).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import secrets
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from .constants import KEY_ID_CHARS, NONCE_BYTES, SERVER_ID_BYTES, TOKEN_BYTES, TOKEN_ENV
from .errors import LocalError


def new_token() -> str:
    return secrets.token_hex(TOKEN_BYTES)


def new_nonce() -> str:
    return secrets.token_hex(NONCE_BYTES)


def key_id(token: str | None) -> str:
    """Which token a client will prove with, as HELLO names it ("" without a token)."""
    token = (token or "").strip()
    if not token:
        return ""
    return hashlib.sha256(b"comfyui-mesh|key-id|" + token.encode()).hexdigest()[:KEY_ID_CHARS]


@dataclass(frozen=True)
class Transcript:
    """What both proofs cover, as the peers sent it (ASCII strings; client_name as UTF-8)."""

    client_nonce: str
    server_nonce: str
    server_id: str
    key_id: str
    client_name: str
    link: str

    def message(self, role: bytes) -> bytes:
        fields = (self.client_nonce, self.server_nonce, self.server_id, self.key_id, self.client_name, self.link)
        # Each field is length-prefixed: no boundary between two fields can be moved.
        body = b"".join(len(b).to_bytes(4, "big") + b for b in (f.encode("utf-8", "surrogatepass") for f in fields))
        return b"comfyui-mesh|" + role + b"|v3|" + body


def _mac(token: str, role: bytes, t: Transcript) -> str:
    return hmac.new(token.strip().encode(), t.message(role), hashlib.sha256).hexdigest()


def client_proof(token: str, t: Transcript) -> str:
    return _mac(token, b"icarus", t)


def server_proof(token: str, t: Transcript) -> str:
    return _mac(token, b"daedalus", t)


MAC_CHARS = 2 * hashlib.sha256().digest_size  # a proof: lowercase hex SHA-256
NONCE_CHARS = 2 * NONCE_BYTES
SERVER_ID_CHARS = 2 * SERVER_ID_BYTES
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


DEFAULT_TOKEN_NAME = "default"  # the token in <state dir>/token


@dataclass(frozen=True)
class TokenEntry:
    """One token a server accepts, with its holder's limits."""

    name: str
    token: str
    max_sessions: int = 0  # sessions open at once with this token; 0 = only the server's max_clients
    may_reconfigure: bool = True  # RECONFIGURE allowed (it changes the split for every client)


class Keyring:
    """The tokens a server accepts, found by the key id a HELLO names (``key_id``)."""

    def __init__(self, entries: Iterable[TokenEntry] = ()):
        self._by_key: dict[str, TokenEntry] = {}
        for e in entries:
            self._by_key.setdefault(key_id(e.token), e)

    @classmethod
    def single(cls, token: str, name: str = DEFAULT_TOKEN_NAME) -> Keyring:
        return cls([TokenEntry(name, token.strip())])

    def lookup(self, kid: str) -> TokenEntry | None:
        return self._by_key.get(kid) if kid else None

    def entries(self) -> list[TokenEntry]:
        return list(self._by_key.values())

    def __len__(self) -> int:
        return len(self._by_key)


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


def new_server_id() -> str:
    return secrets.token_hex(SERVER_ID_BYTES)


def load_or_create_server_id(path: Path) -> str:
    """The server's persistent identity (``SERVER_ID_BYTES`` random bytes as hex), created (mode 0600)
    on first start beside the token file. Clients pin it per host:port."""
    if path.exists():
        sid = path.read_text().strip()
        if not is_hex(sid, SERVER_ID_CHARS):
            raise LocalError(
                f"server id file {path} does not hold {SERVER_ID_CHARS} lowercase hex characters; delete it to "
                "make a new one (clients that pinned the old id must then forget it: Token… on the node, save again)"
            )
        return sid
    sid = new_server_id()
    _write_private(path, sid + "\n")
    return sid


class TokenStore:
    """Icarus's per-server tokens and pinned server ids, kept out of workflow files.

    A JSON file {"host:port": token, ..., "server_ids": {"host:port": id}} in ComfyUI's user folder.
    ``COMFYUI_MESH_TOKEN`` overrides the tokens for every server (handy for a single-server setup or
    headless runs); the pins stay per host:port. Without a file (``path`` None) nothing is pinned.
    """

    PINS = "server_ids"  # never a "host:port" key: it has no colon

    def __init__(self, path: Path | None):
        self.path = path
        self._lock = threading.Lock()

    @staticmethod
    def key(host: str, port: int) -> str:
        return f"{host.strip().lower()}:{int(port)}"

    def _read_all(self) -> dict:
        if self.path is None or not self.path.exists():
            return {}
        try:
            data = json.loads(self.path.read_text())
        except (OSError, ValueError) as e:
            raise LocalError(f"cannot read the token store {self.path}: {e}; fix or delete the file") from e
        return data if isinstance(data, dict) else {}

    def _read(self) -> dict[str, str]:
        return {str(k): str(v) for k, v in self._read_all().items() if k != self.PINS and isinstance(v, str)}

    def _write(self, data: dict) -> None:
        assert self.path is not None
        _write_private(self.path, json.dumps(data, indent=1, sort_keys=True))

    def get(self, host: str, port: int) -> str | None:
        env = os.environ.get(TOKEN_ENV, "").strip()
        if env:
            return env
        with self._lock:
            return self._read().get(self.key(host, port))

    def set(self, host: str, port: int, token: str) -> None:
        """Save (or, empty, delete) the token for host:port. Either way the server id pinned for
        host:port is forgotten: the next authenticated connection pins the id it then sees."""
        if self.path is None:
            raise LocalError("no token store path is configured")
        k = self.key(host, port)
        with self._lock:
            data = self._read_all()
            if token:
                data[k] = token.strip()
            else:
                data.pop(k, None)
            pins = data.get(self.PINS)
            if isinstance(pins, dict):
                pins.pop(k, None)
            self._write(data)

    def has(self, host: str, port: int) -> bool:
        return bool(self.get(host, port))

    def pinned_id(self, host: str, port: int) -> str:
        """The server id pinned for host:port ("" when none is)."""
        k = self.key(host, port)
        if self.path is None:
            return ""
        with self._lock:
            pins = self._read_all().get(self.PINS)
            v = pins.get(k, "") if isinstance(pins, dict) else ""
            return v if isinstance(v, str) else ""

    def pin(self, host: str, port: int, server_id: str) -> None:
        """Trust on first use: remember the id an authenticated server at host:port presented."""
        k = self.key(host, port)
        if self.path is None:
            return
        with self._lock:
            data = self._read_all()
            pins = data.get(self.PINS)
            if not isinstance(pins, dict):
                pins = data[self.PINS] = {}
            pins[k] = server_id
            self._write(data)
