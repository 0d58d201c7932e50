"""A real client <-> server session on 127.0.0.1 port 0 with the model-free toy back half."""

from __future__ import annotations

import os
import socket
import threading

import pytest
import torch
from comfyui_mesh import protocol
from comfyui_mesh.config import ClientConfig, ServerConfig
from comfyui_mesh.constants import SKEW_ENV
from comfyui_mesh.errors import AuthError, ConnectFailed, RemoteFailure, VersionMismatch
from comfyui_mesh.netio import recv_message, send_message
from comfyui_mesh.server.core import DaedalusServer, ServerState
from comfyui_mesh.server.toy import ToyBackend, ToyModel
from comfyui_mesh.transport import MeshClient

TOKEN = "0123456789abcdef0123456789abcdef"


@pytest.fixture
def server():
    cfg = ServerConfig(port=0, device="cpu", n_blocks=3)
    st = ServerState(cfg, lambda n: ToyBackend(n), token=TOKEN)
    srv = DaedalusServer(st)
    host, port = srv.start()
    yield srv, host, port
    srv.shutdown()


def _client(host, port, token=TOKEN, **expect):
    cfg = ClientConfig(host=host, port=port, token=token, retry_backoff_s=0.05)
    return MeshClient(cfg, expect=expect or {"arch": "toy", "n_blocks": 3})


def _inputs():
    g = torch.Generator().manual_seed(0)
    return torch.randn(2, 11, 64, generator=g), torch.randn(64, generator=g)


def test_split_equals_whole_with_raw_and_int8_within_budget(server):
    _, host, port = server
    model = ToyModel()
    x, bias = _inputs()
    whole = model.run(x, bias)
    front = model.run(x, bias, 0, 5)
    # Over TCP (the same-host fast path would keep the payloads off the socket: tests/test_samehost.py).
    c = MeshClient(
        ClientConfig(host=host, port=port, token=TOKEN, samehost=False), expect={"arch": "toy", "n_blocks": 3}
    )
    out, stats = c.forward(arch="toy", n_blocks=3, coded={"x": front}, exact={}, consts={"bias": bias}, scalars={})
    assert torch.equal(out["out"], whole)
    assert stats.consts_sent == 1 and stats.bytes_out > front.numel() * 4
    out8, stats8 = c.forward(
        arch="toy", n_blocks=3, coded={"x": front}, exact={}, consts={"bias": bias}, scalars={}, codec_name="int8"
    )
    assert stats8.consts_sent == 0, "a constant already sent on this connection must not be resent"
    assert stats8.bytes_out < stats.bytes_out / 2
    rel = (out8["out"] - whole).norm() / whole.norm()
    assert 0 < rel < 0.02
    c.close()


def test_constants_are_resent_after_a_server_restart():
    cfg = ServerConfig(port=0, device="cpu", n_blocks=3)
    st = ServerState(cfg, lambda n: ToyBackend(n), token=TOKEN)
    srv = DaedalusServer(st)
    host, port = srv.start()
    model = ToyModel()
    x, bias = _inputs()
    front = model.run(x, bias, 0, 5)
    c = _client(host, port)
    c.forward(arch="toy", n_blocks=3, coded={"x": front}, exact={}, consts={"bias": bias}, scalars={})
    srv.shutdown()
    cfg2 = ServerConfig(port=port, device="cpu", n_blocks=3)
    srv2 = DaedalusServer(ServerState(cfg2, lambda n: ToyBackend(n), token=TOKEN))
    srv2.start()
    try:
        out, stats = c.forward(arch="toy", n_blocks=3, coded={"x": front}, exact={}, consts={"bias": bias}, scalars={})
        assert torch.equal(out["out"], model.run(x, bias))
        assert stats.consts_sent == 1, "after reconnecting, the constants must travel again"
    finally:
        c.close()
        srv2.shutdown()


def test_wrong_token_is_rejected_and_server_stays_up(server):
    _, host, port = server
    with pytest.raises(AuthError, match="rejected the token"):
        _client(host, port, token="not-the-token-000000").connect()
    with pytest.raises(AuthError, match="requires a token"):
        _client(host, port, token=None).connect()
    c = _client(host, port)
    assert c.connect().arch == "toy"
    c.close()


