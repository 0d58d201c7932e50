"""The Icarus <-> Daedalus wire protocol, sans-IO.

Bytes in, typed messages out; typed messages in, bytes out. No sockets, no torch: the
same objects serve the ComfyUI node, the server, the GUI probe and the tests. The frame
layout is documented in docs/PROTOCOL.md.

    prefix  (24 bytes, little-endian)
        magic       4  b"MESH"
        version     u16 PROTOCOL_VERSION
        kind        u16 MsgKind
        header_len  u32 <= MAX_HEADER_BYTES
        body_len    u64 <= MAX_BODY_BYTES
        crc32       u32 over header + body
    header  JSON object (UTF-8): the message's fields, plus "tensors": a list of
            {name, dtype, shape, codec, meta, nbytes}
    body    the tensors' payloads, back to back, in header order

Every length is checked against its limit before a byte is allocated for it.
"""

import dataclasses
import enum
import hashlib
import json
import struct
import types
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Union, get_args, get_origin

from .constants import (
    BIG_BODY_BYTES,
    MAGIC,
    MAX_BODY_BYTES,
    MAX_HEADER_BYTES,
    MAX_NAME_LEN,
    MAX_TENSOR_NDIM,
    MAX_TENSORS_PER_FRAME,
    PREFIX_SIZE,
    PROTOCOL_VERSION,
)
from .errors import LocalError, RemoteProtocolError

try:  # zlib-ng's crc32: the same checksum as zlib's, ~8x faster (SIMD; the stdlib's zlib 1.2 is not)
    from zlib_ng.zlib_ng import crc32
except ImportError:  # an install without it (requirements.txt has it): the stdlib's
    from zlib import crc32

_PREFIX = struct.Struct("<4sHHIQI")
assert _PREFIX.size == PREFIX_SIZE

Buffer = Union[bytes, bytearray, memoryview]


class MsgKind(enum.IntEnum):
    HELLO = 1
    CHALLENGE = 2
    AUTH = 3
    WELCOME = 4
    FORWARD = 5
    RESULT = 6
    ERROR = 7
    RECONFIGURE = 8
    RECONFIGURED = 9
    PING = 10
    PONG = 11
    BYE = 12
    END_STREAM = 13
    STREAM_ENDED = 14
    PROGRESS = 15
    FORWARD_CHUNK = 20
    RESULT_CHUNK = 21


# Element types a tensor descriptor may name. Codecs decide what they accept; the
# protocol only refuses names outside this list.
DTYPES = frozenset(
    {
        "float64",
        "float32",
        "float16",
        "bfloat16",
        "float8_e4m3fn",
        "float8_e5m2",
        "int64",
        "int32",
        "int16",
        "int8",
        "uint8",
        "bool",
    }
)


@dataclass(frozen=True)
class WireTensor:
    """One tensor on the wire: how to rebuild it (dtype, shape, codec + meta) and its bytes."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    codec: int
    data: Buffer
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def nbytes(self) -> int:
        return memoryview(self.data).nbytes


@dataclass(frozen=True)
class Message:
    """Base of every message. Subclasses declare their header fields as dataclass fields."""

    KIND: ClassVar[MsgKind]
    tensors: tuple[WireTensor, ...] = ()


@dataclass(frozen=True)
class Hello(Message):
    """Client -> server, first frame. Says who the client is and what it expects."""

    KIND: ClassVar[MsgKind] = MsgKind.HELLO
    nonce: str = ""  # hex, NONCE_BYTES random bytes for the HMAC challenge
    package_version: str = ""
    comfyui_version: str = ""
    torch_version: str = ""
    arch: str = ""  # adapter family, e.g. "flux2"; "" when only probing status
    n_blocks: int = 0  # back-half blocks the client expects the server to hold; 0 = any
    fingerprint: str = ""  # hash of the back half as the client has it; "" = don't check
    codecs: list = field(default_factory=list)  # wire ids the client can decode
    client_name: str = ""
    key_id: str = ""  # which token the client will prove with (auth.key_id); "" = none


@dataclass(frozen=True)
class Challenge(Message):
    """Server -> client. Carries the server's nonce, identity and proof, and everything the client checks."""

    KIND: ClassVar[MsgKind] = MsgKind.CHALLENGE
    nonce: str = ""
    auth: str = "hmac-sha256"  # or "none" when the server runs with --no-auth
    server_id: str = ""  # the server's persistent identity (hex); the client pins it per host:port
    mac: str = ""  # the server's proof over the transcript; "" when it holds no token of HELLO's key id
    link: str = "aes-256-gcm"  # frames after WELCOME: sealed (securelink), or "none" (--no-auth, --no-encrypt)
    package_version: str = ""
    comfyui_version: str = ""
    torch_version: str = ""
    arch: str = ""
    model: str = ""  # checkpoint file name, for messages
    n_blocks: int = 0
    n_blocks_max: int = 0
    fingerprint: str = ""
    codecs: list = field(default_factory=list)
    device: str = ""
    # Same-host fast path offered (samehost.HostSecret.offer): {"seg": secret segment, "gpus": [...]}; {} = none.
    samehost: dict = field(default_factory=dict)
    # Every checkpoint this server serves (§5.4), [{"fingerprint": str, "model": str}, ...], the main one
    # first; the fields above describe the one HELLO's fingerprint names. [] (absent): an older server.
    models: list = field(default_factory=list)


