"""The handshake, sans-IO: what each side sends and what the client checks (docs/PROTOCOL.md §5).

Client half: ``ClientHandshake`` (HELLO -> CHALLENGE -> AUTH -> WELCOME), which the blocking client
drives over its socket. Server half: ``ServerHandshake`` (HELLO -> CHALLENGE, AUTH -> WELCOME), which
``server.core.Session`` feeds the first frames of a connection. The server proves it knows the token
first (CHALLENGE.mac), the client checks that proof and the server id it pinned for the address before
it proves anything itself (AUTH); both halves then hold a ``SecureLink`` for every later frame. ``problems`` and ``auth_problems``
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
from .constants import ALLOW_UNENCRYPTED_ENV, MAX_LISTED_MODELS, PACKAGE_VERSION, SKEW_ENV, TOKEN_ENV
from .errors import AuthError, LocalError, MeshError, RemoteFailure, RemoteProtocolError, VersionMismatch
from .protocol import Auth, Bye, Challenge, Error, ErrorCode, Hello, Message, Welcome
from .securelink import LINK_AES_GCM, LINK_NONE, SecureLink

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


def allow_unencrypted() -> bool:
    """``COMFYUI_MESH_ALLOW_UNENCRYPTED=1`` (exactly "1"): accept a --no-encrypt server off loopback."""
    return os.environ.get(ALLOW_UNENCRYPTED_ENV) == "1"


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


def make_hello(
    expect: Expect, versions: Versions, *, nonce: str, codecs: Iterable[int], client_name: str, key_id: str = ""
) -> Hello:
    return Hello(
        key_id=key_id,
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
        served = served_models(ch)
        held = (
            f"different back-half weights ({ch.model}, fingerprint {ch.fingerprint[:12]})"
            if len(served) < 2
            else f"none of its checkpoints' back-half weights ({', '.join(f'{m} {f[:12]}' for f, m in served)})"
        )
        text = (
            f"{where} holds {held} than this ComfyUI's model (fingerprint {fp[:12]}): "
            "load the same checkpoint file with the same weight dtype on both machines"
            + (" (or add it to that Daedalus: --weights once per checkpoint)" if len(served) > 1 else "")
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


def served_models(ch: Challenge) -> list[tuple[str, str]]:
    """(fingerprint, checkpoint name) of each model CHALLENGE.models lists (§5.4), in its order; entries
    that are not ``{"fingerprint": str, "model": str}`` are skipped, names cut for messages. An older
    server sends none: then the one model the CHALLENGE describes."""
    out = []
    for m in ch.models[:MAX_LISTED_MODELS] if isinstance(ch.models, list) else ():
        if isinstance(m, dict) and isinstance(m.get("fingerprint"), str) and isinstance(m.get("model"), str):
            out.append((m["fingerprint"][:64], m["model"][:200]))
    return out or ([(ch.fingerprint, ch.model)] if ch.fingerprint else [])


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


def transcript(hello: Hello, ch: Challenge) -> auth.Transcript:
    """What both proofs (and the link keys) cover, from the HELLO and CHALLENGE as sent."""
    return auth.Transcript(hello.nonce, ch.nonce, ch.server_id, hello.key_id, hello.client_name, ch.link)


def check_server(ch: Challenge, hello: Hello, token: str, where: str, pinned_id: str = "") -> None:
    """The client's checks of an ``hmac-sha256`` CHALLENGE before it proves anything itself: well-formed
    fields, the server's proof (it knows this token), and the server id pinned for this address."""
    if not (auth.is_hex(ch.nonce, auth.NONCE_CHARS) and auth.is_hex(ch.server_id, auth.SERVER_ID_CHARS)):
        raise RemoteProtocolError(f"{where} sent a malformed nonce or server id")
    if ch.link not in (LINK_AES_GCM, LINK_NONE):
        raise RemoteProtocolError(
            f"{where} asks for unknown link mode {ch.link!r}: install the same ComfyUI-Mesh release on both"
        )
    if ch.mac == "":
        raise AuthError(
            f"{where} rejected the token this ComfyUI uses (it holds no token of key id {hello.key_id}): copy the "
            "token shown by the Daedalus window/console (or given by its operator) into the Icarus node (its "
            f"Token… button) or set {TOKEN_ENV}"
        )
    if not auth.check(auth.server_proof(token, transcript(hello, ch)), ch.mac):
        raise AuthError(f"{where} could not prove it knows the token: is something else on that port?")
    if pinned_id and ch.server_id != pinned_id:
        raise AuthError(
            f"{where} presents server id {ch.server_id}, but this ComfyUI pinned {pinned_id} for that address "
            "when it first connected: another Daedalus that knows this token answers there now (or that server's "
            "state folder was replaced). If the change is expected, save the token for this server again with "
            "the node's Token… button (that forgets the pinned id); otherwise check the address"
        )