def test_server_proves_it_knows_the_token(server):
    """A server that does not hold the client's token sends no proof: the client stops before its own."""
    srv, host, port = server
    srv.state.set_token("another-token-aaaaaaaaaaaa")  # server now holds a different secret
    with pytest.raises(AuthError, match="rejected the token this ComfyUI uses"):
        _client(host, port).connect()


def test_mismatches_name_both_values(server):
    _, host, port = server
    with pytest.raises(VersionMismatch, match="holds the last 3 blocks but n_blocks_remote is 4"):
        _client(host, port, arch="toy", n_blocks=4).connect()
    with pytest.raises(VersionMismatch, match="serves a toy model"):
        _client(host, port, arch="flux2", n_blocks=3).connect()
    with pytest.raises(VersionMismatch, match="different back-half weights"):
        _client(host, port, arch="toy", n_blocks=3, fingerprint="f" * 32).connect()


def test_skew_accepts_a_fingerprint_mismatch_with_a_warning(server, monkeypatch, caplog):
    _, host, port = server
    monkeypatch.setenv(SKEW_ENV, "1")
    c = _client(host, port, arch="toy", n_blocks=3, fingerprint="ff" * 16)
    with caplog.at_level("WARNING", logger="comfyui_mesh"):
        ch = c.connect()
    c.close()
    assert ch.n_blocks == 3
    assert any("different back-half weights" in r.message and f"accepted because {SKEW_ENV}=1" in r.message
               for r in caplog.records)  # fmt: skip


def test_bad_request_gets_an_error_frame_and_server_keeps_serving(server):
    _, host, port = server
    c = _client(host, port)
    x, bias = _inputs()
    with pytest.raises(RemoteFailure) as e:
        c.forward(arch="toy", n_blocks=3, coded={"x": x[..., :10]}, exact={}, consts={"bias": bias}, scalars={})
    assert e.value.code == "bad_request" and "takes width 64" in e.value.message  # refused before decoding
    with pytest.raises(RemoteFailure) as e:  # a name the back half does not take: refused before decoding
        c.forward(arch="toy", n_blocks=3, coded={"x": x, "evil": x}, exact={}, consts={"bias": bias}, scalars={})
    assert e.value.code == "bad_request" and "not 'evil'" in e.value.message
    with pytest.raises(RemoteFailure) as e:  # integer hidden states: refused before decoding
        c.forward(arch="toy", n_blocks=3, coded={"x": x.to(torch.int32)}, exact={}, consts={"bias": bias}, scalars={})
    assert e.value.code == "bad_request" and "takes floating point" in e.value.message
    with pytest.raises(RemoteFailure) as e:
        c.forward(arch="toy", n_blocks=5, coded={"x": x}, exact={}, consts={"bias": bias}, scalars={})
    assert e.value.code == "config_mismatch"
    out, _ = c.forward(arch="toy", n_blocks=3, coded={"x": x}, exact={}, consts={"bias": bias}, scalars={})
    assert out["out"].shape == x.shape
    c.close()


def test_garbage_bytes_get_bad_frame_and_server_survives(server):
    _, host, port = server
    with socket.create_connection((host, port), timeout=5) as s:
        s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n" + b"\0" * 32)
        msg, _ = recv_message(s, protocol.FrameDecoder())
        assert isinstance(msg, protocol.Error) and msg.code == "bad_frame"
    with socket.create_connection((host, port), timeout=5) as s:  # forward before the handshake
        send_message(s, protocol.Forward(seq=1))
        msg, _ = recv_message(s, protocol.FrameDecoder())
        assert isinstance(msg, protocol.Error) and "expected hello" in msg.message
    c = _client(host, port)
    assert c.ping()[0] > 0
    c.close()


