"""Sans-IO frame encoder/decoder: round trips, chunking, and every rejection path."""

from __future__ import annotations

import dataclasses
import json
import random
import re
import struct
import tracemalloc
import zlib

import pytest
from comfyui_mesh import constants, errors, protocol
from comfyui_mesh.protocol import NEED_DATA, FrameDecoder, MsgKind, WireTensor

PREFIX = struct.Struct("<4sHHIQI")
V = constants.PROTOCOL_VERSION


# ---------------------------------------------------------------------------- helpers


def forge(
    kind: int,
    header: dict | list | bytes,
    body: bytes = b"",
    *,
    magic: bytes = constants.MAGIC,
    version: int = V,
    hlen: int | None = None,
    blen: int | None = None,
    crc: int | None = None,
) -> bytes:
    """A frame built by hand (valid unless told otherwise)."""
    hb = header if isinstance(header, bytes) else json.dumps(header).encode()
    if crc is None:
        crc = zlib.crc32(hb + body)
    prefix = PREFIX.pack(
        magic, version, kind, len(hb) if hlen is None else hlen, len(body) if blen is None else blen, crc
    )
    return prefix + hb + body


def desc(name="t", dtype="float32", shape=(2,), codec=0, nbytes=8, meta=None) -> dict:
    d = {"name": name, "dtype": dtype, "shape": list(shape), "codec": codec, "nbytes": nbytes}
    if meta is not None:
        d["meta"] = meta
    return d


def decode_one(frame: bytes, **kw) -> protocol.Message:
    dec = FrameDecoder(**kw)
    dec.feed(frame)
    return dec.next_message()


def header_fields(cls) -> list[str]:
    return [f.name for f in dataclasses.fields(cls) if f.name != "tensors"]


def assert_same_message(got: protocol.Message, sent: protocol.Message) -> None:
    assert type(got) is type(sent)
    for name in header_fields(type(sent)):
        assert getattr(got, name) == getattr(sent, name), name
        assert type(getattr(got, name)) is type(getattr(sent, name)), name
    assert len(got.tensors) == len(sent.tensors)
    for g, s in zip(got.tensors, sent.tensors, strict=True):
        assert g.name == s.name
        assert g.dtype == s.dtype
        assert g.shape == tuple(s.shape)
        assert isinstance(g.shape, tuple)
        assert g.codec == s.codec
        assert g.meta == s.meta
        assert g.nbytes == s.nbytes
        assert bytes(g.data) == bytes(s.data)


# Non-default values for every header field of every message class.
NON_DEFAULT: dict[type, dict] = {
    protocol.Hello: dict(
        nonce="ab" * 32,
        package_version="0.2.0",
        comfyui_version="0.3.40",
        torch_version="2.5.1+cu124",
        arch="flux2",
        n_blocks=8,
        fingerprint="f" * 64,
        codecs=[0, 1],
        client_name="icarus-test",
        key_id="0123456789abcdef",
    ),
    protocol.Challenge: dict(
        nonce="cd" * 32,
        auth="none",
        server_id="5e" * 16,
        mac="7" * 64,
        link="none",
        package_version="0.2.0",
        comfyui_version="0.3.41",
        torch_version="2.6.0",
        arch="ltxv",
        model="ltx-video-2b.safetensors",
        n_blocks=12,
        n_blocks_max=28,
        fingerprint="0123abcd",
        codecs=[1, 0],
        device="NVIDIA GeForce RTX 4090 (cuda:0)",
        samehost={"seg": "mh" + "1" * 24 + "p", "gpus": ["GPU-1"]},
        models=[{"fingerprint": "0123abcd", "model": "ltx-video-2b.safetensors"}, {"fingerprint": "9f", "model": "b"}],
    ),
    protocol.Auth: dict(mac="e" * 64, samehost={"proof": "f" * 64, "gpus": []}),
    protocol.Welcome: dict(session="sess-42", samehost=True),
    protocol.Forward: dict(
        seq=123456789012,
        arch="flux2",
        n_blocks=6,
        scalars={"timestep": 0.625, "guidance": 3.5, "flag": True, "none": None, "nested": {"a": [1, 2.5, "x"]}},
        consts={"pe": "c0ffee", "mask": "deadbeef"},
        reply_codec=1,
        stream={"key": "abc", "step": 3},
        slabs={"x": {"dim": 1, "parts": ["x#0", "x#1"]}},
        reply_slab_bytes=4 << 20,
    ),
    protocol.ForwardChunk: dict(seq=123456789012, part=3),
    protocol.Result: dict(
        seq=77, timings={"decode": 1.5, "forward": 42.0, "encode": 0.25}, slabs={"out": {"dim": 0, "parts": ["o#0"]}}
    ),
    protocol.ResultChunk: dict(seq=77, part=1),
    protocol.Error: dict(code="oom", message="CUDA out of memory – ünïcödé ✓", detail={"free": 123, "need": [1, 2]}),
    protocol.Reconfigure: dict(n_blocks=3),
    protocol.Reconfigured: dict(n_blocks=5, fingerprint="beef", no_op=True),
    protocol.Ping: dict(seq=-1, echo_bytes=1 << 20),
    protocol.Pong: dict(seq=99),
    protocol.Bye: dict(reason="shutting down"),
    protocol.EndStream: dict(gen="0123456789abcdef"),
    protocol.StreamEnded: dict(gen="fedcba9876543210", released=3 << 30),
    protocol.Progress: dict(seq=12, phase="forward", elapsed_ms=5012.5),
}

