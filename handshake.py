"""The handshake, sans-IO: what each side sends and what the client checks (docs/PROTOCOL.md §5).

Client half: ``ClientHandshake`` (HELLO -> CHALLENGE -> AUTH -> WELCOME), which the blocking client
drives over its socket. Server half: ``ServerHandshake`` (HELLO -> CHALLENGE, AUTH -> WELCOME), which
``server.core.Session`` feeds the first frames of a connection. ``problems`` and ``auth_problems``
are the one copy of the version, model and token policy: the client raises the first problem, the
status route shows them all. No sockets here; both halves can be paired in memory.
"""

from __future__ import annotations

import dataclasses
import enum
import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from . import auth, samehost
from .constants import PACKAGE_VERSION, SKEW_ENV, TOKEN_ENV
from .errors import AuthError, LocalError, MeshError, RemoteFailure, RemoteProtocolError, VersionMismatch
from .protocol import Auth, Bye, Challenge, Error, ErrorCode, Hello, Message, Welcome

AUTH_NONE = "none"  # the server runs with --no-auth
AUTH_HMAC = "hmac-sha256"


@dataclass(frozen=True)
class Versions:
    """What one side runs. ``comfyui`` is "" where unknown (then it is not compared)."""

    package: str
    comfyui: str
    torch: str


def local_versions(comfyui_version: str = "") -> Versions:
    """This process's versions (ComfyUI's is the caller's to find)."""
    import torch

    return Versions(PACKAGE_VERSION, comfyui_version, torch.__version__)


def allow_skew() -> bool:
    """The escape hatch ``COMFYUI_MESH_ALLOW_VERSION_SKEW=1`` (exactly "1")."""
    return os.environ.get(SKEW_ENV) == "1"


def major_minor(version: str) -> str:
    """``"2.7.1+cu128"`` -> ``"2.7"``."""
    return ".".join(version.split("+")[0].split(".")[:2])


@dataclass(frozen=True)
class Expect:
    """What the client needs the server to hold; "" / 0 = don't check."""

    arch: str = ""
    n_blocks: int = 0
    fingerprint: str = ""

    @classmethod
    def of(cls, d: Mapping[str, Any] | None) -> Expect:
        d = d or {}
        return cls(str(d.get("arch") or ""), int(d.get("n_blocks") or 0), str(d.get("fingerprint") or ""))


class ProblemKind(str, enum.Enum):
    PACKAGE_VERSION = "package_version"
    COMFYUI_VERSION = "comfyui_version"
    TORCH_VERSION = "torch_version"
    ARCH = "arch"
    N_BLOCKS = "n_blocks"
    FINGERPRINT = "fingerprint"
    AUTH_DOWNGRADE = "auth_downgrade"  # a token is saved, the server runs without authentication
    TOKEN_MISSING = "token_missing"
    AUTH_SCHEME = "auth_scheme"  # an auth scheme this side does not know


@dataclass(frozen=True)
class Problem:
    """Why a run against this server would fail (or, not ``fatal``, was accepted under SKEW_ENV=1)."""

    kind: ProblemKind
    message: str  # the client's error: names the server and the fix
    brief: str  # the status route's one line
    error: type[MeshError] = VersionMismatch
    fatal: bool = True
    bye: str = ""  # the client says BYE with this reason before giving up ("" = it just closes)

    def exception(self) -> MeshError:
        return self.error(self.message)


def make_hello(expect: Expect, versions: Versions, *, nonce: str, codecs: Iterable[int], client_name: str) -> Hello:
    return Hello(
        nonce=nonce,
        package_version=versions.package,
        comfyui_version=versions.comfyui,
        torch_version=versions.torch,
        arch=expect.arch,
        n_blocks=expect.n_blocks,
        fingerprint=expect.fingerprint,
        codecs=list(codecs),
        client_name=client_name,
    )