def test_several_clients_interleave(server):
    _, host, port = server
    model = ToyModel()
    errors = []

    def work(seed):
        try:
            g = torch.Generator().manual_seed(seed)
            x, bias = torch.randn(1, 5 + seed, 64, generator=g), torch.randn(64, generator=g)
            c = _client(host, port)
            for _ in range(5):
                out, _ = c.forward(
                    arch="toy",
                    n_blocks=3,
                    coded={"x": model.run(x, bias, 0, 5)},
                    exact={},
                    consts={"bias": bias},
                    scalars={},
                )
                assert torch.equal(out["out"], model.run(x, bias))
            c.close()
        except Exception as e:  # collected and re-raised in the main thread
            errors.append(e)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors


def test_reconfigure_changes_the_served_blocks(server):
    srv, host, port = server
    c = _client(host, port)
    r = c.reconfigure(5)
    assert r.n_blocks == 5 and not r.no_op and srv.state.backend.n_blocks == 5
    assert c.reconfigure(5).no_op
    with pytest.raises(RemoteFailure, match="out of range"):
        c.reconfigure(99)
    assert srv.state.backend.n_blocks == 5
    c.close()


def test_unreachable_server_names_host_and_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(ConnectFailed, match=rf"cannot reach Daedalus at 127.0.0.1:{port}: connection refused"):
        _client("127.0.0.1", port).connect()


def test_client_with_token_refuses_a_no_auth_server():
    cfg = ServerConfig(port=0, device="cpu", n_blocks=3, auth=False)
    srv = DaedalusServer(ServerState(cfg, lambda n: ToyBackend(n), token=None))
    host, port = srv.start()
    try:
        with pytest.raises(AuthError, match="runs without authentication"):
            _client(host, port).connect()
        assert _client(host, port, token=None).connect().auth == "none"
    finally:
        srv.shutdown()


def test_big_frames_are_refused_before_authentication(server):
    _, host, port = server
    with socket.create_connection((host, port), timeout=5) as s:
        big = protocol.Hello(tensors=(protocol.WireTensor("x", "uint8", (100_000,), 0, b"\0" * 100_000),))
        try:
            send_message(s, big)
        except OSError:
            pass  # the server may stop reading once it saw the length; its answer is what counts
        msg, _ = recv_message(s, protocol.FrameDecoder())
        assert isinstance(msg, protocol.Error) and msg.code == "bad_frame" and "exceeds the limit" in msg.message


def test_constant_must_match_its_hash(server):
    _, host, port = server
    c = _client(host, port)
    c.connect()
    x, bias = _inputs()
    from comfyui_mesh import codec

    fake = codec.encode(bias, "const:" + "0" * 32, "raw")
    msg = protocol.Forward(
        seq=1, arch="toy", n_blocks=3, consts={"bias": "0" * 32}, tensors=(codec.encode(x, "x"), fake)
    )
    with pytest.raises(RemoteFailure, match="does not match its content hash"):
        c.request(msg)
    c.close()


def test_constants_larger_than_the_server_cache_still_work():
    """Constants sent with a request are used even when the cache cannot keep them."""
    cfg = ServerConfig(port=0, device="cpu", n_blocks=3, const_cache_bytes=16)
    srv = DaedalusServer(ServerState(cfg, lambda n: ToyBackend(n), token=TOKEN))
    host, port = srv.start()
    try:
        model = ToyModel()
        x, bias = _inputs()
        c = _client(host, port)
        for _ in range(2):  # second call: evicted constants are resent automatically
            out, _ = c.forward(
                arch="toy", n_blocks=3, coded={"x": model.run(x, bias, 0, 5)}, exact={},
                consts={"bias": bias}, scalars={},  # 256 bytes, over the 16-byte cache
            )  # fmt: skip
            assert torch.equal(out["out"], model.run(x, bias))
        c.close()
    finally:
        srv.shutdown()


def test_recv_message_receives_big_frames_into_the_body_allocator():
    """The socket loop hands the decoder's body_alloc the whole frame (page-locked memory on a
    CUDA machine, see hostmem.receive_alloc); the tensor bytes are a view into that buffer."""
    body = bytes(range(256)) * (8 << 12)  # 8 MiB
    msg = protocol.Forward(seq=1, tensors=(protocol.WireTensor("x", "uint8", (len(body),), 0, body),))
    made: list[bytearray] = []

    def alloc(n: int) -> memoryview:
        made.append(bytearray(n))
        return memoryview(made[-1])

    a, b = socket.socketpair()
    with a, b:
        t = threading.Thread(target=lambda: (send_message(a, msg), send_message(a, protocol.Ping(seq=2))))
        t.start()
        dec = protocol.FrameDecoder(body_alloc=alloc)
        got, n = recv_message(b, dec)
        ping, _ = recv_message(b, dec)
        t.join()
    assert bytes(got.tensors[0].data) == body and got.tensors[0].data.obj is made[0]
    assert len(made) == 1 and ping == protocol.Ping(seq=2)