def unencrypted_problem(where: str) -> AuthError:
    return AuthError(
        f"{where} runs with --no-encrypt, which this ComfyUI accepts only on a loopback address: restart "
        f"Daedalus without --no-encrypt, or set {ALLOW_UNENCRYPTED_ENV}=1 on this ComfyUI if the link between "
        "the two machines is trusted"
    )


def auth_reply(ch: Challenge, hello: Hello, token: str) -> Auth:
    """The client's AUTH answer to ``ch`` (after ``check_server``)."""
    return Auth(mac="" if ch.auth == AUTH_NONE else auth.client_proof(token, transcript(hello, ch)))


def remote_error(where: str, err: Error) -> MeshError:
    """What an error frame raises on the client."""
    if err.code == ErrorCode.AUTH_FAILED:
        return AuthError(
            f"{where} rejected the token: {err.message}. Copy the token shown by the Daedalus window/console "
            f"into the Icarus node (its Token… button) or set {TOKEN_ENV}"
        )
    return RemoteFailure(err.code, f"{where}: {err.message}", err.detail if isinstance(err.detail, dict) else None)


class ClientHandshake:
    """The client's half. ``hello()`` first; then ``receive()`` each frame and send what it returns.

    ``receive`` raises when a frame ends the handshake with nothing to send (an error frame, a wrong
    message, a server that cannot prove it knows the token or presents another id than ``pinned_id``).
    When the replies end it (a BYE), it sets ``error`` for the caller to raise after sending them. Once
    ``done``, ``challenge`` is the server's description, ``problems`` the version/model checks (for the
    caller to raise or log), and ``link`` the keys for every later frame (None: the server does not
    encrypt). ``plaintext_ok``: a --no-encrypt server is accepted (loopback, or allowed by the user).
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
        pinned_id: str = "",
        plaintext_ok: bool = False,
        samehost: bool = False,
    ):
        self.expect = expect
        self.versions = versions
        self.token = (token or "").strip()
        self.codecs = list(codecs)
        self.client_name = client_name
        self.allow_skew = allow_skew
        self.where = where
        self.nonce = nonce or auth.new_nonce()
        self.pinned_id = pinned_id
        self.plaintext_ok = plaintext_ok
        self.phase = "start"  # -> "challenge" -> "welcome" -> "done" | "failed"
        self.sent_hello: Hello | None = None
        self.challenge: Challenge | None = None
        self.error: MeshError | None = None
        self.problems: list[Problem] = []
        self.link: SecureLink | None = None
        # Same-host fast path (samehost.py): asked for; the server's secret once proved; why not.
        self.want_samehost = samehost
        self.samehost_secret = b""
        self.samehost = False
        self.samehost_reason = "" if samehost else "off on this side"

    @property
    def done(self) -> bool:
        return self.phase == "done"

    @property
    def authenticated(self) -> bool:
        """The server proved it knows the token (its ``server_id`` may be pinned)."""
        return self.challenge is not None and self.challenge.auth == AUTH_HMAC and self.phase in ("welcome", "done")

    def hello(self) -> Hello:
        if self.phase != "start":
            raise LocalError(f"hello() called in handshake phase {self.phase}")
        self.phase = "challenge"
        self.sent_hello = make_hello(
            self.expect,
            self.versions,
            nonce=self.nonce,
            codecs=self.codecs,
            client_name=self.client_name,
            key_id=auth.key_id(self.token),
        )
        return self.sent_hello

    def _answer(self, ch: Challenge) -> list[Message]:
        hello = self.sent_hello
        assert hello is not None
        for p in auth_problems(ch, bool(self.token), self.where):
            if not p.bye:
                raise p.exception()
            self.error = p.exception()
            return [Bye(reason=p.bye)]
        if ch.auth == AUTH_HMAC:
            try:
                check_server(ch, hello, self.token, self.where, self.pinned_id)
            except AuthError as e:
                if ch.mac:  # an impostor or a changed identity: nothing more is said to it
                    raise
                self.error = e
                return [Bye(reason="unknown token")]
            if ch.link == LINK_NONE and not self.plaintext_ok:
                self.error = unencrypted_problem(self.where)
                return [Bye(reason="unencrypted link refused")]
            if ch.link == LINK_AES_GCM:
                self.link = SecureLink.for_client(self.token, transcript(hello, ch))
        self.phase = "welcome"
        return [self._samehost_answer(auth_reply(ch, hello, self.token), ch)]

    def receive(self, msg: Message) -> list[Message]:
        phase, self.phase = self.phase, "failed"  # until this frame is known good
        if isinstance(msg, Error):
            raise remote_error(self.where, msg)
        if phase == "challenge":
            if not isinstance(msg, Challenge):
                raise RemoteProtocolError(f"{self.where} answered hello with {type(msg).__name__}")
            self.challenge = msg
            return self._answer(msg)
        if phase == "welcome":
            ch = self.challenge
            assert ch is not None
            if not isinstance(msg, Welcome):
                raise RemoteProtocolError(f"{self.where} answered auth with {type(msg).__name__}")
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
    """The server's half: HELLO -> CHALLENGE (with the server's proof), then AUTH -> WELCOME (or
    ``auth_failed``).

    ``keyring`` holds the tokens the server accepts (None: --no-auth); HELLO's key id picks one.
    ``offer()`` describes what this server holds now (a CHALLENGE without nonce, identity and proof).
    After each ``receive``, ``closed`` says the connection must end and ``ready`` that it is open;
    once ready, ``entry`` is the token the client proved (None without auth) and ``link`` the keys
    for every later frame (None: not encrypted).
    """

    def __init__(
        self,
        keyring: auth.Keyring | None,
        offer: Callable[[], Challenge],
        *,
        server_id: str = "",
        encrypt: bool = True,
        nonce: str | None = None,
        samehost: samehost.HostSecret | None = None,
    ):
        self.keyring = keyring
        self.offer = offer
        self.server_id = server_id
        self.encrypt = encrypt
        self.nonce = nonce or auth.new_nonce()
        self.phase = "hello"  # -> "auth" -> "ready"
        self.hello: Hello | None = None
        self.challenge: Challenge | None = None
        self.candidate: auth.TokenEntry | None = None  # the token HELLO's key id names, if held here
        self.entry: auth.TokenEntry | None = None
        self.link: SecureLink | None = None
        self.closed = False
        self.auth_failed = False
        self.host_secret = samehost
        self.samehost = False  # the client proved it runs on this host (WELCOME.samehost)
        self.samehost_reason = "off on this server" if samehost is None else ""
        self.samehost_gpus: list = []  # the GPUs the client announced with its proof

    @property
    def ready(self) -> bool:
        return self.phase == "ready"

    @property
    def unknown_key(self) -> bool:
        """HELLO named a token this server does not hold (its CHALLENGE carried no proof)."""
        return self.keyring is not None and self.hello is not None and self.candidate is None

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

    def _challenge(self, msg: Hello) -> Challenge:
        ch = dataclasses.replace(
            self.offer(),
            nonce=self.nonce,
            auth=AUTH_HMAC if self.keyring is not None else AUTH_NONE,
            server_id=self.server_id,
            link=LINK_AES_GCM if self.keyring is not None and self.encrypt else LINK_NONE,
            mac="",
            samehost=self._samehost_offer(),
        )
        if self.candidate is not None:
            ch = dataclasses.replace(ch, mac=auth.server_proof(self.candidate.token, transcript(msg, ch)))
        return ch

    def receive(self, msg: Message) -> list[Message]:
        if self.phase == "hello":
            if not isinstance(msg, Hello):
                return self._refuse(ErrorCode.BAD_REQUEST, f"expected hello, got {type(msg).__name__}")
            if self.keyring is not None and not auth.is_hex(msg.nonce, auth.NONCE_CHARS):
                self.auth_failed = True  # no proof can be made over a malformed nonce
                return self._refuse(ErrorCode.AUTH_FAILED, f"malformed nonce (want {auth.NONCE_CHARS} lowercase hex)")
            self.hello = msg
            if self.keyring is not None and msg.key_id:
                self.candidate = self.keyring.lookup(msg.key_id)
            self.phase = "auth"
            self.challenge = self._challenge(msg)
            return [self.challenge]
        if self.phase == "auth":
            if not isinstance(msg, Auth):
                return self._refuse(ErrorCode.BAD_REQUEST, f"expected auth, got {type(msg).__name__}")
            assert self.hello is not None and self.challenge is not None
            if self.keyring is not None:
                if not auth.is_hex(msg.mac, auth.MAC_CHARS):  # empty, wrong length, non-ASCII, ...
                    self.auth_failed = True
                    return self._refuse(ErrorCode.AUTH_FAILED, "malformed or missing mac (wrong or missing token)")
                entry = self.candidate
                t = transcript(self.hello, self.challenge)
                if entry is None or not auth.check(auth.client_proof(entry.token, t), msg.mac):
                    self.auth_failed = True
                    return self._refuse(ErrorCode.AUTH_FAILED, "wrong token")
                self.entry = entry
                if self.challenge.link == LINK_AES_GCM:
                    self.link = SecureLink.for_server(entry.token, t)
            self.phase = "ready"
            return [Welcome(session=self.nonce[:16], samehost=self._samehost_check(msg))]
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
    "allow_unencrypted",
    "auth_problems",
    "check_server",
    "transcript",
    "local_versions",
    "major_minor",
    "make_hello",
    "problems",
    "remote_error",
    "served_models",
]
