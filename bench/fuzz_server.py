"""Fuzz a running Daedalus with mutated frames, before and after authentication (issue #14 item 8).

    python bench/fuzz_server.py [--frames 1000000] [--procs 2] [--threads 4] [--json report.json]

Starts ``python -m comfyui_mesh.server --toy --device cpu --port 0`` (auth on, its token read from
--state-dir) and sends it mutated copies of valid frames built with protocol.py: HELLO, AUTH,
FORWARD with tensors coded by every codec id (float32 / bfloat16, I- and P-frames of the temporal
codecs, constant-channel tensors), PING, END_STREAM, RECONFIGURE, BYE. Mutations: bit flips with and
without a fixed checksum, truncation, prefix length fields (declared bodies up to 3 GiB), header JSON
fields (dtype, shape, codec id, meta, nbytes, names; huge, negative, NaN, lone-surrogate, nested
values), shape bombs on tiny payloads (all-constant quant channels), zstd bombs (payloads that inflate
far past what they declare, and within what they declare), all-zero payloads, duplicate names, many
tensors, deep JSON, invalid UTF-8, kind / version / magic swaps.

Pre-auth a frame is sent as the first frame of a fresh connection, or as the AUTH after a real HELLO
and CHALLENGE. Post-auth a worker completes a real handshake with the token and sends mutated
frames on that connection, reconnecting when the server closes it. A frame whose framing is intact
must be answered (or its connection closed), one whose framing is broken is followed by a half-close
and the server must close: within --hang-s, or it is "slow" (reported with the longest wait: e.g.
queued behind honest requests at the size limit) up to 6 x --hang-s, and a hang after that.

Watched: the server's exit (crash), "Traceback" in its output, a probe client whose PING must be
answered within --hang-s every 0.5 s, FORWARD_FAILED replies (the server's catch-all for an
exception a frame caused), RSS (VmRSS sampled every 0.1 s, VmHWM at the end) against --rss-budget-mb
(default: the server-wide budgets it is started with, PROTOCOL.md §3.1, see ``run``). The server gets
--max-request-mb / --max-codec-state-mb 16 and small server-wide budgets unless told otherwise, so
honest requests at the limit stay quick on a CPU.
Prints a Markdown table; --json writes the whole report.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import random
import socket
import struct
import sys
import tempfile
import threading
import time
import zlib
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from comfyui_mesh import auth, handshake
from comfyui_mesh.constants import MAGIC, MAX_BODY_BYTES, PACKAGE_VERSION, PROTOCOL_VERSION
from comfyui_mesh.errors import MeshError
from comfyui_mesh.netio import recv_message
from comfyui_mesh.protocol import (
    Challenge,
    Error,
    FrameDecoder,
    Message,
    MsgKind,
    Reconfigure,
    WireTensor,
    content_hash,
    encode_bytes,
)
from comfyui_mesh.securelink import SecureLink
from serverproc import ServerProc, percentile, read_status

PREFIX = struct.Struct("<4sHHIQI")  # magic, version, kind, header_len, body_len, crc32 (docs/PROTOCOL.md)

# The HEVC payload header (wirecodecs/hevc_layout.py): magic, version, quantizer, tile, flags, N, C, h, w,
# frame width, height, frames, bitstream bytes, CRC-32 of the bitstream.
HEVC_HEADER = struct.Struct("<4s4B9I")
# A seed: (label, kind, header dict incl. "tensors" descriptors, body bytes).
Seed = tuple[str, int, dict, bytes]


# ---------------------------------------------------------------------------- connections


class Conn:
    """One connection to the server. Every frame of an authenticated connection goes out through
    ``send_frame`` and every reply comes in through ``recv`` (the one place a record layer goes)."""

    def __init__(self, address: tuple[str, int], source: str, timeout: float):
        self.sock = socket.socket()
        self.sock.bind((source, 0))
        self.sock.settimeout(timeout)
        self.sock.connect(address)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.dec = FrameDecoder()
        self.timeout = timeout
        self.authenticated = False
        self.link: SecureLink | None = None  # after WELCOME of an encrypting server: every frame sealed

    def send_frame(self, data: bytes) -> None:
        """Write one (possibly mutated) frame's bytes; after the handshake sealed in valid records, as an
        honest client's would be, so the mutants reach the frame decoder (records themselves are
        fuzzed by tests/test_securelink.py)."""
        if self.link is None:
            self.sock.sendall(data)
            return
        for header, sealed in self.link.sealer.seal([data]):
            self.sock.sendall(header + sealed)

    def recv(self, timeout: float | None = None) -> Message:
        """The next whole frame from the server within the timeout (TimeoutError; calling again goes
        on with the same frame), EOF ConnectionError."""
        msg, _ = recv_message(self.sock, self.dec, time.monotonic() + (timeout or self.timeout), link=self.link)
        return msg

    def drain(self, timeout: float | None = None) -> bool:
        """Half-close, then read until the server closes. False when it is still open after the
        timeout (calling again waits on)."""
        try:
            self.sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass  # already half-closed, or the server is gone
        end = time.monotonic() + (timeout or self.timeout)
        try:
            while True:
                left = end - time.monotonic()
                if left <= 0:
                    return False
                self.sock.settimeout(left)
                if not self.sock.recv(1 << 16):
                    return True
        except TimeoutError:
            return False
        except OSError:
            return True  # reset: closed

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass


def hello_for(nonce: str, name: str = "fuzz", token: str | None = None) -> Any:
    hs = handshake.ClientHandshake(
        handshake.Expect(),
        handshake.Versions(PACKAGE_VERSION, "", ""),
        token,  # its key id in HELLO picks the server's token (and the server's proof in CHALLENGE)
        codecs=range(18),
        client_name=name,
        allow_skew=True,
        nonce=nonce,
    )
    return hs


def authenticate(address: tuple[str, int], source: str, token: str, timeout: float) -> Conn:
    """A connection that completed a real handshake (raises MeshError / OSError when refused)."""
    c = Conn(address, source, timeout)
    try:
        hs = handshake.ClientHandshake(
            handshake.Expect(),
            handshake.Versions(PACKAGE_VERSION, "", ""),
            token,
            codecs=range(18),
            client_name="fuzz",
            allow_skew=True,
        )
        c.sock.sendall(encode_bytes(hs.hello()))
        while not hs.done:
            for reply in hs.receive(c.recv()):
                c.sock.sendall(encode_bytes(reply))
            if hs.error is not None:
                raise hs.error
        c.authenticated = True
        c.link = hs.link
        return c
    except BaseException:
        c.close()
        raise


# ---------------------------------------------------------------------------- seeds (valid frames)


def split_frame(label: str, msg: Message) -> Seed:
    data = encode_bytes(msg)
    _, _, kind, hlen, _, _ = PREFIX.unpack_from(data)
    return label, kind, json.loads(data[PREFIX.size : PREFIX.size + hlen]), data[PREFIX.size + hlen :]


def build_seeds() -> list[Seed]:
    """Valid frames of every kind a client sends, FORWARD with every codec id (needs torch)."""
    import torch
    from comfyui_mesh import codec, protocol
    from comfyui_mesh.wirecodecs import temporal

    g = torch.Generator().manual_seed(0)
    bias = torch.randn(64, generator=g) * 0.1
    cw = codec.encode(bias, "const", "raw")
    h = protocol.content_hash(cw)
    const = protocol.WireTensor("const:" + h, cw.dtype, cw.shape, 0, cw.data)
    seeds: list[Seed] = []
    seq = 0

    def forward(label: str, tensors: list, stream: dict | None = None, reply: int = 0, with_const: bool = True) -> None:
        nonlocal seq
        seq += 1
        msg = protocol.Forward(
            tensors=(*tensors, const) if with_const else tuple(tensors),
            seq=seq,
            arch="toy",
            n_blocks=N_BLOCKS,
            consts={"bias": h},
            reply_codec=reply,
            stream=stream or {},
        )
        seeds.append(split_frame(label, msg))

    names = [codec.CODECS[i].name for i in codec.available_ids()]
    for name in names:
        temporal_codec = name in ("lossless-t", "quant-t", "auto")
        for dt in (torch.float32, torch.bfloat16):
            for L in (1, 8):
                stream = {"gen": f"{name}-{L}", "cfg": 0} if temporal_codec else None
                state: dict = {}
                x = torch.randn(1, L, 64, generator=g).to(dt)
                for step in range(3 if temporal_codec else 1):
                    sub = temporal.stream_state(state, stream)
                    wt = codec.encode(x + 0.01 * step, "x", name, state=sub)
                    forward(f"forward/{name}/{str(dt)[6:]}/L{L}/s{step}", [wt], stream)
        # constant channels: the quant family codes each as its mean alone (a tiny payload for any N)
        xc = (torch.arange(64, dtype=torch.float32) / 64).expand(1, 16, 64).contiguous()
        forward(f"forward/{name}/const-channels", [codec.encode(xc, "x", name, state={})])
    x = torch.randn(1, 4, 64, generator=g)
    for rid in codec.available_ids():
        if rid != 15:
            forward(f"forward/reply-{codec.CODECS[rid].name}", [codec.encode(x, "x", "raw")], reply=rid)
    forward("forward/no-const", [codec.encode(x, "x", "raw")], with_const=False)
    forward("forward/extra-scalar", [codec.encode(x, "x", "raw"), codec.encode(x, "y", "int8")])
    seeds.append(split_frame("ping", protocol.Ping(seq=1, echo_bytes=16)))
    probe = protocol.WireTensor("probe", "uint8", (4096,), 0, bytes(4096))
    seeds.append(split_frame("ping/probe", protocol.Ping(seq=2, tensors=(probe,))))
    seeds.append(split_frame("end-stream/gen", protocol.EndStream(gen="quant-t-8")))
    seeds.append(split_frame("end-stream/all", protocol.EndStream(gen=None)))
    seeds.append(split_frame("reconfigure", protocol.Reconfigure(n_blocks=N_BLOCKS)))
    seeds.append(split_frame("bye", protocol.Bye(reason="fuzz")))
    seeds.append(split_frame("hello", protocol.Hello(nonce=auth.new_nonce(), package_version=PACKAGE_VERSION)))
    seeds.append(split_frame("auth", protocol.Auth(mac="0" * 64)))
    return seeds


def zstd_bombs() -> dict[int, bytes]:
    """zstd frames of 2^k zero bytes (k = 16..30): ~32 KB inflate to 1 GiB."""
    import zstandard

    out = {}
    for k in (16, 20, 22, 24, 26, 28, 30):
        c = zstandard.ZstdCompressor(level=3).compressobj(size=1 << k)
        zeros = bytes(1 << min(k, 24))
        parts = [c.compress(zeros) for _ in range((1 << k) // len(zeros))]
        out[k] = b"".join(parts) + c.flush()
    return out


# ---------------------------------------------------------------------------- mutations


def frame(kind: int, hbytes: bytes, body: bytes, *, magic: bytes = MAGIC, version: int = PROTOCOL_VERSION) -> bytes:
    crc = zlib.crc32(body, zlib.crc32(hbytes))
    return PREFIX.pack(magic, version, kind, len(hbytes), len(body), crc) + hbytes + body


def dumps(h: Any) -> bytes:
    return json.dumps(h, separators=(",", ":"), allow_nan=True).encode()


BIG = [2**31 - 1, 2**31, 2**32, 2**40, 2**63 - 1, 2**63, 2**64, 10**30]
INTERESTING: list[Any] = [
    0, -1, 1, 2, 3, 7, 8, 15, 16, 17, 63, 64, 255, 256, 65535, 65536, -(2**63), *BIG,
    0.5, -0.0, 1e308, float("nan"), float("inf"), float("-inf"), True, False, None,
    "", "x" * 300, "\ud800", "\udfff\ud800", "é€😀", "\u0000", "../../etc/passwd", "NaN",
    "float32", "bfloat16", "float8_e4m3fn", "bool", "int64", "uint8", "zstd", "ans", "c", "i", "p",
    [], {}, [0] * 9, [[1]], [-1], [2**40], [1, 2, 3], {"a": 1}, {"gen": "\ud800"},
]  # fmt: skip
SHAPES: list[Any] = [
    [1, 1 << 20, 64], [1, 1 << 26, 64], [1 << 31], [65536, 65536, 64], [1 << 40, 1 << 40], [0], [], [1] * 8,
    [2] * 9, [1, 0, 64], [-1, 64], [1, 8, 32], [1, 8, 65], [4, 16, 64], [1.5], ["8"], [True], None, {},
]  # fmt: skip


def paths(obj: Any, prefix: tuple = (), depth: int = 0) -> list[tuple]:
    out = [prefix]
    if depth > 6:
        return out
    if isinstance(obj, dict):
        for k, v in obj.items():
            out += paths(v, (*prefix, k), depth + 1)
    elif isinstance(obj, list) and len(obj) <= 64:
        for i, v in enumerate(obj):
            out += paths(v, (*prefix, i), depth + 1)
    return out


def get_parent(obj: Any, path: tuple) -> Any:
    for p in path[:-1]:
        obj = obj[p]
    return obj


@dataclass
class Mutant:
    data: bytes
    framed: bool  # the prefix's lengths match the bytes sent: the server reads exactly one frame
    label: str


class Mutator:
    def __init__(self, seeds: list[Seed], bombs: dict[int, bytes], rng: random.Random, only: frozenset = frozenset()):
        self.seeds = seeds
        self.post = [s for s in seeds if s[1] not in (MsgKind.HELLO, MsgKind.AUTH)]
        self.forwards = [s for s in seeds if s[1] == MsgKind.FORWARD]
        self.hello = [s for s in seeds if s[1] == MsgKind.HELLO]
        self.bombs = bombs
        self.rng = rng
        self.structured = [
            (self.m_field, 10), (self.m_delete, 3), (self.m_shape, 6), (self.m_dtype, 3), (self.m_codec, 6),
            (self.m_sections, 6), (self.m_zero_body, 3), (self.m_body_flip, 14), (self.m_header_flip, 4),
            (self.m_dup, 3), (self.m_many, 1), (self.m_zstd_bomb, 3), (self.m_payload, 4), (self.m_deep, 1),
            (self.m_header_junk, 2), (self.m_kind, 2), (self.m_versions, 1), (self.m_valid, 6), (self.m_hevc, 4),
            (self.m_const_flood, 0),  # 4 MiB frames: only when asked for (--only const_flood)
        ]  # fmt: skip
        self.unframed = [
            (self.m_flip, 4),
            (self.m_truncate, 4),
            (self.m_lengths, 4),
            (self.m_random, 1),
            (self.m_two, 2),
        ]
        if only:  # a targeted run: these mutations alone (names without "m_")
            self.structured = [(f, max(w, 1)) for f, w in self.structured if f.__name__[2:] in only]
            self.unframed = [(f, w) for f, w in self.unframed if f.__name__[2:] in only]
            if not self.structured + self.unframed:
                raise ValueError(f"no mutation named in {sorted(only)}")
        self._swf = [w for _, w in self.structured]
        self._uwf = [w for _, w in self.unframed]

    def pick(self, pool: list[Seed]) -> tuple[str, int, dict, bytes]:
        label, kind, header, body = self.rng.choice(pool)
        return label, kind, json.loads(json.dumps(header)), body

    def mutate(self, pool: list[Seed], unframed_share: float) -> Mutant:
        seed = self.pick(pool)
        if not self.structured or (self.unframed and self.rng.random() < unframed_share):
            (fn,) = self.rng.choices([f for f, _ in self.unframed], self._uwf)
        else:
            (fn,) = self.rng.choices([f for f, _ in self.structured], self._swf)
        return fn(seed)

    # -- helpers
    def _t(self, header: dict) -> tuple[int, dict] | None:
        ts = header.get("tensors") or []
        if not ts:
            return None
        i = self.rng.randrange(len(ts))
        return i, ts[i]

    def _slices(self, header: dict, body: bytes) -> list[bytes]:
        out, off = [], 0
        for d in header.get("tensors", []):
            out.append(body[off : off + d["nbytes"]])
            off += d["nbytes"]
        return out

    def _rebuild(self, header: dict, parts: list[bytes]) -> bytes:
        for d, p in zip(header["tensors"], parts, strict=True):
            d["nbytes"] = len(p)
        return b"".join(parts)

    def _ok(self, kind: int, header: dict, body: bytes, label: str) -> Mutant:
        return Mutant(frame(kind, dumps(header), body), True, label)

    # -- framed mutations (valid lengths and checksum)
    def m_valid(self, s: Seed) -> Mutant:
        return self._ok(s[1], s[2], s[3], f"{s[0]}|valid")

    def m_field(self, s: Seed) -> Mutant:
        label, kind, header, body = s
        path = self.rng.choice(paths(header)[1:] or [("x",)])
        v = self.rng.choice(INTERESTING)
        get_parent(header, path)[path[-1]] = v
        return self._ok(kind, header, body, f"{label}|field {path}={v!r:.40}")

    def m_delete(self, s: Seed) -> Mutant:
        label, kind, header, body = s
        ps = [p for p in paths(header)[1:] if isinstance(get_parent(header, p), dict)]
        if self.rng.random() < 0.3 or not ps:
            header[self.rng.choice(["zz", "tensors", "seq", "\ud800"])] = self.rng.choice(INTERESTING)
            return self._ok(kind, header, body, f"{label}|add field")
        p = self.rng.choice(ps)
        del get_parent(header, p)[p[-1]]
        if p == ("tensors",):
            body = b""
        return self._ok(kind, header, body, f"{label}|delete {p}")

    def m_shape(self, s: Seed) -> Mutant:
        label, kind, header, body = s
        t = self._t(header)
        if t is None:
            return self.m_field(s)
        shape = self.rng.choice(SHAPES)
        t[1]["shape"] = shape
        return self._ok(kind, header, body, f"{label}|shape {t[1]['name']}={shape}")

    def m_dtype(self, s: Seed) -> Mutant:
        label, kind, header, body = s
        t = self._t(header)
        if t is None:
            return self.m_field(s)
        dt = self.rng.choice(["float64", "float16", "bfloat16", "int8", "uint8", "bool", "int64", "int32",
                              "float8_e4m3fn", "float8_e5m2", "int16", "complex64", "float32"])  # fmt: skip
        t[1]["dtype"] = dt
        return self._ok(kind, header, body, f"{label}|dtype {t[1]['name']}={dt}")

    def m_codec(self, s: Seed) -> Mutant:
        label, kind, header, body = s
        t = self._t(header)
        if t is None:
            return self.m_field(s)
        cid = self.rng.choice([0, 1, 2, 3, 4, 5, 6, 7, 15, 16, 17, 8, 14, 18, 65535, -1, 65536])
        t[1]["codec"] = cid
        return self._ok(kind, header, body, f"{label}|codec {t[1]['name']}={cid}")

    def m_sections(self, s: Seed) -> Mutant:
        label, kind, header, body = s
        t = self._t(header)
        sec = t[1].get("meta", {}).get("s") if t else None
        if not sec:
            return self.m_codec(s)
        e = self.rng.choice(sec)
        j = self.rng.randrange(3)
        e[j] = self.rng.choice([0, 1, 2, -1, e[j] + 1, max(e[j] - 1, 0), *BIG, 1 << 24, "1", None])
        if self.rng.random() < 0.2:
            t[1]["meta"]["be"] = self.rng.choice(["ans", "zstd", "lz4", "", None])
        return self._ok(kind, header, body, f"{label}|sections {t[1]['name']}[{j}]={e[j]!r}")

    def m_hevc(self, s: Seed) -> Mutant:
        """Bytes of an HEVC (ids 16, 17) bitstream changed and its CRC-32 fixed, so they reach the
        native decoder (a token holder can compute the CRC)."""
        hevc = [x for x in self.forwards if any(d["codec"] in (16, 17) and d["nbytes"] > 44 for d in x[2]["tensors"])]
        label, kind, header, body = self.pick(hevc)
        parts = self._slices(header, body)
        i = next(j for j, d in enumerate(header["tensors"]) if d["codec"] in (16, 17) and d["nbytes"] > 44)
        p = bytearray(parts[i])
        f = HEVC_HEADER.unpack_from(p)
        c, nbytes = f[6], f[12]
        start = HEVC_HEADER.size + 8 * c
        if nbytes:
            for _ in range(self.rng.choice([1, 2, 4, 16, 64])):
                k = start + self.rng.randrange(nbytes)
                p[k] = self.rng.randrange(256) if self.rng.random() < 0.5 else p[k] ^ (1 << self.rng.randrange(8))
            struct.pack_into("<I", p, 40, zlib.crc32(p[start : start + nbytes]))
        parts[i] = bytes(p)
        return self._ok(kind, header, self._rebuild(header, parts), f"{label}|hevc bitstream bytes, CRC fixed")

    def m_const_flood(self, s: Seed) -> Mutant:
        """A valid FORWARD carrying 1-2 new 4 MiB constants (right content hashes): the server caches
        every one it is sent, up to its per-connection constants cache."""
        label, kind, header, body = self.pick(self.forwards)
        parts = self._slices(header, body)
        for _ in range(self.rng.choice([1, 2])):
            data = self.rng.randbytes(4 << 20)
            wt = WireTensor("c", "uint8", (len(data),), 0, data)
            header["tensors"].append(
                {"name": "const:" + content_hash(wt), "dtype": "uint8", "shape": [len(data)], "codec": 0, "meta": {}}
            )
            parts.append(data)
        return self._ok(kind, header, self._rebuild(header, parts), f"{label}|new 4 MiB constants")

    def m_zero_body(self, s: Seed) -> Mutant:
        label, kind, header, body = s
        return self._ok(kind, header, bytes(len(body)), f"{label}|zero body")

    def m_body_flip(self, s: Seed) -> Mutant:
        label, kind, header, body = s
        if not body:
            return self.m_header_flip(s)
        b = bytearray(body)
        parts = self._slices(header, body)
        # aim at a coded tensor's payload (not the constant) most of the time
        off = 0
        if parts and self.rng.random() < 0.8:
            i = self.rng.randrange(len(parts))
            off = sum(len(p) for p in parts[:i])
            n = max(len(parts[i]), 1)
        else:
            n = len(b)
        for _ in range(self.rng.choice([1, 1, 2, 4, 16])):
            k = min(off + self.rng.randrange(n), len(b) - 1)
            if self.rng.random() < 0.5:
                b[k] ^= 1 << self.rng.randrange(8)
            else:
                b[k] = self.rng.choice([0, 0xFF, 0x7F, 0x80, self.rng.randrange(256)])
        return self._ok(kind, header, bytes(b), f"{label}|body flips")

    def m_header_flip(self, s: Seed) -> Mutant:
        label, kind, header, body = s
        h = bytearray(dumps(header))
        for _ in range(self.rng.choice([1, 2, 4])):
            k = self.rng.randrange(len(h))
            h[k] = self.rng.choice([ord(c) for c in '{}[]",:0-9e."\\'] + [0x80, 0xFF, 0xED, self.rng.randrange(256)])
        return Mutant(frame(kind, bytes(h), body), True, f"{label}|header bytes")

    def m_dup(self, s: Seed) -> Mutant:
        label, kind, header, body = s
        t = self._t(header)
        if t is None:
            return self.m_field(s)
        parts = self._slices(header, body)
        header["tensors"].append(dict(t[1]))
        parts.append(parts[t[0]])
        return self._ok(kind, header, self._rebuild(header, parts), f"{label}|duplicate {t[1]['name']}")

    def m_many(self, s: Seed) -> Mutant:
        label, kind, header, _ = s
        n = self.rng.choice([256, 257])
        names = [f"t{i}" for i in range(n)] if self.rng.random() < 0.5 else ["x"] * n
        shape = self.rng.choice([[1, 1 << 20, 64], [4], [1 << 24]])
        header["tensors"] = [
            {"name": nm, "dtype": "float32", "shape": shape, "codec": 3, "meta": {}, "nbytes": 0} for nm in names
        ]
        return self._ok(kind, header, b"", f"{label}|{n} tensors shape {shape}")

    def m_zstd_bomb(self, s: Seed) -> Mutant:
        """A lossless (id 2) or lossless-t I-frame tensor whose byte planes are zstd frames of zeros:
        either honest (the shape declares what they inflate to) or lying (they inflate far past it)."""
        _, kind, header, _ = self.pick(self.forwards)
        k = self.rng.choice(sorted(self.bombs))
        z = self.bombs[k]
        honest = self.rng.random() < 0.5
        numel = (1 << k) if honest else self.rng.choice([64, 1024])
        cid = self.rng.choice([2, 6])
        meta: dict[str, Any] = {"l": "c", "be": "zstd", "s": [[1, numel, len(z)]] * 4}
        if cid == 6:
            meta.update({"f": "i", "g": 1, "i": 0})
        n_planes = self.rng.choice([1, 4])  # float32 'l': 'c' is 4 byte planes; 1 is malformed
        meta["s"] = meta["s"][:n_planes]
        payload = z * n_planes
        desc = {"name": "x", "dtype": "float32", "shape": [1, numel // 64 or 1, 64], "codec": cid, "meta": meta}
        header["tensors"] = [dict(desc, nbytes=len(payload))]
        return self._ok(kind, header, payload, f"zstd bomb 2^{k} {'honest' if honest else 'lying'} codec {cid}")

    def m_payload(self, s: Seed) -> Mutant:
        label, kind, header, body = s
        t = self._t(header)
        if t is None:
            return self.m_field(s)
        parts = self._slices(header, body)
        n = self.rng.choice([0, 1, 7, 64, len(parts[t[0]]) + 1, max(len(parts[t[0]]) - 1, 0), 4096])
        parts[t[0]] = self.rng.choice([bytes(n), self.rng.randbytes(n), b"\xff" * n])
        return self._ok(kind, header, self._rebuild(header, parts), f"{label}|payload {t[1]['name']} {n} bytes")

    def m_deep(self, s: Seed) -> Mutant:
        label, kind, _, body = s
        d = self.rng.choice([1000, 100_000, 400_000])
        h = self.rng.choice([b"[" * d + b"]" * d, b'{"a":' * d + b"1" + b"}" * d])
        return Mutant(frame(kind, h[: 1 << 20], b""), True, f"{label}|deep json {d}")

    def m_header_junk(self, s: Seed) -> Mutant:
        label, kind, _, _ = s
        h = self.rng.choice([b"", b"null", b"[]", b"1", b'"x"', b"\xff\xfe", b'{"tensors":7}', b'{"a":"\\ud800"}',
                             b'{"tensors":[1]}', b'{"tensors":[{}]}', b"NaN", b'{"a":1,"a":2}', b"\x00" * 64])  # fmt: skip
        return Mutant(frame(kind, h, b""), True, f"{label}|header {h[:16]!r}")

    def m_kind(self, s: Seed) -> Mutant:
        label, kind, header, body = s
        k = self.rng.choice([0, *range(1, 15), 15, 255, 65535])
        return self._ok(k, header, body, f"{label}|kind {k}")

    def m_versions(self, s: Seed) -> Mutant:
        label, kind, header, body = s
        hb = dumps(header)
        if self.rng.random() < 0.5:
            return Mutant(frame(kind, hb, body, version=self.rng.choice([0, 1, 3, 65535])), True, f"{label}|version")
        return Mutant(
            frame(kind, hb, body, magic=self.rng.choice([b"MESX", b"\0\0\0\0", b"GET "])), True, f"{label}|magic"
        )

    # -- unframed mutations (lengths broken: followed by a half-close)
    def m_flip(self, s: Seed) -> Mutant:
        label, kind, header, body = s
        b = bytearray(frame(kind, dumps(header), body))
        for _ in range(self.rng.choice([1, 2, 8])):
            k = self.rng.randrange(len(b))
            b[k] ^= 1 << self.rng.randrange(8)
        return Mutant(bytes(b), False, f"{label}|frame flips")

    def m_truncate(self, s: Seed) -> Mutant:
        label, kind, header, body = s
        b = frame(kind, dumps(header), body)
        n = self.rng.randrange(len(b))
        return Mutant(b[:n], False, f"{label}|truncate {n}/{len(b)}")

    def m_lengths(self, s: Seed) -> Mutant:
        label, kind, header, body = s
        hb = dumps(header)
        b = frame(kind, hb, body)
        magic, ver, kd, hlen, blen, crc = PREFIX.unpack_from(b)
        which = self.rng.random()
        if which < 0.4:  # a length bomb: declare a huge body, send a little of it
            blen = self.rng.choice(
                [MAX_BODY_BYTES, MAX_BODY_BYTES - 1, MAX_BODY_BYTES + 1, 1 << 30, 1 << 63, 2**64 - 1]
            )
        elif which < 0.7:
            hlen = self.rng.choice([0, 1, hlen - 1, hlen + 1, 1 << 20, (1 << 20) + 1, 2**32 - 1])
        else:
            blen = self.rng.choice([0, max(blen - 1, 0), blen + 1, blen + 4096])
        tail = b[PREFIX.size :] + bytes(self.rng.choice([0, 0, 4096, 1 << 16]))
        return Mutant(PREFIX.pack(magic, ver, kd, hlen, blen, crc) + tail, False, f"{label}|lengths h{hlen} b{blen}")

    def m_random(self, s: Seed) -> Mutant:
        return Mutant(self.rng.randbytes(self.rng.choice([1, 23, 24, 100, 4096])), False, "random bytes")

    def m_two(self, s: Seed) -> Mutant:
        a = self.m_valid(s).data
        b = self.m_truncate(self.pick(self.seeds))
        return Mutant(a + b.data, False, f"{s[0]}|valid + {b.label}")


# ---------------------------------------------------------------------------- workers


@dataclass
class Tally:
    frames: int = 0
    pre: int = 0
    post: int = 0
    framed: int = 0
    connections: int = 0
    replies: Counter = field(default_factory=Counter)
    closed: int = 0  # the server closed the connection after a frame (expected for broken frames)
    hangs: int = 0
    restores: int = 0  # RECONFIGURE back to N_BLOCKS after a mutated one (not counted as frames)
    slow: int = 0  # answered after more than hang_s, within SLOW_FACTOR x hang_s
    slowest_s: float = 0.0
    refused: int = 0  # connect / handshake refused (busy, reset): retried
    findings: list = field(default_factory=list)
    last: list = field(default_factory=list)  # the last frames sent (label, first bytes hex)

    def note(self, kind: str, m: Mutant, extra: str = "") -> None:
        if len(self.findings) < 50:
            self.findings.append({"kind": kind, "label": m.label, "extra": extra, "frame_hex": m.data[:512].hex()})

    def merge(self, o: dict) -> None:
        for k in ("frames", "pre", "post", "framed", "connections", "closed", "hangs", "slow", "refused", "restores"):
            setattr(self, k, getattr(self, k) + o[k])
        self.slowest_s = max(self.slowest_s, o["slowest_s"])
        self.replies.update(o["replies"])
        self.findings += o["findings"][: max(0, 200 - len(self.findings))]
        self.last += o["last"]


def reply_name(msg: Message) -> str:
    return f"error:{msg.code}" if isinstance(msg, Error) else type(msg).__name__


N_BLOCKS = 3  # what the server is started with and the seeds ask for
RESTORE = encode_bytes(Reconfigure(n_blocks=N_BLOCKS))
# A frame unanswered after hang_s is waited for up to SLOW_FACTOR x hang_s: answered by then it is
# "slow" (reported: e.g. queued behind honest requests at the size limit), else a hang.
SLOW_FACTOR = 6
CLOSING = {"error:bad_frame", "error:auth_failed", "error:busy", "error:bad_request"}


def fuzz_thread(
    wid: int,
    address: tuple[str, int],
    token: str,
    seeds: list[Seed],
    bombs: dict[int, bytes],
    frames: int,
    opts: dict,
    progress: Any,
    stop: Any,
) -> dict:
    rng = random.Random(opts["seed"] * 1000 + wid)
    mut = Mutator(seeds, bombs, rng, frozenset(opts["only"]))
    t = Tally()
    source = f"127.0.{1 + wid // 200}.{10 + wid % 200}"
    hang_s = opts["hang_s"]
    conn: Conn | None = None
    deadline = time.monotonic() + opts["duration"]

    def remember(m: Mutant) -> None:
        t.last.append((m.label, m.data[:64].hex()))
        del t.last[:-3]

    def exchange(c: Conn, m: Mutant) -> bool:
        """Send one mutant; True if the connection is still usable afterwards."""
        remember(m)
        t.frames += 1
        try:
            c.send_frame(m.data)
        except OSError:
            t.closed += 1
            return False
        t0 = time.monotonic()

        def slow() -> None:  # answered, but after more than hang_s (queued behind big requests?)
            t.slow += 1
            t.slowest_s = max(t.slowest_s, time.monotonic() - t0)
            if t.slow <= 3:
                t.note("slow", m, f"answered after {time.monotonic() - t0:.1f} s")

        if not m.framed:
            if not c.drain():
                if not c.drain(hang_s * (SLOW_FACTOR - 1)):
                    t.hangs += 1
                    t.note("hang", m, f"no close within {hang_s * SLOW_FACTOR:g} s of a half-close")
                else:
                    slow()
            return False
        t.framed += 1
        try:
            try:
                reply = c.recv()
            except TimeoutError:
                reply = c.recv(hang_s * (SLOW_FACTOR - 1))
                slow()
        except TimeoutError:
            t.hangs += 1
            t.note("hang", m, f"no reply within {hang_s * SLOW_FACTOR:g} s")
            return False
        except (ConnectionError, OSError):
            t.closed += 1
            return False
        except MeshError as e:
            t.note("bad reply", m, repr(e))
            return False
        name = reply_name(reply)
        t.replies[name] += 1
        if name in ("error:forward_failed", "error:reconfigure_failed"):
            t.note(name, m, getattr(reply, "message", ""))
        if not c.authenticated:
            return isinstance(reply, Challenge)
        if name == "error:config_mismatch" or getattr(reply, "n_blocks", N_BLOCKS) != N_BLOCKS:
            # a mutated RECONFIGURE moved the server off the seeds' n_blocks: move it back (not counted),
            # or the next FORWARDs would all be refused before decoding
            try:
                c.send_frame(RESTORE)
                c.recv(hang_s * SLOW_FACTOR)
                t.restores += 1
            except (OSError, MeshError):
                return False
        return name not in CLOSING or name == "error:bad_request"

    def post_conn() -> Conn | None:
        try:
            c = authenticate(address, source, token, hang_s)
            t.connections += 1
            return c
        except ConnectionRefusedError:
            raise
        except (MeshError, OSError):
            t.refused += 1
            time.sleep(0.05)
            return None

    try:
        while t.frames < frames and time.monotonic() < deadline and not stop.is_set():
            n0 = t.frames
            if rng.random() < opts["pre_share"]:  # before authentication, a fresh connection
                t.pre += 1
                c = Conn(address, source, hang_s)
                t.connections += 1
                try:
                    if rng.random() < 0.5:
                        m = mut.mutate(mut.hello if rng.random() < 0.7 else mut.seeds, opts["unframed_share"])
                        exchange(c, m)
                    else:  # a real HELLO, then a mutated AUTH (its mac right or not)
                        hs = hello_for(auth.new_nonce(), token=token)
                        hello = hs.hello()
                        c.sock.sendall(encode_bytes(hello))
                        ch = c.recv()
                        if isinstance(ch, Challenge):
                            right = auth.client_proof(token, handshake.transcript(hello, ch))
                            mac = right if rng.random() < 0.5 else "0" * 64
                            seed = split_frame("auth", auth_msg(mac))
                            m = mut.mutate([seed], opts["unframed_share"])
                            if exchange(c, m):
                                pass
                except (TimeoutError, ConnectionError, OSError, MeshError):
                    t.closed += 1
                finally:
                    c.close()
            else:
                t.post += 1
                if conn is None:
                    conn = post_conn()
                    if conn is None:
                        continue
                m = mut.mutate(mut.post, opts["unframed_share"])
                if not exchange(conn, m):
                    conn.close()
                    conn = None
            if t.frames != n0 and t.frames % 50 == 0:
                with progress.get_lock():
                    progress.value += 50
    except ConnectionRefusedError:
        t.findings.append({"kind": "refused", "label": "server gone", "extra": "", "frame_hex": ""})
    finally:
        if conn is not None:
            conn.close()
    with progress.get_lock():
        progress.value += t.frames % 50
    d = t.__dict__.copy()
    d["replies"] = dict(t.replies)
    return d


def auth_msg(mac: str) -> Message:
    from comfyui_mesh.protocol import Auth

    return Auth(mac=mac)


def fuzz_process(
    pid: int, threads: int, args: tuple, frames: int, opts: dict, progress: Any, stop: Any, q: Any
) -> None:
    results: list[dict] = [{}] * threads

    def run(i: int) -> None:
        results[i] = fuzz_thread(
            pid * threads + i, *args, frames // threads + (i < frames % threads), opts, progress, stop
        )

    ts = [threading.Thread(target=run, args=(i,)) for i in range(threads)]
    for th in ts:
        th.start()
    for th in ts:
        th.join()
    q.put([r for r in results if r])


# ---------------------------------------------------------------------------- monitor


class Monitor:
    """RSS samples and a probe client's PING round trips, in threads of this process."""

    def __init__(self, srv: ServerProc, hang_s: float):
        self.srv = srv
        self.hang_s = hang_s
        self.stop = threading.Event()
        self.rss_max = 0
        self.series: list[tuple[float, int]] = []
        self.probe_ms: list[float] = []
        self.probe_fail: list[str] = []
        self.t0 = time.monotonic()
        self.threads = [
            threading.Thread(target=self._rss, daemon=True),
            threading.Thread(target=self._probe, daemon=True),
        ]
        for th in self.threads:
            th.start()

    def _rss(self) -> None:
        last = -1.0
        while not self.stop.wait(0.1):
            r = read_status(self.srv.pid)["VmRSS"]
            self.rss_max = max(self.rss_max, r)
            now = time.monotonic() - self.t0
            if now - last >= 1.0:
                self.series.append((round(now, 1), r))
                last = now

    def _probe(self) -> None:
        c: Conn | None = None
        while not self.stop.wait(0.5):
            if not self.srv.alive():
                return
            t0 = time.monotonic()
            try:
                if c is None:
                    c = authenticate(self.srv.address, "127.0.0.1", self.srv.token, self.hang_s)
                c.send_frame(encode_bytes(ping_msg()))
                reply = c.recv()
                if not type(reply).__name__ == "Pong":
                    raise MeshError(f"probe got {reply_name(reply)}")
                self.probe_ms.append((time.monotonic() - t0) * 1e3)
            except (MeshError, OSError) as e:
                self.probe_fail.append(f"{time.monotonic() - self.t0:.1f}s: {type(e).__name__}: {e}")
                if c is not None:
                    c.close()
                c = None

    def close(self) -> None:
        self.stop.set()
        for th in self.threads:
            th.join(timeout=self.hang_s + 5)


