"""The Icarus client: one blocking TCP connection to a Daedalus server, and the per-process pool.

The client is used from inside ComfyUI sampling, so it is plain blocking I/O with
timeouts and errors that name host:port and the fix.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import queue
import random
import socket
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch

from . import auth, codec, handshake, hostmem, samehost, streaming
from .config import ClientConfig
from .constants import (
    LINK_PROBE_BIG_MS,
    LINK_PROBE_BYTES,
    LINK_PROBE_MAX_BYTES,
    LINK_TTL_S,
    MAX_DECODED_REQUEST_BYTES,
    MAX_POOLED_MODELS,
    MAX_STREAM_PARTS,
    SAMEHOST_ENV,
    SKEW_ENV,
)
from .errors import (
    ConnectFailed,
    LocalError,
    MeshError,
    RemoteFailure,
    RemoteProtocolError,
)
from .netio import is_loopback, recv_message, send_message, tune_socket
from .protocol import (
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
    tensor_map,
)
from .securelink import SecureLink
from .wirecodecs import auto as codec_auto
from .wirecodecs import temporal
from .wirecodecs.base import Staged, run_stages

log = logging.getLogger("comfyui_mesh")


class ServerTimeout(ConnectFailed):
    """The server kept sending heartbeats but no reply within the read timeout (not retried: it is alive
    and may still be working on it)."""


class ServerSilent(ConnectFailed):
    """Nothing at all (no reply, no PROGRESS heartbeat, no progress of a send) came from the server within
    the liveness timeout: the server or the link is gone. Retried like a dropped connection."""


class RetriesExhausted(ConnectFailed):
    """A model call failed across reconnects until the retry budget was spent."""


StatusCallback = Callable[[str, str], None]  # (level: ok / warn / error, text) for the node's banner


class _Retry:
    """Bounded exponential backoff across reconnects for one call: ``failed(e)`` logs, tells
    ``on_status`` and sleeps before the next try, or raises ``RetriesExhausted`` once ``retry_budget_s``
    would be spent; ``succeeded()`` reports a recovery."""

    def __init__(self, cfg: ClientConfig, where: str, on_status: StatusCallback | None):
        self.cfg = cfg
        self.where = where
        self.on_status = on_status
        self.failures = 0
        self.first: float | None = None
        self.delay = cfg.retry_backoff_s

    def _tell(self, level: str, text: str) -> None:
        if self.on_status is not None:
            try:
                self.on_status(level, text)
            except Exception:  # the UI is a courtesy: never fail a call over it
                log.debug("ComfyUI-Mesh: status callback failed", exc_info=True)

    def failed(self, e: MeshError) -> None:
        now = time.monotonic()
        if self.first is None:
            self.first = now
        self.failures += 1
        spent = now - self.first
        if spent + self.delay > self.cfg.retry_budget_s:
            msg = (
                f"gave up on {self.where} after retrying for {spent:.0f} s ({self.failures} failed tries, "
                f"retry budget {self.cfg.retry_budget_s:g} s); last error: {e} — start Daedalus again "
                "(python -m comfyui_mesh.server) or check the network link to it, then queue the prompt again"
            )
            log.error("ComfyUI-Mesh: %s", msg)
            self._tell("error", msg)
            raise RetriesExhausted(msg) from e
        # Equal jitter: clients refused together (a full server budget, a restart) come back apart.
        wait = self.delay * random.uniform(0.5, 1.0)
        log.warning(
            "ComfyUI-Mesh: %s — reconnecting to %s in %.1f s (try %d, %.0f s of the %.0f s retry budget spent)",
            e,
            self.cfg.address,
            wait,
            self.failures + 1,
            spent,
            self.cfg.retry_budget_s,
        )
        self._tell(
            "warn",
            f"reconnecting to {self.cfg.address}… (try {self.failures + 1}, {spent:.0f} s of "
            f"{self.cfg.retry_budget_s:.0f} s): {e}",
        )
        time.sleep(wait)
        self.delay = min(max(self.delay * 2, 0.05), self.cfg.retry_backoff_max_s)

    def succeeded(self) -> None:
        if self.failures and self.first is not None:
            spent = time.monotonic() - self.first
            log.warning("ComfyUI-Mesh: reconnected to %s; the call went through after %.1f s", self.cfg.address, spent)
            self._tell("ok", f"reconnected to {self.cfg.address} after {spent:.0f} s")


@dataclass
class StepStats:
    bytes_out: int = 0
    bytes_in: int = 0
    encode_ms: float = 0.0
    wait_ms: float = 0.0  # send + server work + receive
    decode_ms: float = 0.0
    server: dict[str, float] = field(default_factory=dict)
    consts_sent: int = 0
    codec: dict[str, Any] = field(default_factory=dict)  # codec + params used; for "auto" also why
    slabs_out: int = 0  # streamed call (docs/PROTOCOL.md §6.1): slabs sent in FORWARD_CHUNK frames
    slabs_in: int = 0  # and received in RESULT_CHUNK frames
    via: str = "tcp"  # "samehost": the big payloads went through shared memory / CUDA IPC (bytes_* count TCP only)
    settle_ms: float = 0.0  # of encode_ms: waiting for the front half's queued GPU work, not coding (balance.py)

    def line(self) -> str:
        s = self.server
        return (
            f"out {self.bytes_out / 1e6:.2f} MB in {self.bytes_in / 1e6:.2f} MB | "
            f"encode {self.encode_ms:.1f} ms, round trip {self.wait_ms:.1f} ms "
            f"(server decode {s.get('decode', 0):.1f} / forward {s.get('forward', 0):.1f} / "
            f"encode {s.get('encode', 0):.1f} ms), decode {self.decode_ms:.1f} ms"
        )


Encoder = Callable[[torch.Tensor, str], Staged]  # (tensor, name) -> staged coder, with the call's codec state


def _marks(ts: dict[str, torch.Tensor]) -> list[torch.cuda.Event]:
    """A CUDA event after the GPU work queued so far that produces ``ts`` (the front half), one per device."""
    marks = []
    for dev in {t.device for t in ts.values() if t.device.type == "cuda"}:
        ev = torch.cuda.Event()
        ev.record(torch.cuda.current_stream(dev))
        marks.append(ev)
    return marks


def _settle(marks: list[torch.cuda.Event]) -> None:
    """Wait for the front half's GPU work (``_marks``), not for the coders' first stage queued behind it
    (the coder's first host round trip would wait for it anyway; waiting here keeps it out of the
    coding time that plans the next call's slabs)."""
    for ev in marks:
        ev.synchronize()


class _Started:
    """A staged coder after its first stage (``Codec.staged_encode``): its device work is queued (behind
    the front half's, on a GPU) and the host is free; ``finish`` runs the rest. ``ms``: host time of
    both stages, not the wait between them."""

    def __init__(self, gen: Staged):
        t0 = time.perf_counter()
        self._gen = gen
        self._done: WireTensor | None = None
        try:
            next(gen)
        except StopIteration as e:
            self._done = e.value
        self.ms = (time.perf_counter() - t0) * 1e3

    def finish(self) -> WireTensor:
        if self._done is None:
            t0 = time.perf_counter()
            self._done = run_stages(self._gen)
            self.ms += (time.perf_counter() - t0) * 1e3
        return self._done


@dataclass
class _Coded:
    """A call's coded tensors for one try (``MeshClient._encode_coded``)."""

    whole: list[WireTensor]  # those that go in the FORWARD frame
    upload: _Upload | None  # those cut into slabs, coded as their chunks are sent
    learn: list[tuple[int, float]]  # (raw bytes, coding ms) per coder call, for the slab planner
    settle_ms: float  # waiting for the front half's GPU work


class _Upload:
    """A call's big coded tensors cut into slabs (docs/PROTOCOL.md §6.1), each coded when its chunk is
    about to be sent and kept, so a resend on the same codec state sends the same bytes. ``start``
    queues the first slab's first stage early (before the caller waits for the front half)."""

    def __init__(self, coded: dict[str, torch.Tensor], cuts: dict[str, streaming.Cut], enc: Encoder):
        self.coded, self.cuts, self.enc = coded, cuts, enc
        self._wire: list[WireTensor] = []
        self._ahead: list[_Started] = []  # the first slab, its first stage queued (``start``)
        self.encode_s = 0.0
        self.slab_ms: list[tuple[int, float]] = []  # (raw bytes, ms) of each slab coded

    def spec(self) -> dict[str, Any]:
        return {n: c.spec() for n, c in self.cuts.items()}

    @property
    def wire_bytes(self) -> int:
        return sum(w.nbytes for w in self._wire)

    def _slabs(self) -> Iterator[tuple[str, torch.Tensor]]:
        for name, cut in self.cuts.items():
            yield from cut.slabs(self.coded[name])

    def start(self) -> None:
        """The first stage of the first slab. Only the first: a later slab's first stage queued now would
        run on the GPU before the first slab's second stage, which waits for the stream."""
        if not self._wire and not self._ahead:
            sname, slab = next(self._slabs())
            self._ahead.append(_Started(self.enc(slab, sname)))

    def chunks(self, seq: int) -> Iterator[ForwardChunk]:
        for k, (sname, slab) in enumerate(self._slabs()):
            if k == len(self._wire):
                coder = self._ahead.pop(0) if self._ahead else _Started(self.enc(slab, sname))
                self._wire.append(coder.finish())
                self.encode_s += coder.ms / 1e3
                # both stages, the first slab's too: the plan's per-slab coding cost (its first stage hidden
                # behind the front half is a gain the plan does not count on; counting it, the plan cut
                # more, smaller slabs that the coder could not keep up with at 2.5 GbE on one H200)
                self.slab_ms.append((slab.numel() * slab.element_size(), coder.ms))
            yield ForwardChunk(seq=seq, part=k, tensors=(self._wire[k],))


class _Sender:
    """Writes frames to a socket from a thread of its own, so the caller codes the next chunk while
    this one goes out. At most two frames wait; after a failure the rest are dropped unsent."""

    def __init__(self, sock: socket.socket, link: SecureLink | None):
        self._sock, self._link = sock, link
        self._q: queue.Queue[Message | None] = queue.Queue(maxsize=2)
        self.sent = 0
        self.error: BaseException | None = None
        self._t = threading.Thread(target=self._run, name="icarus-send", daemon=True)
        self._t.start()

    def _run(self) -> None:
        while (msg := self._q.get()) is not None:
            if self.error is None:
                try:
                    self.sent += send_message(self._sock, msg, self._link)
                except BaseException as e:  # handed to the caller by close()
                    self.error = e

    def put(self, msg: Message) -> bool:
        """Queue ``msg``; False once a send has failed (stop coding)."""
        self._q.put(msg)
        return self.error is None

    def close(self) -> None:
        """Wait until every queued frame is written (or dropped after a failure)."""
        self._q.put(None)
        self._t.join()


class MeshClient:
    """One authenticated connection to a Daedalus server. Thread-safe (one request at a time)."""

    def __init__(
        self,
        cfg: ClientConfig,
        *,
        expect: dict[str, Any] | None = None,
        comfyui_version: str = "",
    ):
        self.cfg = cfg
        self.expect = dict(expect or {})  # arch / n_blocks / fingerprint the caller needs
        self.comfyui_version = comfyui_version
        self.server: Challenge | None = None
        self._sock: socket.socket | None = None
        self._link: SecureLink | None = None  # the connection's keys (None: the server does not encrypt)
        self._dec = FrameDecoder(body_alloc=hostmem.receive_alloc())
        self._lock = threading.RLock()
        self._sent_consts: set[str] = set()
        self._memo: dict[int, tuple[torch.Tensor, tuple[int, int], str, WireTensor]] = {}
        self._memo_lock = threading.Lock()
        self._seq = 0
        # Per connection: temporal codec state (wirecodecs.temporal.stream_state), codec param overrides.
        self._codec_state: dict[str, Any] = {}
        self._slab_costs: dict[str, streaming.CostTracker] = {}  # codec -> what its slabs cost (the plan)
        self._codec_override: dict[str, Any] = {}
        self._codec_gen = 0  # bumped whenever the codec state above is reset: coded tensors are stale
        self._chan: samehost.Channel | None = None  # the same-host fast path of this connection

    # ------------------------------------------------------------------ connection
    @property
    def connected(self) -> bool:
        return self._sock is not None

    @property
    def via_samehost(self) -> bool:
        """Connected on the same-host fast path (the big payloads bypass the socket)."""
        return self._chan is not None

    @property
    def via_loopback(self) -> bool:
        """Connected to this machine's loopback address (the link is a memory copy)."""
        return self._sock is not None and is_loopback(self._sock)

    def connect_retrying(self, on_status: StatusCallback | None = None) -> Challenge:
        """``connect``, reconnecting with the bounded backoff of a model call (``_Retry``) while the
        server is refused, dropped or silent."""
        retry = _Retry(self.cfg, self._where(), on_status)
        while True:
            try:
                server = self.connect()
            except ServerTimeout:
                raise
            except ConnectFailed as e:
                retry.failed(e)
                continue
            retry.succeeded()
            return server

    def _where(self) -> str:
        return f"Daedalus at {self.cfg.address}"

    def connect(self) -> Challenge:
        with self._lock:
            if self._sock is not None:
                assert self.server is not None
                return self.server
            try:
                sock = socket.create_connection((self.cfg.host, self.cfg.port), timeout=self.cfg.connect_timeout_s)
            except ConnectionRefusedError:
                raise ConnectFailed(
                    f"cannot reach {self._where()}: connection refused — is it running? "
                    f"Start it with: python -m comfyui_mesh.server --weights <model> --port {self.cfg.port}"
                ) from None
            except TimeoutError:
                raise ConnectFailed(
                    f"cannot reach {self._where()}: no answer within {self.cfg.connect_timeout_s:.0f} s — "
                    "check the address, the firewall and that the server binds 0.0.0.0 for LAN use"
                ) from None
            except OSError as e:
                raise ConnectFailed(f"cannot reach {self._where()}: {e}") from None
            tune_socket(sock)
            self._dec = FrameDecoder(body_alloc=hostmem.receive_alloc())
            try:
                sock.settimeout(self.cfg.handshake_timeout_s)
                self.server, self._link = self._handshake(sock)
            except BaseException:
                sock.close()
                raise
            sock.settimeout(self.cfg.read_timeout_s)
            self._sock = sock
            self._sent_consts.clear()
            self._codec_override.clear()
            self._reset_codec_state()  # a new server session: the next coded frames must be keyframes
            return self.server

    def _recv(self, sock: socket.socket, link: SecureLink | None = None) -> tuple[Message, int]:
        try:
            msg, n = recv_message(sock, self._dec, link=link)
        except TimeoutError:
            raise ServerSilent(
                f"{self._where()} sent nothing for {sock.gettimeout():g} s (no reply, no heartbeat) — "
                "the server or the link to it is down"
            ) from None
        except (ConnectionError, OSError) as e:
            raise ConnectFailed(f"connection to {self._where()} broke: {e}") from None
        if isinstance(msg, Error):
            raise handshake.remote_error(self._where(), msg)
        return msg, n

    def _pins(self) -> auth.TokenStore:
        """Where the server id of each host:port is pinned (``ClientConfig.trust_file``)."""
        return auth.TokenStore(Path(self.cfg.trust_file) if self.cfg.trust_file else None)

    def _handshake(self, sock: socket.socket) -> tuple[Challenge, SecureLink | None]:
        pins = self._pins()
        pinned = pins.pinned_id(self.cfg.host, self.cfg.port)
        hs = handshake.ClientHandshake(
            handshake.Expect.of(self.expect),
            handshake.local_versions(self.comfyui_version),
            self.cfg.token,
            codecs=codec.available_ids(),
            client_name=self.cfg.client_name,
            allow_skew=handshake.allow_skew(),
            where=self._where(),
            pinned_id=pinned,
            plaintext_ok=is_loopback(sock) or self.cfg.allow_unencrypted or handshake.allow_unencrypted(),
            samehost=self.cfg.samehost and os.environ.get(SAMEHOST_ENV) != "0",
        )
        try:
            send_message(sock, hs.hello())
        except OSError as e:
            raise ConnectFailed(f"handshake with {self._where()} failed: {e}") from None
        while not hs.done:
            msg, _ = self._recv(sock)
            for reply in hs.receive(msg):
                send_message(sock, reply)
            if hs.error is not None:
                raise hs.error
        for p in hs.problems:  # the first fatal one is raised; an accepted one (skew allowed) is logged
            if p.fatal:
                raise p.exception()
            log.warning("ComfyUI-Mesh: %s — accepted because %s=1", p.message, SKEW_ENV)
        assert hs.challenge is not None
        if hs.authenticated and not pinned:  # trust on first use, once the server proved the token
            pins.pin(self.cfg.host, self.cfg.port, hs.challenge.server_id)
        self._open_samehost(hs)
        return hs.challenge, hs.link

    def _open_samehost(self, hs: handshake.ClientHandshake) -> None:
        """After the handshake: this connection's fast path, or the one reason it stays on TCP."""
        ch = hs.challenge
        assert ch is not None
        if not hs.samehost:
            if ch.samehost and hs.want_samehost and _SAMEHOST_LAST.get(self.cfg.address) != hs.samehost_reason:
                _SAMEHOST_LAST[self.cfg.address] = hs.samehost_reason  # once per address and reason
                log.info("ComfyUI-Mesh: %s over TCP: %s", self.cfg.address, hs.samehost_reason)
            return
        self._chan = samehost.Channel(
            hs.samehost_secret,
            hs.nonce,
            ch.nonce,
            "c",
            ch.samehost.get("gpus"),
            self.cfg.samehost_max_bytes,
            pin=torch.cuda.is_available(),
        )
        if _SAMEHOST_LAST.get(self.cfg.address) != "":
            _SAMEHOST_LAST[self.cfg.address] = ""
            log.info("ComfyUI-Mesh: %s is on this host: seam tensors go through shared memory", self.cfg.address)

    def _decode(self, wt: WireTensor, device: torch.device | str) -> torch.Tensor:
        return self._chan.decode(wt, device) if self._chan is not None else codec.decode(wt, device)

    def _encode_raw(self, ts: dict[str, torch.Tensor]) -> list[WireTensor]:
        """Raw wire tensors: CUDA IPC handles where the fast path allows, else the bytes."""
        chan = self._chan
        return [(chan and chan.ipc_wire(t, name)) or codec.encode(t, name, "raw") for name, t in ts.items()]

    def close(self, reason: str = "") -> None:
        with self._lock:
            sock, self._sock = self._sock, None
            link, self._link = self._link, None
            self._sent_consts.clear()
            self._codec_state.clear()
            chan, self._chan = self._chan, None
            if sock is not None:
                try:
                    sock.settimeout(1.0)
                    send_message(sock, Bye(reason=reason), link)
                except OSError:
                    pass
                sock.close()
            if chan is not None:  # after BYE: the server copies nothing more out of our segment
                chan.close()

    # ------------------------------------------------------------------ requests
    def _await_reply(
        self, sock: socket.socket, read_timeout_s: float, deadline: float | None = None
    ) -> tuple[Message, int]:
        """The reply to the request just sent, skipping PROGRESS heartbeats. Each frame must arrive
        within the liveness timeout (else ``ServerSilent``: retried); the reply within ``read_timeout_s``
        however many heartbeats came (else ``ServerTimeout``: not retried, the server is still working).
        ``deadline`` (time.monotonic): the read timeout started earlier (the later frames of a streamed reply)."""
        if deadline is None:
            deadline = time.monotonic() + read_timeout_s
        got = 0
        while True:
            left = deadline - time.monotonic()
            wait = min(self.cfg.liveness_timeout_s, left)
            if wait <= 0:
                raise ServerTimeout(self._overdue(read_timeout_s))
            sock.settimeout(wait)
            try:
                msg, n = self._recv(sock, self._link)
            except ServerSilent:
                if wait < self.cfg.liveness_timeout_s:  # the read timeout ran out first
                    raise ServerTimeout(self._overdue(read_timeout_s)) from None
                raise
            got += n
            if not isinstance(msg, Progress):
                return msg, got
            log.debug(
                "ComfyUI-Mesh: %s working on %d: %s, %.1f s", self.cfg.address, msg.seq, msg.phase, msg.elapsed_ms / 1e3
            )

    def _overdue(self, read_timeout_s: float) -> str:
        return (
            f"{self._where()} is alive but did not answer within {read_timeout_s:g} s — is the server stuck "
            "or overloaded? (its log shows what it is doing)"
        )

    def _roundtrip(self, msg: Message, read_timeout_s: float | None = None) -> tuple[Message, int, int]:
        sock = self._sock
        assert sock is not None
        if self._chan is not None:
            msg = self._chan.outgoing(msg)
        try:
            sock.settimeout(self.cfg.liveness_timeout_s)  # a send that makes no progress this long: link down
            sent = send_message(sock, msg, self._link)
        except TimeoutError:
            self.close()
            raise ServerSilent(
                f"sending to {self._where()} made no progress for {self.cfg.liveness_timeout_s:g} s"
            ) from None
        except OSError as e:
            self.close()
            raise ConnectFailed(f"connection to {self._where()} broke: {e}") from None
        try:
            reply, got = self._await_reply(sock, self.cfg.read_timeout_s if read_timeout_s is None else read_timeout_s)
        except (ConnectFailed, RemoteProtocolError):
            self.close()
            raise
        return reply, sent, got

    def request(self, msg: Message, retry: bool = True) -> tuple[Message, int, int]:
        """Send one request, reconnecting once (at once) if the connection had dropped or went silent."""
        with self._lock:
            for attempt in (0, 1):
                try:
                    self.connect()
                    return self._roundtrip(msg)
                except ConnectFailed as e:
                    if attempt or not retry or isinstance(e, ServerTimeout):
                        raise
                    log.info("ComfyUI-Mesh: reconnecting to %s", self.cfg.address)
            raise AssertionError("unreachable")

    def ping(self, echo_bytes: int = 0) -> tuple[float, int]:
        """Round-trip time in ms and bytes received (link probe)."""
        t0 = time.perf_counter()
        reply, _, got = self.request(Ping(seq=self._next_seq(), echo_bytes=echo_bytes))
        if not isinstance(reply, Pong):
            raise RemoteProtocolError(f"{self._where()} answered ping with {type(reply).__name__}")
        return (time.perf_counter() - t0) * 1e3, got

    def reconfigure(self, n_blocks: int) -> Reconfigured:
        reply, _, _ = self.request(Reconfigure(n_blocks=int(n_blocks)))
        if not isinstance(reply, Reconfigured):
            raise RemoteProtocolError(f"{self._where()} answered reconfigure with {type(reply).__name__}")
        if self.server is not None:
            self.server = Challenge(
                **{**self.server.__dict__, "n_blocks": reply.n_blocks, "fingerprint": reply.fingerprint}
            )
        return reply

    def _hashed(self, t: torch.Tensor) -> tuple[str, WireTensor]:
        """(content hash, raw wire tensor) of a constant; memoized while the same tensor object
        is unchanged (a LoRA blob is hashed once, not every step)."""
        # Inference-mode tensors (everything ComfyUI makes while a node runs) keep no version
        # counter; they are matched by identity and storage (ComfyUI never edits such a constant).
        version = -1 if t.is_inference() else t._version
        with self._memo_lock:  # rows of a pipelined call may share this connection (icarus)
            memo = self._memo.get(id(t))
        if memo is not None and memo[0] is t and memo[1] == (version, t.data_ptr()):
            return memo[2], memo[3]
        wt = codec.encode(t, "const", "raw")
        h = content_hash(wt)
        with self._memo_lock:
            self._memo[id(t)] = (t, (version, t.data_ptr()), h, wt)
            while len(self._memo) > 16:
                self._memo.pop(next(iter(self._memo)))
        return h, wt

    def _next_seq(self) -> int:
        self._seq += 1
        return self._seq

    def end_stream(self, gen: str | None = None) -> None:
        """Generation end: drop this connection's temporal codec state of generation ``gen`` (the
        ``stream["gen"]`` it was coded under; None: whatever it holds) here, and, when connected, on
        the server (END_STREAM); that generation's next frames would be keyframes. Never raises for
        the server: a failure is logged and the server's state goes at the next ``gen`` anyway.
        The reply is awaited for at most the handshake timeout (it needs no GPU work)."""
        with self._lock:
            temporal.end_stream(self._codec_state, gen)
            sock = self._sock
            if sock is None:
                return
            try:  # closes the socket when the link failed
                reply, _, _ = self._roundtrip(
                    EndStream(gen=gen), min(self.cfg.read_timeout_s, self.cfg.handshake_timeout_s)
                )
            except (MeshError, OSError) as e:
                log.info("ComfyUI-Mesh: could not tell %s the generation ended (%s)", self.cfg.address, e)
                return
            if isinstance(reply, StreamEnded):
                log.debug("ComfyUI-Mesh: %s released %d bytes of codec references", self.cfg.address, reply.released)
            else:
                log.info("ComfyUI-Mesh: %s answered end of stream with %s", self.cfg.address, type(reply).__name__)

    def link_info(self) -> codec_auto.LinkInfo:
        """The link to this server (lock held, connected), for the ``auto`` codec and the slab
        planner: measured with PING round trips (empty ones for the latency, then ``LINK_PROBE_BYTES``
        up and back; on a fast link two bigger probes each way, the rate from the slope between the
        sizes: ``codec_auto.probe_rate``), cached per host:port for ``LINK_TTL_S``; assumed gigabit
        when it cannot be."""
        key = (self.cfg.host.strip().lower(), self.cfg.port)
        with _LINKS_LOCK:
            hit = _LINKS.get(key)
        if hit is not None and time.monotonic() - hit.when < LINK_TTL_S:
            return hit
        try:
            rtt = min(self.ping(0)[0] for _ in range(2))
            rates = []
            for probe in (self._probe_up, self._probe_down):
                small = (LINK_PROBE_BYTES, min(probe(LINK_PROBE_BYTES) for _ in range(2)))  # a first frame can stall
                first = codec_auto.probe_rate(small, None, rtt)
                n = codec_auto.big_probe_bytes(first, LINK_PROBE_BYTES, LINK_PROBE_BIG_MS, LINK_PROBE_MAX_BYTES)
                big = (n, min(probe(n) for _ in range(2))) if n else None
                rates.append(codec_auto.probe_rate(small, big, rtt))
        except MeshError as e:
            log.warning("ComfyUI-Mesh: cannot measure the link to %s (%s); assuming gigabit", self.cfg.address, e)
            return codec_auto.LinkInfo.assumed()
        li = codec_auto.LinkInfo(up_bps=rates[0], down_bps=rates[1], rtt_ms=rtt, when=time.monotonic(), how="measured")
        with _LINKS_LOCK:
            _LINKS[key] = li
        log.info(
            "ComfyUI-Mesh: link to %s: up %.0f MB/s, down %.0f MB/s, rtt %.1f ms",
            self.cfg.address,
            li.up_bps / 1e6,
            li.down_bps / 1e6,
            rtt,
        )
        return li

    def _probe_up(self, nbytes: int) -> float:
        """ms for a PING carrying ``nbytes`` to the server and its empty PONG."""
        probe = WireTensor("probe", "uint8", (nbytes,), 0, bytes(nbytes))
        t0 = time.perf_counter()
        self.request(Ping(seq=0, echo_bytes=0, tensors=(probe,)))
        return (time.perf_counter() - t0) * 1e3

    def _probe_down(self, nbytes: int) -> float:
        """ms for an empty PING and a PONG carrying ``nbytes`` back."""
        return self.ping(nbytes)[0]

    def _auto_choice(self, coded: dict[str, torch.Tensor], params: dict[str, Any]) -> dict[str, Any]:
        """``auto``'s report for these tensors on this link (logged when the choice changes)."""
        peer = self.server.device if self.server is not None else ""
        rep = codec_auto.choose_for(coded.values(), self.link_info(), peer, params)
        sig = (rep["codec"], repr(sorted(rep["params"].items())))
        if _AUTO_LAST.get(self.cfg.address) != sig:
            _AUTO_LAST[self.cfg.address] = sig
            log.info(
                "ComfyUI-Mesh auto codec for %s: %s %s (%s)", self.cfg.address, sig[0], rep["params"], rep["reason"]
            )
        return rep

    def _coder(
        self,
        coded: dict[str, torch.Tensor],
        codec_name: str,
        codec_params: dict[str, Any] | None,
        stream: dict[str, Any] | None,
        stats: StepStats,
    ) -> Encoder:
        """The encoder of this call's coded tensors: ``auto`` resolved for all of ``coded``, this
        connection's overrides and codec state (lock held, connected)."""
        params = dict(codec_params or {})
        if codec_name == "auto":  # a policy, not a format: pick the codec for the measured link
            stats.codec = self._auto_choice(coded, params)
            codec_name, params = stats.codec["codec"], dict(stats.codec["params"])
        if self._codec_override and codec.by_name(codec_name).uses_entropy_backend:
            params.update(self._codec_override)
        stats.codec = {**stats.codec, "codec": codec_name, "params": params}
        name_ = codec_name
        if name_ == "raw":  # stateless
            return lambda t, name: codec.staged_encode(t, name, "raw")
        sub = temporal.stream_state(self._codec_state, stream)

        def enc(t: torch.Tensor, name: str) -> Staged:
            return codec.staged_encode(t, name, name_, params, state=sub)

        return enc

    def _encode_coded(
        self,
        coded: dict[str, torch.Tensor],
        codec_name: str,
        codec_params: dict[str, Any] | None,
        stream: dict[str, Any] | None,
        stats: StepStats,
    ) -> _Coded:
        """Encode ``coded`` for one try with this connection's codec state (lock held, connected):
        big tensors over TCP cut into slabs where that is faster (coded as their chunks are sent), the
        rest whole. Each coder's first stage is queued behind the front half's GPU work before this
        waits for that work (``_settle``), so only its second stage is in series with the call."""
        marks = _marks(coded)  # the front half, queued on the GPU
        enc = self._coder(coded, codec_name, codec_params, stream, stats)
        used = stats.codec["codec"]
        cuts = self._cuts(coded, used, stats.codec["params"])
        upload = _Upload(coded, cuts, enc) if cuts else None
        ipc = used == "raw" and upload is None  # whole and raw: CUDA IPC handles where the fast path allows
        whole: list[_Started] = []
        if not ipc:  # (raw's first stage is empty: its copy waits for the front half anyway)
            if upload is not None:
                upload.start()
            whole = [_Started(enc(t, n)) for n, t in coded.items() if n not in cuts]
        t_settle = time.perf_counter()
        _settle(marks)  # the front half done: what follows times the coding alone
        t_enc = time.perf_counter()
        wire = self._encode_raw(coded) if ipc else [w.finish() for w in whole]
        if upload is not None:
            learn = upload.slab_ms
        else:  # both stages (as for slabs)
            raw_bytes = sum(t.numel() * t.element_size() for t in coded.values())
            learn = [(raw_bytes, (time.perf_counter() - t_enc) * 1e3 if ipc else sum(w.ms for w in whole))]
        return _Coded(wire, upload, learn, (t_enc - t_settle) * 1e3)

    # ------------------------------------------------------------------ streamed calls (§6.1)
    def _cuts(
        self, coded: dict[str, torch.Tensor], codec_name: str, params: dict[str, Any]
    ) -> dict[str, streaming.Cut]:
        """How to stream ``coded``; {} when it goes as one frame: a call too small to gain, the same-host
        fast path (big tensors bypass the socket there), and where one frame is fastest. With
        ``stream_plan`` "auto" the slab count is the one ``streaming.best_parts`` expects to be fastest
        from this link's rate and what this codec's slabs have cost so far (``_slab_tracker``); slabs are
        never smaller than ``stream_slab_bytes``. "fixed": slabs of ``stream_slab_bytes``."""
        slab = self.cfg.stream_slab_bytes
        total = sum(t.numel() * t.element_size() for t in coded.values())
        if self._chan is not None or slab <= 0 or total < self.cfg.stream_min_bytes:
            return {}
        if self.cfg.stream_plan == "fixed":
            return streaming.plan(coded, slab)
        tracker = self._slab_tracker(coded, codec_name, params)
        up_bps = self.link_info().up_bps
        k = tracker.parts_for(total, up_bps, max(1, min(MAX_STREAM_PARTS, total // slab)))
        log.debug(
            "ComfyUI-Mesh: %s: %s plan %d slab(s) for %.1f MB at %.0f MB/s (code %s, decode %s, ratio %.3f)",
            self.cfg.address,
            codec_name,
            k,
            total / 1e6,
            up_bps / 1e6,
            tracker.enc.cost,
            tracker.dec.cost,
            tracker.ratio,
        )
        return streaming.plan(coded, -(-total // k)) if k > 1 else {}

    def _slab_tracker(
        self, coded: dict[str, torch.Tensor], codec_name: str, params: dict[str, Any]
    ) -> streaming.CostTracker:
        tr = self._slab_costs.get(codec_name)
        if tr is None:
            t = next(iter(coded.values()))
            peer = self.server.device if self.server is not None else ""
            floor = params.get("snr_db", 27.0)
            enc, dec, ratio = codec_auto.slab_costs(
                codec_name, t.device.type == "cuda", peer, t.element_size(), float(floor)
            )
            tr = self._slab_costs[codec_name] = streaming.CostTracker(
                streaming.Affine(*enc), streaming.Affine(*dec), ratio
            )
        return tr

    def _learn_costs(
        self, codec_name: str, raw: int, coded_ms: list[tuple[int, float]], wire: int, stats: StepStats
    ) -> None:
        """What this call's slabs cost (coded here, decoded by the server), for the next plan."""
        tr = self._slab_costs.get(codec_name)
        if tr is None or raw <= 0 or not coded_ms:
            return
        for nbytes, ms in coded_ms:
            tr.coded(nbytes, ms)
        k = len(coded_ms)
        if "decode" in stats.server:
            tr.decoded(raw / k, float(stats.server["decode"]) / k)
        tr.sent(raw, wire)

    def _send_streamed(self, sock: socket.socket, msg: Forward, upload: _Upload) -> int:
        """Send the FORWARD, then its chunks, each coded while the previous one is written; bytes
        sent. A failure mid-way leaves the server half a request: the connection is closed."""
        sock.settimeout(self.cfg.liveness_timeout_s)  # a send that makes no progress this long: link down
        sender = _Sender(sock, self._link)
        try:
            if sender.put(msg):
                for chunk in upload.chunks(msg.seq):
                    if not sender.put(chunk):
                        break
        except BaseException:  # coding failed: the stream cannot be finished
            sender.close()
            self.close()
            raise
        sender.close()
        if sender.error is not None:
            self._broken_send(sock, sender.error)
        return sender.sent

    def _broken_send(self, sock: socket.socket, e: BaseException) -> None:
        """A send failed: raise the error frame the server may have sent first (it refused the
        stream), else ConnectFailed; the connection is closed either way."""
        try:
            sock.settimeout(1.0)
            while isinstance(self._recv(sock, self._link)[0], Progress):  # heartbeats before the error
                pass
        except RemoteFailure:
            self.close()
            raise
        except (MeshError, OSError):
            pass
        self.close()
        if isinstance(e, TimeoutError):
            raise ServerSilent(
                f"sending to {self._where()} made no progress for {self.cfg.liveness_timeout_s:g} s"
            ) from None
        raise ConnectFailed(f"connection to {self._where()} broke while sending: {e}") from None

    def _recv_result(
        self,
        sock: socket.socket,
        seq: int,
        device: torch.device | str,
        stats: StepStats,
        first: tuple[Message, int] | None = None,
    ) -> tuple[Message, int, dict[str, torch.Tensor]]:
        """The reply to request ``seq`` (its first frame ``first`` when already read) and, when that
        RESULT names slabs, its RESULT_CHUNK frames, each decoded into place as it arrives (the next
        one is still on the wire); (the reply frame, bytes read, the slabbed tensors)."""
        read_timeout_s = self.cfg.read_timeout_s
        deadline = time.monotonic() + read_timeout_s
        try:
            reply, got = first if first is not None else self._await_reply(sock, read_timeout_s)
        except (ConnectFailed, RemoteProtocolError):
            self.close()
            raise
        if not isinstance(reply, Result):  # out of step with this request (a stray chunk, ...)
            self.close()
            raise RemoteProtocolError(f"{self._where()} answered forward with {type(reply).__name__}")
        if not reply.slabs:
            return reply, got, {}
        t0 = time.perf_counter()
        try:
            asm = streaming.Assembler(reply.slabs, RemoteProtocolError)
            if asm.nbytes > MAX_DECODED_REQUEST_BYTES:
                raise RemoteProtocolError(f"{self._where()} announced a reply of {asm.nbytes} bytes")
            asm.allocate(device)
            dec_s = time.perf_counter() - t0
            part = 0
            while not asm.complete:
                chunk, n = self._await_reply(sock, read_timeout_s, deadline)  # skips PROGRESS, if any
                got += n
                if not isinstance(chunk, ResultChunk) or (chunk.seq, chunk.part) != (seq, part) or not chunk.tensors:
                    raise RemoteProtocolError(
                        f"{self._where()} sent {type(chunk).__name__} where chunk {part} of reply {seq} was due"
                    )
                part += 1
                t0 = time.perf_counter()
                for wt in chunk.tensors:
                    asm.admit(wt)
                    asm.put(wt.name, self._decode(wt, device))
                dec_s += time.perf_counter() - t0
            joined = asm.finish()
        except (ConnectFailed, RemoteProtocolError):
            self.close()
            raise
        stats.decode_ms = dec_s * 1e3
        stats.slabs_in = sum(len(w.parts) for w in asm.wholes.values())
        return reply, got, joined

    def _reset_codec_state(self) -> None:
        self._codec_state.clear()
        self._codec_gen += 1

    # Recovery after a failed forward try: each action adjusts this client so that the next try
    # can succeed, and returns False when it cannot help (the error is raised).
    def _forget_sent_consts(self, e: RemoteFailure) -> bool:
        self._sent_consts.clear()  # the server lost them (restart, eviction): resend every one
        return True

    def _drop_codec_state(self, e: RemoteFailure) -> bool:
        log.info("ComfyUI-Mesh: %s lost the temporal codec state; resending keyframes", self.cfg.address)
        self._reset_codec_state()
        return True

    def _force_zstd(self, e: RemoteFailure) -> bool:
        if self._codec_override.get("backend") == "zstd":
            return False
        log.warning("ComfyUI-Mesh: %s; using the CPU entropy coder (zstd) on this connection", e.message)
        self._codec_override["backend"] = "zstd"
        self._reset_codec_state()
        return True

    _RECOVERY: ClassVar[dict[ErrorCode, Callable[[MeshClient, RemoteFailure], bool]]] = {
        ErrorCode.MISSING_CONSTS: _forget_sent_consts,
        ErrorCode.STREAM_RESET: _drop_codec_state,
        ErrorCode.CODEC_UNAVAILABLE: _force_zstd,
    }
    REMOTE_RECOVERIES = 2  # error frames recovered from per call (a dropped connection: the retry budget)

    def _no_ipc(self, e: RemoteFailure) -> bool:
        """The server could not open a CUDA IPC handle: CUDA tensors go through the segments."""
        chan = self._chan
        if chan is None or not chan.peer_gpus or samehost.IPC_FAILED not in e.message:
            return False
        log.warning("ComfyUI-Mesh: %s; sending CUDA tensors through shared host memory instead", e.message)
        chan.peer_gpus.clear()
        self._reset_codec_state()  # re-encode this call's tensors
        return True

    def _recover(self, e: RemoteFailure, recovered: int) -> bool:
        if recovered >= self.REMOTE_RECOVERIES:
            return False
        if e.code == ErrorCode.BAD_REQUEST:
            return self._no_ipc(e)
        code = ErrorCode.of(e.code)
        action = self._RECOVERY.get(code) if code is not None else None
        return action is not None and action(self, e)

    def _send_forward(
        self, msg: Forward, stats: StepStats, upload: _Upload | None = None, device: torch.device | str = "cpu"
    ) -> tuple[Message, dict[str, torch.Tensor]]:
        """Send the request (streamed when ``upload``), read the reply (streamed when the server
        cut it); (closing reply frame, the reply's joined slabs)."""
        t1 = time.perf_counter()
        sock = self._sock
        assert sock is not None
        if upload is not None:
            sent = self._send_streamed(sock, msg, upload)
            stats.slabs_out = sum(c.parts for c in upload.cuts.values())
            reply, got, joined = self._recv_result(sock, msg.seq, device, stats)
        else:
            first, sent, n = self._roundtrip(msg)
            reply, got, joined = self._recv_result(sock, msg.seq, device, stats, (first, n))
        stats.wait_ms = (time.perf_counter() - t1) * 1e3
        stats.bytes_out, stats.bytes_in = sent, got
        return reply, joined

    def _decode_result(
        self,
        reply: Message,
        stats: StepStats,
        device: torch.device | str,
        joined: dict[str, torch.Tensor] | None = None,
    ) -> dict[str, torch.Tensor]:
        if not isinstance(reply, Result):
            raise RemoteProtocolError(f"{self._where()} answered forward with {type(reply).__name__}")
        stats.server = {k: float(v) for k, v in reply.timings.items() if isinstance(v, (int, float))}
        t2 = time.perf_counter()
        out = dict(joined or {})
        for name, wt in tensor_map(reply.tensors).items():
            if name in out:
                raise RemoteProtocolError(f"{self._where()} sent {name!r} twice (as slabs and whole)")
            out[name] = self._decode(wt, device)
        stats.decode_ms += (time.perf_counter() - t2) * 1e3
        return out

    def forward(
        self,
        *,
        arch: str,
        n_blocks: int,
        coded: dict[str, torch.Tensor],
        exact: dict[str, torch.Tensor],
        consts: dict[str, torch.Tensor],
        scalars: dict[str, Any],
        codec_name: str = "raw",
        codec_params: dict[str, Any] | None = None,
        reply_codec: str = "raw",
        stream: dict[str, Any] | None = None,
        device: torch.device | str = "cpu",
        on_encoded: Callable[[StepStats], None] | None = None,
        on_status: StatusCallback | None = None,
    ) -> tuple[dict[str, torch.Tensor], StepStats]:
        """Run the back half: encode -> round trip -> decode. ``coded`` go through ``codec_name``;
        ``exact`` and ``consts`` raw.

        Constants are sent once per connection (by content hash). A failed try is sent again:
        after an error frame ``_recover`` adjusts (resend the constants, resend keyframes, fall back
        to zstd); after a refused, dropped or silent connection the call reconnects with bounded
        backoff until ``cfg.retry_budget_s`` is spent (``on_status`` hears "reconnecting"). A new
        connection is a new server session: every constant (the LoRA set too) is resent, and the coded
        tensors are re-encoded as keyframes whenever their codec state was reset. A FORWARD is a pure
        function of its frame, so resending one the server may have run already is safe.
        """
        stats = StepStats()
        t0 = time.perf_counter()
        const_keys, const_wire = {}, {}
        for name, t in consts.items():
            const_keys[name], const_wire[name] = self._hashed(t)
        const_data = {h: const_wire[n] for n, h in const_keys.items()}
        with self._lock:
            coded_wire: list[WireTensor] = []
            tensors: list[WireTensor] = []
            upload: _Upload | None = None
            enc_gen = -1
            retry = _Retry(self.cfg, self._where(), on_status)
            raw_bytes = sum(t.numel() * t.element_size() for t in coded.values())
            learn: list[tuple[int, float]] = []
            recovered = 0
            enc_chan: Any = False  # the fast path the tensors were encoded for (CUDA IPC handles are per connection)
            while True:
                try:
                    self.connect()  # coded tensors may depend on this connection's codec state
                    # First try, reconnected, codec state reset, or another fast path (CUDA IPC handles
                    # are per connection): encode again.
                    if enc_gen != self._codec_gen or enc_chan is not self._chan:
                        if self._chan is not None:
                            self._chan.release()  # the server answered: it is done with what it was lent
                        tensors = self._encode_raw(exact)
                        coded_try = self._encode_coded(coded, codec_name, codec_params, stream, stats)
                        coded_wire, upload, learn = coded_try.whole, coded_try.upload, coded_try.learn
                        if enc_gen == -1:
                            stats.settle_ms = coded_try.settle_ms
                            stats.encode_ms = (time.perf_counter() - t0) * 1e3
                            if on_encoded:
                                on_encoded(stats)
                        enc_gen, enc_chan = self._codec_gen, self._chan
                    missing = [h for h in const_data if h not in self._sent_consts]
                    extra = [dataclasses.replace(const_data[h], name="const:" + h) for h in missing]
                    msg = Forward(
                        tensors=tuple(coded_wire + tensors + extra),
                        seq=self._next_seq(),
                        arch=arch,
                        n_blocks=n_blocks,
                        scalars=scalars,
                        consts=const_keys,
                        reply_codec=codec.by_name(reply_codec).wire_id,
                        stream=stream or {},
                        slabs=upload.spec() if upload is not None else {},
                        # the same-host fast path carries a big reply past the socket: no streamed reply then
                        reply_slab_bytes=self.cfg.stream_slab_bytes if self._chan is None else 0,
                    )
                    reply, joined = self._send_forward(msg, stats, upload, device)
                except ServerTimeout:  # alive and still working on it: a resend would queue behind it
                    raise
                except ConnectFailed as e:  # refused, dropped, silent: the next try connects again
                    retry.failed(e)
                    continue
                except RemoteFailure as e:
                    if e.code == ErrorCode.BUSY and e.detail.get("transient") is True:
                        retry.failed(e)  # a server-wide memory budget held by other clients: wait, resend
                        continue
                    if not self._recover(e, recovered):
                        raise
                    recovered += 1
                    continue
                stats.consts_sent = len(extra)
                self._sent_consts.update(missing)
                stats.via = "samehost" if self._chan is not None else "tcp"
                retry.succeeded()
                break
            if upload is not None:
                stats.encode_ms += upload.encode_s * 1e3  # overlapped with the send (inside wait_ms too)
            # Under the lock: a reply in the server's segment is overwritten by the next request's.
            out = self._decode_result(reply, stats, device, joined)
            if self._chan is None:  # what the slabs cost (stats.server has the server's decode time now)
                wire = sum(w.nbytes for w in coded_wire) + (upload.wire_bytes if upload is not None else 0)
                self._learn_costs(stats.codec.get("codec", codec_name), raw_bytes, learn, wire, stats)
            return out, stats


# ---------------------------------------------------------------------------- pool

# (host, port, model fingerprint, lane) -> client, least recently used first.
_POOL: OrderedDict[tuple[str, int, str, int], MeshClient] = OrderedDict()
_POOL_LOCK = threading.Lock()


def pooled_client(cfg: ClientConfig, expect: dict[str, Any], comfyui_version: str = "", lane: int = 0) -> MeshClient:
    """One client per host:port, model and lane for the whole ComfyUI process; re-handshakes when
    expectations change. Lane 0 carries every call; lanes 1.. carry the other rows in flight of a
    pipelined call (icarus, rows.py), each a connection (a server session) of its own. The model is
    ``expect``'s fingerprint: two models split against one Daedalus that serves both (Wan 2.2's experts,
    docs/PROTOCOL.md §5.4) each get sessions of their own, their constants and codec state apart; at most
    ``MAX_POOLED_MODELS`` per host:port and lane are kept (the least recently used is closed)."""
    host = cfg.host.strip().lower()
    key = (host, cfg.port, str(expect.get("fingerprint") or ""), lane)
    gone: list[tuple[MeshClient, str]] = []
    with _POOL_LOCK:
        c = _POOL.get(key)
        if c is not None and (c.cfg != cfg or c.expect != expect):
            c.close("settings changed")
            c = None
        if c is None:
            c = MeshClient(cfg, expect=expect, comfyui_version=comfyui_version)
            _POOL[key] = c
        _POOL.move_to_end(key)
        # One server serves one n_blocks (all its checkpoints share it): a session kept for another
        # n_blocks of this host:port (any lane) can never be served again, and holds a server slot.
        n = expect.get("n_blocks")
        stale = [
            k
            for k, old in _POOL.items()
            if k[:2] == (host, cfg.port) and n is not None and old.expect.get("n_blocks") not in (None, n)
        ]
        gone = [(_POOL.pop(k), "the server serves another n_blocks now") for k in stale]
        same = [k for k in _POOL if (k[0], k[1], k[3]) == (host, cfg.port, lane)]
        gone += [(_POOL.pop(k), "not used lately") for k in same[: max(len(same) - MAX_POOLED_MODELS, 0)]]
    for old, why in gone:
        old.close(why)
    return c


def drop_pooled(host: str, port: int) -> None:
    """Close and forget the pooled clients of host:port (every lane)."""
    with _POOL_LOCK:
        gone = [_POOL.pop(k) for k in list(_POOL) if k[:2] == (host.strip().lower(), port)]
    for c in gone:
        c.close("dropped")


__all__ = [
    "MeshClient",
    "StepStats",
    "pooled_client",
    "drop_pooled",
    "MeshError",
    "LocalError",
]


# ---------------------------------------------------------------------------- link measurement

_LINKS: dict[tuple[str, int], codec_auto.LinkInfo] = {}  # host:port -> the last measurement
_LINKS_LOCK = threading.Lock()
_AUTO_LAST: dict[str, tuple[str, str]] = {}  # address -> the auto codec's last choice (logged on change)
_SAMEHOST_LAST: dict[str, str] = {}  # address -> why the last connection stayed on TCP ("": it did not)