TENSOR_SETS = {
    "none": (),
    "one": (WireTensor("x", "float32", (2, 3), 0, bytes(range(24))),),
    "several": (
        WireTensor("img", "bfloat16", (1, 7, 13), 0, bytes(i % 251 for i in range(2 * 7 * 13))),
        WireTensor("empty", "float16", (0, 4), 0, b""),
        WireTensor("scalar", "int64", (), 0, struct.pack("<q", -5)),
        WireTensor("q", "float16", (3, 2), 1, bytearray(b"\x01" * 14), {"raw": False, "scale": [1.5, 2]}),
        WireTensor("const:abc", "uint8", (4,), 0, memoryview(b"\xff\x00\x7f\x80")),
        WireTensor("empty_tail", "bool", (0,), 0, b""),
    ),
}


def test_every_kind_has_a_class_in_the_table():
    assert set(NON_DEFAULT) == set(protocol.MESSAGE_TYPES.values())
    assert {cls.KIND for cls in NON_DEFAULT} == set(MsgKind)


@pytest.mark.parametrize("cls", list(NON_DEFAULT), ids=lambda c: c.__name__)
def test_fixture_values_are_not_defaults(cls):
    # Otherwise a decoder that dropped the field would still pass the round trip.
    defaults = cls()
    kwargs = NON_DEFAULT[cls]
    assert set(kwargs) == set(header_fields(cls))
    for name, value in kwargs.items():
        assert value != getattr(defaults, name), name


@pytest.mark.parametrize("tset", list(TENSOR_SETS))
@pytest.mark.parametrize("cls", list(NON_DEFAULT), ids=lambda c: c.__name__)
def test_round_trip_every_message(cls, tset):
    sent = cls(tensors=TENSOR_SETS[tset], **NON_DEFAULT[cls])
    frame = protocol.encode_bytes(sent)
    kind = PREFIX.unpack_from(frame)[2]
    assert kind == int(cls.KIND)
    (got,) = protocol.decode_all(frame)
    assert_same_message(got, sent)
    if tset == "none":
        assert got == sent


@pytest.mark.parametrize("cls", list(NON_DEFAULT), ids=lambda c: c.__name__)
def test_round_trip_defaults(cls):
    sent = cls()
    (got,) = protocol.decode_all(protocol.encode_bytes(sent))
    assert got == sent


def test_encode_prefix_layout():
    msg = protocol.Forward(seq=1, tensors=TENSOR_SETS["several"])
    frame = protocol.encode_bytes(msg)
    magic, version, kind, hlen, blen, crc = PREFIX.unpack_from(frame)
    assert magic == b"MESH"
    assert version == V
    assert kind == MsgKind.FORWARD
    assert blen == sum(t.nbytes for t in msg.tensors)
    assert len(frame) == constants.PREFIX_SIZE + hlen + blen
    assert zlib.crc32(frame[constants.PREFIX_SIZE :]) == crc
    header = json.loads(frame[constants.PREFIX_SIZE : constants.PREFIX_SIZE + hlen])
    assert [d["name"] for d in header["tensors"]] == [t.name for t in msg.tensors]
    assert [d["nbytes"] for d in header["tensors"]] == [t.nbytes for t in msg.tensors]


def test_encode_does_not_copy_tensor_data():
    data = bytearray(b"abcdefgh")
    bufs = protocol.encode(protocol.Result(tensors=(WireTensor("o", "float32", (2,), 0, data),)))
    assert len(bufs) == 2
    assert bufs[1] is data


def test_encode_skips_empty_payload_buffers():
    tensors = (WireTensor("a", "float32", (0,), 0, b""), WireTensor("b", "uint8", (1,), 0, b"z"))
    bufs = protocol.encode(protocol.Result(tensors=tensors))
    assert len(bufs) == 2
    assert bytes(bufs[1]) == b"z"


def test_absent_fields_take_defaults_and_unknown_fields_are_ignored():
    msg = decode_one(forge(MsgKind.FORWARD, {"seq": 3, "future_field": {"x": 1}}))
    assert msg == protocol.Forward(seq=3)


def test_header_without_tensors_key_has_no_tensors():
    msg = decode_one(forge(MsgKind.PONG, {"seq": 4}))
    assert msg == protocol.Pong(seq=4)
    assert msg.tensors == ()


def test_descriptor_meta_defaults_to_empty_dict():
    msg = decode_one(forge(MsgKind.RESULT, {"tensors": [desc(nbytes=8)]}, b"\x00" * 8))
    assert msg.tensors[0].meta == {}


# ---------------------------------------------------------------------------- chunking


def _frames():
    a = protocol.Forward(tensors=TENSOR_SETS["several"], **NON_DEFAULT[protocol.Forward])
    b = protocol.Pong(seq=5)
    c = protocol.Result(seq=9, tensors=TENSOR_SETS["one"])
    return [a, b, c], [protocol.encode_bytes(m) for m in (a, b, c)]


def test_frame_fed_whole():
    msgs, frames = _frames()
    dec = FrameDecoder()
    dec.feed(frames[0])
    got = dec.next_message()
    assert_same_message(got, msgs[0])
    assert dec.next_message() is NEED_DATA
    assert dec.buffered == 0