@dataclass(frozen=True)
class Auth(Message):
    """Client -> server: the client's proof over the transcript, in hex (sent after it checked the server's)."""

    KIND: ClassVar[MsgKind] = MsgKind.AUTH
    mac: str = ""
    samehost: dict = field(default_factory=dict)  # {"proof": hex, "gpus": [...]}: the same-host answer; {} = none


@dataclass(frozen=True)
class Welcome(Message):
    """Server -> client, the last frame in the clear: the session is open (sealed from the next frame on)."""

    KIND: ClassVar[MsgKind] = MsgKind.WELCOME
    session: str = ""
    samehost: bool = False  # the same-host proof held: big payloads of this session go through shared memory


@dataclass(frozen=True)
class Forward(Message):
    """Client -> server: run the back half for one model call.

    ``consts`` maps an argument name to the content hash of a per-generation constant;
    tensors named ``const:<hash>`` carry the ones the server has not been sent yet.
    """

    KIND: ClassVar[MsgKind] = MsgKind.FORWARD
    seq: int = 0
    arch: str = ""
    n_blocks: int = 0
    scalars: dict = field(default_factory=dict)
    consts: dict = field(default_factory=dict)
    reply_codec: int = 0
    stream: dict = field(default_factory=dict)  # codec state keys (temporal coding)
    # Streamed calls (§6.1): tensor name -> {"dim": int, "parts": [slab names]}, the slabs that follow in
    # FORWARD_CHUNK frames of this seq, joined along dim in that order; {} = nothing is streamed.
    slabs: dict = field(default_factory=dict)
    # > 0: the client takes a streamed reply, reply tensors cut into slabs of about this many raw bytes.
    reply_slab_bytes: int = 0


@dataclass(frozen=True)
class ForwardChunk(Message):
    """Client -> server: part ``part`` (0, 1, ... in order) of the streamed request ``seq``, sent
    right after its FORWARD: slabs that FORWARD names in ``slabs``, which the server decodes as they
    arrive; the request is complete when every named slab has come (§6.1)."""

    KIND: ClassVar[MsgKind] = MsgKind.FORWARD_CHUNK
    seq: int = 0
    part: int = 0


@dataclass(frozen=True)
class Result(Message):
    KIND: ClassVar[MsgKind] = MsgKind.RESULT
    seq: int = 0
    timings: dict = field(default_factory=dict)  # ms: decode, forward, encode
    slabs: dict = field(default_factory=dict)  # as Forward.slabs, for this seq's RESULT_CHUNK frames


@dataclass(frozen=True)
class ResultChunk(Message):
    """Server -> client: part ``part`` of the streamed reply to request ``seq``, before its RESULT
    (which names the slabs in ``slabs``)."""

    KIND: ClassVar[MsgKind] = MsgKind.RESULT_CHUNK
    seq: int = 0
    part: int = 0


class ErrorCode(str, enum.Enum):
    """Every ``Error.code`` a peer sends (the table in docs/PROTOCOL.md §9 lists exactly these)."""

    BAD_REQUEST = "bad_request"
    BAD_FRAME = "bad_frame"
    AUTH_FAILED = "auth_failed"
    CONFIG_MISMATCH = "config_mismatch"
    MISSING_CONSTS = "missing_consts"
    FORWARD_FAILED = "forward_failed"
    RECONFIGURE_FAILED = "reconfigure_failed"
    BUSY = "busy"
    STREAM_RESET = "stream_reset"
    CODEC_UNAVAILABLE = "codec_unavailable"
    NOT_ALLOWED = "not_allowed"

    @classmethod
    def of(cls, code: str) -> "ErrorCode | None":
        """The member for a received code string; None for a code this side does not know."""
        try:
            return cls(code)
        except ValueError:
            return None


