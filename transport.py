"""Blocking TCP transport: socket pumps around protocol.py, and the Icarus client.

The client is used from inside ComfyUI sampling, so it is plain blocking I/O with
timeouts and errors that name host:port and the fix.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from . import auth, codec, hostmem
from .config import ClientConfig
from .constants import LINK_PROBE_BYTES, LINK_TTL_S, PACKAGE_VERSION, SOCKET_CHUNK
from .errors import (
    AuthError,
    ConnectFailed,
    LocalError,
    MeshError,
    RemoteFailure,
    RemoteProtocolError,
    VersionMismatch,
)
from .protocol import (
    NEED_DATA,
    Auth,
    Bye,
    Challenge,
    Error,
    Forward,
    FrameDecoder,
    Hello,
    Message,
    Ping,
    Pong,
    Reconfigure,
    Reconfigured,
    Result,
    Welcome,
    WireTensor,
    encode,
    tensor_map,
)
from .wirecodecs import auto as codec_auto
from .wirecodecs.temporal import stream_state

log = logging.getLogger("comfyui_mesh")

SKEW_ENV = "COMFYUI_MESH_ALLOW_VERSION_SKEW"


def tune_socket(sock: socket.socket) -> None:
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    for opt in (socket.SO_SNDBUF, socket.SO_RCVBUF):
        try:
            sock.setsockopt(socket.SOL_SOCKET, opt, 4 << 20)
        except OSError:
            pass


def send_message(sock: socket.socket, msg: Message) -> int:
    """Write one frame; returns bytes written."""
    n = 0
    for buf in encode(msg):
        sock.sendall(buf)
        n += memoryview(buf).nbytes
    return n


def recv_message(sock: socket.socket, dec: FrameDecoder) -> tuple[Message, int]:
    """Read until one whole frame is decoded; returns (message, bytes read). EOF -> ConnectionError."""
    got = 0
    while True:
        msg = dec.next_message()
        if msg is not NEED_DATA:
            return msg, got
        need = dec.bytes_needed()
        if need >= SOCKET_CHUNK:  # the rest of a big frame: receive straight into its buffer
            view = dec.reserve(need)
            k = 0
            try:
                while k < need:
                    r = sock.recv_into(view[k:], min(need - k, SOCKET_CHUNK * 16))
                    if not r:
                        raise ConnectionError("peer closed the connection")
                    k += r
            finally:
                view.release()
                dec.commit(k)
            got += k
            continue
        chunk = sock.recv(min(need, SOCKET_CHUNK))
        if not chunk:
            raise ConnectionError("peer closed the connection")
        got += len(chunk)
        dec.feed(chunk)


def content_hash(wt: WireTensor) -> str:
    """Key of a per-generation constant: sha256 over wire dtype, shape and the raw bytes.

    Computed from the raw-coded wire tensor, so the server can verify what it caches."""
    h = hashlib.sha256()
    h.update(f"{wt.dtype}|{list(wt.shape)}|".encode())
    h.update(wt.data)
    return h.hexdigest()[:32]


class ServerTimeout(ConnectFailed):
    """The server accepted the request but did not answer in time (not retried: it may still be working)."""


def _major_minor(v: str) -> str:
    return ".".join(v.split("+")[0].split(".")[:2])


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

    def line(self) -> str:
        s = self.server
        return (
            f"out {self.bytes_out / 1e6:.2f} MB in {self.bytes_in / 1e6:.2f} MB | "
            f"encode {self.encode_ms:.1f} ms, round trip {self.wait_ms:.1f} ms "
            f"(server decode {s.get('decode', 0):.1f} / forward {s.get('forward', 0):.1f} / "
            f"encode {s.get('encode', 0):.1f} ms), decode {self.decode_ms:.1f} ms"
        )


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
        self._dec = FrameDecoder(body_alloc=hostmem.receive_alloc())
        self._lock = threading.RLock()
        self._sent_consts: set[str] = set()
        self._memo: dict[int, tuple[torch.Tensor, tuple[int, int], str, WireTensor]] = {}
        self._seq = 0
        # Per connection: temporal codec state (wirecodecs.temporal.stream_state), codec param overrides.
        self._codec_state: dict[str, Any] = {}
        self._codec_override: dict[str, Any] = {}
        self._conn_gen = 0

    # ------------------------------------------------------------------ connection
    @property
    def connected(self) -> bool:
        return self._sock is not None

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
                self.server = self._handshake(sock)
            except BaseException:
                sock.close()
                raise
            sock.settimeout(self.cfg.read_timeout_s)
            self._sock = sock
            self._sent_consts.clear()
            self._codec_state.clear()  # a new server session: the next coded frames must be keyframes
            self._codec_override.clear()
            self._conn_gen += 1
            return self.server

    def _recv(self, sock: socket.socket) -> tuple[Message, int]:
        try:
            msg, n = recv_message(sock, self._dec)
        except TimeoutError:
            raise ServerTimeout(
                f"{self._where()} did not answer within {sock.gettimeout():.0f} s — is the server stuck or overloaded?"
            ) from None
        except (ConnectionError, OSError) as e:
            raise ConnectFailed(f"connection to {self._where()} broke: {e}") from None
        if isinstance(msg, Error):
            if msg.code == "auth_failed":
                raise AuthError(
                    f"{self._where()} rejected the token: {msg.message}. Copy the token shown by the "
                    "Daedalus window/console into the Icarus node's token field (or COMFYUI_MESH_TOKEN)"
                )
            raise RemoteFailure(msg.code, f"{self._where()}: {msg.message}")
        return msg, n

    def _handshake(self, sock: socket.socket) -> Challenge:
        cn = auth.new_nonce()
        hello = Hello(
            nonce=cn,
            package_version=PACKAGE_VERSION,
            comfyui_version=self.comfyui_version,
            torch_version=torch.__version__,
            arch=str(self.expect.get("arch", "")),
            n_blocks=int(self.expect.get("n_blocks", 0)),
            fingerprint=str(self.expect.get("fingerprint", "")),
            codecs=codec.available_ids(),
            client_name=self.cfg.client_name,
        )
        try:
            send_message(sock, hello)
            ch, _ = self._recv(sock)
        except (ConnectionError, OSError) as e:
            raise ConnectFailed(f"handshake with {self._where()} failed: {e}") from None
        if not isinstance(ch, Challenge):
            raise RemoteProtocolError(f"{self._where()} answered hello with {type(ch).__name__}")
        if ch.auth == "none":
            if self.cfg.token:
                send_message(sock, Bye(reason="auth downgrade refused"))
                raise AuthError(
                    f"{self._where()} runs without authentication (--no-auth) but a token is saved for it here; "
                    "refusing, since anything could be answering on that port. Remove the saved token for this "
                    "server, or start Daedalus without --no-auth"
                )
            send_message(sock, Auth(mac=""))
        elif ch.auth == "hmac-sha256":
            token = self.cfg.token
            if not token:
                send_message(sock, Bye(reason="no token"))
                raise AuthError(
                    f"{self._where()} requires a token and none is saved for it. Copy the token that "
                    "Daedalus printed at start (also in its settings folder, file 'token') into the "
                    "Icarus node's token field, or set COMFYUI_MESH_TOKEN"
                )
            send_message(sock, Auth(mac=auth.client_proof(token, cn, ch.nonce)))
        else:
            raise RemoteProtocolError(f"{self._where()} asks for unknown auth scheme {ch.auth!r}")
        w, _ = self._recv(sock)
        if not isinstance(w, Welcome):
            raise RemoteProtocolError(f"{self._where()} answered auth with {type(w).__name__}")
        if ch.auth != "none":
            assert self.cfg.token
            if not auth.check(auth.server_proof(self.cfg.token, cn, ch.nonce), w.mac):
                raise AuthError(f"{self._where()} could not prove it knows the token: is something else on that port?")
        self._check_server(ch)
        return ch

    def _check_server(self, ch: Challenge) -> None:
        where = self._where()
        if ch.package_version != PACKAGE_VERSION:
            raise VersionMismatch(
                f"{where} runs ComfyUI-Mesh {ch.package_version}, this ComfyUI has {PACKAGE_VERSION}: "
                "install the same release on both machines (git pull on both)"
            )
        skew_ok = os.environ.get(SKEW_ENV) == "1"
        if not skew_ok:
            if self.comfyui_version and ch.comfyui_version and ch.comfyui_version != self.comfyui_version:
                raise VersionMismatch(
                    f"{where} loads its model with ComfyUI {ch.comfyui_version}, this ComfyUI is "
                    f"{self.comfyui_version}: the halves may compute different math. Update the server's "
                    f"ComfyUI to the same release, or set {SKEW_ENV}=1 to accept the difference"
                )
            if _major_minor(ch.torch_version) != _major_minor(torch.__version__):
                raise VersionMismatch(
                    f"{where} runs torch {ch.torch_version}, this side torch {torch.__version__}: "
                    f"install the same torch minor release on both, or set {SKEW_ENV}=1 to accept it"
                )
        arch = self.expect.get("arch")
        if arch and ch.arch and ch.arch != arch:
            raise VersionMismatch(
                f"{where} serves a {ch.arch} model ({ch.model}) but this node splits a {arch} model: "
                "start Daedalus with the same checkpoint the ComfyUI loader uses"
            )
        n = self.expect.get("n_blocks")
        if n and ch.n_blocks != n:
            raise VersionMismatch(
                f"{where} holds the last {ch.n_blocks} blocks but n_blocks_remote is {n}: press Confirm on "
                f"the node to reconfigure the server, set n_blocks_remote to {ch.n_blocks}, or restart "
                f"Daedalus with --n-blocks {n}"
            )
        fp = self.expect.get("fingerprint")
        if fp and ch.fingerprint and ch.fingerprint != fp:
            msg = (
                f"{where} holds different back-half weights ({ch.model}, fingerprint {ch.fingerprint[:12]}) "
                f"than this ComfyUI's model (fingerprint {fp[:12]}): load the same checkpoint file with the "
                "same weight dtype on both machines"
            )
            if not skew_ok:
                raise VersionMismatch(msg + f" (or set {SKEW_ENV}=1 to accept it)")
            log.warning("ComfyUI-Mesh: %s — accepted because %s=1", msg, SKEW_ENV)

    def close(self, reason: str = "") -> None:
        with self._lock:
            sock, self._sock = self._sock, None
            self._sent_consts.clear()
            self._codec_state.clear()
            if sock is not None:
                try:
                    sock.settimeout(1.0)
                    send_message(sock, Bye(reason=reason))
                except OSError:
                    pass
                sock.close()

    # ------------------------------------------------------------------ requests
    def _roundtrip(self, msg: Message) -> tuple[Message, int, int]:
        sock = self._sock
        assert sock is not None
        try:
            sent = send_message(sock, msg)
        except TimeoutError:
            self.close()
            raise ConnectFailed(f"sending to {self._where()} timed out") from None
        except OSError as e:
            self.close()
            raise ConnectFailed(f"connection to {self._where()} broke: {e}") from None
        try:
            reply, got = self._recv(sock)
        except (ConnectFailed, RemoteProtocolError):
            self.close()
            raise
        return reply, sent, got

    def request(self, msg: Message, retry: bool = True) -> tuple[Message, int, int]:
        """Send one request, reconnecting once if the connection had dropped."""
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
        memo = self._memo.get(id(t))
        if memo is not None and memo[0] is t and memo[1] == (version, t.data_ptr()):
            return memo[2], memo[3]
        wt = codec.encode(t, "const", "raw")
        h = content_hash(wt)
        self._memo[id(t)] = (t, (version, t.data_ptr()), h, wt)
        while len(self._memo) > 16:
            self._memo.pop(next(iter(self._memo)))
        return h, wt

    def _next_seq(self) -> int:
        self._seq += 1
        return self._seq

    def end_stream(self) -> None:
        """Drop this connection's temporal codec state (generation end); the next frames are keyframes.
        Passing a new ``stream["gen"]`` does the same on both sides."""
        with self._lock:
            self._codec_state.clear()

    def link_info(self) -> codec_auto.LinkInfo:
        """The link to this server (lock held, connected), for the ``auto`` codec: measured
        with three PING round trips (one carrying ``LINK_PROBE_BYTES`` up, one asking for them
        back), cached per host:port for ``LINK_TTL_S``; assumed gigabit when it cannot be."""
        key = (self.cfg.host.strip().lower(), self.cfg.port)
        with _LINKS_LOCK:
            hit = _LINKS.get(key)
        if hit is not None and time.monotonic() - hit.when < LINK_TTL_S:
            return hit
        try:
            rtt = min(self.ping(0)[0] for _ in range(2))
            probe = WireTensor("probe", "uint8", (LINK_PROBE_BYTES,), 0, bytes(LINK_PROBE_BYTES))
            t0 = time.perf_counter()
            self.request(Ping(seq=0, echo_bytes=0, tensors=(probe,)))
            up_ms = (time.perf_counter() - t0) * 1e3
            down_ms, _ = self.ping(LINK_PROBE_BYTES)
        except MeshError as e:
            log.warning("ComfyUI-Mesh: cannot measure the link to %s (%s); assuming gigabit", self.cfg.address, e)
            return codec_auto.LinkInfo.assumed()
        li = codec_auto.LinkInfo(
            up_bps=LINK_PROBE_BYTES / max(up_ms - rtt, 0.05) * 1e3,
            down_bps=LINK_PROBE_BYTES / max(down_ms - rtt, 0.05) * 1e3,
            rtt_ms=rtt,
            when=time.monotonic(),
            how="measured",
        )
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

    def _encode_coded(
        self,
        coded: dict[str, torch.Tensor],
        codec_name: str,
        codec_params: dict[str, Any] | None,
        stream: dict[str, Any] | None,
        stats: StepStats,
    ) -> list[WireTensor]:
        """Encode ``coded`` with this connection's codec state (lock held, connected)."""
        params = dict(codec_params or {})
        if codec_name == "auto":  # a policy, not a format: pick the codec for the measured link
            stats.codec = self._auto_choice(coded, params)
            codec_name, params = stats.codec["codec"], dict(stats.codec["params"])
        if self._codec_override and codec.by_name(codec_name).uses_entropy_backend:
            params.update(self._codec_override)
        stats.codec = {**stats.codec, "codec": codec_name, "params": params}
        sub = stream_state(self._codec_state, stream)
        return [codec.encode(t, name, codec_name, params, state=sub) for name, t in coded.items()]

    def _codec_retry(self, e: RemoteFailure) -> bool:
        """After ``stream_reset`` / ``codec_unavailable``: adjust so a re-encode can succeed."""
        if e.code == "stream_reset":
            log.info("ComfyUI-Mesh: %s lost the temporal codec state; resending keyframes", self.cfg.address)
            self._codec_state.clear()
            return True
        if e.code == "codec_unavailable" and self._codec_override.get("backend") != "zstd":
            log.warning("ComfyUI-Mesh: %s; using the CPU entropy coder (zstd) on this connection", e.message)
            self._codec_override["backend"] = "zstd"
            self._codec_state.clear()
            return True
        return False

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
    ) -> tuple[dict[str, torch.Tensor], StepStats]:
        """Run the back half. ``coded`` go through ``codec_name``; ``exact`` and ``consts`` raw.

        Constants are sent once per connection (by content hash) and resent automatically
        when the server says it lacks them (restart, eviction).
        """
        stats = StepStats()
        t0 = time.perf_counter()
        tensors: list[WireTensor] = []
        for name, t in exact.items():
            tensors.append(codec.encode(t, name, "raw"))
        const_wire, const_keys = {}, {}
        for name, t in consts.items():
            const_keys[name], const_wire[name] = self._hashed(t)
        const_data = {h: const_wire[n] for n, h in const_keys.items()}
        with self._lock:
            self.connect()  # coded tensors may depend on this connection's codec state
            coded_wire, enc_gen = self._encode_coded(coded, codec_name, codec_params, stream, stats), self._conn_gen
            stats.encode_ms = (time.perf_counter() - t0) * 1e3
            if on_encoded:
                on_encoded(stats)
            for attempt in (0, 1, 2):
                self.connect()
                if enc_gen != self._conn_gen:  # reconnected: re-encode against the new (empty) state
                    coded_wire = self._encode_coded(coded, codec_name, codec_params, stream, stats)
                    enc_gen = self._conn_gen
                missing = [h for h in const_data if h not in self._sent_consts]
                extra = [dataclasses.replace(const_data[h], name="const:" + h) for h in dict.fromkeys(missing)]
                msg = Forward(
                    tensors=tuple(coded_wire + tensors + extra),
                    seq=self._next_seq(),
                    arch=arch,
                    n_blocks=n_blocks,
                    scalars=scalars,
                    consts=const_keys,
                    reply_codec=codec.by_name(reply_codec).wire_id,
                    stream=stream or {},
                )
                t1 = time.perf_counter()
                try:
                    reply, sent, got = self._roundtrip(msg)
                except ConnectFailed as e:
                    if attempt or isinstance(e, ServerTimeout):
                        raise
                    log.info("ComfyUI-Mesh: connection to %s dropped, reconnecting", self.cfg.address)
                    continue
                except RemoteFailure as e:
                    if e.code == "missing_consts" and attempt < 2:
                        self._sent_consts.clear()
                        continue
                    if attempt < 2 and self._codec_retry(e):
                        coded_wire = self._encode_coded(coded, codec_name, codec_params, stream, stats)
                        continue
                    raise
                stats.wait_ms = (time.perf_counter() - t1) * 1e3
                stats.bytes_out, stats.bytes_in = sent, got
                stats.consts_sent = len(extra)
                self._sent_consts.update(missing)
                break
        if not isinstance(reply, Result):
            raise RemoteProtocolError(f"{self._where()} answered forward with {type(reply).__name__}")
        stats.server = {k: float(v) for k, v in reply.timings.items() if isinstance(v, (int, float))}
        t2 = time.perf_counter()
        out = {name: codec.decode(wt, device) for name, wt in tensor_map(reply.tensors).items()}
        stats.decode_ms = (time.perf_counter() - t2) * 1e3
        return out, stats