def test_frame_fed_one_byte_at_a_time():
    msgs, frames = _frames()
    frame = frames[0]
    dec = FrameDecoder()
    assert dec.bytes_needed() == constants.PREFIX_SIZE
    for i in range(len(frame) - 1):
        dec.feed(frame[i : i + 1])
        assert dec.next_message() is NEED_DATA, i
        fed = i + 1
        expected = constants.PREFIX_SIZE - fed if fed < constants.PREFIX_SIZE else len(frame) - fed
        assert dec.bytes_needed() == expected, i
    dec.feed(frame[-1:])
    got = dec.next_message()
    assert_same_message(got, msgs[0])
    assert dec.next_message() is NEED_DATA
    assert dec.buffered == 0
    assert dec.bytes_needed() == constants.PREFIX_SIZE


def test_bytes_needed_is_at_least_one_after_prefix_only_frame():
    frame = protocol.encode_bytes(protocol.Pong(seq=1))
    dec = FrameDecoder()
    dec.feed(frame[:-1])
    assert dec.next_message() is NEED_DATA
    assert dec.bytes_needed() == 1


def test_two_frames_in_one_feed():
    msgs, frames = _frames()
    dec = FrameDecoder()
    dec.feed(frames[0] + frames[1])
    assert_same_message(dec.next_message(), msgs[0])
    assert dec.next_message() == msgs[1]
    assert dec.next_message() is NEED_DATA
    assert dec.buffered == 0


def test_frame_then_trailing_partial_bytes():
    msgs, frames = _frames()
    dec = FrameDecoder()
    tail = frames[2][:10]
    dec.feed(frames[1] + tail)
    assert dec.next_message() == msgs[1]
    assert dec.next_message() is NEED_DATA
    assert dec.buffered == len(tail) > 0
    dec.feed(frames[2][10:])
    assert_same_message(dec.next_message(), msgs[2])
    assert dec.buffered == 0


def test_frame_then_trailing_partial_beyond_prefix():
    msgs, frames = _frames()
    dec = FrameDecoder()
    cut = constants.PREFIX_SIZE + 5
    dec.feed(frames[1] + frames[0][:cut])
    assert dec.next_message() == msgs[1]
    assert dec.next_message() is NEED_DATA
    assert dec.buffered == cut
    assert dec.bytes_needed() == len(frames[0]) - cut


def test_random_chunking_of_many_frames():
    msgs, frames = _frames()
    stream = b"".join(frames * 3)
    rng = random.Random(1234)
    dec = FrameDecoder()
    got = []
    pos = 0
    while pos < len(stream):
        n = rng.randint(1, 97)
        dec.feed(memoryview(stream)[pos : pos + n])
        pos += n
        while (m := dec.next_message()) is not NEED_DATA:
            got.append(m)
    assert len(got) == 9
    for g, s in zip(got, msgs * 3, strict=True):
        assert_same_message(g, s)
    assert dec.buffered == 0


def test_decoded_tensor_survives_later_feeds():
    # Tensors are zero-copy views into the frame; feeding more must not disturb them.
    msgs, frames = _frames()
    dec = FrameDecoder()
    dec.feed(frames[2])
    first = dec.next_message()
    before = bytes(first.tensors[0].data)
    dec.feed(frames[2])
    dec.feed(b"\x00" * 5)
    second = dec.next_message()
    assert bytes(first.tensors[0].data) == before == bytes(second.tensors[0].data)


def test_decode_all_multiple_frames():
    msgs, frames = _frames()
    got = protocol.decode_all(b"".join(frames))
    assert len(got) == 3
    for g, s in zip(got, msgs, strict=True):
        assert_same_message(g, s)
    assert protocol.decode_all(b"") == []


@pytest.mark.parametrize("extra", [1, 23, 24, 30])
def test_decode_all_rejects_trailing_bytes(extra):
    msgs, frames = _frames()
    with pytest.raises(errors.RemoteProtocolError, match=f"{extra} trailing bytes"):
        protocol.decode_all(frames[1] + frames[0][:extra])


def test_decode_all_rejects_a_lone_partial_frame():
    frame = protocol.encode_bytes(protocol.Ping(seq=1))
    with pytest.raises(errors.RemoteProtocolError, match="trailing bytes"):
        protocol.decode_all(frame[:-1])


# ---------------------------------------------------------------------------- prefix errors


def assert_broken(dec: FrameDecoder, exc: errors.RemoteProtocolError) -> None:
    """After an error the decoder refuses both feeding and reading, with the same error (a new
    exception each time: a kept one would hold the broken frame through its traceback)."""
    with pytest.raises(errors.RemoteProtocolError) as e1:
        dec.feed(protocol.encode_bytes(protocol.Ping(seq=1)))
    assert str(e1.value) == str(exc) and e1.value is not exc
    with pytest.raises(errors.RemoteProtocolError) as e2:
        dec.next_message()
    assert str(e2.value) == str(exc)


def expect_error(frame: bytes, match: str, **kw) -> FrameDecoder:
    dec = FrameDecoder(**kw)
    dec.feed(frame)
    with pytest.raises(errors.RemoteProtocolError, match=match) as ei:
        dec.next_message()
    assert type(ei.value) is errors.RemoteProtocolError
    assert_broken(dec, ei.value)
    return dec


@pytest.mark.parametrize(
    "garbage",
    [
        b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n",
        b"\x00" * 24,
        bytes(range(64)),
        b"mesh" + bytes(40),
    ],
)
def test_bad_magic(garbage):
    expect_error(garbage, "not a ComfyUI-Mesh peer")


