"""Daedalus as a library: protocol sessions, constants cache, and the TCP server.

``Session.handle(msg) -> replies`` is sans-IO and holds one connection's state; the
``DaedalusServer`` only moves bytes. The back half itself is a ``Backend`` (a model
loaded through ComfyUI, or the model-free ``ToyBackend`` used by tests and demos).
GPU work from all connections is serialized by one lock.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import socket
import threading
import time
import traceback
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from .. import auth, codec, hostmem, patchpipe, samehost, streaming
from ..config import ServerConfig
from ..constants import (
    LINGER_S,
    MAX_BODY_BYTES,
    MAX_HEADER_BYTES,
    MIN_STREAM_SLAB_BYTES,
    PACKAGE_VERSION,
    PEER_LOG_INTERVAL_S,
    PEER_LOG_LINES,
    PRE_AUTH_MAX_BODY,
    PRE_AUTH_MAX_HEADER,
    STATUS_CLIENT_NAME,
    TOKEN_RELOAD_S,
)
from ..errors import BackendUnavailable, LocalError, MeshError, OverBudget, RemoteProtocolError, StreamStateError
from ..handshake import ServerHandshake
from ..netio import recv_message, send_message, tune_socket
from ..protocol import (
    Bye,
    Challenge,
    EndStream,
    Error,
    ErrorCode,
    Forward,
    ForwardChunk,
    FrameDecoder,
    Message,
    Ping,
    Pong,
    Progress,
    Reconfigure,
    Reconfigured,
    Result,
    ResultChunk,
    StreamEnded,
    WireTensor,
    content_hash,
)
from ..securelink import SecureLink
from ..wirecodecs import temporal
from ..wirecodecs.base import decodes_in_place, itemsize, numel, torch_dtype
from . import tokens
from .budget import Budget, Budgets, SizedLRU
from .ratelog import RateLimitedLog
from .tokens import NamedTokens

log = logging.getLogger("daedalus")


class Backend(Protocol):
    arch: str
    model_name: str
    n_blocks: int
    n_blocks_max: int
    fingerprint: str
    device: torch.device
    comfyui_version: str

    def forward(self, tensors: dict[str, torch.Tensor], scalars: dict[str, Any]) -> dict[str, torch.Tensor]: ...

    def check_request(
        self, shapes: dict[str, tuple[int, ...] | None], dtypes: dict[str, str] | None = None
    ) -> str | None:
        """What is wrong with a request's tensors (argument name -> shape, constants included, and the
        wire dtypes of those whose descriptors are here), checked before anything is decoded; None when
        the back half takes them."""
        ...

    def close(self) -> None: ...


BackendFactory = Callable[[int], Backend]


@dataclass
class ServerStats:
    clients: int = 0  # authenticated sessions open (status probes included)
    steps: int = 0
    bytes_in: int = 0
    bytes_out: int = 0
    last_step: dict[str, Any] = field(default_factory=dict)
    errors: int = 0
    codec_state_bytes: int = 0  # temporal codec references held by all open connections
    samehost_sessions: int = 0  # sessions opened on the same-host fast path (samehost.py)
    samehost_bytes_in: int = 0  # payload bytes received / sent through shared memory or CUDA IPC
    samehost_bytes_out: int = 0
    patch_kv_bytes: int = 0  # stale keys / values of pipelined generations held (patchpipe.KVRegistry, §6.3)
    patch_kv_stores: int = 0  # ... for that many (client, generation)s


class ServerState:
    """What every connection shares: config, tokens, identity, backends (one per checkpoint), GPU lock, stats.

    ``server_id``: the persistent identity the CLI and the window keep in the state folder
    (``auth.load_or_create_server_id``); None makes one for this process (tests, demos).
    ``named``: the state folder's named tokens (``server.tokens``), accepted beside ``token`` (the
    "default" one) and reloaded by ``reload_tokens``; None: the default token only."""

    def __init__(
        self,
        cfg: ServerConfig,
        factory: BackendFactory | Sequence[BackendFactory],
        token: str | None,
        on_event: Callable[[dict[str, Any]], None] | None = None,
        server_id: str | None = None,
        named: NamedTokens | None = None,
    ):
        if cfg.auth and not token:
            raise LocalError("authentication is on but no token was given (use --no-auth to run without one)")
        self.cfg = cfg
        self.server_id = server_id or auth.new_server_id()
        self.gpu_lock = threading.Lock()
        self.stats = ServerStats()
        self._stats_lock = threading.Lock()
        self.on_event = on_event
        # Lines a peer's garbage causes (bad frames, failed auth, timeouts): one budget for the server.
        self.peer_log = RateLimitedLog(log, PEER_LOG_LINES, PEER_LOG_INTERVAL_S)
        # What all connections together may make this server hold (server/budget.py).
        self.budgets = Budgets(
            inflight=Budget("frames and requests in flight, all clients", cfg.max_inflight_bytes, "--max-inflight-mb"),
            consts=Budget("cached constants, all clients", cfg.max_const_total_bytes, "--max-consts-total-mb"),
            codec_state=Budget(
                "temporal-codec references, all clients",
                cfg.max_codec_state_total_bytes,
                "--max-codec-state-total-mb",
            ),
        )
        self.named = named if cfg.auth else None
        self.keyring: auth.Keyring | None = None
        self._default_token = token
        self._named_entries: list[auth.TokenEntry] = []
        self._named_sig: object = "unread"
        self._sessions: set[Session] = set()  # admitted (authenticated, holding a client slot)
        self.reload_tokens()
        # One backend per checkpoint (``factory``: one, or a sequence for --weights given several times),
        # the main one first. A session is bound to one by its HELLO's fingerprint (``slot_for``).
        self.factories: list[BackendFactory] = [factory] if callable(factory) else list(factory)
        if not self.factories:
            raise LocalError("no backend to serve: give --weights (or --toy)")
        self.backends: list[Backend] = self._build(cfg.n_blocks)
        self.patch_kv = patchpipe.KVRegistry(cfg.max_patch_kv_bytes)  # §6.3: per client and generation
        # The same-host proof's secret while a DaedalusServer listens (samehost.HostSecret).
        self.host_secret: samehost.HostSecret | None = None

    @property
    def backend(self) -> Backend:
        """The main checkpoint's back half (the only one unless several --weights were given)."""
        return self.backends[0]

    def _build(self, n_blocks: int) -> list[Backend]:
        """Every checkpoint's back half at ``n_blocks``; all of one family, no two alike."""
        built: list[Backend] = []
        try:
            for make in self.factories:
                b = make(n_blocks)
                built.append(b)
                first = built[0]
                if b.arch != first.arch:
                    raise LocalError(
                        f"{b.model_name} is a {b.arch} model but {first.model_name} is {first.arch}: one Daedalus "
                        "serves checkpoints of one family; start a second Daedalus on another --port for it"
                    )
                same = [x.model_name for x in built[:-1] if x.fingerprint == b.fingerprint]
                if same:
                    raise LocalError(
                        f"{b.model_name} holds the same back-half weights as {same[0]}: give each checkpoint "
                        "once in --weights"
                    )
        except BaseException:
            for b in built:
                b.close()
            raise
        return built

    def slot_for(self, fingerprint: str) -> int | None:
        """The backend whose fingerprint is ``fingerprint``; 0 (the main one) for ""; None if none is."""
        if not fingerprint:
            return 0
        for i, b in enumerate(self.backends):
            if b.fingerprint == fingerprint:
                return i
        return None

    def models(self) -> list[dict[str, Any]]:
        """What CHALLENGE.models lists: each backend's fingerprint and checkpoint name, the main one first."""
        return [{"fingerprint": b.fingerprint, "model": b.model_name} for b in self.backends]

    def close(self) -> None:
        """Free every backend (the server is stopping)."""
        gone, self.backends = self.backends, []
        for b in gone:
            b.close()

    def open_samehost(self) -> None:
        """Create the host secret clients on this host prove they can read (once; cfg.samehost)."""
        if not self.cfg.samehost or self.host_secret is not None:
            return
        try:
            self.host_secret = samehost.HostSecret()
        except OSError as e:  # no POSIX shared memory here (a locked-down container)
            log.warning("same-host fast path off: cannot create shared memory (%s)", e)

    def close_samehost(self) -> None:
        secret, self.host_secret = self.host_secret, None
        if secret is not None:
            secret.close()

    def set_token(self, token: str | None) -> None:
        """A new default token (the window's Regenerate…): new connections need it at once, and the
        sessions that proved the old one are closed."""
        self._default_token = token
        self._swap_keyring()

    def reload_tokens(self) -> bool:
        """Re-read the named tokens if their file changed (the CLI or the window edited it); sessions of
        a revoked token are closed. False when nothing changed or the file cannot be read (the tokens
        in use stay, one warning is logged)."""
        if self.named is None:
            if self.keyring is None:
                self._swap_keyring()
            return False
        sig = self.named.signature()
        if sig == self._named_sig:
            return False
        self._named_sig = sig
        try:
            self._named_entries = self.named.read()
        except LocalError as e:
            log.warning("%s (the tokens loaded before stay in use)", e)
            return False
        self._swap_keyring()
        return True

    def _swap_keyring(self) -> None:
        ring = tokens.keyring(self._default_token, self._named_entries) if self.cfg.auth else None
        with self._stats_lock:
            self.keyring = ring
            gone = [s for s in self._sessions if not self._holds(s)]
        if ring is not None:
            log.info("tokens: %s", ", ".join(e.name for e in ring.entries()))
            self.emit(kind="tokens", names=[e.name for e in ring.entries()])
        for s in gone:
            log.info("%s: token '%s' was revoked or replaced: closing its session", s.peer, s.token_name)
            s.kick()

    def _holds(self, session: Session) -> bool:
        """Under ``_stats_lock``: the token ``session`` proved is still one this server accepts."""
        e = session.handshake.entry
        if e is None or self.keyring is None:
            return e is None and self.keyring is None
        now = self.keyring.lookup(auth.key_id(e.token))
        return now is not None and now.name == e.name

    def admit(self, session: Session) -> Error | None:
        """An authenticated session takes one of ``cfg.max_clients`` slots (and, with a token limited to
        ``max_sessions``, one of its own; status probes do not count there); the refusal otherwise."""
        e = session.handshake.entry
        with self._stats_lock:
            if not self._holds(session):
                return _err(ErrorCode.AUTH_FAILED, "token revoked")
            n = self.cfg.max_clients
            if self.stats.clients >= n:
                return _err(ErrorCode.BUSY, f"server has {n} clients, the limit")
            if e is not None and e.max_sessions and not session.status_probe:
                mine = sum(1 for s in self._sessions if s.token_name == e.name and not s.status_probe)
                if mine >= e.max_sessions:
                    return _err(
                        ErrorCode.BUSY,
                        f"token '{e.name}' has {mine} sessions open, its limit (the server's operator sets it: "
                        "tokens add --max-sessions)",
                    )
            self.stats.clients += 1
            self._sessions.add(session)
            return None

    def leave(self, session: Session) -> None:
        with self._stats_lock:
            self.stats.clients -= 1
            self._sessions.discard(session)

    def patch_kv_changed(self, peer: str, why: str, released: int) -> None:
        """Stats after stale keys / values were dropped (``released`` bytes; logged when any)."""
        self.stats.patch_kv_bytes, self.stats.patch_kv_stores = self.patch_kv.nbytes, len(self.patch_kv)
        if released:
            log.info(
                "%s: patch K/V released (%s): %.2f MB; %d generation(s), %.2f MB held",
                peer,
                why,
                released / 1e6,
                len(self.patch_kv),
                self.patch_kv.nbytes / 1e6,
            )

    def emit(self, **event: Any) -> None:
        if self.on_event is not None:
            try:
                self.on_event(event)
            except Exception:  # a GUI callback must never take the server down
                log.exception("event callback failed")

    def add_codec_state_bytes(self, delta: int) -> None:
        """Account references already held (checked against the budget before they were made)."""
        with self._stats_lock:  # connection threads update it concurrently
            self.budgets.codec_state.adjust(delta)
            self.stats.codec_state_bytes = self.budgets.codec_state.used

    def reconfigure(self, n_blocks: int, slot: int = 0) -> tuple[Backend, bool]:
        """Every checkpoint's back half moves to ``n_blocks`` (they share --n-blocks); the one in ``slot``
        (the asking session's) and whether nothing changed."""
        with self.gpu_lock:
            old = self.backends[slot]
            if n_blocks == old.n_blocks:
                return old, True
            for b in self.backends:
                if not (1 <= n_blocks <= b.n_blocks_max):
                    raise LocalError(f"n_blocks={n_blocks} is out of range 1..{b.n_blocks_max} for {b.model_name}")
            log.info("reconfiguring: n_blocks %d -> %d", old.n_blocks, n_blocks)
            self.patch_kv_changed("-", "reconfigured", self.patch_kv.drop_all())  # attentions renumbered
            for b in self.backends:  # closed, still listed: a session reading its device meanwhile finds one
                b.close()
            try:
                self.backends = self._build(n_blocks)
            except Exception:
                log.exception("reconfigure to n_blocks=%d failed; restoring n_blocks=%d", n_blocks, old.n_blocks)
                self.backends = self._build(old.n_blocks)
                raise
            self.emit(kind="reconfigured", n_blocks=n_blocks)
            return self.backends[slot], False