# ---------------------------------------------------------------------------- pool

_POOL: dict[tuple[str, int], MeshClient] = {}
_POOL_LOCK = threading.Lock()


def pooled_client(cfg: ClientConfig, expect: dict[str, Any], comfyui_version: str = "") -> MeshClient:
    """One client per host:port for the whole ComfyUI process; re-handshakes when expectations change."""
    key = (cfg.host.strip().lower(), cfg.port)
    with _POOL_LOCK:
        c = _POOL.get(key)
        if c is not None and (c.cfg != cfg or c.expect != expect):
            c.close("settings changed")
            c = None
        if c is None:
            c = MeshClient(cfg, expect=expect, comfyui_version=comfyui_version)
            _POOL[key] = c
        return c


def drop_pooled(host: str, port: int) -> None:
    with _POOL_LOCK:
        c = _POOL.pop((host.strip().lower(), port), None)
    if c is not None:
        c.close("dropped")


__all__ = [
    "MeshClient",
    "StepStats",
    "pooled_client",
    "drop_pooled",
    "send_message",
    "recv_message",
    "tune_socket",
    "content_hash",
    "MeshError",
    "LocalError",
]


# ---------------------------------------------------------------------------- link measurement

_LINKS: dict[tuple[str, int], codec_auto.LinkInfo] = {}  # host:port -> the last measurement
_LINKS_LOCK = threading.Lock()
_AUTO_LAST: dict[str, tuple[str, str]] = {}  # address -> the auto codec's last choice (logged on change)