def test_bad_magic_is_detected_from_the_prefix_alone():
    dec = FrameDecoder()
    dec.feed(b"SSH-2.0-OpenSSH_9.6\r\n")  # 21 bytes: not a full prefix yet
    assert dec.next_message() is NEED_DATA
    dec.feed(b"xyz")
    with pytest.raises(errors.RemoteProtocolError, match="magic"):
        dec.next_message()


@pytest.mark.parametrize("version", [0, 1, V + 1, 0xFFFF])
def test_wrong_protocol_version(version):
    frame = bytearray(protocol.encode_bytes(protocol.Hello(nonce="00")))
    struct.pack_into("<H", frame, 4, version)
    expect_error(bytes(frame), rf"protocol v{version}, this side v{V}")


@pytest.mark.parametrize("kind", [0, max(MsgKind) + 1, 255, 0xFFFF])
def test_unknown_kind(kind):
    expect_error(forge(kind, {}), rf"unknown message kind {kind}\b")


def test_header_len_over_limit_rejected_from_prefix():
    prefix = forge(MsgKind.PING, b"", hlen=constants.MAX_HEADER_BYTES + 1)
    assert len(prefix) == constants.PREFIX_SIZE
    expect_error(
        prefix, f"header length {constants.MAX_HEADER_BYTES + 1} exceeds the limit of {constants.MAX_HEADER_BYTES}"
    )
    small = forge(MsgKind.PING, b"", hlen=1025)  # a decoder told a smaller limit (before auth) keeps to it
    expect_error(small, "header length 1025 exceeds the limit of 1024", max_header=1024)


def test_header_len_at_limit_is_accepted():
    dec = FrameDecoder()
    dec.feed(forge(MsgKind.PING, b"", hlen=constants.MAX_HEADER_BYTES))
    assert dec.next_message() is NEED_DATA
    assert dec.bytes_needed() == constants.MAX_HEADER_BYTES


def test_body_len_over_small_limit():
    body = b"\x00" * 11
    expect_error(
        forge(MsgKind.RESULT, {"tensors": [desc(dtype="uint8", shape=(11,), nbytes=11)]}, body),
        "body length 11 exceeds the limit of 10 bytes",
        max_body=10,
    )


def test_body_len_at_small_limit_is_accepted():
    body = b"\x01" * 10
    msg = decode_one(
        forge(MsgKind.RESULT, {"tensors": [desc(dtype="uint8", shape=(10,), nbytes=10)]}, body), max_body=10
    )
    assert bytes(msg.tensors[0].data) == body


def test_huge_body_rejected_after_prefix_only_without_allocating():
    prefix = forge(MsgKind.FORWARD, b"", blen=constants.MAX_BODY_BYTES + 1)
    assert len(prefix) == constants.PREFIX_SIZE
    dec = FrameDecoder()
    tracemalloc.start()
    try:
        dec.feed(prefix)
        with pytest.raises(errors.RemoteProtocolError, match=f"body length {constants.MAX_BODY_BYTES + 1} exceeds"):
            dec.next_message()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20
    assert dec.buffered == constants.PREFIX_SIZE


@pytest.mark.parametrize("blen", [2**63, 2**64 - 1])
def test_absurd_body_len_rejected(blen):
    expect_error(forge(MsgKind.FORWARD, b"", blen=blen), "body length")


def test_body_at_default_limit_waits_without_allocating():
    dec = FrameDecoder()
    tracemalloc.start()
    try:
        dec.feed(forge(MsgKind.FORWARD, b"", blen=constants.MAX_BODY_BYTES))
        assert dec.next_message() is NEED_DATA
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20
    assert dec.bytes_needed() == constants.MAX_BODY_BYTES


# ---------------------------------------------------------------------------- frame content errors


def test_checksum_mismatch_on_flipped_body_byte():
    frame = bytearray(protocol.encode_bytes(protocol.Result(seq=1, tensors=TENSOR_SETS["one"])))
    frame[-3] ^= 0x01
    expect_error(bytes(frame), "checksum mismatch")


def test_checksum_mismatch_on_flipped_header_byte():
    frame = bytearray(protocol.encode_bytes(protocol.Pong(seq=12345)))
    i = frame.index(b"12345")
    frame[i] = ord("9")
    expect_error(bytes(frame), "checksum mismatch")


def test_checksum_mismatch_on_wrong_crc_field():
    frame = protocol.encode_bytes(protocol.Pong(seq=1))
    crc = PREFIX.unpack_from(frame)[5]
    expect_error(forge(MsgKind.PONG, frame[constants.PREFIX_SIZE :], crc=crc ^ 1), "checksum")


@pytest.mark.parametrize("hb", [b"not json", b"{", b"\xff\xfe\xfd", b"", b"{'seq': 1}"])
def test_header_not_json(hb):
    expect_error(forge(MsgKind.PONG, hb), "header is not valid JSON")


@pytest.mark.parametrize("hb", [b"[1, 2]", b"42", b'"seq"', b"null", b"true"])
def test_header_json_but_not_object(hb):
    expect_error(forge(MsgKind.PONG, hb), "header must be a JSON object")


def test_deeply_nested_header_is_a_protocol_error():
    hb = b"[" * 200_000  # well below MAX_HEADER_BYTES
    dec = FrameDecoder()
    dec.feed(forge(MsgKind.PONG, hb))
    with pytest.raises(errors.RemoteProtocolError):
        dec.next_message()


