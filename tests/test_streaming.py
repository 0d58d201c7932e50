"""Streamed calls (docs/PROTOCOL.md §6.1): slab cutting, chunk frames on the wire, and a loopback
toy server answering streamed requests with streamed replies."""

from __future__ import annotations

import dataclasses
import socket
import time

import pytest
import torch
from comfyui_mesh import codec, protocol, streaming
from comfyui_mesh.config import ClientConfig, ServerConfig
from comfyui_mesh.constants import MAX_STREAM_PARTS, MIN_STREAM_SLAB_BYTES, PREFIX_SIZE
from comfyui_mesh.errors import ConnectFailed, RemoteFailure, RemoteProtocolError
from comfyui_mesh.netio import recv_message, send_message
from comfyui_mesh.protocol import NEED_DATA, Forward, ForwardChunk, FrameDecoder, MsgKind
from comfyui_mesh.server.core import DaedalusServer, ServerState
from comfyui_mesh.server.toy import ToyBackend, ToyModel
from comfyui_mesh.transport import MeshClient
from toy_support import toy_forward

TOKEN = "0123456789abcdef0123456789abcdef"
SLAB = 16 << 10  # small slabs so toy tensors are cut into several


# ---------------------------------------------------------------------------- cutting and joining


def _assemble(spec, slabs, device="cpu"):
    asm = streaming.Assembler(spec, RemoteProtocolError)
    asm.allocate(device)
    for name, t in slabs.items():
        asm.admit(codec.encode(t, name, "raw"))
        asm.put(name, t)
    return asm.finish()


