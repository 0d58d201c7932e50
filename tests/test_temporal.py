"""Temporal codecs (ids 6, 7): closed-loop residuals over sampler steps, keyframes, state loss and
recovery, stream state; plus the transport plumbing (stream_reset, codec_unavailable, auto)."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import threading
import time

import pytest
import torch
from comfyui_mesh import codec, errors
from comfyui_mesh.config import ClientConfig, ServerConfig
from comfyui_mesh.protocol import EndStream, Error, Forward, StreamEnded, WireTensor
from comfyui_mesh.server import core
from comfyui_mesh.server.core import DaedalusServer, ServerState
from comfyui_mesh.server.toy import ToyBackend, ToyModel
from comfyui_mesh.transport import MeshClient
from comfyui_mesh.wirecodecs import backends
from comfyui_mesh.wirecodecs.fidelity import channel_snr_db, snr_from_cosine
from comfyui_mesh.wirecodecs.temporal import MAX_KEY_CHARS, MAX_STREAMS, end_stream, state_bytes, stream_state

TOKEN = "0123456789abcdef0123456789abcdef"
DEV = os.environ.get("COMFYUI_MESH_TEST_DEVICE", "cpu")  # cuda: the codec tests run on the GPU
BITS = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16}


def wire_copy(wt):
    return dataclasses.replace(wt, data=bytes(wt.data), meta=json.loads(json.dumps(wt.meta)))


def sequence(steps, shape=(1, 64, 48), r=0.2, dtype=torch.bfloat16, seed=0, device=DEV):
    """Correlated steps: AR(1) with relative residual ~r around per-channel means and scales."""
    g = torch.Generator().manual_seed(seed)
    c = shape[-1]
    sig = torch.exp(torch.randn(c, generator=g))
    mu = torch.randn(c, generator=g) * sig
    rho = 1 - r * r / 2
    z = torch.randn(shape, generator=g)
    out = []
    for _ in range(steps):
        out.append((mu + sig * z).to(dtype).to(device))
        z = rho * z + math.sqrt(1 - rho * rho) * torch.randn(shape, generator=g)
    return out


def slack(dtype, x, y):
    mag = torch.maximum(x.double().abs(), y.double().abs())
    return {torch.bfloat16: mag * 2**-8, torch.float16: mag * 2**-11 + 2**-24}.get(dtype, mag * 2**-23)


def exact(a, b):
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.view(BITS[a.dtype]), b.view(BITS[b.dtype]))


# ---------------------------------------------------------------------------- stream state


def test_stream_state_keys_generations_and_lru():
    conn: dict = {}
    a = stream_state(conn, {"cond_or_uncond": [0, 1]})
    a["k"] = 1
    assert stream_state(conn, {"cond_or_uncond": [0, 1]}) is a
    b = stream_state(conn, {"cond_or_uncond": [1]})
    assert b is not a and b == {}
    assert stream_state(conn, None) is not a
    a2 = stream_state(conn, {"cond_or_uncond": [0, 1], "gen": 7})  # a new generation drops everything
    assert a2 == {} and a2 is not a
    assert stream_state(conn, {"gen": 7, "cond_or_uncond": [0, 1]}) is a2
    for i in range(MAX_STREAMS + 3):
        stream_state(conn, {"gen": 7, "row": i})
    assert len(conn["_streams"]) == MAX_STREAMS
    with pytest.raises(errors.LocalError, match="limit"):
        stream_state(conn, {"k": "x" * 1000})
    with pytest.raises(errors.RemoteProtocolError):
        stream_state(conn, {"k": float("nan")}, errors.RemoteProtocolError)


# ---------------------------------------------------------------------------- lossless-t


def test_end_stream_drops_only_its_generation():
    conn: dict = {}
    sub = stream_state(conn, {"gen": "a", "cond": [0]})
    sub[("dec", 7, "x")] = {"g": 1, "i": 0, "ref": torch.zeros(4, 8), "shape": (4, 8), "dtype": torch.float32}
    stream_state(conn, {"gen": "a", "cond": [1]})[("dec", 7, "x")] = {"ref": torch.zeros(2, dtype=torch.bfloat16)}
    assert state_bytes(conn) == 4 * 8 * 4 + 2 * 2
    assert not end_stream(conn, "b") and state_bytes(conn) == 132  # another generation's: kept
    assert end_stream(conn, "a") and conn == {} and state_bytes(conn) == 0
    assert not end_stream(conn)  # nothing held
    stream_state(conn, {"gen": 3})
    assert end_stream(conn) and conn == {}  # None: whatever it holds
    with pytest.raises(errors.LocalError, match="at most 512"):
        end_stream(conn, "x" * (MAX_KEY_CHARS + 1))
    with pytest.raises(ValueError):
        end_stream(conn, 5, ValueError)  # type: ignore[arg-type]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
def test_lossless_t_is_exact_over_100_steps(dtype):
    seq = sequence(100, dtype=dtype, r=0.05)
    seq[40].view(-1)[:3] = torch.tensor([float("nan"), float("inf"), -0.0], dtype=dtype)
    enc, dec = {}, {}
    frames = []
    for x in seq:
        wt = codec.encode(x, "x", "lossless-t", {"keyint": 32}, state=enc)
        frames.append(wt.meta["f"])
        y = codec.decode(wire_copy(wt), DEV, state=dec)
        assert exact(y, x)
    assert frames[0] == "i" and frames.count("p") > 80
    assert [i for i, f in enumerate(frames) if f == "i"][:4] == [0, 32, 64, 96]
    p = codec.encode(seq[-1] + 0, "x", "lossless-t", {}, state=enc)
    intra = codec.encode(seq[-1], "x", "lossless", {})
    assert p.meta["f"] == "p" and p.nbytes < intra.nbytes


def test_lossless_t_picks_a_keyframe_when_the_difference_is_not_cheaper():
    g = torch.Generator().manual_seed(3)
    enc = {}
    codec.encode(torch.randn(64, 32, generator=g).to(torch.bfloat16), "x", "lossless-t", {}, state=enc)
    wt = codec.encode(torch.randn(64, 32, generator=g).to(torch.bfloat16) * 1e6, "x", "lossless-t", {}, state=enc)
    assert wt.meta["f"] == "i"


# ---------------------------------------------------------------------------- quant-t


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_quant_t_error_is_bounded_and_does_not_drift(dtype):
    seq = sequence(100, dtype=dtype, r=0.1)
    enc, dec = {}, {}
    errs, bits = [], []
    for i, x in enumerate(seq):
        wt = codec.encode(x, "x", "quant-t", {"cosine": 0.999, "keyint": 0}, state=enc)
        assert wt.meta["f"] == ("i" if i == 0 else "p")
        y = codec.decode(wire_copy(wt), DEV, state=dec)
        err = (x.double() - y.double()).abs()
        std = x.double().reshape(-1, x.shape[-1]).var(dim=0, correction=0).sqrt()
        assert bool((err <= wt.meta["st"] * std * (1 + 2**-8) / 2 * (1 + 1e-5) + slack(dtype, x, y)).all())
        assert float(channel_snr_db(x, y).min()) >= snr_from_cosine(0.999)  # 26.99 dB on every channel
        # the decoder's reference is what the encoder predicted from: bit for bit
        assert exact(enc[("enc", 7, "x")]["ref"], dec[("dec", 7, "x")]["ref"])
        errs.append(float((x.double() - y.double()).norm() / x.double().norm()))
        bits.append(8 * wt.nbytes / x.numel())
    assert max(errs[90:]) <= 1.2 * errs[0]  # closed loop: step 100 no worse than step 1
    assert sum(bits[1:]) / 99 < 0.75 * bits[0]  # P-frames are cheaper than the keyframe


def test_quant_t_matches_intra_quant_fidelity_with_fewer_bytes():
    seq = sequence(6, shape=(1, 256, 64), r=0.1, seed=4)
    enc, dec = {}, {}
    for x in seq:
        wt = codec.encode(x, "x", "quant-t", {"cosine": 0.995}, state=enc)
        y = codec.decode(wire_copy(wt), DEV, state=dec)
    intra = codec.encode(seq[-1], "x", "quant", {"cosine": 0.995})
    yi = codec.decode(wire_copy(intra), DEV)
    err_t = float((seq[-1].double() - y.double()).norm())
    err_i = float((seq[-1].double() - yi.double()).norm())
    assert err_t <= 1.3 * err_i
    assert wt.nbytes < 0.7 * intra.nbytes


@pytest.mark.parametrize("name", ["quant-t", "lossless-t"])
def test_keyframes_on_shape_dtype_keyint_and_request(name):
    enc = {}
    x = sequence(1, shape=(1, 16, 8))[0]

    def frame(t, **p):
        return codec.encode(t, "x", name, p, state=enc).meta["f"]

    assert [frame(x), frame(x)] == ["i", "p"]
    assert frame(sequence(1, shape=(1, 17, 8))[0]) == "i"  # shape change
    assert frame(sequence(1, shape=(1, 17, 8), dtype=torch.float16)[0]) == "i"  # dtype change
    y = sequence(1, shape=(1, 17, 8), dtype=torch.float16)[0]
    assert [frame(y, keyint=3) for _ in range(4)] == ["p", "p", "i", "p"]  # GOPs of 3: I P P
    assert frame(y, keyframe=True) == "i"
    assert codec.encode(y, "x", name, {}, state=None).meta["f"] == "i"  # no state: always a keyframe


@pytest.mark.parametrize("name", ["quant-t", "lossless-t"])
def test_p_frame_without_matching_state_raises_stream_state_error(name):
    seq = sequence(4)
    enc, dec = {}, {}
    wts = [codec.encode(x, "x", name, {}, state=enc) for x in seq]
    codec.decode(wire_copy(wts[0]), DEV, state=dec)
    with pytest.raises(errors.StreamStateError, match="keyframe"):  # skipped frame 1
        codec.decode(wire_copy(wts[2]), DEV, state=dec)
    assert dec == {}  # the stale reference is dropped
    with pytest.raises(errors.StreamStateError):
        codec.decode(wire_copy(wts[1]), DEV, state=None)
    with pytest.raises(errors.StreamStateError):
        codec.decode(wire_copy(wts[1]), DEV, state={})
    other = {}
    codec.decode(wire_copy(codec.encode(seq[0], "x", name, {}, state={})), DEV, state=other)
    with pytest.raises(errors.StreamStateError):  # same index, another GOP
        codec.decode(wire_copy(wts[1]), DEV, state=other)
    assert isinstance(errors.StreamStateError("x"), errors.CodecError)


@pytest.mark.parametrize("name", ["quant-t", "lossless-t"])
def test_decoder_output_is_not_its_reference(name):
    seq = sequence(3)
    enc, dec = {}, {}
    for x in seq[:2]:
        y = codec.decode(wire_copy(codec.encode(x, "x", name, {}, state=enc)), DEV, state=dec)
    y.mul_(0)  # a model that works in place must not corrupt the next step
    wt = codec.encode(seq[2], "x", name, {}, state=enc)
    y2 = codec.decode(wire_copy(wt), DEV, state=dec)
    assert float((y2.double() - seq[2].double()).norm() / seq[2].double().norm()) < 0.05


@pytest.mark.parametrize("name", ["quant-t", "lossless-t"])
def test_temporal_truncated_p_frame_raises_and_drops_state(name):
    seq = sequence(2)
    enc, dec = {}, {}
    codec.decode(wire_copy(codec.encode(seq[0], "x", name, {}, state=enc)), DEV, state=dec)
    wt = wire_copy(codec.encode(seq[1], "x", name, {}, state=enc))
    with pytest.raises(errors.CodecError):
        codec.decode(dataclasses.replace(wt, data=bytes(wt.data)[:-3]), DEV, state=dec)
    assert dec == {}
    for patch in ({"f": "b"}, {"g": -1}, {"i": "1"}, {"f": "i"}):
        with pytest.raises(errors.CodecError):
            codec.decode(dataclasses.replace(wt, meta={**wt.meta, **patch}), DEV, state={})


# ---------------------------------------------------------------------------- through a real connection


class RecordingSession(core.Session):
    made: list[core.Session] = []

    def __init__(self, *a, **k):
        super().__init__(*a, **k)
        RecordingSession.made.append(self)


@pytest.fixture
def server(monkeypatch):
    RecordingSession.made = []
    monkeypatch.setattr(core, "Session", RecordingSession)
    cfg = ServerConfig(port=0, device="cpu", n_blocks=3)
    srv = DaedalusServer(ServerState(cfg, lambda n: ToyBackend(n), token=TOKEN))
    host, port = srv.start()
    yield srv, host, port
    srv.shutdown()


@pytest.fixture
def sent(monkeypatch):
    """The temporal frames the client encoded, in order (the last one is what went out)."""
    frames: list[WireTensor] = []
    real = codec.staged_encode  # what the client codes with

    def recording(t, name, c="raw", params=None, state=None):
        wt = yield from real(t, name, c, params, state)
        if wt.codec in (6, 7):
            frames.append(wt)
        return wt

    monkeypatch.setattr(codec, "staged_encode", recording)
    return frames


def _client(host, port):
    return MeshClient(ClientConfig(host=host, port=port, token=TOKEN), expect={"arch": "toy", "n_blocks": 3})


def _steps(n, r=0.05):
    g = torch.Generator().manual_seed(0)
    model, bias = ToyModel(), torch.randn(64, generator=g)
    return (
        model,
        bias,
        [model.run(x, bias, 0, 5) for x in sequence(n, shape=(2, 11, 64), r=r, dtype=torch.float32, device="cpu")],
    )


def _fwd(c, front, bias, name, stream=None, params=None):
    return c.forward(
        arch="toy",
        n_blocks=3,
        coded={"x": front},
        exact={},
        consts={"bias": bias},
        scalars={},
        codec_name=name,
        codec_params=params,
        stream=stream,
    )


def test_loopback_lossless_t_is_bit_identical_and_shrinks(server, sent):
    _, host, port = server
    model, bias, fronts = _steps(5, r=0.002)
    # Over TCP: bytes_out counts the socket (the same-host fast path moves the payloads off it).
    c = MeshClient(
        ClientConfig(host=host, port=port, token=TOKEN, samehost=False), expect={"arch": "toy", "n_blocks": 3}
    )
    for i, front in enumerate(fronts):
        out, stats = _fwd(c, front, bias, "lossless-t", {"cond_or_uncond": [0, 1]})
        assert torch.equal(out["out"], model.run(front, bias, 5))
        assert stats.codec["codec"] == "lossless-t"
        assert sent[-1].meta["i"] == i and sent[-1].meta["f"] == ("i" if i == 0 else "p")
    _, intra = _fwd(c, fronts[-1], bias, "lossless")
    assert stats.bytes_out < intra.bytes_out
    c.close()


def test_loopback_state_loss_recovers_with_a_keyframe(server, sent):
    _, host, port = server
    model, bias, fronts = _steps(6)
    c = _client(host, port)
    for front in fronts[:3]:
        _fwd(c, front, bias, "quant-t", params={"cosine": 0.9999})
    (session,) = RecordingSession.made
    session.codec_state.clear()  # the server forgets (eviction, restart of the state)
    out, stats = _fwd(c, fronts[3], bias, "quant-t", params={"cosine": 0.9999})
    rel = float((out["out"] - model.run(fronts[3], bias, 5)).norm() / model.run(fronts[3], bias, 5).norm())
    assert rel < 0.01
    assert sent[-1].meta["f"] == "i"  # the client dropped its state and sent a keyframe
    out, _ = _fwd(c, fronts[4], bias, "quant-t", params={"cosine": 0.9999})
    assert sent[-1].meta["f"] == "p" and sent[-1].meta["i"] == 1  # and the stream goes on
    assert len(RecordingSession.made) == 1  # no reconnect was needed
    c.close()


def test_loopback_reconnect_starts_with_keyframes(server, sent):
    srv, host, port = server
    model, bias, fronts = _steps(4)
    c = _client(host, port)
    for front in fronts[:2]:
        _fwd(c, front, bias, "lossless-t")
    c._sock.close()  # the connection drops under the client
    out, _ = _fwd(c, fronts[2], bias, "lossless-t")
    assert torch.equal(out["out"], model.run(fronts[2], bias, 5))
    assert len(RecordingSession.made) == 2
    assert sent[-1].meta["f"] == "i"
    c.close()


def test_loopback_generation_change_drops_both_sides(server, sent):
    _, host, port = server
    _, bias, fronts = _steps(3)
    c = _client(host, port)
    _fwd(c, fronts[0], bias, "quant-t", {"gen": 1})
    _fwd(c, fronts[1], bias, "quant-t", {"gen": 1})
    (session,) = RecordingSession.made
    assert session.codec_state["_gen"] == 1
    _fwd(c, fronts[2], bias, "quant-t", {"gen": 2})
    assert session.codec_state["_gen"] == 2
    assert sent[-1].meta["f"] == "i"
    _fwd(c, fronts[2], bias, "quant-t", {"gen": 2})
    assert sent[-1].meta["f"] == "p"
    c.end_stream()
    _fwd(c, fronts[2], bias, "quant-t", {"gen": 2})
    assert sent[-1].meta["f"] == "i"  # end_stream dropped the client's references
    c.close()


def _wait_for(cond, timeout=5.0):
    deadline = time.monotonic() + timeout
    while not cond() and time.monotonic() < deadline:
        time.sleep(0.01)
    return cond()


@pytest.mark.parametrize("name", ["quant-t", "lossless-t"])
def test_loopback_end_stream_releases_the_server_state(server, sent, name):
    srv, host, port = server
    stats = srv.state.stats
    model, bias, fronts = _steps(5)
    params = {"cosine": 0.9999} if name == "quant-t" else None
    c = _client(host, port)
    for front in fronts[:3]:
        _fwd(c, front, bias, name, {"gen": "g1", "cond": [0, 1]}, params)
    assert sent[-1].meta["f"] == "p"
    held = stats.codec_state_bytes
    assert held >= fronts[0].numel() * fronts[0].element_size()  # at least one reference per coded tensor
    (session,) = RecordingSession.made
    assert stats.codec_state_bytes == state_bytes(session.codec_state)
    steps, errors_before = stats.steps, stats.errors
    c.end_stream("g1")
    assert stats.codec_state_bytes == 0 and state_bytes(session.codec_state) == 0
    assert (stats.steps, stats.errors) == (steps, errors_before)  # END_STREAM counts nothing else
    # the next generation (or the same id again) opens with a keyframe that the server decodes
    out, _ = _fwd(c, fronts[3], bias, name, {"gen": "g1", "cond": [0, 1]}, params)
    assert sent[-1].meta["f"] == "i" and stats.errors == errors_before
    ref = model.run(fronts[3], bias, 5)
    assert float((out["out"] - ref).norm() / ref.norm()) < 0.01
    _fwd(c, fronts[4], bias, name, {"gen": "g1", "cond": [0, 1]}, params)
    assert sent[-1].meta["f"] == "p"  # and the new stream goes on
    assert len(RecordingSession.made) == 1  # on the same connection
    c.close()
    assert _wait_for(lambda: stats.codec_state_bytes == 0)  # a closed connection's references leave too


def test_loopback_end_stream_of_another_generation_keeps_the_state(server, sent):
    srv, host, port = server
    _, bias, fronts = _steps(3)
    c = _client(host, port)
    _fwd(c, fronts[0], bias, "quant-t", {"gen": "live"})
    held = srv.state.stats.codec_state_bytes
    assert held > 0
    c.end_stream("finished-elsewhere")  # not this connection's generation: both sides keep theirs
    assert srv.state.stats.codec_state_bytes == held
    _fwd(c, fronts[1], bias, "quant-t", {"gen": "live"})
    assert sent[-1].meta["f"] == "p" and srv.state.stats.errors == 0
    c.end_stream()  # None: whatever the connection holds
    assert srv.state.stats.codec_state_bytes == 0
    _fwd(c, fronts[2], bias, "quant-t", {"gen": "live"})
    assert sent[-1].meta["f"] == "i" and srv.state.stats.errors == 0
    c.close()


def test_loopback_end_stream_with_the_server_gone_does_not_raise(server, sent):
    srv, host, port = server
    _, bias, fronts = _steps(2)
    c = _client(host, port)
    _fwd(c, fronts[0], bias, "quant-t", {"gen": "g"})
    srv.shutdown()
    t0 = time.monotonic()
    c.end_stream("g")  # logged, not raised
    assert time.monotonic() - t0 < 5
    assert not c.connected and not c._codec_state
    c.end_stream("g")  # not connected: nothing to tell
    # a server that never answers: the client waits the handshake timeout, then gives up the link
    srv2 = DaedalusServer(ServerState(ServerConfig(port=0, device="cpu", n_blocks=3), ToyBackend, token=TOKEN))
    host2, port2 = srv2.start()
    try:
        cfg = ClientConfig(host=host2, port=port2, token=TOKEN, handshake_timeout_s=0.3)
        c2 = MeshClient(cfg, expect={"arch": "toy", "n_blocks": 3})
        _fwd(c2, fronts[1], bias, "quant-t", {"gen": "g"})
        release = threading.Event()
        stuck = RecordingSession.made[-1]
        stuck._end_stream = lambda msg: (release.wait(10), StreamEnded(gen=msg.gen))[1]
        t0 = time.monotonic()
        c2.end_stream("g")
        assert time.monotonic() - t0 < 3
        assert not c2.connected  # its reply would come late: the connection is dropped, not reused
        release.set()
        out, _ = _fwd(c2, fronts[1], bias, "quant-t", {"gen": "g2"})  # reconnects
        assert sent[-1].meta["f"] == "i"
        c2.close()
    finally:
        release.set()
        srv2.shutdown()


def test_end_stream_bad_input_gets_an_error_frame(server):
    srv, host, port = server
    c = _client(host, port)
    with pytest.raises(errors.RemoteFailure) as e:
        c.request(EndStream(gen="g" * (MAX_KEY_CHARS + 1)))
    assert e.value.code == "bad_request" and "at most 512 characters" in e.value.message
    with pytest.raises(errors.LocalError, match="at most 512"):
        c.end_stream("g" * (MAX_KEY_CHARS + 1))  # our misuse: refused before anything is sent
    assert c.ping()[0] > 0 and len(RecordingSession.made) == 1  # the connection stays usable
    c.close()
    # before authentication it is the handshake's "expected hello"
    session = core.Session(srv.state, "peer")
    (err,) = session.handle(EndStream(gen="g"))
    assert isinstance(err, Error) and err.code == "bad_request" and "expected hello, got EndStream" in err.message


def test_loopback_codec_unavailable_falls_back_to_zstd(server, monkeypatch):
    _, host, port = server
    model, bias, fronts = _steps(2)
    real = backends.ZstdBackend.decompress
    calls = []

    def refuse_once(self, comp, n, device):
        calls.append(n)
        if len(calls) == 1:
            raise errors.BackendUnavailable("pretend this payload is ANS and the server has no GPU", "ans")
        return real(self, comp, n, device)

    monkeypatch.setattr(backends.ZstdBackend, "decompress", refuse_once)
    c = _client(host, port)
    out, stats = _fwd(c, fronts[0], bias, "quant", params={"cosine": 0.9999})
    assert c._codec_override == {"backend": "zstd"}
    assert stats.codec["params"]["backend"] == "zstd"
    assert float((out["out"] - model.run(fronts[0], bias, 5)).norm() / out["out"].norm()) < 0.01
    c.close()


def test_loopback_unrecoverable_codec_errors_still_raise(server, monkeypatch):
    _, host, port = server
    _, bias, fronts = _steps(1)

    def refuse(self, comp, n, device):
        raise errors.BackendUnavailable("no zstd here", "zstd")

    monkeypatch.setattr(backends.ZstdBackend, "decompress", refuse)
    c = _client(host, port)
    with pytest.raises(errors.RemoteFailure) as e:
        _fwd(c, fronts[0], bias, "lossless")
    assert e.value.code == "codec_unavailable"
    c.close()


def test_loopback_auto_reports_its_choice(server):
    _, host, port = server
    model, bias, fronts = _steps(2)
    c = _client(host, port)
    out, stats = _fwd(c, fronts[0], bias, "auto", params={"cosine": 0.999})
    assert stats.codec["codec"] in ("raw", "lossless", "quant-t")
    assert "link" in stats.codec and stats.codec["link"]["how"] == "measured"
    assert "reason" in stats.codec and "fidelity floor 27.0 dB per channel" in stats.codec["reason"]
    rel = float((out["out"] - model.run(fronts[0], bias, 5)).norm() / out["out"].norm())
    assert rel < 0.05
    out, stats = _fwd(c, fronts[0], bias, "auto", params={"lossless": True})
    assert stats.codec["codec"] in ("raw", "lossless")
    assert torch.equal(out["out"], model.run(fronts[0], bias, 5))
    c.close()


def test_auto_choice_follows_the_link():
    from comfyui_mesh.wirecodecs.auto import LinkInfo, choose

    mb = 37_748_736
    slow, fast = LinkInfo.assumed(12e6), LinkInfo.assumed(20e9)
    assert choose(mb, 2, True, "cuda:0", slow, {"cosine": 0.999})["codec"] == "quant-t"
    assert choose(mb, 2, False, "cpu", fast, {"cosine": 0.999})["codec"] == "raw"
    exact_only = choose(mb, 2, False, "cpu", slow, {"lossless": True})
    assert exact_only["codec"] == "lossless" and exact_only["params"]["backend"] == "zstd"
    picked = choose(mb, 2, False, "cpu", slow, {"cosine": 0.99})
    assert picked["codec"] == "quant-t" and picked["params"]["snr_db"] == pytest.approx(16.99, abs=0.01)
    assert choose(mb, 2, True, "cuda:0", slow, {"snr_db": 35.0})["params"]["snr_db"] == 35.0
    # int8 has no per-channel floor: never picked, whatever the link and the floor
    for bps in (12e6, 117e6, 300e6, 1.2e9, 5e9, 20e9):
        for on_cuda, peer in ((True, "cuda:0"), (False, "cpu")):
            for p in ({"cosine": 0.99}, {"snr_db": 20.0}, {}):
                assert choose(mb, 2, on_cuda, peer, LinkInfo.assumed(bps), p)["codec"] != "int8"


def test_server_without_gpu_entropy_asks_for_zstd(monkeypatch, caplog):
    """--no-gpu-entropy: an ANS-labelled payload is refused before any decoder sees it; the client
    re-sends with zstd (the codec_unavailable fallback)."""
    cfg = ServerConfig(port=0, device="cpu", n_blocks=3, gpu_entropy=False)
    srv = DaedalusServer(ServerState(cfg, lambda n: ToyBackend(n), token=TOKEN))
    host, port = srv.start()
    model, bias, fronts = _steps(1)
    real = codec.staged_encode  # what the client codes with
    labelled = []

    def as_if_ans(t, name, c="raw", params=None, state=None):
        wt = yield from real(t, name, c, params, state)
        if wt.meta.get("be") == "zstd" and "backend" not in (params or {}):  # what a GPU client would send
            labelled.append(name)
            wt = dataclasses.replace(wt, meta={**wt.meta, "be": "ans"})
        return wt

    monkeypatch.setattr(codec, "staged_encode", as_if_ans)
    try:
        c = _client(host, port)
        out, stats = _fwd(c, fronts[0], bias, "quant", params={"cosine": 0.9999})
        assert labelled == ["x"]
        assert "--no-gpu-entropy" in caplog.text  # refused by the option, not by a missing nvCOMP
        assert c._codec_override == {"backend": "zstd"} and stats.codec["params"]["backend"] == "zstd"
        assert float((out["out"] - model.run(fronts[0], bias, 5)).norm() / out["out"].norm()) < 0.01
        c.close()
    finally:
        srv.shutdown()


def test_server_command_line_turns_gpu_entropy_off():
    from comfyui_mesh.server.__main__ import build_parser, config_from_args

    assert config_from_args(build_parser().parse_args(["--toy"])).gpu_entropy is True
    assert config_from_args(build_parser().parse_args(["--toy", "--no-gpu-entropy"])).gpu_entropy is False


def test_quant_t_keeps_every_channel_above_the_floor_over_50_steps_of_massive_channels():
    """Massive channels that vary over the tokens and grow with the timestep: every frame of a
    50-step stream keeps every channel at >= the floor (closed loop, keyframes every 16)."""
    from comfyui_mesh.synthetic import seam_steps

    seq = seam_steps(50, grid=(16, 16), text=16, channels=96, massive=4, r=0.2, seed=5)
    enc, dec = {}, {}
    worst = []
    for x in seq:
        wt = codec.encode(x, "x", "quant-t", {"snr_db": 30.0}, state=enc)
        y = codec.decode(wire_copy(wt), DEV, state=dec)
        worst.append(float(channel_snr_db(x, y).min()))
    assert min(worst) >= 30.0, worst


def test_temporal_references_are_bounded_per_connection():
    """Temporal references are kept per tensor name: many names would pin the server's memory.
    Past --max-codec-state-mb the request is refused and the connection's references dropped;
    the next request within the budget is served."""
    cfg = ServerConfig(port=0, device="cpu", n_blocks=3, max_codec_state_bytes=64 << 10)
    srv = DaedalusServer(ServerState(cfg, lambda n: ToyBackend(n, ignored=("pad",)), token=TOKEN))
    host, port = srv.start()
    try:
        c = MeshClient(ClientConfig(host=host, port=port, token=TOKEN))
        c.connect()
        extra = {f"pad{i}": torch.randn(64, 64) for i in range(8)}  # 8 x 16 KiB of float32 references
        tensors = tuple(codec.encode(t, n, "lossless-t", state={}) for n, t in extra.items())
        msg = Forward(seq=1, arch="toy", n_blocks=3, consts={}, tensors=tensors)
        with pytest.raises(
            errors.RemoteFailure, match=r"temporal-codec references would take \d+ bytes.*--max-codec-state-mb"
        ):
            c.request(msg)
        assert srv.state.stats.codec_state_bytes == 0  # nothing kept after the refusal
        c.close()
    finally:
        srv.shutdown()
