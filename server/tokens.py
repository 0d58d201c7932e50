"""Named tokens: one Daedalus shared by several people or machines, each with a token and limits of
its own (docs/PROTOCOL.md §5.3).

``<state dir>/tokens.json`` (mode 0600) holds them::

    {"tokens": [{"name": "alice", "token": "<64 hex>", "max_sessions": 2, "may_reconfigure": false}]}

The single token file ``<state dir>/token`` stays what it was: the token named "default", with no
session limit of its own and allowed to reconfigure, so a setup from before keeps working unchanged.
The command line (``python -m comfyui_mesh.server tokens add|revoke|list``) and the window edit the
file; a running server notices the change within ``TOKEN_RELOAD_S`` (``ServerState.reload_tokens``)
and closes the sessions of a revoked token.
"""

from __future__ import annotations

import argparse
import json
import os
import re
from pathlib import Path

from .. import auth
from ..auth import DEFAULT_TOKEN_NAME, TokenEntry
from ..config import default_state_dir
from ..errors import LocalError

NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@-]{0,31}")
FILE_NAME = "tokens.json"


def check_name(name: str) -> str:
    if not NAME_RE.fullmatch(name or ""):
        raise LocalError(
            f"token name {name!r}: use 1 to 32 letters, digits, '.', '_', '@' or '-' (starting with a letter or digit)"
        )
    return name


class NamedTokens:
    """The named-token file of one state folder."""

    def __init__(self, state_dir: Path):
        self.path = Path(state_dir) / FILE_NAME

    def signature(self) -> tuple[int, int, int] | None:
        """Changes whenever the file is written (it is replaced atomically); None while it does not exist."""
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return None
        return st.st_ino, st.st_mtime_ns, st.st_size

    def read(self) -> list[TokenEntry]:
        """The named tokens (none while the file does not exist); LocalError, naming the file, if it is malformed."""
        if not self.path.exists():
            return []
        try:
            data = json.loads(self.path.read_text())
            out = []
            for d in data["tokens"]:
                e = TokenEntry(
                    name=check_name(str(d["name"])),
                    token=str(d["token"]).strip(),
                    max_sessions=int(d.get("max_sessions", 0)),
                    may_reconfigure=bool(d.get("may_reconfigure", False)),
                )
                if len(e.token) < 16 or e.max_sessions < 0:
                    raise ValueError(f"token {e.name!r}: token shorter than 16 characters or max_sessions < 0")
                out.append(e)
        except (OSError, ValueError, KeyError, TypeError, LocalError) as e:
            raise LocalError(f"cannot read the named tokens in {self.path}: {e}; fix or delete the file") from e
        return out

    def _write(self, entries: list[TokenEntry]) -> None:
        rows = [
            {"name": e.name, "token": e.token, "max_sessions": e.max_sessions, "may_reconfigure": e.may_reconfigure}
            for e in entries
        ]
        auth._write_private(self.path, json.dumps({"tokens": rows}, indent=1) + "\n")

    def add(self, name: str, max_sessions: int = 0, may_reconfigure: bool = False) -> TokenEntry:
        """A new random token for ``name`` (refused if the name is taken)."""
        check_name(name)
        if name == DEFAULT_TOKEN_NAME:
            raise LocalError(f"{DEFAULT_TOKEN_NAME!r} is the token in the 'token' file; choose another name")
        if max_sessions < 0:
            raise LocalError(f"max_sessions must be >= 0 (0: only the server's --max-clients), got {max_sessions}")
        entries = self.read()
        if any(e.name == name for e in entries):
            raise LocalError(
                f"a token named {name!r} exists already in {self.path}: revoke it first, or pick another name"
            )
        entry = TokenEntry(name, auth.new_token(), max_sessions, may_reconfigure)
        self._write([*entries, entry])
        return entry

    def revoke(self, name: str) -> None:
        if name == DEFAULT_TOKEN_NAME:
            raise LocalError(
                f"the {DEFAULT_TOKEN_NAME!r} token is the 'token' file: replace it with --regenerate-token (or the "
                "window's Regenerate…), or run with --no-auth"
            )
        entries = self.read()
        kept = [e for e in entries if e.name != name]
        if len(kept) == len(entries):
            known = ", ".join(e.name for e in entries) or "none"
            raise LocalError(f"no token named {name!r} in {self.path} (named tokens: {known})")
        self._write(kept)


def keyring(default_token: str | None, named: list[TokenEntry]) -> auth.Keyring:
    """The tokens a server accepts: the default one first (it wins a clash), then the named ones."""
    first = [TokenEntry(DEFAULT_TOKEN_NAME, default_token.strip(), 0, True)] if default_token else []
    return auth.Keyring(first + named)


def describe(e: TokenEntry) -> str:
    limit = f"at most {e.max_sessions} sessions" if e.max_sessions else "no session limit of its own"
    return f"{e.name}: key id {auth.key_id(e.token)}, {limit}, {'may' if e.may_reconfigure else 'may not'} reconfigure"


# ---------------------------------------------------------------------------- command line


def cli(argv: list[str]) -> int:
    """``python -m comfyui_mesh.server tokens add NAME [--max-sessions N] [--may-reconfigure] | revoke NAME | list``
    (each with ``--state-dir DIR``). Works while a server runs: it reloads the file."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--state-dir", default="", help="the server's settings folder (default: as the server's)")
    p = argparse.ArgumentParser(prog="python -m comfyui_mesh.server tokens", description="named tokens of a Daedalus")
    sub = p.add_subparsers(dest="op", required=True)
    add = sub.add_parser(
        "add", parents=[common], help="make a token for NAME (printed once; give it to that person or machine)"
    )
    add.add_argument("name")
    add.add_argument("--max-sessions", type=int, default=0, help="sessions open at once with it (0: no own limit)")
    add.add_argument("--may-reconfigure", action="store_true", help="allow it to change the server's n_blocks")
    rev = sub.add_parser("revoke", parents=[common], help="delete NAME's token; a running server closes its sessions")
    rev.add_argument("name")
    sub.add_parser(
        "list", parents=[common], help="the tokens this server accepts (names, key ids, limits; not the tokens)"
    )
    a = p.parse_args(argv)
    state_dir = Path(a.state_dir) if a.state_dir else default_state_dir()
    named = NamedTokens(state_dir)
    if a.op == "add":
        e = named.add(a.name, a.max_sessions, a.may_reconfigure)
        print(f"token for {e.name}: {e.token}")
        print(f"  ({describe(e)}; kept in {named.path}; a running Daedalus accepts it within seconds)")
    elif a.op == "revoke":
        named.revoke(a.name)
        print(f"revoked {a.name}: a running Daedalus closes its sessions within seconds")
    else:
        token_file = state_dir / "token"
        default = token_file.read_text().strip() if token_file.exists() else ""
        for e in keyring(default, named.read()).entries():
            print(describe(e))
    return 0