@dataclass(frozen=True)
class Error(Message):
    """Either side: the request failed. ``code`` is machine-readable: an ``ErrorCode`` value."""

    KIND: ClassVar[MsgKind] = MsgKind.ERROR
    code: str = "error"
    message: str = ""
    detail: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Reconfigure(Message):
    KIND: ClassVar[MsgKind] = MsgKind.RECONFIGURE
    n_blocks: int = 0


@dataclass(frozen=True)
class Reconfigured(Message):
    KIND: ClassVar[MsgKind] = MsgKind.RECONFIGURED
    n_blocks: int = 0
    fingerprint: str = ""
    no_op: bool = False


@dataclass(frozen=True)
class Ping(Message):
    KIND: ClassVar[MsgKind] = MsgKind.PING
    seq: int = 0
    echo_bytes: int = 0  # the server answers with this many payload bytes (link probe)


@dataclass(frozen=True)
class Pong(Message):
    KIND: ClassVar[MsgKind] = MsgKind.PONG
    seq: int = 0


@dataclass(frozen=True)
class Bye(Message):
    KIND: ClassVar[MsgKind] = MsgKind.BYE
    reason: str = ""


@dataclass(frozen=True)
class EndStream(Message):
    """Client -> server: a generation ended; drop the connection's temporal codec state if it
    belongs to generation ``gen`` (the ``Forward.stream["gen"]`` it was coded under), or whatever
    state the connection holds when ``gen`` is None (at most ``wirecodecs.temporal.MAX_KEY_CHARS``
    characters)."""

    KIND: ClassVar[MsgKind] = MsgKind.END_STREAM
    gen: str | None = None


@dataclass(frozen=True)
class StreamEnded(Message):
    """Server -> client, the reply to END_STREAM: ``released`` bytes of references were dropped
    (0: the connection held no state of that generation)."""

    KIND: ClassVar[MsgKind] = MsgKind.STREAM_ENDED
    gen: str | None = None
    released: int = 0


@dataclass(frozen=True)
class Progress(Message):
    """Server -> client, a heartbeat while the server serves the client's request (queued for the GPU,
    decoding, running the forward, encoding the reply): the server is alive, keep waiting for the reply.
    ``seq``: the request's (FORWARD / PING; 0 for requests without one); ``phase``: ``queued``,
    ``decode``, ``forward``, ``encode`` or ``""``; ``elapsed_ms``: since the request was received."""

    KIND: ClassVar[MsgKind] = MsgKind.PROGRESS
    seq: int = 0
    phase: str = ""
    elapsed_ms: float = 0.0


MESSAGE_TYPES: dict[MsgKind, type[Message]] = {
    cls.KIND: cls
    for cls in (
        Hello,
        Challenge,
        Auth,
        Welcome,
        Forward,
        Result,
        Error,
        Reconfigure,
        Reconfigured,
        Ping,
        Pong,
        Bye,
        EndStream,
        StreamEnded,
        Progress,
        ForwardChunk,
        ResultChunk,
    )
}
assert len(MESSAGE_TYPES) == len(MsgKind), "every MsgKind needs exactly one message class"


# ---------------------------------------------------------------------------- encoding


def _fields(cls: type[Message]) -> list[dataclasses.Field]:
    return [f for f in dataclasses.fields(cls) if f.name != "tensors"]