def problems(
    ch: Challenge, expect: Expect, versions: Versions, allow_skew: bool, where: str = "the server"
) -> list[Problem]:
    """The CHALLENGE checked against this side (§5's table, in its order)."""
    out: list[Problem] = []
    K = ProblemKind
    if ch.package_version != versions.package:
        out.append(
            Problem(
                K.PACKAGE_VERSION,
                f"{where} runs ComfyUI-Mesh {ch.package_version}, this ComfyUI has {versions.package}: "
                "install the same release on both machines (git pull on both)",
                f"server runs ComfyUI-Mesh {ch.package_version}, this ComfyUI {versions.package}: update both",
            )
        )
    if not allow_skew:
        ours = versions.comfyui
        if ours and ch.comfyui_version and ch.comfyui_version != ours:
            out.append(
                Problem(
                    K.COMFYUI_VERSION,
                    f"{where} loads its model with ComfyUI {ch.comfyui_version}, this ComfyUI is {ours}: the halves "
                    "may compute different math. Update the server's ComfyUI to the same release, or set "
                    f"{SKEW_ENV}=1 to accept the difference",
                    f"server's ComfyUI is {ch.comfyui_version}, this one {ours}: update one (or set {SKEW_ENV}=1)",
                )
            )
        if major_minor(ch.torch_version) != major_minor(versions.torch):
            out.append(
                Problem(
                    K.TORCH_VERSION,
                    f"{where} runs torch {ch.torch_version}, this side torch {versions.torch}: install the same "
                    f"torch minor release on both, or set {SKEW_ENV}=1 to accept it",
                    f"server runs torch {ch.torch_version}, this side {versions.torch} (or set {SKEW_ENV}=1)",
                )
            )
    if expect.arch and ch.arch and ch.arch != expect.arch:
        out.append(
            Problem(
                K.ARCH,
                f"{where} serves a {ch.arch} model ({ch.model}) but this node splits a {expect.arch} model: "
                "start Daedalus with the same checkpoint the ComfyUI loader uses",
                f"server serves a {ch.arch} model, this node splits a {expect.arch} model",
            )
        )
    n = expect.n_blocks
    if n and ch.n_blocks != n:
        out.append(
            Problem(
                K.N_BLOCKS,
                f"{where} holds the last {ch.n_blocks} blocks but n_blocks_remote is {n}: press Confirm on the "
                f"node to reconfigure the server, set n_blocks_remote to {ch.n_blocks}, or restart Daedalus "
                f"with --n-blocks {n}",
                f"server holds {ch.n_blocks} blocks, n_blocks_remote is {n}: press Confirm",
            )
        )
    fp = expect.fingerprint
    if fp and ch.fingerprint and ch.fingerprint != fp:
        text = (
            f"{where} holds different back-half weights ({ch.model}, fingerprint {ch.fingerprint[:12]}) than "
            f"this ComfyUI's model (fingerprint {fp[:12]}): load the same checkpoint file with the same weight "
            "dtype on both machines"
        )
        out.append(
            Problem(
                K.FINGERPRINT,
                text if allow_skew else text + f" (or set {SKEW_ENV}=1 to accept it)",
                "server holds different back-half weights: load the same checkpoint on both",
                fatal=not allow_skew,
            )
        )
    return out


def auth_problems(ch: Challenge, have_token: bool, where: str = "the server") -> list[Problem]:
    """The CHALLENGE's auth scheme against whether a token is saved for this server."""
    if ch.auth == AUTH_NONE:
        if not have_token:
            return []
        return [
            Problem(
                ProblemKind.AUTH_DOWNGRADE,
                f"{where} runs without authentication (--no-auth) but a token is saved for it here; refusing, "
                "since anything could be answering on that port. Remove the saved token for this server, or "
                "start Daedalus without --no-auth",
                "server runs without authentication but a token is saved for it: remove the token (Token…, empty)",
                AuthError,
                bye="auth downgrade refused",
            )
        ]
    if ch.auth == AUTH_HMAC:
        if have_token:
            return []
        return [
            Problem(
                ProblemKind.TOKEN_MISSING,
                f"{where} requires a token and none is saved for it. Copy the token that Daedalus printed at "
                "start (also in its settings folder, file 'token') into the Icarus node (its Token… button), or set "
                f"{TOKEN_ENV}",
                "token needed: press Token… and paste the token the Daedalus window shows",
                AuthError,
                bye="no token",
            )
        ]
    return [
        Problem(
            ProblemKind.AUTH_SCHEME,
            f"{where} asks for unknown auth scheme {ch.auth!r}",
            f"server asks for unknown auth scheme {ch.auth!r}: install the same ComfyUI-Mesh release on both",
            RemoteProtocolError,
        )
    ]