class ConstCache:
    """Per-connection LRU of per-generation constants, bounded in bytes by its own limit and by the
    server-wide constants budget (``pool``)."""

    def __init__(self, max_bytes: int, pool: Budget | None = None):
        self._lru: SizedLRU[torch.Tensor] = SizedLRU(max_bytes, lambda t: t.numel() * t.element_size(), pool)

    @property
    def bytes(self) -> int:
        return self._lru.bytes

    def get(self, h: str) -> torch.Tensor | None:
        return self._lru.get(h)

    def put(self, h: str, t: torch.Tensor) -> bool:
        """Cache ``t`` under ``h``; False when the server-wide budget had no room (the request that
        sent it still uses it; a later one that only names it gets ``missing_consts`` and resends).
        A tensor that is a view into a larger buffer (a raw constant decoded on the CPU is a
        zero-copy view into its whole received frame) is copied first: the cache must hold, and
        count, only the constant's own bytes."""
        if self._lru.get(h) is not None:
            return True
        if t.untyped_storage().nbytes() > t.numel() * t.element_size():
            t = t.clone()
        return self._lru.put(h, t)

    def clear(self) -> None:
        self._lru.clear()


def _no_offer() -> Challenge:
    raise LocalError("the connection is closed")


def _err(code: ErrorCode, message: str, **detail: Any) -> Error:
    return Error(code=code.value, message=message, detail=detail)