@pytest.mark.parametrize(
    "kind, header, match",
    [
        (MsgKind.FORWARD, {"seq": "5"}, r"Forward\.seq"),
        (MsgKind.FORWARD, {"seq": 5.0}, r"Forward\.seq"),
        (MsgKind.FORWARD, {"seq": True}, r"Forward\.seq"),
        (MsgKind.FORWARD, {"scalars": []}, r"Forward\.scalars"),
        (MsgKind.HELLO, {"codecs": {"0": 1}}, r"Hello\.codecs"),
        (MsgKind.HELLO, {"nonce": 7}, r"Hello\.nonce"),
        (MsgKind.RECONFIGURED, {"no_op": 1}, r"Reconfigured\.no_op"),
        (MsgKind.ERROR, {"message": None}, r"Error\.message"),
        (MsgKind.PING, {"echo_bytes": "1"}, r"Ping\.echo_bytes"),
        (MsgKind.END_STREAM, {"gen": 7}, r"EndStream\.gen"),
        (MsgKind.END_STREAM, {"gen": ["a"]}, r"EndStream\.gen"),
        (MsgKind.STREAM_ENDED, {"released": 1.5}, r"StreamEnded\.released"),
    ],
)
def test_wrong_field_type(kind, header, match):
    expect_error(forge(kind, header), match)


# ---------------------------------------------------------------------------- tensor descriptors


@pytest.mark.parametrize(
    "tensors, body, match",
    [
        ([desc(dtype="complex64")], b"\x00" * 8, "dtype 'complex64'"),
        ([desc(dtype="float")], b"\x00" * 8, "dtype 'float'"),
        ([desc(dtype=None)], b"\x00" * 8, "dtype None"),
        ([desc(shape=(2, -1))], b"\x00" * 8, "bad dimension -1"),
        ([desc(shape=(2, 1.5))], b"\x00" * 8, "bad dimension 1.5"),
        ([desc(shape=(True,))], b"\x00" * 8, "bad dimension True"),
        ([desc(shape=(constants.MAX_BODY_BYTES + 1,))], b"\x00" * 8, "bad dimension"),
        ([desc(shape=(1,) * (constants.MAX_TENSOR_NDIM + 1))], b"\x00" * 8, "at most 8 sizes"),
        ([{**desc(), "shape": "2"}], b"\x00" * 8, "must be a list"),
        ([{**desc(), "shape": None}], b"\x00" * 8, "must be a list"),
        ([desc(nbytes=9)], b"\x00" * 8, "runs past the end"),
        ([desc(name="a", nbytes=4), desc(name="b", nbytes=5)], b"\x00" * 8, "'b' runs past the end"),
        ([desc(nbytes=4)], b"\x00" * 8, "add up to 4 bytes but the body has 8"),
        ([], b"\x00" * 3, "add up to 0 bytes but the body has 3"),
        ([desc(nbytes=-1)], b"", "bad nbytes -1"),
        ([desc(nbytes=8.0)], b"\x00" * 8, "bad nbytes 8.0"),
        ([desc(nbytes=True)], b"\x00", "bad nbytes True"),
        ([{k: v for k, v in desc().items() if k != "nbytes"}], b"\x00" * 8, "bad nbytes None"),
        ([desc(name="")], b"\x00" * 8, "must be a string"),
        ([desc(name=7)], b"\x00" * 8, "must be a string"),
        ([desc(name="n" * (constants.MAX_NAME_LEN + 1))], b"\x00" * 8, "must be a string"),
        ([desc(codec=-1)], b"\x00" * 8, "codec id -1"),
        ([desc(codec=65536)], b"\x00" * 8, "codec id 65536"),
        ([desc(codec="0")], b"\x00" * 8, "codec id '0'"),
        ([desc(codec=False)], b"\x00" * 8, "codec id False"),
        ([desc(meta=[1])], b"\x00" * 8, "meta must be an object"),
        (["not an object"], b"", "descriptor must be an object"),
        ({"t": desc()}, b"\x00" * 8, "'tensors' must be a list"),
        ([desc(nbytes=0, shape=(0,))] * (constants.MAX_TENSORS_PER_FRAME + 1), b"", "at most 256 descriptors"),
    ],
)
def test_bad_tensor_descriptor(tensors, body, match):
    expect_error(forge(MsgKind.FORWARD, {"tensors": tensors}, body), match)


def test_descriptor_limits_at_boundary_are_accepted():
    tensors = [desc(name="n" * constants.MAX_NAME_LEN, shape=(1,) * constants.MAX_TENSOR_NDIM, codec=65535, nbytes=1)]
    tensors += [desc(name=f"e{i}", shape=(0,), nbytes=0) for i in range(constants.MAX_TENSORS_PER_FRAME - 1)]
    msg = decode_one(forge(MsgKind.FORWARD, {"tensors": tensors}, b"\x07"))
    assert len(msg.tensors) == constants.MAX_TENSORS_PER_FRAME
    assert msg.tensors[0].codec == 65535
    assert bytes(msg.tensors[0].data) == b"\x07"


@pytest.mark.parametrize("dtype", [[], {"a": 1}])
def test_unhashable_dtype_is_a_protocol_error(dtype):
    expect_error(forge(MsgKind.FORWARD, {"tensors": [desc(dtype=dtype)]}, b"\x00" * 8), "dtype")