def auth_reply(ch: Challenge, token: str, nonce: str) -> Auth:
    """The client's AUTH answer to ``ch`` (``nonce``: the one its HELLO carried)."""
    return Auth(mac="" if ch.auth == AUTH_NONE else auth.client_proof(token, nonce, ch.nonce))


def remote_error(where: str, err: Error) -> MeshError:
    """What an error frame raises on the client."""
    if err.code == ErrorCode.AUTH_FAILED:
        return AuthError(
            f"{where} rejected the token: {err.message}. Copy the token shown by the Daedalus window/console "
            f"into the Icarus node (its Token… button) or set {TOKEN_ENV}"
        )
    return RemoteFailure(err.code, f"{where}: {err.message}")


class ClientHandshake:
    """The client's half. ``hello()`` first; then ``receive()`` each frame and send what it returns.

    ``receive`` raises when a frame ends the handshake with nothing to send (an error frame, a wrong
    message, a server that cannot prove it knows the token). When the replies end it (a BYE), it sets
    ``error`` for the caller to raise after sending them. Once ``done``, ``challenge`` is the server's
    description and ``problems`` the version/model checks, for the caller to raise or log.
    """

    def __init__(
        self,
        expect: Expect,
        versions: Versions,
        token: str | None,
        *,
        codecs: Iterable[int],
        client_name: str,
        allow_skew: bool,
        where: str = "the server",
        nonce: str | None = None,
        samehost: bool = False,
    ):
        self.expect = expect
        self.versions = versions
        self.token = token or ""
        self.codecs = list(codecs)
        self.client_name = client_name
        self.allow_skew = allow_skew
        self.where = where
        self.nonce = nonce or auth.new_nonce()
        self.phase = "start"  # -> "challenge" -> "welcome" -> "done" | "failed"
        self.challenge: Challenge | None = None
        self.error: MeshError | None = None
        self.problems: list[Problem] = []
        # Same-host fast path (samehost.py): asked for; the server's secret once proved; why not.
        self.want_samehost = samehost
        self.samehost_secret = b""
        self.samehost = False
        self.samehost_reason = "" if samehost else "off on this side"

    @property
    def done(self) -> bool:
        return self.phase == "done"

    def hello(self) -> Hello:
        if self.phase != "start":
            raise LocalError(f"hello() called in handshake phase {self.phase}")
        self.phase = "challenge"
        return make_hello(
            self.expect, self.versions, nonce=self.nonce, codecs=self.codecs, client_name=self.client_name
        )

    def receive(self, msg: Message) -> list[Message]:
        phase, self.phase = self.phase, "failed"  # until this frame is known good
        if isinstance(msg, Error):
            raise remote_error(self.where, msg)
        if phase == "challenge":
            if not isinstance(msg, Challenge):
                raise RemoteProtocolError(f"{self.where} answered hello with {type(msg).__name__}")
            self.challenge = msg
            for p in auth_problems(msg, bool(self.token), self.where):
                if not p.bye:
                    raise p.exception()
                self.error = p.exception()
                return [Bye(reason=p.bye)]
            self.phase = "welcome"
            return [self._samehost_answer(auth_reply(msg, self.token, self.nonce), msg)]
        if phase == "welcome":
            ch = self.challenge
            assert ch is not None
            if not isinstance(msg, Welcome):
                raise RemoteProtocolError(f"{self.where} answered auth with {type(msg).__name__}")
            if ch.auth != AUTH_NONE and not (
                auth.is_hex(ch.nonce, auth.NONCE_CHARS)
                and auth.check(auth.server_proof(self.token, self.nonce, ch.nonce), msg.mac)
            ):
                raise AuthError(f"{self.where} could not prove it knows the token: is something else on that port?")
            self.problems = problems(ch, self.expect, self.versions, self.allow_skew, self.where)
            self._samehost_verdict(msg)
            self.phase = "done"
            return []
        raise LocalError(f"handshake got {type(msg).__name__} in phase {phase}")

    def _samehost_answer(self, reply: Auth, ch: Challenge) -> Auth:
        """AUTH with the same-host proof added when the server offered the fast path and its host
        secret is readable from here."""
        if not self.want_samehost:
            return reply
        if not ch.samehost:
            self.samehost_reason = f"{self.where} does not offer it"
            return reply
        proof, self.samehost_secret, why = samehost.answer(ch.samehost, self.nonce, ch.nonce)
        if not proof:
            self.samehost_reason = why
            return reply
        return dataclasses.replace(reply, samehost=proof)

    def _samehost_verdict(self, msg: Welcome) -> None:
        if not self.samehost_secret:
            return
        self.samehost = msg.samehost is True
        self.samehost_reason = "" if self.samehost else f"{self.where} did not accept the same-host proof"