@dataclass
class _Inbound:
    """A streamed request whose FORWARD was read and whose slabs are arriving in FORWARD_CHUNK frames
    (docs/PROTOCOL.md §6.1): its decoded tensors, the whole tensors the slabs are decoded into, and the
    bytes they hold in the server-wide in-flight budget. ``failed``: the request was answered with an
    error; its remaining chunks are dropped unread."""

    msg: Forward
    budget: Budget
    asm: streaming.Assembler
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)  # the FORWARD's own, decoded
    held: int = 0  # bytes taken from the budget
    next_part: int = 0
    bytes_in: int = 0
    decode_s: float = 0.0
    failed: bool = False

    def drop(self) -> None:
        self.tensors.clear()
        self.asm.drop()
        self.budget.give(self.held)
        self.held = 0


class Session:
    """One connection's protocol state. ``handle`` never raises for bad client input."""

    def __init__(self, state: ServerState, peer: str):
        self.state = state
        self.peer = peer
        self.closed = False
        self.status_probe = False  # the client is a node's status light (STATUS_CLIENT_NAME)
        self.admitted = False  # authenticated and holding one of the server's client slots
        self.handshake = ServerHandshake(
            state.keyring,
            self._offer,
            server_id=state.server_id,
            encrypt=state.cfg.encrypt,
            samehost=state.host_secret,
        )
        self.chan: samehost.Channel | None = None  # the same-host fast path, once proved
        self._shm_counted = (0, 0)  # chan.bytes_in / bytes_out already added to the server's stats
        self.consts = ConstCache(state.cfg.const_cache_bytes, state.budgets.consts)
        self.codec_state: dict[str, Any] = {}  # temporal codec references (wirecodecs.temporal.stream_state)
        self._codec_bytes = 0  # their size as last added to the server's stats
        self._inbound: _Inbound | None = None  # a streamed request being received
        self._outbound: Iterator[Message] | None = None  # a streamed reply, coded as it is sent
        self.linger = False  # closing after a broken stream: drain the peer's bytes after the last reply
        # Ends the connection from another thread (its token was revoked); the server sets it.
        self.kick: Callable[[], None] = lambda: None
        self.step_phase = ""  # what the request being served is doing (PROGRESS.phase): decode, queued, ...
        # The checkpoint this session is served by (ServerState.backends), from its HELLO's fingerprint.
        self.slot = 0

    @property
    def backend(self) -> Backend:
        """This session's back half (its checkpoint's, at the server's n_blocks now)."""
        return self.state.backends[self.slot]

    def handle(self, msg: Message, bytes_in: int = 0) -> list[Message]:
        if not self.handshake.ready:
            return self._handle_handshake(msg)
        dev = self.backend.device
        # The current CUDA device is per thread: make it the backend's in this connection thread.
        on_device = torch.cuda.device(dev) if dev.type == "cuda" else contextlib.nullcontext()
        chan = self.chan
        if chan is not None:
            chan.release()  # the client's next message: it has copied what the last reply lent it
        try:
            with on_device:
                replies = self._handle(msg, bytes_in)
            if chan is not None:
                replies = [chan.outgoing(r) for r in replies]
                self._count_samehost()
            return replies
        except Exception as e:
            err = self._failure(e)
            return [err, *self._abandon(msg)]
        finally:
            self._account_codec_state()

    def _failure(self, e: Exception) -> Error:
        """The error frame for a request that raised ``e``."""
        self.state.stats.errors += 1
        if isinstance(e, OverBudget):  # a server-wide budget has no room (now, or for a request this big)
            self.state.peer_log.warning("%s: refused: %s", self.peer, e)
            return _err(ErrorCode.BUSY, str(e), transient=e.transient)
        if isinstance(e, (RemoteProtocolError, LocalError)):
            self.state.peer_log.warning("%s: bad request: %s", self.peer, e)
            return _err(ErrorCode.BAD_REQUEST, str(e))
        # a failing step must not take the server down
        log.error("%s: request failed:\n%s", self.peer, traceback.format_exc())
        return _err(ErrorCode.FORWARD_FAILED, f"{type(e).__name__}: {e}")

    def take_outbound(self) -> Iterator[Message]:
        """The frames of a streamed reply ``handle`` left to send (coded one by one as the caller
        iterates: the caller sends each before the next is coded); empty when there is none."""
        out, self._outbound = self._outbound, None
        return out if out is not None else iter(())

    @property
    def link(self) -> SecureLink | None:
        """The keys every frame after WELCOME is sealed with (None: not encrypted)."""
        return self.handshake.link

    @property
    def token_name(self) -> str:
        """The name of the token the client proved ("" without auth)."""
        e = self.handshake.entry
        return e.name if e is not None else ""

    def release(self) -> None:
        """The connection closed: its codec references, constants and client slot go back to the server."""
        self._drop_inbound()
        self._outbound = None
        self.codec_state.clear()
        self._account_codec_state()
        self.consts.clear()
        self.state.patch_kv_changed(self.peer, "connection closed", self.state.patch_kv.leave(id(self)))
        if self.chan is not None:
            self.chan.close()
            self.chan = None
        if self.admitted:
            self.admitted = False
            self.state.leave(self)
        # The handshake holds a bound method of this session, a reference cycle: broken here, the
        # session and what it holds (record buffers of the encrypted link, caches) go with the
        # connection instead of waiting for the cyclic GC.
        self.handshake.offer = _no_offer
        self.kick = lambda: None

    def broken_frame(self, e: RemoteProtocolError) -> Error:
        """The decoder failed on the peer's bytes: the error frame to send before closing. An AUTH
        frame that cannot be read (a mac of the wrong type, ...) is a failed authentication."""
        self.state.stats.errors += 1
        self.closed = True
        if self.phase == "auth":
            self._auth_failed(f"unreadable auth frame: {e}")
            return _err(ErrorCode.AUTH_FAILED, "malformed auth frame (wrong or missing token)")
        self.state.peer_log.warning("%s: protocol error, closing: %s", self.peer, e)
        return _err(ErrorCode.BAD_FRAME, str(e))

    def _auth_failed(self, why: str) -> None:
        self.state.peer_log.warning("%s: authentication failed (%s)", self.peer, why)
        self.state.emit(kind="auth_failed", peer=self.peer)

    def _handle_handshake(self, msg: Message) -> list[Message]:
        """HELLO / AUTH / BYE before the session is open. Whatever the peer sent, this answers with
        frames (an error frame closes): never an exception, never a traceback in the log."""
        if isinstance(msg, Bye):
            self.closed = True
            return []
        hs = self.handshake
        try:
            replies = hs.receive(msg)
        except Exception as e:  # a malformed field the checks above missed: still only the peer's garbage
            self.state.stats.errors += 1
            self.closed = True
            if hs.phase == "auth":
                self._auth_failed(f"{type(e).__name__} on its auth frame")
                return [_err(ErrorCode.AUTH_FAILED, "malformed auth frame (wrong or missing token)")]
            self.state.peer_log.warning("%s: bad handshake frame, closing: %s", self.peer, type(e).__name__)
            return [_err(ErrorCode.BAD_REQUEST, f"bad handshake frame ({type(e).__name__})")]
        self.closed = hs.closed
        if hs.phase == "auth" and hs.unknown_key and hs.hello is not None and hs.hello.key_id:
            self._auth_failed(f"unknown token (key id {hs.hello.key_id[:16]!r})")
        if hs.auth_failed:
            self._auth_failed(replies[0].message if replies and isinstance(replies[0], Error) else "wrong token")
        elif hs.ready:
            name = hs.hello.client_name if hs.hello else "?"
            self.status_probe = name == STATUS_CLIENT_NAME
            refused = self.state.admit(self)
            if refused is not None:
                self.closed = True
                self.state.peer_log.warning("%s: authenticated, but refused: %s", self.peer, refused.message)
                return [refused]
            self.admitted = True
            token = f" (token '{self.token_name}')" if self.token_name else ""
            self._open_samehost()
            if self.status_probe:  # a node's status light checking its token: not a client session
                log.debug("%s: status probe authenticated%s", self.peer, token)
            else:
                log.info("%s: client '%s' connected%s", self.peer, name, token)
                self.state.emit(kind="client", peer=self.peer, connected=True, token=self.token_name)
        return replies

    def _open_samehost(self) -> None:
        """The session is open: its same-host channel, or the logged reason it stays on TCP."""
        hs = self.handshake
        secret = self.state.host_secret
        if secret is None or hs.hello is None:
            return
        say = log.debug if self.status_probe else log.info
        if not hs.samehost:
            say("%s: over TCP: %s", self.peer, hs.samehost_reason)
            return
        cfg = self.state.cfg
        self.chan = samehost.Channel(
            secret.secret,
            hs.hello.nonce,
            hs.nonce,
            "s",
            hs.samehost_gpus,
            cfg.samehost_max_bytes,
            pin=self.backend.device.type == "cuda",
        )
        with self.state._stats_lock:
            self.state.stats.samehost_sessions += 1
        say("%s: on this host: seam tensors go through shared memory", self.peer)

    def _count_samehost(self) -> None:
        chan = self.chan
        assert chan is not None
        with self.state._stats_lock:
            self.state.stats.samehost_bytes_in += chan.bytes_in - self._shm_counted[0]
            self.state.stats.samehost_bytes_out += chan.bytes_out - self._shm_counted[1]
        self._shm_counted = (chan.bytes_in, chan.bytes_out)

    def _wire(self, wt: WireTensor, device: torch.device, state: dict[Any, Any] | None = None) -> torch.Tensor:
        """Decode one received tensor, wherever its bytes are."""
        if self.chan is not None:
            return self.chan.decode(wt, device, state)
        if "shm" in wt.meta or "cuda" in wt.meta:
            raise RemoteProtocolError(f"tensor {wt.name!r} is in shared memory, but this session is not same-host")
        return codec.decode(wt, device, state=state)

    def _account_codec_state(self) -> int:
        """Bring ``stats.codec_state_bytes`` and the server-wide budget up to date with this
        session's references; their size."""
        now = temporal.state_bytes(self.codec_state)
        if now != self._codec_bytes:
            self.state.add_codec_state_bytes(now - self._codec_bytes)
            self._codec_bytes = now
        return now

    @property
    def phase(self) -> str:
        """``hello`` -> ``auth`` -> ``ready`` (handshake.ServerHandshake)."""
        return self.handshake.phase

    def _offer(self) -> Challenge:
        """What this server holds now for the checkpoint the HELLO's fingerprint names (this session is
        bound to it; the main one when it names none, or one this server does not hold: the client then
        reports the mismatch, with ``models``); the handshake adds the nonce and the auth scheme."""
        hello = self.handshake.hello
        slot = self.state.slot_for(hello.fingerprint if hello is not None else "")
        self.slot = slot or 0
        b = self.backend
        return Challenge(
            package_version=PACKAGE_VERSION,
            comfyui_version=b.comfyui_version,
            torch_version=torch.__version__,
            arch=b.arch,
            model=b.model_name,
            n_blocks=b.n_blocks,
            n_blocks_max=b.n_blocks_max,
            fingerprint=b.fingerprint,
            codecs=codec.available_ids(),
            device=str(b.device),
            models=self.state.models(),
        )

    def _handle(self, msg: Message, bytes_in: int) -> list[Message]:
        if isinstance(msg, Bye):
            self.closed = True
            return []
        if isinstance(msg, ForwardChunk):
            return self._chunk(msg, bytes_in)
        if self._inbound is not None:
            return self._broken_stream(
                f"{type(msg).__name__} in the middle of streamed request {self._inbound.msg.seq}"
            )
        if isinstance(msg, Ping):
            payload = b"\0" * max(0, min(msg.echo_bytes, 64 << 20))
            tensors = (WireTensor("echo", "uint8", (len(payload),), 0, payload),) if payload else ()
            return [Pong(seq=msg.seq, tensors=tensors)]
        if isinstance(msg, Reconfigure):
            entry = self.handshake.entry
            if entry is not None and not entry.may_reconfigure:
                b = self.backend
                self.state.peer_log.warning("%s: token '%s' may not reconfigure; refused", self.peer, entry.name)
                return [
                    _err(
                        ErrorCode.NOT_ALLOWED,
                        f"token '{entry.name}' may not reconfigure this server (it holds the last {b.n_blocks} "
                        f"blocks of {b.model_name}): set n_blocks_remote to {b.n_blocks}, or ask the server's "
                        "operator to allow it (a token made with tokens add --may-reconfigure)",
                        n_blocks=b.n_blocks,
                    )
                ]
            try:
                b, no_op = self.state.reconfigure(msg.n_blocks, self.slot)
            except LocalError as e:
                return [_err(ErrorCode.BAD_REQUEST, str(e))]
            except Exception as e:  # the reload failed; the previous configuration was restored
                log.error("%s: reconfigure failed:\n%s", self.peer, traceback.format_exc())
                return [_err(ErrorCode.RECONFIGURE_FAILED, f"{type(e).__name__}: {e}")]
            return [Reconfigured(n_blocks=b.n_blocks, fingerprint=b.fingerprint, no_op=no_op)]
        if isinstance(msg, Forward):
            reply = self._forward(msg, bytes_in)
            if reply is None:
                return []
            if isinstance(reply, Error):  # a streamed request refused at its FORWARD: drop its chunks
                return [reply, *self._abandon(msg)]
            return [reply]
        if isinstance(msg, EndStream):
            return [self._end_stream(msg)]
        return [_err(ErrorCode.BAD_REQUEST, f"unexpected {type(msg).__name__} after the handshake")]

    # ------------------------------------------------------------ streamed requests (§6.1)
    def _drop_inbound(self) -> None:
        ib, self._inbound = self._inbound, None
        if ib is not None:
            ib.drop()

    def _broken_stream(self, why: str) -> list[Message]:
        """The peer broke the chunk sequence: the connection cannot be trusted to be in step any more."""
        self._drop_inbound()
        self.closed = self.linger = True
        self.state.stats.errors += 1
        self.state.peer_log.warning("%s: broken stream, closing: %s", self.peer, why)
        return [_err(ErrorCode.BAD_REQUEST, f"broken stream: {why}")]

    def _abandon(self, msg: Message) -> list[Message]:
        """``msg`` was answered with an error: the chunks of its streamed request that are still to
        come are dropped unread (a FORWARD whose slabs cannot even be counted closes the connection)."""
        if isinstance(msg, ForwardChunk) and self._inbound is not None:
            ib = self._inbound
            ib.drop()
            ib.failed = True
            for wt in msg.tensors:  # this chunk's slabs not decoded yet: not waited for
                ib.asm.pending.pop(wt.name, None)
            if ib.asm.complete:
                self._inbound = None
        elif isinstance(msg, Forward) and msg.slabs and self._inbound is None:
            try:
                asm = streaming.Assembler(msg.slabs, RemoteProtocolError)
            except RemoteProtocolError as e:
                self.closed = self.linger = True
                self.state.peer_log.warning("%s: unusable slabs, closing: %s", self.peer, e)
                return []
            self._inbound = _Inbound(msg, self.state.budgets.inflight, asm, failed=True)
        return []

    def _chunk(self, msg: ForwardChunk, bytes_in: int) -> list[Message]:
        """One chunk of the streamed request: its slabs are decoded now (the next chunk is still on
        the wire); after the last one the step runs and is answered."""
        st = self.state
        ib = self._inbound
        if ib is None:
            return self._broken_stream(f"chunk {msg.part} of request {msg.seq} without its FORWARD")
        if (msg.seq, msg.part) != (ib.msg.seq, ib.next_part):
            return self._broken_stream(
                f"chunk {msg.part} of request {msg.seq} where chunk {ib.next_part} of request {ib.msg.seq} was due"
            )
        if not msg.tensors:
            return self._broken_stream(f"chunk {msg.part} of request {msg.seq} carries no slab")
        ib.next_part += 1
        ib.bytes_in += bytes_in
        if ib.failed:  # answered already: dropped unread
            try:
                for wt in msg.tensors:
                    ib.asm.skip(wt.name)
            except RemoteProtocolError as e:
                return self._broken_stream(str(e))
            if ib.asm.complete:
                self._inbound = None
            return []
        self.step_phase = "decode"
        t0 = time.perf_counter()
        for wt in msg.tensors:
            try:
                ib.asm.admit(wt)  # named, due, fits: before anything is decoded
            except RemoteProtocolError as e:
                return self._broken_stream(str(e))
            size = numel(wt.shape) * itemsize(torch_dtype(wt.dtype))
            with st.budgets.inflight.reserve(size, "a streamed request's slab"):  # decoded, then copied in place
                out = self._decode_coded({wt.name: wt}, ib.msg.stream, self.backend.device)
                if isinstance(out, Error):
                    return [out, *self._abandon(msg)]
                ib.asm.put(wt.name, out[wt.name])
                del out
        ib.decode_s += time.perf_counter() - t0
        if not ib.asm.complete:
            return []
        self._inbound = None  # the last chunk: run the step
        try:
            ib.tensors.update(ib.asm.finish())  # what the unstreamed path decodes, slab by slab in place
            reply = self._run(ib.msg, ib.bytes_in, ib.tensors, ib.decode_s * 1e3)
            return [reply] if reply is not None else []
        finally:
            ib.drop()

    def _end_stream(self, msg: EndStream) -> StreamEnded:
        """Generation end: drop this connection's temporal references if they are that
        generation's (those of another generation are still in use). Counts no step."""
        held = self._account_codec_state()
        released = held if temporal.end_stream(self.codec_state, msg.gen, RemoteProtocolError) else 0
        if msg.gen is not None:  # a pipelined generation's stale keys / values (§6.3) go too
            kv = self.state.patch_kv.end(f"{self.token_name}#{self.slot}", msg.gen)
            self.state.patch_kv_changed(self.peer, "generation ended", kv)
            released += kv
        if released:
            log.debug("%s: generation ended, released %.2f MB of codec references", self.peer, released / 1e6)
        return StreamEnded(gen=msg.gen, released=released)

    @staticmethod
    def _mismatch(msg: Forward, b: Backend) -> Error | None:
        if msg.arch == b.arch and msg.n_blocks == b.n_blocks:
            return None
        return _err(
            ErrorCode.CONFIG_MISMATCH,
            f"this server holds the last {b.n_blocks} blocks of a {b.arch} model ({b.model_name}); "
            f"the request is for {msg.n_blocks} blocks of {msg.arch}: reconfigure the server or change "
            "n_blocks_remote",
            n_blocks=b.n_blocks,
            arch=b.arch,
        )

    def _forward(self, msg: Forward, bytes_in: int) -> Message | None:
        """One request. A streamed one (``slabs``) is checked, its whole tensors allocated and its own
        tensors decoded now, then it waits for its chunks (``_chunk`` answers it); None then, and when
        the reply is streamed (``take_outbound``)."""
        st = self.state
        b = self.backend
        asm = streaming.Assembler(msg.slabs, RemoteProtocolError) if msg.slabs else None
        mismatch = self._mismatch(msg, b)
        if mismatch:
            return mismatch
        codec.by_id(msg.reply_codec)  # unknown reply codec: refuse before running the step
        self._patch_spec(msg)  # a malformed or unsupported ``patch``: refuse before decoding
        self.step_phase = "decode"
        t0 = time.perf_counter()
        incoming: dict[str, WireTensor] = {}
        decoded = held = asm.nbytes if asm is not None else 0
        # A tensor decoded as a view into its frame (raw, on the CPU, aligned) adds nothing to the
        # frame's bytes, already counted: reserving it again (``held``) would make the request hold
        # twice its frame, and clients that each hold a frame would wait on one another's.
        for wt in msg.tensors:
            if wt.name in incoming or (asm is not None and (wt.name in asm.wholes or wt.name in asm.pending)):
                raise RemoteProtocolError(f"tensor {wt.name!r} sent twice")
            incoming[wt.name] = wt
            size = numel(wt.shape) * itemsize(torch_dtype(wt.dtype))
            decoded += size
            held += 0 if decodes_in_place(wt, b.device) else size
        check = getattr(b, "check_request", None)
        if check is not None:  # names and widths the back half takes, before anything is decoded
            shapes: dict[str, tuple[int, ...] | None] = {n: tuple(w.shape) for n, w in incoming.items()}
            shapes = {n: v for n, v in shapes.items() if not n.startswith("const:")}
            shapes.update({n: w.shape for n, w in asm.wholes.items()} if asm is not None else {})
            shapes.update({a: None for a in msg.consts if isinstance(a, str)})
            dtypes = {n: w.dtype for n, w in incoming.items() if not n.startswith("const:")}
            dtypes.update({n: str(w.dtype).removeprefix("torch.") for n, w in asm.wholes.items()} if asm else {})
            wrong = check(shapes, dtypes)
            if wrong:
                raise RemoteProtocolError(f"request refused before decoding: {wrong}")
        if decoded > st.cfg.max_decoded_request_bytes:  # before any decoding allocates
            raise RemoteProtocolError(
                f"the request's tensors decode to {decoded} bytes, over this server's limit of "
                f"{st.cfg.max_decoded_request_bytes} (--max-request-mb)"
            )
        if asm is None:
            with st.budgets.inflight.reserve(held, "the request's decoded tensors"):
                tensors: dict[str, torch.Tensor] = {}
                err = self._prepare(msg, incoming, tensors)
                return err or self._run(msg, bytes_in, tensors, (time.perf_counter() - t0) * 1e3)
        for arg in asm.wholes:
            if arg in msg.consts:
                raise RemoteProtocolError(f"tensor {arg!r} sent twice (as slabs and as a constant)")
        st.budgets.inflight.take_or_raise(held, "the request's decoded tensors")
        ib = _Inbound(msg, st.budgets.inflight, asm, held=held, bytes_in=bytes_in)
        try:
            err = self._prepare(msg, incoming, ib.tensors)
            if err is None:
                asm.allocate(b.device)
        except BaseException:
            ib.drop()
            raise
        ib.decode_s = time.perf_counter() - t0
        if err is not None:
            ib.drop()
            return err
        self._inbound = ib
        return None

    def _patch_spec(self, msg: Forward) -> patchpipe.PatchSpec | None:
        """The request's ``patch`` scalar (§6.3), checked: None when it has none."""
        if "patch" not in msg.scalars:
            return None
        spec = patchpipe.PatchSpec.parse(msg.scalars["patch"])
        gen = msg.stream.get("gen") if isinstance(msg.stream, dict) else None
        if not isinstance(gen, str) or not gen or len(gen) > temporal.MAX_KEY_CHARS:
            raise RemoteProtocolError(
                f"a request with 'patch' must name its generation (stream.gen, 1..{temporal.MAX_KEY_CHARS} characters)"
            )
        b = self.backend  # the checkpoint this session is bound to (§5.4)
        if getattr(getattr(b, "adapter", None), "patch", None) is None:
            raise RemoteProtocolError(
                f"this server's back half ({b.arch}, {b.model_name}) has no patch pipelining: set patch_pipelining off"
            )
        return spec

    def _patch_override(self, msg: Forward) -> Any:
        """The attention override of a request with ``patch``: this client's generation's store."""
        spec = self._patch_spec(msg)
        if spec is None:
            return None
        # per token, checkpoint (§5.4) and generation; only an exact call starts a store
        owner = f"{self.token_name}#{self.slot}"
        store = self.state.patch_kv.store(owner, str(msg.stream["gen"]), id(self), create=spec.exact)
        if store is None:
            raise RemoteProtocolError(
                f"patch {spec.index} of {spec.count}: no exact call of this generation came first (patch_warmup >= 1)"
            )
        return patchpipe.attention_override(store, spec)

    def _decode_coded(
        self, incoming: dict[str, WireTensor], stream: dict, device: torch.device
    ) -> dict[str, torch.Tensor] | Error:
        """Decode coded tensors with this connection's codec state for ``stream``; an Error for what
        the client recovers from (references lost, entropy backend refused)."""
        st = self.state
        sub = temporal.stream_state(self.codec_state, stream, RemoteProtocolError)
        tensors: dict[str, torch.Tensor] = {}
        try:
            for name, wt in incoming.items():
                if not st.cfg.gpu_entropy and wt.meta.get("be") == "ans":
                    raise BackendUnavailable(
                        "this Daedalus refuses nvCOMP ANS payloads (started with --no-gpu-entropy); "
                        "send zstd-coded payloads",
                        "ans",
                    )
                tensors[name] = self._wire(wt, device, sub)
        except StreamStateError as e:  # the client drops its state and resends keyframes
            self.codec_state.clear()
            return _err(ErrorCode.STREAM_RESET, str(e))
        except BackendUnavailable as e:  # the client falls back to the CPU entropy coder
            return _err(ErrorCode.CODEC_UNAVAILABLE, str(e), backend=e.backend)
        except Exception:  # references half updated by a failed request are useless: drop them all
            self.codec_state.clear()
            raise
        held = temporal.state_bytes(self.codec_state)
        if held > st.cfg.max_codec_state_bytes:
            self.codec_state.clear()
            raise RemoteProtocolError(
                f"this connection's temporal-codec references would take {held} bytes, over this server's "
                f"limit of {st.cfg.max_codec_state_bytes} (--max-codec-state-mb): send fewer tensors with a "
                "temporal codec, or use quant / lossless"
            )
        pool = st.budgets.codec_state
        if pool.used - self._codec_bytes + held > pool.limit:  # with every other connection's references
            self.codec_state.clear()
            raise pool.refusal(held, "this connection's temporal-codec references")
        return tensors

    def _prepare(self, msg: Forward, incoming: dict[str, WireTensor], tensors: dict[str, torch.Tensor]) -> Error | None:
        """Resolve the request's constants and decode its own tensors into ``tensors``; an Error the
        client recovers from (constants missing, codec state lost, entropy backend refused)."""
        b = self.backend
        fresh: dict[str, torch.Tensor] = {}  # sent with this request: usable even if the cache evicts them
        for name, wt in list(incoming.items()):
            if name.startswith("const:"):
                h = name[6:]
                known = self.consts.get(h)
                if known is None:
                    if self.chan is not None:
                        wt = self.chan.resolve(wt)
                    if wt.codec != 0 or "cuda" in wt.meta or content_hash(wt) != h:
                        raise RemoteProtocolError(f"constant {h[:12]} does not match its content hash")
                    known = codec.decode(wt, b.device)
                    self.consts.put(h, known)
                fresh[h] = known
                del incoming[name]
        missing = []
        for arg, h in msg.consts.items():
            if not isinstance(h, str):
                raise RemoteProtocolError(f"constant {arg!r} has a non-string hash")
            t = fresh.get(h)
            if t is None:
                t = self.consts.get(h)
            if t is None:
                missing.append(h)
            else:
                tensors[arg] = t
        if missing:
            return _err(
                ErrorCode.MISSING_CONSTS, f"{len(missing)} constants not cached here; resend them", missing=missing
            )
        decoded = self._decode_coded(incoming, msg.stream, b.device)
        if isinstance(decoded, Error):
            return decoded
        tensors.update(decoded)
        return None

    def _run(self, msg: Forward, bytes_in: int, tensors: dict[str, torch.Tensor], decode_ms: float) -> Message | None:
        """Run the step on the decoded tensors; the reply (None: streamed, ``take_outbound``)."""
        st = self.state
        b = self.backend
        t_dec = time.perf_counter()
        if b.device.type == "cuda":
            torch.cuda.synchronize(b.device)
        decode_ms += (time.perf_counter() - t_dec) * 1e3
        self.step_phase = "queued"
        with st.gpu_lock:
            self.step_phase = "forward"
            b = self.backend
            mismatch = self._mismatch(msg, b)  # another client may have reconfigured meanwhile
            if mismatch:
                return mismatch
            t1 = time.perf_counter()
            with torch.inference_mode(), patchpipe.serving(self._patch_override(msg)):
                out = b.forward(tensors, dict(msg.scalars))
            if b.device.type == "cuda":
                torch.cuda.synchronize(b.device)
        t2 = time.perf_counter()
        self.step_phase = "encode"
        timings = {"decode": decode_ms, "forward": (t2 - t1) * 1e3}
        # A streamed reply over TCP only: on the same-host fast path the big tensors bypass the socket.
        if msg.reply_slab_bytes > 0 and self.chan is None:
            cuts = streaming.plan(out, max(msg.reply_slab_bytes, MIN_STREAM_SLAB_BYTES))
            if cuts:
                self._outbound = self._stream_reply(msg, bytes_in, out, cuts, timings)
                return None
        chan = self.chan if msg.reply_codec == 0 else None
        reply = tuple((chan and chan.ipc_wire(v, k)) or codec.encode(v, k, msg.reply_codec) for k, v in out.items())
        timings["encode"] = (time.perf_counter() - t2) * 1e3
        return self._step_done(msg, bytes_in, sum(w.nbytes for w in reply), timings, reply)

    def _stream_reply(
        self,
        msg: Forward,
        bytes_in: int,
        out: dict[str, torch.Tensor],
        cuts: dict[str, streaming.Cut],
        timings: dict[str, float],
    ) -> Iterator[Message]:
        """The RESULT (naming the slabs; its ``timings.encode`` covers its own tensors), then the
        RESULT_CHUNK frames, each coded when the previous one has been handed to the socket (it is on
        the wire while this one is coded). A slab that fails to code ends the reply with an error frame
        instead of the chunks still due."""
        dev = self.backend.device
        on_device = torch.cuda.device(dev) if dev.type == "cuda" else contextlib.nullcontext()
        slabbed = {n: out.pop(n) for n in cuts}
        t0 = time.perf_counter()
        try:
            with on_device:
                rest = tuple(codec.encode(v, k, msg.reply_codec) for k, v in out.items())
        except Exception as e:
            yield self._failure(e)
            return
        timings["encode"] = (time.perf_counter() - t0) * 1e3
        spec = {n: c.spec() for n, c in cuts.items()}
        yield self._step_done(msg, bytes_in, sum(w.nbytes for w in rest), timings, rest, spec)
        part = 0
        try:
            for name, cut in cuts.items():
                t = slabbed.pop(name)
                for sname, slab in cut.slabs(t):
                    with on_device:
                        wt = codec.encode(slab, sname, msg.reply_codec)
                    self.state.stats.bytes_out += wt.nbytes
                    yield ResultChunk(seq=msg.seq, part=part, tensors=(wt,))
                    part += 1
                del t
        except Exception as e:
            yield self._failure(e)

    def _step_done(
        self,
        msg: Forward,
        bytes_in: int,
        bytes_out: int,
        timings: dict[str, float],
        reply: tuple[WireTensor, ...],
        slabs: dict[str, Any] | None = None,
    ) -> Result:
        st = self.state
        st.stats.steps += 1
        st.stats.bytes_in += bytes_in
        st.stats.bytes_out += bytes_out
        st.stats.last_step = {
            "peer": self.peer,
            "token": self.token_name,
            "bytes_in": bytes_in,
            "bytes_out": bytes_out,
            **timings,
        }
        log.info(
            "step %d %s%s: in %.2f MB out %.2f MB | decode %.1f ms forward %.1f ms encode %.1f ms",
            msg.seq,
            self.peer,
            f" [{self.token_name}]" if self.token_name else "",
            bytes_in / 1e6,
            bytes_out / 1e6,
            timings["decode"],
            timings["forward"],
            timings["encode"],
        )
        st.emit(kind="step", **st.stats.last_step)
        return Result(seq=msg.seq, timings=timings, tensors=reply, slabs=slabs or {})