def encode(msg: Message) -> list[Buffer]:
    """Serialize ``msg`` into buffers to be written in order (tensor data is not copied)."""
    tensors = msg.tensors
    if len(tensors) > MAX_TENSORS_PER_FRAME:
        raise LocalError(f"{len(tensors)} tensors in one frame; the limit is {MAX_TENSORS_PER_FRAME}")
    header: dict[str, Any] = {f.name: getattr(msg, f.name) for f in _fields(type(msg))}
    descs = []
    body_len = 0
    for t in tensors:
        _check_descriptor(t.name, t.dtype, t.shape, t.codec, t.meta, LocalError)
        n = t.nbytes
        descs.append(
            {
                "name": t.name,
                "dtype": t.dtype,
                "shape": list(t.shape),
                "codec": t.codec,
                "meta": t.meta,
                "nbytes": n,
            }
        )
        body_len += n
    header["tensors"] = descs
    try:
        hbytes = json.dumps(header, separators=(",", ":"), allow_nan=False).encode()
    except (TypeError, ValueError) as e:
        raise LocalError(f"{type(msg).__name__} header is not JSON-serializable: {e}") from e
    if len(hbytes) > MAX_HEADER_BYTES:
        raise LocalError(f"header of {len(hbytes)} bytes exceeds MAX_HEADER_BYTES={MAX_HEADER_BYTES}")
    if body_len > MAX_BODY_BYTES:
        raise LocalError(f"frame body of {body_len} bytes exceeds MAX_BODY_BYTES={MAX_BODY_BYTES}")
    crc = crc32(hbytes)
    for t in tensors:
        crc = crc32(t.data, crc)
    prefix = _PREFIX.pack(MAGIC, PROTOCOL_VERSION, int(msg.KIND), len(hbytes), body_len, crc)
    return [prefix + hbytes, *(t.data for t in tensors if memoryview(t.data).nbytes)]


def encode_bytes(msg: Message) -> bytes:
    """Whole frame as one bytes object (tests, small messages)."""
    return b"".join(bytes(b) for b in encode(msg))


def _check_descriptor(name: Any, dtype: Any, shape: Any, codec: Any, meta: Any, exc: type[Exception]) -> None:
    if not isinstance(name, str) or not (0 < len(name) <= MAX_NAME_LEN):
        raise exc(f"tensor name {name!r} must be a string of 1..{MAX_NAME_LEN} characters")
    if not isinstance(dtype, str) or dtype not in DTYPES:
        raise exc(f"tensor {name!r}: dtype {dtype!r} is not one of {sorted(DTYPES)}")
    if not isinstance(shape, (list, tuple)) or len(shape) > MAX_TENSOR_NDIM:
        raise exc(f"tensor {name!r}: shape {shape!r} must be a list of at most {MAX_TENSOR_NDIM} sizes")
    for s in shape:
        if not isinstance(s, int) or isinstance(s, bool) or s < 0 or s > MAX_BODY_BYTES:
            raise exc(f"tensor {name!r}: bad dimension {s!r} in shape {shape!r}")
    if not isinstance(codec, int) or isinstance(codec, bool) or not (0 <= codec < 65536):
        raise exc(f"tensor {name!r}: codec id {codec!r} must be an integer 0..65535")
    if not isinstance(meta, dict):
        raise exc(f"tensor {name!r}: codec meta must be an object")


# ---------------------------------------------------------------------------- decoding


class _NeedData:
    def __repr__(self) -> str:
        return "NEED_DATA"


NEED_DATA: Any = _NeedData()


def _type_ok(value: Any, annotation: Any) -> bool:
    origin = get_origin(annotation)
    if origin in (Union, types.UnionType):
        return any(_type_ok(value, a) for a in get_args(annotation))
    if annotation is type(None):
        return value is None
    base = origin or annotation
    if base is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if base is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    return isinstance(value, base)


def _build(kind: MsgKind, header: dict[str, Any], tensors: tuple[WireTensor, ...]) -> Message:
    cls = MESSAGE_TYPES[kind]
    kwargs: dict[str, Any] = {}
    for f in _fields(cls):
        if f.name not in header:
            continue  # every field has a default; absent means default
        v = header[f.name]
        if not _type_ok(v, f.type):
            raise RemoteProtocolError(f"{cls.__name__}.{f.name}: expected {f.type}, got {type(v).__name__}")
        kwargs[f.name] = v
    return cls(tensors=tensors, **kwargs)