class ServerHandshake:
    """The server's half: HELLO -> CHALLENGE, then AUTH -> WELCOME (or ``auth_failed``).

    ``offer()`` describes what this server holds now (a CHALLENGE without nonce and auth scheme).
    After each ``receive``, ``closed`` says the connection must end and ``ready`` that it is open.
    """

    def __init__(
        self,
        token: str | None,
        offer: Callable[[], Challenge],
        nonce: str | None = None,
        samehost: samehost.HostSecret | None = None,
    ):
        self.token = token or ""
        self.offer = offer
        self.nonce = nonce or auth.new_nonce()
        self.phase = "hello"  # -> "auth" -> "ready"
        self.hello: Hello | None = None
        self.closed = False
        self.auth_failed = False
        self.host_secret = samehost
        self.samehost = False  # the client proved it runs on this host (WELCOME.samehost)
        self.samehost_reason = "off on this server" if samehost is None else ""
        self.samehost_gpus: list = []  # the GPUs the client announced with its proof

    @property
    def ready(self) -> bool:
        return self.phase == "ready"

    def _samehost_offer(self) -> dict[str, Any]:
        return self.host_secret.offer() if self.host_secret is not None else {}

    def _samehost_check(self, msg: Auth) -> bool:
        """Whether the AUTH's same-host answer proves the client reads this host's secret."""
        if self.host_secret is None:
            return False
        assert self.hello is not None
        self.samehost, self.samehost_reason = self.host_secret.verify(msg.samehost, self.hello.nonce, self.nonce)
        if self.samehost:
            self.samehost_gpus = list(msg.samehost.get("gpus") or [])
        return self.samehost

    def _refuse(self, code: ErrorCode, message: str) -> list[Message]:
        self.closed = True
        return [Error(code=code.value, message=message)]

    def receive(self, msg: Message) -> list[Message]:
        if self.phase == "hello":
            if not isinstance(msg, Hello):
                return self._refuse(ErrorCode.BAD_REQUEST, f"expected hello, got {type(msg).__name__}")
            if self.token and not auth.is_hex(msg.nonce, auth.NONCE_CHARS):
                self.auth_failed = True  # no proof can be checked against a malformed nonce
                return self._refuse(ErrorCode.AUTH_FAILED, f"malformed nonce (want {auth.NONCE_CHARS} lowercase hex)")
            self.hello = msg
            self.phase = "auth"
            auth_scheme = AUTH_HMAC if self.token else AUTH_NONE
            return [
                dataclasses.replace(self.offer(), nonce=self.nonce, auth=auth_scheme, samehost=self._samehost_offer())
            ]
        if self.phase == "auth":
            if not isinstance(msg, Auth):
                return self._refuse(ErrorCode.BAD_REQUEST, f"expected auth, got {type(msg).__name__}")
            assert self.hello is not None
            mac = ""
            if self.token:
                proof = auth.client_proof(self.token, self.hello.nonce, self.nonce)
                if not auth.is_hex(msg.mac, auth.MAC_CHARS):  # empty, wrong length, non-ASCII, ...
                    self.auth_failed = True
                    return self._refuse(ErrorCode.AUTH_FAILED, "malformed or missing mac (wrong or missing token)")
                if not auth.check(proof, msg.mac):
                    self.auth_failed = True
                    return self._refuse(ErrorCode.AUTH_FAILED, "wrong token")
                mac = auth.server_proof(self.token, self.hello.nonce, self.nonce)
            self.phase = "ready"
            return [Welcome(mac=mac, session=self.nonce[:16], samehost=self._samehost_check(msg))]
        raise LocalError(f"the handshake is over (phase {self.phase})")


__all__ = [
    "AUTH_HMAC",
    "AUTH_NONE",
    "ClientHandshake",
    "Expect",
    "Problem",
    "ProblemKind",
    "ServerHandshake",
    "Versions",
    "allow_skew",
    "auth_problems",
    "local_versions",
    "major_minor",
    "make_hello",
    "problems",
    "remote_error",
]
