"""The encrypted link (issue 14, item 5): sealed records sans-IO, a real client and server through it,
and a man in the middle between them that forwards the handshake and then tries to inject, replay,
reorder, drop or alter frames: all refused, the server stays up, an honest client still works."""

from __future__ import annotations

import logging
import socket
import struct
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import pytest
import torch
from comfyui_mesh import auth, protocol
from comfyui_mesh.config import ClientConfig, ServerConfig
from comfyui_mesh.constants import PREFIX_SIZE, RECORD_PLAINTEXT_BYTES
from comfyui_mesh.errors import AuthError, MeshError, RemoteProtocolError
from comfyui_mesh.securelink import MAX_RECORD_BYTES, Opener, Sealer, SecureLink
from comfyui_mesh.server.core import DaedalusServer, ServerState
from comfyui_mesh.server.toy import ToyBackend, ToyModel
from comfyui_mesh.transport import MeshClient

TOKEN = "0123456789abcdef0123456789abcdef"
KEY = bytes(range(32))


def transcript(**kw) -> auth.Transcript:
    f = {"server_id": "5e" * 16, "key_id": auth.key_id(TOKEN), "client_name": "t", "link": "aes-256-gcm", **kw}
    return auth.Transcript("11" * 32, "22" * 32, **f)


def records(sealer: Sealer, msg: protocol.Message) -> list[bytes]:
    return [h + s for h, s in sealer.seal(protocol.encode(msg))]


def open_all(opener: Opener, data: bytes) -> bytes:
    out = bytearray()
    mv = memoryview(data)
    while mv.nbytes:
        k = min(opener.bytes_needed(), mv.nbytes)
        opener.feed(mv[:k])
        mv = mv[k:]
        out += opener.take(1 << 30)
    return bytes(out)


# ---------------------------------------------------------------------------- sans-IO records


def test_keys_differ_per_direction_and_per_connection():
    c2s, s2c = SecureLink.for_client(TOKEN, transcript()).sealer, SecureLink.for_server(TOKEN, transcript()).sealer
    assert c2s._aead is not s2c._aead
    from comfyui_mesh.securelink import derive_keys

    a, b = derive_keys(TOKEN, transcript())
    assert a != b and len(a) == len(b) == 32
    assert derive_keys(TOKEN, transcript()) == (a, b)
    for other in (transcript(server_id="6f" * 16), transcript(client_name="u"), transcript(link="none")):
        assert derive_keys(TOKEN, other)[0] != a
    assert derive_keys("x" * 32, transcript())[0] != a


@pytest.mark.parametrize("n", [0, 1, 1000, 70_000, 3 * 1024 + 7])
def test_frames_of_any_size_cross_small_records_bit_exactly(n):
    sealer, opener = Sealer(KEY, record_bytes=1024), Opener(KEY)
    payload = torch.randint(0, 256, (n,), dtype=torch.uint8).numpy().tobytes()
    msg = protocol.Ping(seq=3, tensors=(protocol.WireTensor("p", "uint8", (n,), 0, payload),) if n else ())
    data = b"".join(records(sealer, msg) + records(sealer, protocol.Bye(reason="x")))
    assert payload[:64] not in data or n < 64
    assert protocol.decode_all(open_all(opener, data)) == [
        protocol.Ping(seq=3, tensors=msg.tensors),
        protocol.Bye(reason="x"),
    ]
    for rec in records(sealer, msg):
        assert len(rec) - 4 <= 1024 + 16  # bounded records, whatever the frame


def test_a_big_tensor_is_sealed_from_its_own_buffer_in_bounded_records():
    sealer = Sealer(KEY)
    big = bytes(9 << 20)
    out = [(h, bytes(s)) for h, s in sealer.seal([b"head" * 10, memoryview(big)])]  # copied: the buffer is reused
    sizes = [len(s) - 16 for _, s in out]
    assert sum(sizes) == 40 + len(big)
    assert max(sizes) <= RECORD_PLAINTEXT_BYTES and len(out) == 4  # 64 KiB join record + 4 MiB pieces