class Heartbeat:
    """While one request is served (queued for the GPU, decoding, forward, encoding): a PROGRESS frame
    every ``interval`` seconds from a second thread, so the client tells a slow step from a dead server.
    Frames go out whole under ``send_lock`` (the connection thread sends its replies under it too), and
    none is sent once the block is left: the reply always comes after the last heartbeat."""

    def __init__(
        self,
        conn: socket.socket,
        send_lock: threading.Lock,
        session: Session,
        msg: Message,
        interval: float,
        link: SecureLink | None = None,
    ):
        self.conn = conn
        self.link = link
        self.send_lock = send_lock
        self.session = session
        self.seq = int(getattr(msg, "seq", 0) or 0)
        self.interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"daedalus-heartbeat-{session.peer}", daemon=True)
        self._t0 = time.monotonic()

    def __enter__(self) -> Heartbeat:
        self.session.step_phase = ""
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        with self.send_lock:  # a heartbeat being written finishes first; none starts after this
            self._stop.set()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            with self.send_lock:
                if self._stop.is_set():
                    return
                beat = Progress(
                    seq=self.seq,
                    phase=self.session.step_phase,
                    elapsed_ms=round((time.monotonic() - self._t0) * 1e3, 1),
                )
                try:
                    send_message(self.conn, beat, self.link)
                except (MeshError, OSError):
                    return  # the link is gone: the reply's send will notice and close