def test_plan_cuts_the_token_dim_into_bounded_slabs_and_assembly_is_exact():
    x = torch.randn(2, 301, 64)
    cuts = streaming.plan({"x": x, "small": torch.randn(4, 4)}, SLAB)
    assert set(cuts) == {"x"}, "a tensor within one slab is not cut"
    cut = cuts["x"]
    assert cut.dim == 1 and cut.parts == -(-x.numel() * 4 // SLAB)
    slabs = dict(cut.slabs(x))
    assert list(slabs) == [f"x#{k}" for k in range(cut.parts)]
    assert all(s.is_contiguous() and s.shape[0] == 2 and s.shape[2] == 64 for s in slabs.values())
    assert streaming.Assembler({"x": cut.spec()}, RemoteProtocolError).nbytes == x.numel() * 4
    assert torch.equal(_assemble({"x": cut.spec()}, slabs)["x"], x)
    # many big tensors: never more than MAX_STREAM_PARTS slabs in all (they grow instead)
    many = {f"t{i}": torch.zeros(1, 1000, 64) for i in range(10)}
    cuts = streaming.plan(many, 1 << 10)
    assert sum(c.parts for c in cuts.values()) <= MAX_STREAM_PARTS and len(cuts) == 10
    assert streaming.plan({"v": torch.zeros(1 << 20)}, SLAB) == {}, "a 1-D tensor has no token dim to cut"
    assert streaming.plan({"x": x}, 0) == {}


def _spec(parts=("x#0", "x#1"), shape=(1, 8, 4), dim=1, dtype="float32"):
    return {"x": {"dim": dim, "parts": list(parts), "shape": list(shape), "dtype": dtype}}


@pytest.mark.parametrize(
    ("spec", "slabs", "why"),
    [
        (_spec(), {"x#1": (1, 5, 4)}, "came before"),  # out of order
        (_spec(), {"x#0": (1, 3, 4), "x#2": (1, 5, 4)}, "not named"),
        (_spec(), {"x#0": (1, 3, 4), "x#0 ": (1, 5, 4)}, "not named"),
        (_spec(), {"x#0": (1, 9, 4)}, "does not fit"),  # longer than the whole
        (_spec(), {"x#0": (1, 3, 5)}, "does not fit"),  # another width
        (_spec(), {"x#0": (1, 3, 4), "x#1": (1, 4, 4)}, "fill 7 of its 8"),  # short: never uninitialized memory
        (_spec(parts=("x#0", "x#0")), {}, "twice"),
        (_spec(dim=3), {}, "bad shape"),
        (_spec(dtype="complex64"), {}, "bad dtype|bad shape"),
        (_spec(shape=(1, -8, 4)), {}, "bad shape"),
        (_spec(parts=[f"x#{k}" for k in range(MAX_STREAM_PARTS + 1)], shape=(1, 99, 4)), {}, "more than"),
        ({"x": {"dim": 1, "parts": "x#0"}}, {}, "parts"),
        ([], {}, "'slabs' must map"),
    ],
)
def test_assembler_refuses_slabs_that_do_not_match(spec, slabs, why):
    with pytest.raises(RemoteProtocolError, match=why):
        _assemble(spec, {n: torch.zeros(s) for n, s in slabs.items()})


# ---------------------------------------------------------------------------- chunk frames on the wire


def _streamed_frames(codec_name: str = "lossless") -> tuple[list[protocol.Message], list[bytes]]:
    x = torch.randn(1, 400, 64).to(torch.bfloat16)
    cut = streaming.plan({"x": x}, SLAB)["x"]
    msgs: list[protocol.Message] = [
        Forward(seq=7, arch="toy", n_blocks=3, slabs={"x": cut.spec()}, reply_slab_bytes=SLAB)
    ]
    for k, (name, slab) in enumerate(cut.slabs(x)):
        msgs.append(ForwardChunk(seq=7, part=k, tensors=(codec.encode(slab, name, codec_name),)))
    return msgs, [protocol.encode_bytes(m) for m in msgs]


def _same(a: protocol.Message, b: protocol.Message) -> None:
    assert type(a) is type(b) and a.KIND == b.KIND
    assert {k: v for k, v in a.__dict__.items() if k != "tensors"} == {
        k: v for k, v in b.__dict__.items() if k != "tensors"
    }
    assert [(t.name, t.shape, t.meta, bytes(t.data)) for t in a.tensors] == [
        (t.name, t.shape, t.meta, bytes(t.data)) for t in b.tensors
    ]


def test_chunk_frames_fed_whole_and_byte_by_byte():
    msgs, frames = _streamed_frames()
    assert len(msgs) >= 4 and msgs[1].KIND == MsgKind.FORWARD_CHUNK
    stream = b"".join(frames)
    dec = FrameDecoder()
    dec.feed(stream)
    got = []
    while (m := dec.next_message()) is not NEED_DATA:
        got.append(m)
    assert len(got) == len(msgs) and dec.buffered == 0
    for g, m in zip(got, msgs, strict=True):
        _same(g, m)
    dec, got = FrameDecoder(), []
    for i in range(len(stream)):
        dec.feed(stream[i : i + 1])
        while (m := dec.next_message()) is not NEED_DATA:
            got.append(m)
    for g, m in zip(got, msgs, strict=True):
        _same(g, m)
    assert len(got) == len(msgs)


def test_chunk_frames_cut_anywhere_yield_only_whole_frames_then_the_rest():
    msgs, frames = _streamed_frames("raw")
    stream = b"".join(frames)
    ends = [sum(len(f) for f in frames[: i + 1]) for i in range(len(frames))]
    # every frame boundary, a few bytes around each, and a spread of other positions
    cuts = sorted(
        {c for e in [0, *ends] for c in range(e - 3, e + PREFIX_SIZE + 3) if 0 < c < len(stream)}
        | set(range(1, len(stream), 977))
    )
    for cut in cuts:
        dec = FrameDecoder()
        dec.feed(stream[:cut])
        got = []
        while (m := dec.next_message()) is not NEED_DATA:
            got.append(m)
        assert len(got) == sum(1 for e in ends if e <= cut), cut
        assert dec.bytes_needed() >= 1
        dec.feed(stream[cut:])
        while (m := dec.next_message()) is not NEED_DATA:
            got.append(m)
        assert len(got) == len(msgs), cut
    # a chunk whose bytes were corrupted is a clean protocol error, never a wrong slab
    bad = bytearray(frames[1])
    bad[-1] ^= 0xFF
    with pytest.raises(RemoteProtocolError, match="checksum"):
        protocol.decode_all(bytes(bad))


# ---------------------------------------------------------------------------- loopback toy server


@pytest.fixture
def server():
    cfg = ServerConfig(port=0, device="cpu", n_blocks=3)
    st = ServerState(cfg, lambda n: ToyBackend(n), token=TOKEN)
    srv = DaedalusServer(st)
    host, port = srv.start()
    yield srv, host, port
    srv.shutdown()


def _client(host, port, slab=SLAB):
    # Over TCP: a same-host session does not stream (its payloads bypass the socket; test_samehost_never_streams).
    cfg = ClientConfig(
        host=host,
        port=port,
        token=TOKEN,
        stream_slab_bytes=slab,
        stream_min_bytes=0,
        stream_plan="fixed",
        samehost=False,
    )
    return MeshClient(cfg, expect={"arch": "toy", "n_blocks": 3})


def _steps(n=4, tokens=300):
    g = torch.Generator().manual_seed(0)
    model = ToyModel()
    bias = torch.randn(64, generator=g)
    x = torch.randn(2, tokens, 64, generator=g)
    out = []
    for _ in range(n):
        out.append(model.run(x, bias, 0, 5))
        x = x + 0.05 * torch.randn(x.shape, generator=g)
    return model, bias, out


def _call(c, front, bias, codec_name, stream_keys=None):
    return toy_forward(c, front, bias, codec_name, stream=stream_keys)


def _count_kinds(monkeypatch):
    """Frames the client sends and receives, by kind."""
    import comfyui_mesh.transport as tr

    sent: list[MsgKind] = []
    got: list[MsgKind] = []
    real_send, real_recv = tr.send_message, tr.recv_message

    def send(sock, msg, link=None):
        sent.append(msg.KIND)
        return real_send(sock, msg, link)

    def recv(sock, dec, deadline=None, link=None):
        msg, n = real_recv(sock, dec, deadline, link)
        got.append(msg.KIND)
        return msg, n

    monkeypatch.setattr(tr, "send_message", send)
    monkeypatch.setattr(tr, "recv_message", recv)
    return sent, got


@pytest.mark.parametrize("codec_name", ["raw", "lossless", "quant", "lossless-t", "quant-t"])
def test_streamed_calls_match_unstreamed(server, monkeypatch, codec_name):
    srv, host, port = server
    model, bias, fronts = _steps()
    plain, streamed = _client(host, port, slab=0), _client(host, port)
    sent, got = _count_kinds(monkeypatch)
    keys = {"gen": "g1"} if codec_name.endswith("-t") else None
    try:
        for step, front in enumerate(fronts):
            want, _ = _call(plain, front, bias, codec_name, keys)
            sent.clear(), got.clear()
            out, stats = _call(streamed, front, bias, codec_name, keys)
            n = streaming.plan({"x": front}, SLAB)["x"].parts
            n_reply = streaming.plan({"out": front}, MIN_STREAM_SLAB_BYTES)["out"].parts  # the server's floor
            assert n > n_reply > 1
            calls = [k for k in sent if k in (MsgKind.FORWARD, MsgKind.FORWARD_CHUNK)]  # not the handshake
            assert calls == [MsgKind.FORWARD] + [MsgKind.FORWARD_CHUNK] * n, "one FORWARD, then its chunks"
            assert got[-n_reply - 1 :] == [MsgKind.RESULT] + [MsgKind.RESULT_CHUNK] * n_reply, "a streamed reply"
            assert out["out"].shape == want["out"].shape and stats.bytes_out > 0
            exact = model.run(front, bias, 5)
            if codec_name in ("raw", "lossless", "lossless-t"):
                assert torch.equal(out["out"], want["out"]), (codec_name, step)
                assert torch.equal(out["out"], exact), (codec_name, step)
            else:  # each slab is coded on its own: within the codec's fidelity of the exact result
                rel = float((out["out"] - exact).norm() / exact.norm())
                assert rel < 0.05, (codec_name, step, rel)
            if codec_name == "quant":  # and exactly what decoding the same slabs gives
                cut = streaming.plan({"x": front}, SLAB)["x"]
                dec = [codec.decode(codec.encode(s, n, "quant")) for n, s in cut.slabs(front)]
                assert torch.equal(out["out"], model.run(torch.cat(dec, 1), bias, 5))
    finally:
        plain.close()
        streamed.close()


def test_small_calls_stay_one_frame(server, monkeypatch):
    _, host, port = server
    model, bias, fronts = _steps(1, tokens=8)
    c = _client(host, port)
    sent, got = _count_kinds(monkeypatch)
    try:
        out, _ = _call(c, fronts[0], bias, "raw")
        assert (
            [k for k in sent if k >= MsgKind.FORWARD] == [MsgKind.FORWARD]
            and got[-1:] == [MsgKind.RESULT]
            and MsgKind.RESULT_CHUNK not in got
        )
        assert torch.equal(out["out"], model.run(fronts[0], bias, 5))
    finally:
        c.close()


def test_missing_constants_resend_the_same_temporal_slabs_without_a_reset(server):
    _, host, port = server
    model, bias, fronts = _steps(3)
    c = _client(host, port)
    try:
        _call(c, fronts[0], bias, "quant-t", {"gen": "g"})
        bias2 = bias + 1
        c._sent_consts.add(c._hashed(bias2)[0])  # the client believes the server holds it: missing_consts
        seq = c._seq
        out, stats = _call(c, fronts[1], bias2, "quant-t", {"gen": "g"})
        assert c._seq - seq == 2, "one retry (constants), no stream reset: nothing was decoded the first time"
        exact = model.run(fronts[1], bias2, 5)
        assert float((out["out"] - exact).norm() / exact.norm()) < 0.05 and stats.consts_sent == 1
    finally:
        c.close()


def _raw_session(host, port):
    """A hand-driven authenticated socket (to break the stream on purpose); frames go through
    ``_send`` / ``_recv`` below, sealed with the connection's keys."""
    c = _client(host, port)
    c.connect()
    return c, c._sock


def _send(c, msg):
    return send_message(c._sock, msg, c._link)


def _recv(c, dec):
    return recv_message(c._sock, dec, None, c._link)


def _chunks(front, seq=1):
    cut = streaming.plan({"x": front}, SLAB)["x"]
    chunks = [
        ForwardChunk(seq=seq, part=k, tensors=(codec.encode(s, n, "raw"),)) for k, (n, s) in enumerate(cut.slabs(front))
    ]
    return cut, chunks


def _forward_msg(c, cut, bias, seq=1):
    h, wt = c._hashed(bias)
    return Forward(
        seq=seq,
        arch="toy",
        n_blocks=3,
        consts={"bias": h},
        slabs={"x": cut.spec()},
        tensors=(dataclasses.replace(wt, name="const:" + h),),
    )


def test_a_connection_cut_mid_stream_frees_its_request_and_the_next_call_works(server):
    srv, host, port = server
    model, bias, fronts = _steps(1)
    c, sock = _raw_session(host, port)
    cut, chunks = _chunks(fronts[0])
    _send(c, _forward_msg(c, cut, bias))
    _send(c, chunks[0])
    sock.shutdown(socket.SHUT_RDWR)  # gone mid-stream
    c.close()
    c2 = _client(host, port)
    try:
        out, _ = _call(c2, fronts[0], bias, "raw")
        assert torch.equal(out["out"], model.run(fronts[0], bias, 5))
    finally:
        c2.close()
    deadline = time.monotonic() + 10
    while srv.state.budgets.inflight.used and time.monotonic() < deadline:
        time.sleep(0.05)
    assert srv.state.budgets.inflight.used == 0, "the partial request's slabs went back to the budget"


@pytest.mark.parametrize("fault", ["other_seq", "skip_part", "unnamed_slab", "ping_mid_stream", "chunk_first"])
def test_a_broken_chunk_sequence_is_a_clean_error_and_closes(server, fault):
    _, host, port = server
    model, bias, fronts = _steps(1)
    c, sock = _raw_session(host, port)
    cut, chunks = _chunks(fronts[0])
    frames: list[protocol.Message] = [_forward_msg(c, cut, bias), chunks[0]]
    if fault == "other_seq":
        frames.append(ForwardChunk(seq=2, part=1, tensors=chunks[1].tensors))
    elif fault == "skip_part":
        frames.append(chunks[2])
    elif fault == "unnamed_slab":
        wt = chunks[1].tensors[0]
        frames.append(ForwardChunk(seq=1, part=1, tensors=(dataclasses.replace(wt, name="y#0"),)))
    elif fault == "ping_mid_stream":
        frames.append(protocol.Ping(seq=5))
    else:
        frames = [chunks[0]]
    for f in frames:
        _send(c, f)
    dec = FrameDecoder()
    reply, _ = _recv(c, dec)
    assert isinstance(reply, protocol.Error) and reply.code == "bad_request" and "broken stream" in reply.message
    with pytest.raises((ConnectionError, OSError)):
        _recv(c, dec)  # the server closed the connection
    c._sock = None
    c2 = _client(host, port)
    try:
        out, _ = _call(c2, fronts[0], bias, "raw")
        assert torch.equal(out["out"], model.run(fronts[0], bias, 5))
    finally:
        c2.close()


def test_a_refused_streamed_request_is_answered_once_and_its_chunks_dropped(server):
    _, host, port = server
    model, bias, fronts = _steps(1)
    c, sock = _raw_session(host, port)
    cut, chunks = _chunks(fronts[0])
    bad = Forward(seq=1, arch="toy", n_blocks=2, slabs={"x": cut.spec()})  # config_mismatch
    for f in [bad, *chunks, protocol.Ping(seq=9)]:
        _send(c, f)
    dec = FrameDecoder()
    err, _ = _recv(c, dec)
    assert isinstance(err, protocol.Error) and err.code == "config_mismatch"
    pong, _ = _recv(c, dec)
    assert isinstance(pong, protocol.Pong) and pong.seq == 9, "the chunks were dropped; the connection is in step"
    c.close()


def test_too_many_slabs_are_refused_before_anything_is_decoded(server):
    _, host, port = server
    c, sock = _raw_session(host, port)
    names = [f"x#{k}" for k in range(MAX_STREAM_PARTS + 1)]
    _send(c, Forward(seq=1, arch="toy", n_blocks=3, slabs={"x": {"dim": 1, "parts": names}}))
    reply, _ = _recv(c, FrameDecoder())
    assert isinstance(reply, protocol.Error) and reply.code == "bad_request" and "more than" in reply.message
    c.close()


def test_a_server_gone_mid_stream_is_connect_failed_and_the_client_recovers(server, monkeypatch):
    srv, host, port = server
    model, bias, fronts = _steps(1)
    c = _client(host, port)
    try:
        c.connect()
        real = c._send_streamed
        calls = {"n": 0}

        def once_broken(sock, msg, upload):
            calls["n"] += 1
            if calls["n"] == 1:
                sock.shutdown(socket.SHUT_RDWR)  # the link drops under the stream
            return real(sock, msg, upload)

        monkeypatch.setattr(c, "_send_streamed", once_broken)
        out, _ = _call(c, fronts[0], bias, "raw")  # reconnects once, as any dropped call
        assert calls["n"] == 2 and torch.equal(out["out"], model.run(fronts[0], bias, 5))
        monkeypatch.setattr(
            c, "_send_streamed", lambda sock, msg, upload: (sock.shutdown(socket.SHUT_RDWR), real(sock, msg, upload))[1]
        )
        # every send breaks: the call gives up when its retry budget is spent (2 s here, not the default 60)
        c.cfg = dataclasses.replace(c.cfg, retry_backoff_s=0.1, retry_backoff_max_s=0.5, retry_budget_s=2.0)
        t0 = time.monotonic()
        with pytest.raises((ConnectFailed, RemoteFailure)):
            _call(c, fronts[0], bias, "raw")
        assert time.monotonic() - t0 < 30
    finally:
        c.close()


@pytest.mark.parametrize(
    ("limit", "code"),
    [({"max_decoded_request_bytes": 100_000}, "bad_request"), ({"max_inflight_bytes": 100_000}, "busy")],
)
def test_a_streamed_request_over_the_limits_is_refused_before_allocating_and_the_connection_stays_in_step(limit, code):
    cfg = ServerConfig(port=0, device="cpu", n_blocks=3, **limit)
    srv = DaedalusServer(ServerState(cfg, lambda n: ToyBackend(n), token=TOKEN))
    host, port = srv.start()
    model, bias, fronts = _steps(1)  # x: 153.6 kB decoded, more than the limit
    c = _client(host, port)
    try:
        with pytest.raises(RemoteFailure) as e:
            _call(c, fronts[0], bias, "raw")
        assert e.value.code == code
        assert c.connected, "an error frame, not a broken connection: the chunks were read and dropped"
        small = fronts[0][:, :100]  # 51 kB: within the limits, still streamed in slabs
        out, stats = _call(c, small, bias, "raw")
        assert torch.equal(out["out"], model.run(small, bias, 5)) and stats.slabs_out >= 2
        assert srv.state.budgets.inflight.used < 100_000
    finally:
        c.close()
        srv.shutdown()


# ---------------------------------------------------------------------------- with the other v3 features


class _SlowToy(ToyBackend):
    def __init__(self, n_blocks: int, sleep_s: float):
        super().__init__(n_blocks)
        self.sleep_s = sleep_s

    def forward(self, tensors, scalars):
        time.sleep(self.sleep_s)
        return super().forward(tensors, scalars)


def test_a_streamed_call_is_sealed_and_heartbeats_keep_it_alive_but_never_split_its_reply(monkeypatch):
    """A 2 s step, a client that gives a silent server up after 1 s: PROGRESS frames (sealed like the
    chunks) keep the streamed call waiting on its first connection; none comes between the RESULT and
    its RESULT_CHUNK frames."""
    cfg = ServerConfig(port=0, device="cpu", n_blocks=3, heartbeat_interval_s=0.2)
    srv = DaedalusServer(ServerState(cfg, lambda n: _SlowToy(n, 2.0), token=TOKEN))
    host, port = srv.start()
    model, bias, fronts = _steps(1)
    c = MeshClient(
        ClientConfig(
            host=host, port=port, token=TOKEN, stream_slab_bytes=SLAB, stream_min_bytes=0, stream_plan="fixed", samehost=False,
            liveness_timeout_s=1.0,
        ),
        expect={"arch": "toy", "n_blocks": 3},
    )  # fmt: skip
    try:
        c.connect()
        assert c._link is not None, "frames after the handshake are sealed"
        seen: list[protocol.Message] = []
        real = c._recv

        def spy(sock, link=None):
            msg, n = real(sock, link)
            seen.append(msg)
            return msg, n

        monkeypatch.setattr(c, "_recv", spy)
        statuses: list = []
        out, stats = c.forward(
            arch="toy", n_blocks=3, coded={"x": fronts[0]}, exact={}, consts={"bias": bias}, scalars={},
            on_status=lambda level, text: statuses.append((level, text)),
        )  # fmt: skip
        assert torch.equal(out["out"], model.run(fronts[0], bias, 5))
        assert not statuses and srv.state.stats.steps == 1, "no reconnect, one step"
        assert stats.slabs_out > 1 and stats.slabs_in > 1
        beats = [m for m in seen if isinstance(m, protocol.Progress)]
        assert len(beats) >= 3 and {b.phase for b in beats} >= {"forward"}
        first = next(k for k, m in enumerate(seen) if isinstance(m, protocol.Result))
        assert all(isinstance(m, protocol.ResultChunk) for m in seen[first + 1 :])
        assert len(seen) - first - 1 == stats.slabs_in
    finally:
        c.close()
        srv.shutdown()


@pytest.mark.skipif(not __import__("os").path.isdir("/dev/shm"), reason="needs POSIX shared memory")
def test_a_same_host_session_never_streams(server, monkeypatch):
    """On the same-host fast path the big tensors bypass the socket: one FORWARD, one RESULT, however
    small the slab size, and the same exact results."""
    _, host, port = server
    model, bias, fronts = _steps(1)
    cfg = ClientConfig(
        host=host, port=port, token=TOKEN, stream_slab_bytes=SLAB, stream_min_bytes=0, stream_plan="fixed"
    )
    c = MeshClient(cfg, expect={"arch": "toy", "n_blocks": 3})
    sent, got = _count_kinds(monkeypatch)
    try:
        for codec_name in ("raw", "lossless"):
            sent.clear(), got.clear()
            out, stats = _call(c, fronts[0], bias, codec_name)
            assert stats.via == "samehost", "the fast path was proved"
            assert torch.equal(out["out"], model.run(fronts[0], bias, 5)), codec_name
            assert MsgKind.FORWARD_CHUNK not in sent and MsgKind.RESULT_CHUNK not in got
            assert stats.slabs_out == stats.slabs_in == 0
    finally:
        c.close()


# ---------------------------------------------------------------------------- how many slabs (stream_plan "auto")

MB = 1e6
GPU_CODER = streaming.Affine(6.0, 0.1)  # an entropy coder on a GPU: ~6 ms a call whatever the size
GPU_DECODER = streaming.Affine(2.5, 0.06)
PER_BYTE = streaming.Affine(0.05, 2.0)  # a CPU coder: the bytes cost, the call hardly


def test_pipeline_time_of_one_slab_is_the_sum_of_the_stages():
    t = streaming.pipeline_ms(40 * MB, 10 * MB, 100 * MB, GPU_CODER, GPU_DECODER, 1, side_ms_per_mb=0.0, slab_ms=0.0)
    assert t == pytest.approx(6.0 + 4.0 + 100.0 + 2.5 + 2.4)
    # two slabs: the first passes every stage, then the slowest stage (the wire, 50 ms) sets the pace
    t2 = streaming.pipeline_ms(40 * MB, 10 * MB, 100 * MB, GPU_CODER, GPU_DECODER, 2, side_ms_per_mb=0.0, slab_ms=0.0)
    assert t2 == pytest.approx((6.0 + 2.0) + 50.0 + (2.5 + 1.2) + 50.0)
    # each side's cost per MB on the wire (sealing, copies) joins its stage
    t3 = streaming.pipeline_ms(40 * MB, 10 * MB, 100 * MB, GPU_CODER, GPU_DECODER, 1, side_ms_per_mb=0.5, slab_ms=0.0)
    assert t3 == pytest.approx(t + 2 * 5.0)
    # and each slab's own cost (a frame, a record) on both sides: dearer the more slabs
    t4 = streaming.pipeline_ms(40 * MB, 10 * MB, 100 * MB, GPU_CODER, GPU_DECODER, 2, side_ms_per_mb=0.0, slab_ms=1.5)
    assert t4 == pytest.approx(t2 + 2 * 1.5)  # the wire still sets the pace of the second slab


def test_costs_per_byte_on_a_slow_link_stream_in_many_slabs():
    k = streaming.best_parts(40 * MB, 40 * MB, 117 * MB, PER_BYTE, PER_BYTE, 9)
    assert k >= 7  # of near-equal counts (within 2 %) the fewer slabs
    assert streaming.best_parts(40 * MB, 40 * MB, 117 * MB, PER_BYTE, PER_BYTE, 3) == 3


def test_a_per_call_coder_on_a_fast_link_sends_one_frame():
    # loopback-like 3 GB/s: ~3 ms of wire cannot hide one 6 ms coding call per slab
    assert streaming.best_parts(40 * MB, 8 * MB, 3e9, GPU_CODER, GPU_DECODER, 9) == 1


def test_a_per_call_coder_on_a_slower_link_streams_a_few_slabs_only():
    k = streaming.best_parts(40 * MB, 8 * MB, 290 * MB, GPU_CODER, GPU_DECODER, 9)  # 2.5 GbE: 27 ms of wire
    assert 1 < k < 9
    t = {j: streaming.pipeline_ms(40 * MB, 8 * MB, 290 * MB, GPU_CODER, GPU_DECODER, j) for j in range(1, 10)}
    assert t[k] <= min(t.values()) * 1.02 and t[9] > t[k] * 1.2  # nine coding calls would cost more than the wire


def test_the_previous_count_is_kept_unless_another_is_clearly_faster():
    args = (40 * MB, 8 * MB, 117 * MB, GPU_CODER, GPU_DECODER, 9)  # 1 GbE: counts from 6 up are near-equal
    best = streaming.best_parts(*args)
    t = {k: streaming.pipeline_ms(*args[:5], k) for k in range(1, 10)}
    slack = t[best] * streaming.KEEP_FRACTION + streaming.KEEP_MS
    kept = [k for k in t if k != best and t[k] <= t[best] + slack]
    dropped = [k for k in t if t[k] > t[best] + slack]
    assert kept and dropped
    for k in kept:  # a temporal codec keeps its slabs (and their references)
        assert streaming.best_parts(*args, current=k) == k
    for k in dropped:  # far slower: re-planned
        assert streaming.best_parts(*args, current=k) == best


def test_cost_model_splits_per_call_and_per_mb_from_two_sizes_and_ignores_a_warm_up():
    m = streaming.CostModel(streaming.Affine(0.0, 0.1))
    assert m.cost == streaming.Affine(0.0, 0.1)  # nothing seen: the prior
    m.observe(4 * MB, 500.0)  # a first call: kernels loaded, buffers allocated
    for _ in range(6):
        m.observe(4 * MB, 6.4)  # 6 ms a call + 0.1 ms/MB
        m.observe(16 * MB, 7.6)
    c = m.cost
    assert c.per_call_ms == pytest.approx(6.0, abs=0.01) and c.per_mb_ms == pytest.approx(0.1, abs=0.01)
    one = streaming.CostModel(streaming.Affine(1.0, 0.5))
    for _ in range(3):
        one.observe(4 * MB, 9.0)  # one size only: the prior (3 ms here) scaled, 3x slower
    assert one.cost.per_call_ms == pytest.approx(3.0) and one.cost.per_mb_ms == pytest.approx(1.5)
    for _ in range(streaming.CostModel.WINDOW):
        one.observe(4 * MB, 3.0)  # the window forgets
    assert one.cost.ms(4 * MB) == pytest.approx(3.0)


def test_cost_tracker_plans_from_what_it_learnt():
    tr = streaming.CostTracker(streaming.Affine(0.0, 0.1), streaming.Affine(0.0, 0.1), 1.0)
    assert tr.parts_for(40 * MB, 3e9, 9) >= 3  # guessed cheap per call: several slabs
    for _ in range(4):  # measured: 6 ms a call to code, 2.5 to decode, whatever the size
        tr.coded(4 * MB, 6.4), tr.coded(16 * MB, 7.6)
        tr.decoded(4 * MB, 2.74), tr.decoded(16 * MB, 3.46)
    tr.sent(40 * MB, 8 * MB)
    assert tr.ratio == pytest.approx(0.2)
    tr.parts = 0  # (a first plan: no count to keep)
    assert tr.parts_for(40 * MB, 3e9, 9) == 1  # now one frame is faster


def test_auto_plan_streams_when_slabs_are_cheap_and_sends_one_frame_when_calls_are_dear(server):
    _, host, port = server
    _, bias, fronts = _steps(n=1)
    cfg = ClientConfig(host=host, port=port, token=TOKEN, stream_slab_bytes=SLAB, stream_min_bytes=0, samehost=False)
    c = MeshClient(cfg, expect={"arch": "toy", "n_blocks": 3})
    try:
        _, stats = _call(c, fronts[0], bias, "lossless")  # connect, measure the link; then set the costs
        tr = c._slab_costs["lossless"]
        tr.enc, tr.dec = (
            streaming.CostModel(streaming.Affine(0.0, 1e3)),
            streaming.CostModel(streaming.Affine(0.0, 1e3)),
        )
        tr.parts = 0  # 1 s per MB: many slabs
        _, stats = _call(c, fronts[0], bias, "lossless")
        most = min(MAX_STREAM_PARTS, fronts[0].numel() * 4 // SLAB)
        assert most * 0.8 <= stats.slabs_out <= most and most > 4
        tr.enc, tr.dec = (
            streaming.CostModel(streaming.Affine(1e4, 0.0)),
            streaming.CostModel(streaming.Affine(1e4, 0.0)),
        )
        tr.parts = 0  # 10 s per call: one frame
        _, stats = _call(c, fronts[0], bias, "lossless")
        assert stats.slabs_out == 0 and stats.bytes_out > 0
        assert tr.enc.cost.per_call_ms < 1e4  # learnt from the call just made
    finally:
        c.close()


# ---------------------------------------------------------------------------- the link probe


def test_probe_rate_takes_the_slope_between_two_sizes():
    from comfyui_mesh.wirecodecs.auto import probe_rate

    rate, frame_ms, rtt = 1.25e9, 6.0, 0.1  # 10 GbE, 6 ms a frame whatever its size

    def took(n):
        return rtt + frame_ms + n / rate * 1e3

    small, big = (2 * MB, took(2 * MB)), (50 * MB, took(50 * MB))
    assert probe_rate(small, None, rtt) < 0.3 * rate  # the frame's cost read as wire
    assert probe_rate(small, big, rtt) == pytest.approx(rate, rel=1e-6)
    # two noisy times close together: at most twice the big probe's own rate, never infinite
    own = 50 * MB / (small[1] - rtt) * 1e3
    assert probe_rate(small, (50 * MB, small[1]), rtt) == pytest.approx(2 * own)
    # a big probe slower than the slope says (noise the other way): not below its own rate
    assert probe_rate(small, (50 * MB, 1e4), rtt) == pytest.approx(50 * MB / (1e4 - rtt) * 1e3)


def test_link_info_probes_a_fast_link_twice_and_a_slow_one_once(monkeypatch):
    from comfyui_mesh import transport
    from comfyui_mesh.constants import LINK_PROBE_BIG_MS, LINK_PROBE_BYTES

    def fake_link(rate, frame_ms=6.0, rtt=0.2):
        c = MeshClient(ClientConfig(host="192.0.2.7", port=9), expect={})
        sizes = {"up": [], "down": []}

        def took(n):
            return rtt + (frame_ms + n / rate * 1e3 if n else 0.0)

        def ping(n=0):
            if n:
                sizes["down"].append(n)
            return took(n), n

        def up(n):
            sizes["up"].append(n)
            return took(n)

        monkeypatch.setattr(c, "ping", ping)
        monkeypatch.setattr(c, "_probe_up", up)
        return c, sizes

    transport._LINKS.clear()
    try:
        c, sizes = fake_link(1.25e9)
        li = c.link_info()
        assert li.up_bps == pytest.approx(1.25e9, rel=1e-3) and li.down_bps == pytest.approx(1.25e9, rel=1e-3)
        for way in ("up", "down"):  # two small probes, then two of the size the first rate says takes ~40 ms
            assert sizes[way][:2] == [LINK_PROBE_BYTES] * 2 and len(sizes[way]) == 4
            assert LINK_PROBE_BYTES < sizes[way][2] == sizes[way][3]
            assert sizes[way][2] / li.up_bps * 1e3 < LINK_PROBE_BIG_MS
        transport._LINKS.clear()
        c, sizes = fake_link(1.25e9)
        first = c._probe_up
        stalls = iter([120.0])  # the connection's first big frame stalls (buffers grown, pages faulted)
        monkeypatch.setattr(c, "_probe_up", lambda n: next(stalls, None) or first(n))
        assert c.link_info().up_bps == pytest.approx(1.25e9, rel=1e-3)  # the second small probe counts
        transport._LINKS.clear()
        c, sizes = fake_link(12.5e6, frame_ms=0.5)  # 100 Mbit/s: one size each way is enough
        li = c.link_info()
        assert sizes == {"up": [LINK_PROBE_BYTES] * 2, "down": [LINK_PROBE_BYTES] * 2}
        assert li.up_bps == pytest.approx(12.5e6, rel=0.05)
    finally:
        transport._LINKS.clear()