class FrameDecoder:
    """Incremental decoder: ``feed()`` bytes in any chunking, ``next_message()`` until NEED_DATA.

    After a RemoteProtocolError the stream is out of sync and the decoder refuses further use:
    the connection must be closed.
    """

    def __init__(
        self,
        max_body: int = MAX_BODY_BYTES,
        body_alloc: Callable[[int], memoryview] | None = None,
        max_header: int = MAX_HEADER_BYTES,
    ):
        self._buf = bytearray()
        self.max_body = max_body  # may be raised after the handshake (small before auth)
        self.max_header = max_header  # likewise
        # Optional: where a frame with a body of at least BIG_BODY_BYTES is assembled when it is
        # received with reserve() (the caller passes page-locked memory there, so tensors in it
        # reach a GPU at full speed). Called with the frame's size; returns a writable buffer.
        self.body_alloc = body_alloc
        self._prefix: tuple[MsgKind, int, int, int] | None = None  # kind, hlen, blen, crc
        # Why the stream broke. The message, not the exception: a kept exception's traceback holds the
        # frames that raised it, their locals (the frame buffer) and this decoder: a reference cycle
        # only the cyclic GC frees, so a server under garbage would hold every broken frame for a while.
        self._broken: str | None = None
        self._reserved: int | None = None
        self._frame: memoryview | None = None  # the big frame being assembled, and its fill
        self._fill = 0
        self._reserved_n = 0

    def feed(self, data: Buffer) -> None:
        if self._broken:
            raise RemoteProtocolError(self._broken)
        if self._reserved is not None:
            raise LocalError("feed() between reserve() and commit()")
        if self._frame is not None:  # top up the big frame first; the rest starts the next one
            mv = memoryview(data).cast("B")
            k = min(mv.nbytes, self._frame.nbytes - self._fill)
            self._frame[self._fill : self._fill + k] = mv[:k]
            self._fill += k
            self._buf += mv[k:]
            return
        self._buf += data

    @property
    def buffered(self) -> int:
        return len(self._buf) + self._fill

    def reserve(self, n: int) -> memoryview:
        """Zero-copy receive: a writable view of ``n`` new bytes at the end of the buffer.

        Fill it (e.g. ``sock.recv_into``), release the view, then ``commit(written)``.
        Equivalent to ``feed()`` of the written bytes, without copying them again. While a big
        frame is assembled in ``body_alloc`` memory, ``n`` may not run past that frame's end."""
        if self._broken:
            raise RemoteProtocolError(self._broken)
        if self._frame is None and self._prefix is not None and self.body_alloc is not None:
            _, hlen, blen, _ = self._prefix
            total = PREFIX_SIZE + hlen + blen
            if blen >= BIG_BODY_BYTES and len(self._buf) + n == total:  # exactly the rest of this frame
                frame = memoryview(self.body_alloc(total)).cast("B")
                if frame.nbytes != total or frame.readonly:
                    raise LocalError(f"body_alloc({total}) must return {total} writable bytes")
                frame[: len(self._buf)] = self._buf
                self._frame, self._fill = frame, len(self._buf)
                self._buf = bytearray()
        if self._frame is not None:
            if n > self._frame.nbytes - self._fill:
                raise LocalError(f"reserve({n}) runs past the end of the frame being received")
            self._reserved, self._reserved_n = self._fill, n
            return self._frame[self._fill : self._fill + n]
        start = len(self._buf)
        grown = bytearray(start + n)
        grown[:start] = self._buf
        self._buf = grown
        self._reserved = start
        return memoryview(self._buf)[start:]

    def commit(self, written: int) -> None:
        start = self._reserved
        if start is None:
            raise LocalError("commit() without reserve()")
        self._reserved = None
        if self._frame is not None:
            self._fill = start + max(0, min(written, self._reserved_n))
            return
        del self._buf[start + max(0, written) :]

    def bytes_needed(self) -> int:
        """How many more bytes complete the frame being read (at least 1 while waiting)."""
        if self._prefix is None:
            return max(PREFIX_SIZE - len(self._buf), 1)
        _, hlen, blen, _ = self._prefix
        return max(PREFIX_SIZE + hlen + blen - self.buffered, 1)

    def _fail(self, msg: str) -> RemoteProtocolError:
        self._broken = msg
        return RemoteProtocolError(msg)

    def _parse_prefix(self) -> None:
        magic, version, kind, hlen, blen, crc = _PREFIX.unpack_from(self._buf, 0)
        if magic != MAGIC:
            raise self._fail(f"not a ComfyUI-Mesh peer (magic {bytes(magic)!r}, expected {MAGIC!r})")
        if version != PROTOCOL_VERSION:
            raise self._fail(
                f"peer speaks ComfyUI-Mesh protocol v{version}, this side v{PROTOCOL_VERSION}: "
                "install the same ComfyUI-Mesh release on both machines"
            )
        try:
            mkind = MsgKind(kind)
        except ValueError:
            raise self._fail(f"unknown message kind {kind}") from None
        if hlen > self.max_header:
            raise self._fail(f"header length {hlen} exceeds the limit of {self.max_header} bytes")
        if blen > self.max_body:
            raise self._fail(f"body length {blen} exceeds the limit of {self.max_body} bytes")
        self._prefix = (mkind, hlen, blen, crc)

    def next_message(self) -> Message | Any:
        if self._broken:
            raise RemoteProtocolError(self._broken)
        if self._prefix is None:
            if len(self._buf) < PREFIX_SIZE:
                return NEED_DATA
            self._parse_prefix()
        assert self._prefix is not None
        kind, hlen, blen, crc = self._prefix
        total = PREFIX_SIZE + hlen + blen
        if self.buffered < total:
            return NEED_DATA
        # Detach this frame's bytes so tensors can be zero-copy views into them.
        if self._frame is not None:
            view, self._frame, self._fill = self._frame, None, 0
        else:
            frame = self._buf
            self._buf = bytearray(frame[total:])
            del frame[total:]
            view = memoryview(frame)
        self._prefix = None
        header_bytes = view[PREFIX_SIZE : PREFIX_SIZE + hlen]
        body = view[PREFIX_SIZE + hlen : total]
        try:
            if crc32(body, crc32(header_bytes)) != crc:
                raise self._fail("frame checksum mismatch (corrupted in transit?)")
            try:
                header = json.loads(bytes(header_bytes))
            except (UnicodeDecodeError, ValueError, RecursionError) as e:
                raise self._fail(f"header is not valid JSON: {type(e).__name__}") from None
            if not isinstance(header, dict):
                raise self._fail("header must be a JSON object")
            tensors = self._tensors(header.pop("tensors", []), body)
            msg = _build(kind, header, tensors)
        except RemoteProtocolError as e:
            self._broken = str(e)
            raise
        return msg

    def _tensors(self, descs: Any, body: memoryview) -> tuple[WireTensor, ...]:
        if not isinstance(descs, list) or len(descs) > MAX_TENSORS_PER_FRAME:
            raise self._fail(f"'tensors' must be a list of at most {MAX_TENSORS_PER_FRAME} descriptors")
        out = []
        offset = 0
        for d in descs:
            if not isinstance(d, dict):
                raise self._fail("tensor descriptor must be an object")
            name, dtype, shape = d.get("name"), d.get("dtype"), d.get("shape")
            codec, meta, nbytes = d.get("codec"), d.get("meta", {}), d.get("nbytes")
            shape = shape if isinstance(shape, list) else None
            _check_descriptor(name, dtype, shape, codec, meta, RemoteProtocolError)
            if not isinstance(nbytes, int) or isinstance(nbytes, bool) or nbytes < 0:
                raise self._fail(f"tensor {name!r}: bad nbytes {nbytes!r}")
            if offset + nbytes > body.nbytes:
                raise self._fail(f"tensor {name!r} runs past the end of the frame body")
            out.append(
                WireTensor(
                    name=str(name),
                    dtype=str(dtype),
                    shape=tuple(int(s) for s in shape or ()),
                    codec=int(codec or 0),
                    meta=meta,
                    data=body[offset : offset + nbytes],
                )
            )
            offset += nbytes
        if offset != body.nbytes:
            raise self._fail(f"tensor sizes add up to {offset} bytes but the body has {body.nbytes}")
        return tuple(out)


def decode_all(data: Buffer) -> list[Message]:
    """Decode every complete frame in ``data``; raise if bytes are left over."""
    dec = FrameDecoder()
    dec.feed(data)
    out = []
    while (m := dec.next_message()) is not NEED_DATA:
        out.append(m)
    if dec.buffered:
        raise RemoteProtocolError(f"{dec.buffered} trailing bytes do not form a complete frame")
    return out


def tensor_map(tensors: Iterable[WireTensor]) -> dict[str, WireTensor]:
    out: dict[str, WireTensor] = {}
    for t in tensors:
        if t.name in out:
            raise RemoteProtocolError(f"tensor name {t.name!r} appears twice in one frame")
        out[t.name] = t
    return out


def names(tensors: Sequence[WireTensor]) -> list[str]:
    return [t.name for t in tensors]


def content_hash(wt: WireTensor) -> str:
    """Key of a per-generation constant: sha256 over wire dtype, shape and the raw bytes.

    Computed from the raw-coded wire tensor, so the server can verify what it caches."""
    h = hashlib.sha256()
    h.update(f"{wt.dtype}|{list(wt.shape)}|".encode())
    h.update(wt.data)
    return h.hexdigest()[:32]