def test_a_record_opens_straight_into_the_given_buffer_only_when_it_fits():
    sealer = Sealer(KEY, record_bytes=1000)
    [(h1, s1), (h2, s2)] = [(bytes(h), bytes(s)) for h, s in sealer.seal([bytes(range(200)) * 10])]
    opener = Opener(KEY)
    dst = bytearray(1500)
    opener.into(memoryview(dst)[100:])
    opener.feed(h1 + s1)
    assert opener.opened_into() == 1000 and not opener.pending  # opened in place, nothing to take
    assert dst[100:1100] == (bytes(range(200)) * 10)[:1000] and dst[:100] == bytes(100)
    opener.into(memoryview(dst)[:999])  # 1000 bytes do not fit in 999: opened as usual
    opener.feed(h2 + s2)
    assert opener.opened_into() == 0 and opener.take(1 << 20).tobytes() == (bytes(range(200)) * 10)[1000:]
    dst.extend(b"x")  # no view of it is left behind
    with pytest.raises(RemoteProtocolError, match="failed authentication"):  # a forged record is still refused
        bad = Opener(KEY)
        bad.into(memoryview(bytearray(2000)))
        bad.feed(h1 + s1[:5] + bytes([s1[5] ^ 1]) + s1[6:])


def test_a_big_sealed_frame_is_opened_into_its_own_buffer(monkeypatch):
    from comfyui_mesh import netio

    link_out, link_in = Sealer(KEY), Opener(KEY)
    taken = []
    take = link_in.take
    monkeypatch.setattr(link_in, "take", lambda n: (lambda v: (taken.append(v.nbytes), v)[1])(take(n)))
    payload = torch.randint(0, 256, (9 << 20,), dtype=torch.uint8).numpy().tobytes()
    msg = protocol.Ping(seq=5, tensors=(protocol.WireTensor("p", "uint8", (len(payload),), 0, payload),))
    a, b = socket.socketpair()
    try:
        t = threading.Thread(target=lambda: [a.sendall(h + s) for h, s in link_out.seal(protocol.encode(msg))])
        t.start()
        got, n = netio._recv_sealed(b, protocol.FrameDecoder(), link_in, None)
        t.join()
    finally:
        a.close(), b.close()
    assert got == msg and n > len(payload)
    assert sum(taken) < 1 << 20  # the body's 4 MiB records opened in place, not copied out of the opener


@pytest.mark.parametrize("attack", ["flip", "replay", "reorder", "drop", "other-key", "truncate-tag"])
def test_altered_replayed_reordered_dropped_or_foreign_records_are_refused(attack):
    sealer, opener = Sealer(KEY, record_bytes=256), Opener(KEY)
    recs = records(sealer, protocol.Ping(seq=1, tensors=(protocol.WireTensor("p", "uint8", (900,), 0, bytes(900)),)))
    assert len(recs) >= 3
    if attack == "flip":
        recs[1] = recs[1][:10] + bytes([recs[1][10] ^ 1]) + recs[1][11:]
    elif attack == "replay":
        recs.insert(1, recs[0])
    elif attack == "reorder":
        recs[0], recs[1] = recs[1], recs[0]
    elif attack == "drop":
        del recs[0]
    elif attack == "other-key":
        recs = records(Sealer(bytes(32), record_bytes=256), protocol.Ping(seq=1))
    else:
        n = struct.unpack("<I", recs[0][:4])[0]
        recs[0] = struct.pack("<I", n - 1) + recs[0][4:-1]
    with pytest.raises(RemoteProtocolError, match="failed authentication"):
        open_all(opener, b"".join(recs))
    with pytest.raises(RemoteProtocolError):  # broken for good: the connection must close
        opener.bytes_needed()


@pytest.mark.parametrize("length", [0, 16, MAX_RECORD_BYTES + 1, 0xFFFFFFFF])
def test_record_lengths_are_checked_before_anything_is_allocated(length):
    opener = Opener(KEY)
    with pytest.raises(RemoteProtocolError, match="sealed record of"):
        opener.feed(struct.pack("<I", length))
    assert opener._body is None


# ---------------------------------------------------------------------------- over TCP


@contextmanager
def serve(**cfg: object) -> Iterator[DaedalusServer]:
    settings: dict = {"port": 0, "device": "cpu", "n_blocks": 3, **cfg}
    st = ServerState(ServerConfig(**settings), ToyBackend, token=TOKEN)
    srv = DaedalusServer(st)
    srv.start()
    try:
        yield srv
    finally:
        srv.shutdown()