def _scripted(c: MeshClient, failures: list, monkeypatch) -> dict:
    """Make c's next forward tries fail with ``failures`` (then reach the server); count tries/encodes."""
    seen = {"tries": 0, "encodes": 0}
    real_send, real_encode = c._roundtrip, c._encode_coded

    def send(msg):
        seen["tries"] += 1
        if failures:
            e = failures.pop(0)
            if isinstance(e, ConnectFailed):
                c.close()  # as a broken round trip does
            raise e
        return real_send(msg)

    def encode(*a, **kw):
        seen["encodes"] += 1
        return real_encode(*a, **kw)

    monkeypatch.setattr(c, "_roundtrip", send)
    monkeypatch.setattr(c, "_encode_coded", encode)
    return seen


@pytest.mark.parametrize(
    ("failures", "tries", "encodes", "raised"),
    [
        ([], 1, 1, None),
        (["missing_consts"], 2, 1, None),
        (["missing_consts", "missing_consts"], 3, 1, None),
        (["missing_consts"] * 3, 3, 1, "missing_consts"),  # two recoveries, then the error
        (["stream_reset"], 2, 2, None),  # keyframes: re-encoded
        (["codec_unavailable"], 2, 2, None),
        (["codec_unavailable", "codec_unavailable"], 2, 2, "codec_unavailable"),  # zstd already: give up
        (["forward_failed"], 1, 1, "forward_failed"),  # no recovery for it
        (["no_such_code"], 1, 1, "no_such_code"),
        (["dropped"], 2, 2, None),  # reconnect, re-encode against the new connection
        (["missing_consts", "dropped"], 3, 2, None),  # a dropped connection is retried on any try
        (["dropped", "silent", "dropped"], 4, 4, None),  # ... across reconnects (within the retry budget)
        (["timeout"], 1, 1, "timeout"),  # alive (heartbeats) but overdue, still working: not retried
    ],
)
def test_forward_recovery_table(server, monkeypatch, failures, tries, encodes, raised):
    from comfyui_mesh.transport import ServerSilent, ServerTimeout

    def error(name):
        if name == "dropped":
            return ConnectFailed("connection broke")
        if name == "silent":
            return ServerSilent("nothing for 20 s")
        if name == "timeout":
            return ServerTimeout("no answer")
        return RemoteFailure(name, f"server says {name}")

    _, host, port = server
    model = ToyModel()
    x, bias = _inputs()
    front = model.run(x, bias, 0, 5)
    c = _client(host, port)
    c.connect()
    seen = _scripted(c, [error(f) for f in failures], monkeypatch)
    kw = dict(arch="toy", n_blocks=3, coded={"x": front}, exact={}, consts={"bias": bias}, scalars={})
    try:
        if raised is None:
            out, stats = c.forward(**kw)
            assert torch.equal(out["out"], model.run(x, bias)) and stats.consts_sent == 1
        else:
            with pytest.raises((RemoteFailure, ConnectFailed)) as e:
                c.forward(**kw)
            assert getattr(e.value, "code", None) == raised or raised in ("dropped", "timeout")
            assert isinstance(e.value, ServerTimeout) == (raised == "timeout")
        assert (seen["tries"], seen["encodes"]) == (tries, encodes)
    finally:
        c.close()