def _linger(conn: socket.socket, limit: int = 4 << 20, within_s: float = LINGER_S) -> None:
    """Close politely after an error frame: stop writing, then drain what the peer is still
    sending, so the kernel doesn't answer with a reset that destroys our error frame unread.
    At most ``within_s`` seconds in all, however slowly the peer keeps sending."""
    conn.shutdown(socket.SHUT_WR)
    deadline = time.monotonic() + within_s
    drained = 0
    while drained < limit:
        left = deadline - time.monotonic()
        if left <= 0:
            break
        conn.settimeout(left)
        chunk = conn.recv(1 << 16)
        if not chunk:
            break
        drained += len(chunk)


def _send_last(conn: socket.socket, msg: Message, link: SecureLink | None = None) -> None:
    """Best effort: one error frame to a peer that may not be reading, then close politely."""
    try:
        conn.settimeout(LINGER_S)
        send_message(conn, msg, link)
        _linger(conn)
    except (MeshError, OSError):
        pass


class DaedalusServer:
    """Accepts connections; one thread each; GPU work serialized by ServerState.

    Before authentication a connection is one of at most ``cfg.max_unauthenticated`` (and
    ``cfg.max_unauthenticated_per_address`` from its source address); a new one over a cap pushes
    out the oldest unauthenticated one (of its own address first). The whole handshake must end within
    ``cfg.handshake_timeout_s`` of accept. Only authenticated sessions count against ``cfg.max_clients``
    (``ServerState.admit``); they are dropped after ``cfg.idle_timeout_s`` of silence.
    """

    def __init__(self, state: ServerState):
        self.state = state
        self._sock: socket.socket | None = None
        self._threads: set[threading.Thread] = set()
        self._conns: set[socket.socket] = set()
        self._lock = threading.Lock()
        # Connections still in the handshake -> their source address, oldest first.
        self._pending: OrderedDict[socket.socket, str] = OrderedDict()
        self._evicted: set[socket.socket] = set()
        self._stop = threading.Event()
        self._accept_thread: threading.Thread | None = None
        self.address: tuple[str, int] = ("", 0)

    @property
    def unauthenticated(self) -> int:
        """Connections accepted and not yet authenticated (nor pushed out)."""
        with self._lock:
            return len(self._pending)

    def start(self) -> tuple[str, int]:
        cfg = self.state.cfg
        try:
            # A deep backlog: a burst of connections must not make a client's SYN wait for a retransmit.
            s = socket.create_server((cfg.bind, cfg.port), reuse_port=False, backlog=socket.SOMAXCONN)
        except OSError as e:
            raise LocalError(
                f"cannot listen on {cfg.bind}:{cfg.port}: {e} — is another Daedalus running? Use --port"
            ) from e
        self._sock = s
        self.address = s.getsockname()[:2]
        self.state.open_samehost()
        self._accept_thread = threading.Thread(target=self._accept_loop, name="daedalus-accept", daemon=True)
        self._accept_thread.start()
        if self.state.named is not None:  # the CLI or the window may add or revoke tokens while it runs
            threading.Thread(target=self._watch_tokens, name="daedalus-tokens", daemon=True).start()
        return self.address

    def _watch_tokens(self) -> None:
        while not self._stop.wait(TOKEN_RELOAD_S):
            try:
                self.state.reload_tokens()
            except Exception:  # never let the watcher die silently: the next change would go unnoticed
                log.exception("reloading the named tokens failed")

    def serve_forever(self) -> None:
        if self._sock is None:
            self.start()
        try:
            while not self._stop.wait(0.5):
                pass
        finally:
            self.shutdown()

    def shutdown(self) -> None:
        self._stop.set()
        if self._sock is not None:
            try:
                self._sock.close()
            except OSError:
                pass
        for c in list(self._conns):
            try:
                c.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        for t in list(self._threads):
            if t.is_alive():  # one accepted this instant may not have started yet (it sees _stop and ends)
                t.join(timeout=5)
        if self._accept_thread is not None and self._accept_thread is not threading.current_thread():
            self._accept_thread.join(timeout=5)
        self.state.close_samehost()
        self.state.peer_log.flush()

    def _accept_loop(self) -> None:
        assert self._sock is not None
        self._sock.settimeout(0.5)
        while not self._stop.is_set():
            try:
                conn, addr = self._sock.accept()
            except TimeoutError:
                continue
            except OSError:
                break
            peer = f"{addr[0]}:{addr[1]}"
            with self._lock:
                victim = self._make_room(str(addr[0]))
                self._pending[conn] = str(addr[0])
                self._conns.add(conn)
            if victim is not None:
                self._push_out(victim)
            t = threading.Thread(target=self._serve_conn, args=(conn, peer), name=f"daedalus-{peer}", daemon=True)
            self._threads.add(t)
            t.start()

    def _make_room(self, source: str) -> socket.socket | None:
        """Under ``_lock``: the unauthenticated connection a new one from ``source`` replaces, if any."""
        cfg = self.state.cfg
        same = [c for c, a in self._pending.items() if a == source]
        if len(same) >= cfg.max_unauthenticated_per_address:
            victim = same[0]
        elif len(self._pending) >= cfg.max_unauthenticated:
            victim = next(iter(self._pending))
        else:
            return None
        del self._pending[victim]
        self._evicted.add(victim)
        return victim

    def _push_out(self, conn: socket.socket, how: int = socket.SHUT_RD) -> None:
        """Wake the connection's thread (its recv sees EOF); it answers ``busy`` and closes (with
        SHUT_RDWR, a revoked token's session, it just closes)."""
        try:
            conn.shutdown(how)
        except OSError:
            pass

    def _authenticated(self, conn: socket.socket) -> bool:
        """The handshake is over: the connection leaves the unauthenticated ones. False if it was
        pushed out meanwhile."""
        with self._lock:
            return self._pending.pop(conn, None) is not None

    def _serve_conn(self, conn: socket.socket, peer: str) -> None:
        st = self.state
        cfg = st.cfg
        session = Session(st, peer)
        session.kick = lambda: self._push_out(conn, socket.SHUT_RDWR)
        # Until the client has authenticated: small frames only, and one deadline for the whole handshake.
        # Big frames land in memory the OS commits as their bytes arrive (hostmem.lazy_buffer): a
        # prefix that declares a 3 GiB body allocates nothing up front and stalls no one.
        dec = FrameDecoder(max_body=PRE_AUTH_MAX_BODY, max_header=PRE_AUTH_MAX_HEADER, body_alloc=hostmem.lazy_buffer)
        deadline: float | None = time.monotonic() + cfg.handshake_timeout_s
        link: SecureLink | None = None  # after WELCOME: every frame sealed (securelink)
        send_lock = threading.Lock()  # whole frames: replies here, PROGRESS from the heartbeat thread
        try:
            tune_socket(conn)
            while not session.closed and not self._stop.is_set():
                try:
                    msg, n = recv_message(conn, dec, deadline, link)
                except RemoteProtocolError as e:
                    _send_last(conn, session.broken_frame(e), link)
                    break
                except OverBudget as e:  # a frame the server-wide budget has no room for: refused unread
                    st.stats.errors += 1
                    st.peer_log.warning("%s: refused a frame: %s", peer, e)
                    _send_last(conn, _err(ErrorCode.BUSY, str(e), transient=e.transient), link)
                    break
                except TimeoutError:
                    if deadline is not None:
                        st.peer_log.warning(
                            "%s: handshake not finished within %g s, closing", peer, cfg.handshake_timeout_s
                        )
                        _send_last(
                            conn,
                            _err(ErrorCode.BAD_REQUEST, f"handshake not finished within {cfg.handshake_timeout_s:g} s"),
                        )
                    else:
                        log.info("%s: silent for %g s, closing", peer, cfg.idle_timeout_s)
                    break
                except (ConnectionError, OSError):
                    if conn in self._evicted:
                        st.peer_log.warning("%s: pushed out by newer unauthenticated connections", peer)
                        _send_last(conn, _err(ErrorCode.BUSY, "too many unauthenticated connections; try again"))
                    break
                was_ready = session.phase == "ready"
                if was_ready:
                    with Heartbeat(conn, send_lock, session, msg, cfg.heartbeat_interval_s, link):
                        replies = session.handle(msg, n)
                else:
                    replies = session.handle(msg, n)
                if not was_ready and session.admitted:
                    if not self._authenticated(conn):
                        break  # pushed out just as it authenticated: its client reconnects
                    deadline = None
                    dec.max_body, dec.max_header = MAX_BODY_BYTES, MAX_HEADER_BYTES
                    # Big tensors land in page-locked memory where a GPU takes them; every big
                    # frame counts against the server-wide in-flight budget while it lives.
                    alloc = hostmem.receive_alloc() if cfg.device.startswith("cuda") else hostmem.lazy_buffer
                    dec.body_alloc = st.budgets.inflight.allocator(alloc)
                    conn.settimeout(cfg.idle_timeout_s)
                del msg  # the frame (and its budget) is free while the connection waits for the next one
                # A streamed reply's frames are coded one by one as they are sent (take_outbound).
                for reply in itertools.chain(replies, session.take_outbound()):
                    try:
                        with send_lock:
                            send_message(conn, reply, link)
                    except (MeshError, OSError) as e:
                        st.peer_log.warning("%s: cannot send reply: %s", peer, e)
                        session.closed = True
                        break
                del replies
                if session.linger:  # a broken stream: let the peer read the error before the close
                    with contextlib.suppress(OSError):
                        _linger(conn)
                if link is None and session.admitted:  # WELCOME went out in the clear; all else is sealed
                    link = session.link
        finally:
            admitted = session.admitted
            session.release()
            if admitted and not session.status_probe:
                log.info("%s: disconnected", peer)
                st.emit(kind="client", peer=peer, connected=False)
            with self._lock:
                self._pending.pop(conn, None)
                self._evicted.discard(conn)
                self._conns.discard(conn)
            self._threads.discard(threading.current_thread())
            conn.close()