def client(address: tuple[str, int], **kw) -> MeshClient:
    # Over TCP: the same-host fast path would carry big payloads past the relay (PROTOCOL.md §11).
    kw.setdefault("samehost", False)
    cfg = ClientConfig(host=address[0], port=address[1], token=TOKEN, **kw)
    return MeshClient(cfg, expect={"arch": "toy", "n_blocks": 3})


def toy_call(c: MeshClient, L: int = 11) -> tuple[torch.Tensor, torch.Tensor]:
    model = ToyModel()
    g = torch.Generator().manual_seed(L)
    x, bias = torch.randn(2, L, 64, generator=g), torch.randn(64, generator=g)
    out, _ = c.forward(
        arch="toy", n_blocks=3, coded={"x": model.run(x, bias, 0, 5)}, exact={}, consts={"bias": bias}, scalars={}
    )
    return out["out"], model.run(x, bias)


def test_raw_results_are_bit_identical_over_the_encrypted_link_with_multi_record_frames():
    with serve() as srv:
        c = client(srv.address)
        assert c.connect().link == "aes-256-gcm" and c._link is not None
        for L in (11, 9000):  # 9000 tokens x 64 x fp32 x 2 = 4.6 MB: a frame of several records each way
            got, want = toy_call(c, L)
            assert torch.equal(got, want)
        c.close()


def read_frame(s: socket.socket) -> bytes:
    head = recv_exact(s, PREFIX_SIZE)
    _, _, _, hlen, blen, _ = struct.unpack("<4sHHIQI", head)
    return head + recv_exact(s, hlen + blen)


def recv_exact(s: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = s.recv(n - len(buf))
        if not chunk:
            raise ConnectionError("closed")
        buf += chunk
    return bytes(buf)


def read_record(s: socket.socket) -> bytes:
    head = recv_exact(s, 4)
    return head + recv_exact(s, struct.unpack("<I", head)[0])


class Relay:
    """A man in the middle: forwards the handshake (HELLO, CHALLENGE, AUTH, WELCOME) frame by frame,
    then hands the client's sealed records to ``tamper(records, upstream)`` (its first connection only;
    later ones pass through honestly)."""

    def __init__(self, target: tuple[str, int], tamper: Callable[[Iterator[bytes], socket.socket], None]):
        self.target, self.tamper = target, tamper
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.address = self.listener.getsockname()[:2]
        self.connections = 0
        self.handshakes: list[bytes] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                down, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self._relay, args=(down,), daemon=True).start()

    def _relay(self, down: socket.socket) -> None:
        self.connections += 1
        first = self.connections == 1
        up = socket.create_connection(self.target)
        try:
            for src, dst in ((down, up), (up, down), (down, up), (up, down)):  # HELLO CHALLENGE AUTH WELCOME
                frame = read_frame(src)
                self.handshakes.append(frame)
                dst.sendall(frame)
            threading.Thread(target=self._pump, args=(up, down), daemon=True).start()

            def client_records() -> Iterator[bytes]:
                while True:
                    yield read_record(down)

            if first:
                self.tamper(client_records(), up)
            for rec in client_records():
                up.sendall(rec)
        except OSError:
            pass
        finally:
            up.close()
            down.close()

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket) -> None:
        try:
            while chunk := src.recv(1 << 16):
                dst.sendall(chunk)
        except OSError:
            pass
        finally:
            try:
                dst.shutdown(socket.SHUT_WR)
            except OSError:
                pass

    def close(self) -> None:
        self.listener.close()


def _inject_plain(recs, up):  # the attacker's own RECONFIGURE in the clear after WELCOME
    up.sendall(protocol.encode_bytes(protocol.Reconfigure(n_blocks=2)))


def _inject_sealed(recs, up):  # ... sealed with a key of its own making (it has no token)
    forged = Sealer(bytes(32))
    up.sendall(b"".join(h + s for h, s in forged.seal(protocol.encode(protocol.Reconfigure(n_blocks=2)))))


def _inject_guessed_key(recs, up):  # ... or with keys derived from a guessed token
    link = SecureLink.for_client("f" * 32, transcript())
    up.sendall(b"".join(h + s for h, s in link.sealer.seal(protocol.encode(protocol.Reconfigure(n_blocks=2)))))