def ping_msg() -> Message:
    from comfyui_mesh.protocol import Ping

    return Ping(seq=1)


# ---------------------------------------------------------------------------- driver


def run(
    frames: int = 3000,
    procs: int = 0,
    threads: int = 4,
    duration: float = 3600.0,
    hang_s: float = 10.0,
    pre_share: float = 0.3,
    unframed_share: float = 0.15,
    seed: int = 1,
    max_request_mb: int = 16,
    max_codec_state_mb: int = 16,
    max_inflight_mb: int = 64,
    max_consts_total_mb: int = 32,
    max_codec_state_total_mb: int = 32,
    rss_budget_mb: float = 0.0,
    server_args: tuple[str, ...] = (),
    only: tuple[str, ...] = (),
    workdir: str = "",
    verbose: bool = False,
) -> dict:
    """Run the fuzzer; returns the report. ``procs`` 0: the worker threads run in this process."""
    tmp = tempfile.TemporaryDirectory(prefix="mesh-fuzz-") if not workdir else None
    wd = Path(workdir or tmp.name)  # type: ignore[union-attr]
    wd.mkdir(parents=True, exist_ok=True)
    t_seed = time.perf_counter()
    seeds = build_seeds()
    bombs = zstd_bombs()
    t_seed = time.perf_counter() - t_seed
    workers = max(procs, 1) * threads
    sargs = [
        "--max-request-mb", str(max_request_mb), "--max-codec-state-mb", str(max_codec_state_mb),
        "--max-consts-mb", str(max_request_mb), "--max-inflight-mb", str(max_inflight_mb),
        "--max-consts-total-mb", str(max_consts_total_mb), "--max-codec-state-total-mb", str(max_codec_state_total_mb),
        "--max-clients", str(workers + 8), "--max-unauthenticated", str(max(64, 2 * workers)),
        *server_args,
    ]  # fmt: skip
    srv = ServerProc(wd, sargs)
    try:
        mon = Monitor(srv, hang_s)
        time.sleep(1.5)  # the probe connected and pinged: the server's resting size
        baseline = read_status(srv.pid)["VmRSS"]
        # What all connections together may make the server hold, from its server-wide budgets
        # (PROTOCOL.md §3.1): frames and decoded requests in flight, cached constants, temporal
        # references; plus what the budgets do not count: the one forward running at a time (the back
        # half's working memory and its reply, about 2 x max_request_mb) and 256 MB of allocator slack.
        # Independent of the number of connections.
        held = max_inflight_mb + max_consts_total_mb + max_codec_state_total_mb + 2 * max_request_mb
        budget = rss_budget_mb * 2**20 or baseline + held * 2**20 + (256 << 20)
        opts = {"seed": seed, "hang_s": hang_s, "pre_share": pre_share, "unframed_share": unframed_share}
        opts["duration"] = duration
        opts["only"] = list(only)
        progress = mp.Value("q", 0) if procs else _Counter()
        stop = mp.Event() if procs else threading.Event()
        wargs = (srv.address, srv.token, seeds, bombs)
        t0 = time.monotonic()
        results: list[dict] = []
        if procs:
            ctx = mp.get_context("spawn")
            q = ctx.Queue()
            progress = ctx.Value("q", 0)
            stop = ctx.Event()
            ps = [
                ctx.Process(
                    target=fuzz_process,
                    args=(i, threads, wargs, frames // procs + (i < frames % procs), opts, progress, stop, q),
                )
                for i in range(procs)
            ]
            for p in ps:
                p.start()
            got = 0
            last_print = 0.0
            while got < procs:
                try:
                    results += q.get(timeout=1.0)
                    got += 1
                except Exception:
                    pass
                if not srv.alive():
                    stop.set()
                if verbose and time.monotonic() - last_print > 10:
                    last_print = time.monotonic()
                    el = last_print - t0
                    print(
                        f"  {progress.value} frames, {el:.0f} s, {progress.value / max(el, 1e-9):.0f} frames/s, "
                        f"RSS {mon.rss_max / 2**20:.0f} MB max",
                        file=sys.stderr,
                        flush=True,
                    )
            for p in ps:
                p.join(timeout=30)
        else:
            out: list[dict] = [{}] * threads

            def one(i: int) -> None:
                out[i] = fuzz_thread(i, *wargs, frames // threads + (i < frames % threads), opts, progress, stop)

            ts = [threading.Thread(target=one, args=(i,)) for i in range(threads)]
            for th in ts:
                th.start()
            for th in ts:
                th.join()
            results = [r for r in out if r]
        elapsed = time.monotonic() - t0
        time.sleep(0.6)  # one more probe after the last frame
        mon.close()
        tally = Tally()
        for r in results:
            tally.merge(r)
        alive = srv.alive()
        status = read_status(srv.pid)
        n_tb, tb_kinds = srv.tracebacks()
        log_bytes = srv.log_bytes()
        tail = "" if alive and not n_tb else srv.tail()
        rc = srv.stop()
    finally:
        if srv.alive():
            srv.stop()
    peak = max(status["VmHWM"], mon.rss_max)
    report = {
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "frames": tally.frames,
        "pre_auth": tally.pre,
        "post_auth": tally.post,
        "framed": tally.framed,
        "connections": tally.connections,
        "seconds": round(elapsed, 1),
        "frames_per_s": round(tally.frames / max(elapsed, 1e-9), 1),
        "seeds": len(seeds),
        "seed_build_s": round(t_seed, 1),
        "crashes": 0 if alive else 1,
        "exit_code": None if alive else rc,
        "hangs": tally.hangs + len(mon.probe_fail),
        "frame_hangs": tally.hangs,
        "slow_frames": tally.slow,
        "slowest_s": round(tally.slowest_s, 1),
        "probe_failures": mon.probe_fail[:20],
        "probe_ms_p50": round(percentile(mon.probe_ms, 50), 1),
        "probe_ms_p99": round(percentile(mon.probe_ms, 99), 1),
        "probe_ms_max": round(max(mon.probe_ms, default=0.0), 1),
        "probes": len(mon.probe_ms),
        "tracebacks": n_tb,
        "traceback_kinds": tb_kinds,
        "forward_failed": tally.replies.get("error:forward_failed", 0),
        "replies": dict(tally.replies.most_common()),
        "closed_by_server": tally.closed,
        "refused_connects": tally.refused,
        "restores": tally.restores,
        "rss_baseline_mb": round(baseline / 2**20, 1),
        "rss_peak_mb": round(peak / 2**20, 1),
        "rss_budget_mb": round(budget / 2**20, 1),
        "rss_over_budget": peak > budget,
        "rss_series_mb": [(t, round(r / 2**20, 1)) for t, r in mon.series],
        "server_log_bytes": log_bytes,
        "server_args": sargs,
        "findings": tally.findings,
        "last_frames": tally.last if not alive else [],
        "server_tail": tail,
    }
    if tmp is not None:
        tmp.cleanup()
    return report


class _Counter:
    """``mp.Value`` stand-in for threads in one process."""

    def __init__(self) -> None:
        self.value = 0
        self._lock = threading.Lock()

    def get_lock(self) -> threading.Lock:
        return self._lock


def markdown(r: dict) -> str:
    rows = [
        (
            "frames (pre-auth / post-auth connections' frames)",
            f"{r['frames']:,} ({r['pre_auth']:,} / {r['post_auth']:,})",
        ),
        ("time, frames/s", f"{r['seconds']} s, {r['frames_per_s']:,}"),
        ("connections", f"{r['connections']:,}"),
        ("crashes", r["crashes"]),
        ("hangs (frames / probe)", f"{r['frame_hangs']} / {len(r['probe_failures'])}"),
        ("slow frames (answered after > hang-s), slowest s", f"{r['slow_frames']}, {r['slowest_s']}"),
        ("tracebacks in the server's output", r["tracebacks"]),
        ("forward_failed replies", r["forward_failed"]),
        ("probe PING p50 / p99 / max ms", f"{r['probe_ms_p50']} / {r['probe_ms_p99']} / {r['probe_ms_max']}"),
        (
            "server RSS baseline / peak / budget MB",
            f"{r['rss_baseline_mb']} / {r['rss_peak_mb']} / {r['rss_budget_mb']}",
        ),
        ("server log bytes", f"{r['server_log_bytes']:,}"),
    ]
    out = ["| fuzz_server | |", "|---|---:|", *[f"| {a} | {b} |" for a, b in rows]]
    out.append("")
    out.append("replies: " + ", ".join(f"{k} {v:,}" for k, v in r["replies"].items()))
    if r["traceback_kinds"]:
        out.append("tracebacks: " + "; ".join(r["traceback_kinds"]))
    for f in r["findings"][:10]:
        out.append(f"- {f['kind']}: {f['label']} {f['extra'][:200]}")
    return "\n".join(out)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--frames", type=int, default=1_000_000)
    ap.add_argument("--procs", type=int, default=2, help="worker processes (0: threads in this process)")
    ap.add_argument("--threads", type=int, default=4, help="connections (threads) per worker process")
    ap.add_argument("--duration", type=float, default=24 * 3600.0, help="stop after this many seconds")
    ap.add_argument("--hang-s", type=float, default=10.0, help="a frame or probe unanswered this long is a hang")
    ap.add_argument("--pre-share", type=float, default=0.3, help="share of frames sent before authentication")
    ap.add_argument("--unframed-share", type=float, default=0.15, help="share of mutants with broken framing")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--max-request-mb", type=int, default=16, help="the server's --max-request-mb")
    ap.add_argument("--max-codec-state-mb", type=int, default=16, help="the server's --max-codec-state-mb")
    ap.add_argument("--max-inflight-mb", type=int, default=64, help="the server's --max-inflight-mb")
    ap.add_argument("--max-consts-total-mb", type=int, default=32, help="the server's --max-consts-total-mb")
    ap.add_argument("--max-codec-state-total-mb", type=int, default=32, help="the server's --max-codec-state-total-mb")
    ap.add_argument(
        "--rss-budget-mb",
        type=float,
        default=0.0,
        help="0: resting RSS + the server-wide budgets (inflight + consts total + codec state total) + 2 x max-request-mb + 256",
    )
    ap.add_argument("--server-arg", action="append", default=[], help="extra server argument (repeatable)")
    ap.add_argument("--only", default="", help="comma-separated mutations to use alone (e.g. hevc,zstd_bomb)")
    ap.add_argument("--workdir", default="", help="keep the server's output here")
    ap.add_argument("--json", default="", help="write the report here")
    a = ap.parse_args()
    r = run(
        frames=a.frames,
        procs=a.procs,
        threads=a.threads,
        duration=a.duration,
        hang_s=a.hang_s,
        pre_share=a.pre_share,
        unframed_share=a.unframed_share,
        seed=a.seed,
        max_request_mb=a.max_request_mb,
        max_inflight_mb=a.max_inflight_mb,
        max_consts_total_mb=a.max_consts_total_mb,
        max_codec_state_total_mb=a.max_codec_state_total_mb,
        max_codec_state_mb=a.max_codec_state_mb,
        rss_budget_mb=a.rss_budget_mb,
        server_args=tuple(a.server_arg),
        only=tuple(x for x in a.only.split(",") if x),
        workdir=a.workdir,
        verbose=True,
    )
    if a.json:
        Path(a.json).write_text(json.dumps(r, indent=1, default=str))
    print(f"# fuzz_server — {r['date']}, this CPU machine, toy back half\n")
    print(markdown(r))
    bad = r["crashes"] or r["hangs"] or r["tracebacks"] or r["forward_failed"] or r["rss_over_budget"]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