def test_decoder_accepts_duplicate_names_but_tensor_map_rejects_them():
    tensors = [desc(name="x", nbytes=4), desc(name="y", nbytes=0), desc(name="x", nbytes=4)]
    msg = decode_one(forge(MsgKind.FORWARD, {"tensors": tensors}, b"\x01" * 4 + b"\x02" * 4))
    assert protocol.names(msg.tensors) == ["x", "y", "x"]
    with pytest.raises(errors.RemoteProtocolError, match="'x' appears twice"):
        protocol.tensor_map(msg.tensors)


def test_tensor_map_of_unique_names():
    ts = TENSOR_SETS["several"]
    m = protocol.tensor_map(ts)
    assert list(m) == [t.name for t in ts]
    assert all(m[t.name] is t for t in ts)


def test_tensor_payloads_are_split_in_header_order():
    tensors = [desc(name="a", nbytes=3), desc(name="b", nbytes=0), desc(name="c", nbytes=2)]
    msg = decode_one(forge(MsgKind.RESULT, {"tensors": tensors}, b"AAACC"))
    assert [bytes(t.data) for t in msg.tensors] == [b"AAA", b"", b"CC"]


def test_error_in_second_frame_keeps_first_message_and_breaks_decoder():
    good = protocol.encode_bytes(protocol.Pong(seq=1))
    bad = forge(MsgKind.PONG, {"seq": "x"})
    dec = FrameDecoder()
    dec.feed(good + bad)
    assert dec.next_message() == protocol.Pong(seq=1)
    with pytest.raises(errors.RemoteProtocolError, match=r"Pong\.seq") as ei:
        dec.next_message()
    assert_broken(dec, ei.value)


def test_prefix_error_breaks_decoder_even_when_fed_more_later():
    dec = FrameDecoder()
    dec.feed(b"XXXX" + bytes(20))
    with pytest.raises(errors.RemoteProtocolError, match="magic") as ei:
        dec.next_message()
    with pytest.raises(errors.RemoteProtocolError) as again:
        dec.feed(protocol.encode_bytes(protocol.Pong()))
    assert str(again.value) == str(ei.value)


# ---------------------------------------------------------------------------- encode-side errors


def test_encode_header_too_large():
    big = protocol.Error(message="x" * constants.MAX_HEADER_BYTES)
    with pytest.raises(errors.LocalError, match="MAX_HEADER_BYTES"):
        protocol.encode(big)


def test_encode_header_just_below_limit_round_trips():
    overhead = len(protocol.encode_bytes(protocol.Error(message=""))) - constants.PREFIX_SIZE
    msg = protocol.Error(message="y" * (constants.MAX_HEADER_BYTES - overhead))
    frame = protocol.encode_bytes(msg)
    assert PREFIX.unpack_from(frame)[3] == constants.MAX_HEADER_BYTES
    assert protocol.decode_all(frame) == [msg]


@pytest.mark.parametrize(
    "msg",
    [
        protocol.Forward(scalars={"x": object()}),
        protocol.Forward(scalars={"x": float("nan")}),
        protocol.Result(timings={"forward": float("inf")}),
        protocol.Error(detail={"b": b"bytes"}),
        protocol.Hello(codecs=[{1, 2}]),
    ],
)
def test_encode_non_json_field(msg):
    with pytest.raises(errors.LocalError, match=f"{type(msg).__name__} header is not JSON-serializable"):
        protocol.encode(msg)


def test_encode_too_many_tensors():
    n = constants.MAX_TENSORS_PER_FRAME + 1
    tensors = tuple(WireTensor(f"t{i}", "uint8", (0,), 0, b"") for i in range(n))
    with pytest.raises(errors.LocalError, match=f"{n} tensors in one frame"):
        protocol.encode(protocol.Forward(tensors=tensors))


def test_encode_max_tensors_round_trips():
    n = constants.MAX_TENSORS_PER_FRAME
    tensors = tuple(WireTensor(f"t{i}", "uint8", (1,), 0, bytes([i % 256])) for i in range(n))
    (got,) = protocol.decode_all(protocol.encode_bytes(protocol.Forward(tensors=tensors)))
    assert [bytes(t.data) for t in got.tensors] == [bytes([i % 256]) for i in range(n)]


@pytest.mark.parametrize(
    "wt, match",
    [
        (WireTensor("", "float32", (1,), 0, b"\x00" * 4), "must be a string"),
        (WireTensor("t", "complex64", (1,), 0, b"\x00" * 8), "dtype 'complex64'"),
        (WireTensor("t", "float32", (-1,), 0, b""), "bad dimension -1"),
        (WireTensor("t", "float32", (1,) * 9, 0, b"\x00" * 4), "at most 8 sizes"),
        (WireTensor("t", "float32", (1,), 70000, b"\x00" * 4), "codec id 70000"),
        (WireTensor("t", "float32", (1,), 0, b"\x00" * 4, meta=None), "meta must be an object"),
    ],
)
def test_encode_bad_descriptor_is_local_error(wt, match):
    with pytest.raises(errors.LocalError, match=match):
        protocol.encode(protocol.Forward(tensors=(wt,)))


def test_need_data_repr_and_identity():
    assert repr(NEED_DATA) == "NEED_DATA"
    assert FrameDecoder().next_message() is NEED_DATA


def test_error_messages_are_helpful_for_version_mismatch():
    frame = bytearray(protocol.encode_bytes(protocol.Hello()))
    struct.pack_into("<H", frame, 4, V + 7)
    dec = FrameDecoder()
    dec.feed(bytes(frame))
    with pytest.raises(errors.RemoteProtocolError, match=re.escape("install the same ComfyUI-Mesh release")):
        dec.next_message()