def _replay(recs, up):
    r = next(recs)
    up.sendall(r + r)


def _reorder(recs, up):
    a, b = next(recs), next(recs)
    up.sendall(b + a)


def _drop(recs, up):
    next(recs)


def _flip(recs, up):
    r = bytearray(next(recs))
    r[len(r) // 2] ^= 0x10
    up.sendall(bytes(r))


ATTACKS = {
    "inject-plain": _inject_plain,
    "inject-sealed": _inject_sealed,
    "inject-guessed-key": _inject_guessed_key,
    "replay": _replay,
    "reorder": _reorder,
    "drop": _drop,
    "flip": _flip,
}


@pytest.mark.parametrize("attack", list(ATTACKS))
def test_a_relay_cannot_inject_replay_reorder_drop_or_alter_frames(attack, caplog):
    caplog.set_level(logging.DEBUG)
    with serve() as srv:
        relay = Relay(srv.address, ATTACKS[attack])
        try:
            victim = client(relay.address, samehost=False)  # the probe's records must cross the relay
            victim.connect()  # the handshake passes through the relay untouched
            assert relay.connections == 1
            probe = protocol.WireTensor("p", "uint8", (5 << 20,), 0, bytes(5 << 20))  # several records
            with pytest.raises(MeshError):
                victim.request(protocol.Ping(seq=1, echo_bytes=8, tensors=(probe,)), retry=False)
            victim.close()
            assert srv.state.backend.n_blocks == 3  # no RECONFIGURE ran
            # the server stays up and serves an honest client, directly and through the (now honest) relay
            for address in (srv.address, relay.address):
                c = client(address)
                got, want = toy_call(c)
                assert torch.equal(got, want)
                c.close()
        finally:
            relay.close()
    for r in caplog.records:
        assert r.exc_info is None and "Traceback" not in r.getMessage(), r.getMessage()
    assert any("protocol error" in r.getMessage() for r in caplog.records if r.name == "daedalus")


def test_the_relay_sees_no_token_and_no_plaintext():
    with serve() as srv:
        seen = bytearray()

        def sniff(recs, up):
            r = next(recs)
            seen.extend(r)
            up.sendall(r)

        relay = Relay(srv.address, sniff)
        try:
            c = client(relay.address)
            got, want = toy_call(c)
            assert torch.equal(got, want)
            c.close()
        finally:
            relay.close()
    wire = b"".join(relay.handshakes) + bytes(seen)
    assert TOKEN.encode() not in wire
    assert b"MESH" not in bytes(seen) and b"forward" not in bytes(seen).lower()


def test_the_server_id_is_pinned_per_address_and_a_changed_one_refused(tmp_path):
    trust = str(tmp_path / "tokens.json")
    with serve() as srv:
        c = client(srv.address, trust_file=trust)
        c.connect()
        c.close()
        pinned = auth.TokenStore(tmp_path / "tokens.json").pinned_id(*srv.address)
        assert pinned == srv.state.server_id
        port = srv.address[1]
    with serve(port=port) as other:  # another Daedalus with the same token, same address, another id
        c = client(other.address, trust_file=trust)
        with pytest.raises(AuthError) as e:
            c.connect()
        assert f"127.0.0.1:{port}" in str(e.value) and "Token…" in str(e.value) and pinned in str(e.value)
        auth.TokenStore(tmp_path / "tokens.json").set("127.0.0.1", port, TOKEN)  # the user saves the token again
        assert c.connect().server_id == other.state.server_id  # and the new id is pinned
        c.close()


def test_no_encrypt_servers_are_accepted_on_loopback_only_unless_allowed(monkeypatch):
    with serve(encrypt=False) as srv:
        c = client(srv.address)
        assert c.connect().link == "none" and c._link is None  # 127.0.0.1: a same-host pair
        got, want = toy_call(c)
        assert torch.equal(got, want)
        c.close()
        monkeypatch.setattr("comfyui_mesh.transport.is_loopback", lambda sock: False)  # as if across a LAN
        with pytest.raises(AuthError, match="COMFYUI_MESH_ALLOW_UNENCRYPTED=1"):
            client(srv.address).connect()
        c = client(srv.address, allow_unencrypted=True)
        assert c.connect().link == "none"
        c.close()