def test_a_cached_constant_holds_only_its_own_bytes():
    """A raw constant decoded on the CPU is a view into its whole received frame: the cache keeps a
    copy, so a 4-byte constant never pins a big frame, and counts only the constant's bytes."""
    from comfyui_mesh.server.core import ConstCache

    frame = torch.zeros(16 << 20, dtype=torch.uint8)  # 16 MiB "received frame"
    view = frame[1024:1028].view(torch.float32)  # a 4-byte constant inside it
    cache = ConstCache(1 << 20)
    cache.put("h", view)
    kept = cache.get("h")
    assert kept is not None and torch.equal(kept, view)
    assert kept.untyped_storage().nbytes() == 4 and cache.bytes == 4
    own = torch.ones(8)
    cache.put("o", own)
    assert cache.get("o") is own  # a tensor that owns its storage is kept as is


def test_a_request_that_would_decode_past_the_budget_is_refused_before_decoding():
    """A few-byte payload may declare a huge tensor (an all-zero quant class, a zstd bomb): the
    server sums the descriptors' decoded sizes first and refuses past --max-request-mb, then still
    serves the next request."""
    import dataclasses

    from comfyui_mesh import codec

    cfg = ServerConfig(port=0, device="cpu", n_blocks=3, max_decoded_request_bytes=1 << 20)
    srv = DaedalusServer(ServerState(cfg, lambda n: ToyBackend(n), token=TOKEN))
    host, port = srv.start()
    try:
        c = _client(host, port)
        c.connect()
        x, bias = _inputs()
        big = dataclasses.replace(codec.encode(x, "x"), shape=(1, 1 << 18, 64))  # 64 MiB declared
        msg = protocol.Forward(seq=1, arch="toy", n_blocks=3, consts={}, tensors=(big,))
        with pytest.raises(
            RemoteFailure, match=r"decode to 67108864 bytes, over this server's limit .*--max-request-mb"
        ):
            c.request(msg)
        model = ToyModel()
        out, _ = c.forward(
            arch="toy", n_blocks=3, coded={"x": model.run(x, bias, 0, 5)}, exact={}, consts={"bias": bias}, scalars={}
        )
        assert torch.equal(out["out"], model.run(x, bias))
        c.close()
    finally:
        srv.shutdown()


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="reads this process's RSS from /proc (Linux)")
def test_a_declared_huge_body_allocates_nothing_before_its_bytes_arrive():
    """A frame prefix declaring a 1 GiB body: the buffer the server receives into is committed as
    bytes arrive (hostmem.lazy_buffer), not zero-filled at once."""
    from comfyui_mesh import hostmem

    size = 1 << 30
    dec = protocol.FrameDecoder(max_body=2 << 30, body_alloc=hostmem.lazy_buffer)
    header = b"{}"
    prefix = protocol._PREFIX.pack(protocol.MAGIC, protocol.PROTOCOL_VERSION, 1, len(header), size, 0)
    dec.feed(prefix + header)
    assert dec.next_message() is protocol.NEED_DATA
    before = _rss_bytes()
    view = dec.reserve(dec.bytes_needed())
    assert view.nbytes == size
    view[:4096] = b"\x01" * 4096  # some bytes arrive
    grown = _rss_bytes() - before
    del view
    dec.commit(4096)
    assert grown < 64 << 20, f"RSS grew by {grown} bytes for 4 KiB received"


@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="reads this process's RSS from /proc (Linux)")
def test_the_server_does_not_commit_a_declared_body_before_it_arrives(server):
    """An authenticated peer sends a prefix declaring a 1 GiB body and then a few bytes: the
    server (in this process) does not zero-fill 1 GiB at once (it used to: a 3 GiB declaration
    stalled every client for seconds, two connections got it OOM-killed)."""
    import time

    _, host, port = server
    c = _client(host, port)
    c.connect()
    s = c._sock
    assert s is not None
    before = _rss_bytes()
    header = b"{}"
    prefix = protocol._PREFIX.pack(protocol.MAGIC, protocol.PROTOCOL_VERSION, 3, len(header), 1 << 30, 0)
    link = c._link
    assert link is not None  # sealed like every frame after the handshake (else the record layer refuses it)
    for rec_header, sealed in link.sealer.seal([prefix + header + b"\0" * (2 << 20)]):  # past SOCKET_CHUNK
        s.sendall(rec_header + sealed)
    time.sleep(1.0)
    grown = _rss_bytes() - before
    c.close()
    assert grown < 256 << 20, f"server RSS grew by {grown >> 20} MiB for 2 MiB received"