def test_reserve_commit_is_equivalent_to_feed():
    msg = protocol.Forward(seq=9, tensors=(protocol.WireTensor("x", "uint8", (5000,), 0, bytes(range(250)) * 20),))
    frame = protocol.encode_bytes(msg) + protocol.encode_bytes(protocol.Ping(seq=2))
    dec = protocol.FrameDecoder()
    dec.feed(frame[:30])
    view = dec.reserve(10_000)
    view[:4000] = frame[30:4030]
    view.release()
    dec.commit(4000)  # partial fill: only what was written counts
    assert dec.next_message() is protocol.NEED_DATA
    view = dec.reserve(len(frame))
    n = len(frame) - 4030
    view[:n] = frame[4030:]
    view.release()
    dec.commit(n)
    got = dec.next_message()
    assert isinstance(got, protocol.Forward) and bytes(got.tensors[0].data) == bytes(msg.tensors[0].data)
    assert isinstance(dec.next_message(), protocol.Ping)
    assert dec.buffered == 0 and dec.next_message() is protocol.NEED_DATA


# ---------------------------------------------------------------------------- big frames, body_alloc


def _big():
    body = bytes(range(256)) * (constants.BIG_BODY_BYTES // 256 + 3)
    msg = protocol.Forward(seq=3, tensors=(WireTensor("x", "uint8", (len(body),), 0, body),))
    return body, protocol.encode_bytes(msg)


class Recorder:
    """A body_alloc that hands out bytearrays and remembers them."""

    def __init__(self, extra: int = 0):
        self.made: list[bytearray] = []
        self.extra = extra

    def __call__(self, n: int) -> memoryview:
        self.made.append(bytearray(n + self.extra))
        return memoryview(self.made[-1])


def _receive(dec: FrameDecoder, frame: bytes, start: int, step: int = 300_000) -> None:
    """What netio.recv_message does: reserve the rest of the frame, fill it in pieces."""
    k = start
    while k < len(frame):
        view = dec.reserve(dec.bytes_needed())
        n = min(step, len(frame) - k)
        view[:n] = frame[k : k + n]
        view.release()
        dec.commit(n)
        k += n
        if k < len(frame):
            assert dec.next_message() is NEED_DATA


def test_big_frame_lands_in_the_body_allocator_without_a_copy():
    body, frame = _big()
    alloc = Recorder()
    dec = FrameDecoder(body_alloc=alloc)
    dec.feed(frame[:100])
    assert dec.next_message() is NEED_DATA  # prefix parsed: the frame's size is known
    _receive(dec, frame, 100)
    dec.feed(protocol.encode_bytes(protocol.Ping(seq=4)))
    got = dec.next_message()
    assert len(alloc.made) == 1 and len(alloc.made[0]) == len(frame)
    assert bytes(got.tensors[0].data) == body
    assert got.tensors[0].data.obj is alloc.made[0]  # a view into the allocated buffer
    assert isinstance(dec.next_message(), protocol.Ping)
    assert dec.buffered == 0 and dec.next_message() is NEED_DATA


def test_big_frame_finished_by_feed_with_the_next_frame_behind_it():
    body, frame = _big()
    alloc = Recorder()
    dec = FrameDecoder(body_alloc=alloc)
    dec.feed(frame[:50])
    assert dec.next_message() is NEED_DATA
    view = dec.reserve(dec.bytes_needed())
    view[:1000] = frame[50:1050]
    view.release()
    dec.commit(1000)
    dec.feed(frame[1050:] + protocol.encode_bytes(protocol.Ping(seq=8)))
    assert bytes(dec.next_message().tensors[0].data) == body
    assert dec.next_message() == protocol.Ping(seq=8)
    assert len(alloc.made) == 1


def test_small_frames_and_unknown_sizes_do_not_use_the_body_allocator():
    msgs, frames = _frames()
    alloc = Recorder()
    dec = FrameDecoder(body_alloc=alloc)
    for m, f in zip(msgs, frames, strict=True):
        dec.feed(f[:30])
        assert dec.next_message() is NEED_DATA
        _receive(dec, f, 30, step=7)
        assert_same_message(dec.next_message(), m)
    body, frame = _big()
    view = dec.reserve(len(frame))  # prefix not parsed yet: a plain buffer
    view[:] = frame
    view.release()
    dec.commit(len(frame))
    assert bytes(dec.next_message().tensors[0].data) == body
    assert alloc.made == []


def test_big_frame_checksum_and_allocator_size_are_checked():
    body, frame = _big()
    bad = bytearray(frame)
    bad[-5] ^= 0xFF
    dec = FrameDecoder(body_alloc=Recorder())
    dec.feed(bytes(bad[:100]))
    dec.next_message()
    _receive(dec, bytes(bad), 100)
    with pytest.raises(errors.RemoteProtocolError, match="checksum"):
        dec.next_message()
    dec = FrameDecoder(body_alloc=Recorder(extra=1))
    dec.feed(frame[:100])
    dec.next_message()
    with pytest.raises(errors.LocalError, match="body_alloc"):
        dec.reserve(dec.bytes_needed())


def test_reserve_misuse_is_refused_and_overlong_commits_are_clamped():
    body, frame = _big()
    dec = FrameDecoder(body_alloc=Recorder())
    dec.feed(frame[:100])
    dec.next_message()
    view = dec.reserve(1000)
    with pytest.raises(errors.LocalError, match="between reserve"):
        dec.feed(b"x")
    view[:] = frame[100:1100]
    view.release()
    dec.commit(5000)  # more than was reserved: only the reserved bytes count
    assert dec.buffered == 1100
    _receive(dec, frame, 1100)
    assert bytes(dec.next_message().tensors[0].data) == body


# ---------------------------------------------------------------------------- error codes


def _documented_error_codes(text: str) -> list[str]:
    """The first column of the table in PROTOCOL.md section 9, in order."""
    section = re.search(r"^## 9\. Error codes\n(.*?)^## ", text, re.S | re.M)
    assert section, "docs/PROTOCOL.md has no '## 9. Error codes' section"
    codes = re.findall(r"^\| `([a-z_]+)` \|", section.group(1), re.M)
    assert codes, "section 9 has no table rows"
    return codes


def test_protocol_md_section_9_lists_exactly_the_error_codes():
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "docs" / "PROTOCOL.md").read_text(encoding="utf-8")
    documented = _documented_error_codes(text)
    assert len(documented) == len(set(documented)), f"a code is documented twice: {documented}"
    assert set(documented) == {c.value for c in protocol.ErrorCode}
    # the check fails when either side drifts
    assert _documented_error_codes(text.replace("| `busy` |", "| `busy2` |")) != documented


def _protocol_md() -> str:
    from pathlib import Path

    return (Path(__file__).resolve().parents[1] / "docs" / "PROTOCOL.md").read_text(encoding="utf-8")


def _documented_kinds(text: str) -> dict[int, str]:
    """Kind number -> name from the table of PROTOCOL.md section 4 (``| 8 / 9 | A / B |`` rows)."""
    section = re.search(r"^## 4\. Messages\n(.*?)^## ", text, re.S | re.M)
    assert section, "docs/PROTOCOL.md has no '## 4. Messages' section"
    kinds: dict[int, str] = {}
    for nums, names in re.findall(r"^\| ([0-9][0-9 /]*) \| ([A-Z_][A-Z_ /]*) \|", section.group(1), re.M):
        pairs = list(zip(nums.split(" / "), names.split(" / "), strict=True))
        for n, name in pairs:
            assert int(n) not in kinds, f"kind {n} is documented twice"
            kinds[int(n)] = name.strip()
    return kinds


def test_protocol_md_lists_exactly_the_message_kinds():
    text = _protocol_md()
    documented = _documented_kinds(text)
    assert documented == {int(k): k.name for k in MsgKind}
    # the frame table's kind range too
    assert f"u16 `MsgKind` (1..{max(MsgKind)}, §4)" in text
    assert _documented_kinds(text.replace("| 12 | BYE |", "| 12 | BYE2 |")) != documented


def test_end_stream_round_trip_and_bounds():
    sent = protocol.EndStream(gen="g" * 512)
    (got,) = protocol.decode_all(protocol.encode_bytes(sent))
    assert got == sent and got.KIND == MsgKind.END_STREAM
    assert protocol.decode_all(protocol.encode_bytes(protocol.EndStream()))[0].gen is None  # "every generation"
    # a header too big for the frame limit is refused before sending
    with pytest.raises(errors.LocalError, match="MAX_HEADER_BYTES"):
        protocol.encode(protocol.EndStream(gen="g" * constants.MAX_HEADER_BYTES))
    ended = protocol.StreamEnded(gen=None, released=0)
    assert protocol.decode_all(protocol.encode_bytes(ended)) == [ended]


def test_error_codes_travel_as_their_string_values():
    err = protocol.Error(code=protocol.ErrorCode.STREAM_RESET.value, message="x")
    (back,) = protocol.decode_all(protocol.encode_bytes(err))
    assert back.code == "stream_reset" and protocol.ErrorCode.of(back.code) is protocol.ErrorCode.STREAM_RESET
    assert protocol.ErrorCode.of("something_new") is None


def test_a_broken_decoder_does_not_keep_its_frame_alive():
    """A decoder that failed on a frame keeps only the reason: the frame's buffer goes as soon as the
    caller drops it, without waiting for the cyclic GC (a server under garbage would otherwise hold
    every broken connection's last frame)."""
    import gc
    import weakref

    import numpy as np

    gc.disable()
    try:
        dec = FrameDecoder(body_alloc=lambda n: memoryview(np.empty(n, dtype=np.uint8)))
        frame = bytearray(
            protocol.encode_bytes(
                protocol.Ping(seq=1, tensors=(WireTensor("p", "uint8", (2 << 20,), 0, bytes(2 << 20)),))
            )
        )
        frame[-1] ^= 1  # checksum mismatch
        dec.feed(bytes(frame[:64]))
        assert dec.next_message() is NEED_DATA  # the prefix is read: the rest goes into body_alloc memory
        view = dec.reserve(dec.bytes_needed())
        owner = weakref.ref(view.obj)
        view[:] = frame[64 : 64 + view.nbytes]
        n = view.nbytes
        view.release()
        dec.commit(n)
        with pytest.raises(errors.RemoteProtocolError, match="checksum"):
            dec.next_message()
        del view
        assert owner() is None  # freed by reference counting alone
        with pytest.raises(errors.RemoteProtocolError, match="checksum"):
            dec.next_message()
    finally:
        gc.enable()
