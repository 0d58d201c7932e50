"""Activation codecs: raw exactness, int8 error budget, non-finite policy, corrupt payloads, registry."""

from __future__ import annotations

import dataclasses
import json
import struct
import zlib

import pytest
import torch
from comfyui_mesh import codec, constants, errors, hostmem, protocol
from comfyui_mesh.protocol import WireTensor
from comfyui_mesh.wirecodecs import base

RAW_DTYPES = [
    torch.float32,
    torch.float16,
    torch.bfloat16,
    torch.float64,
    torch.int8,
    torch.uint8,
    torch.int32,
    torch.int64,
    torch.bool,
    torch.float8_e4m3fn,
]
SHAPES = [(), (0,), (0, 4), (1, 1, 1), (1, 7, 13), (2, 97, 64)]
FLOATS = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
INT8_FLOATS = [torch.float32, torch.float16, torch.bfloat16]  # int8 refuses float64 (send it raw)

# Same-size integer type to compare floats bit for bit.
BITS = {
    torch.float64: torch.int64,
    torch.float32: torch.int32,
    torch.float16: torch.int16,
    torch.bfloat16: torch.int16,
    torch.float8_e4m3fn: torch.int8,
    torch.float8_e5m2: torch.int8,
}


def make(shape, dtype, seed=0, scale=3.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if dtype == torch.bool:
        return torch.randint(0, 2, shape, generator=g).bool()
    if dtype.is_floating_point:
        return (torch.randn(shape, generator=g, dtype=torch.float64) * scale).to(dtype)
    info = torch.iinfo(dtype)
    return torch.randint(max(info.min, -(2**62)), min(info.max, 2**62), shape, generator=g, dtype=torch.int64).to(dtype)


def assert_bit_exact(got: torch.Tensor, want: torch.Tensor) -> None:
    assert got.dtype == want.dtype
    assert got.shape == want.shape
    assert got.device.type == "cpu"
    if want.dtype in BITS:
        assert torch.equal(got.view(BITS[want.dtype]), want.view(BITS[want.dtype]))
    else:
        assert torch.equal(got, want)


def wire_copy(wt: WireTensor) -> WireTensor:
    """The WireTensor as it would come out of the decoder: a fresh copy of the bytes."""
    return dataclasses.replace(wt, data=bytes(wt.data), shape=tuple(wt.shape), meta=json.loads(json.dumps(wt.meta)))


def int8_budget(x: torch.Tensor) -> torch.Tensor:
    """Per-element bound absmax_c / 127 / 2 over the last axis (finite values only), float64."""
    xd = x.double()
    finite = torch.where(torch.isfinite(xd), xd, torch.zeros_like(xd))
    absmax = finite.abs().reshape(-1, x.shape[-1]).amax(dim=0)
    return (absmax / 127 / 2 * (1 + 1e-3)).expand(finite.reshape(-1, x.shape[-1]).shape).reshape(x.shape)


def rounding_slack(dtype: torch.dtype, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Extra error allowed for rounding the float32 result into a narrower output dtype."""
    mag = torch.maximum(x.double().abs(), y.double().abs())
    if dtype == torch.bfloat16:
        return mag * 2**-7
    if dtype == torch.float16:
        return mag * 2**-10 + 2**-24
    return torch.zeros_like(mag)


def assert_within_int8_budget(x: torch.Tensor, y: torch.Tensor) -> None:
    assert y.dtype == x.dtype and y.shape == x.shape
    err = (x.double() - y.double()).abs()
    bound = int8_budget(x) + rounding_slack(x.dtype, x, y)
    worst = (err - bound).max().item() if err.numel() else 0.0
    assert bool((err <= bound).all()), f"int8 error over budget by {worst}"


def int8_round_trip(x: torch.Tensor) -> tuple[WireTensor, torch.Tensor]:
    wt = codec.encode(x, "x", "int8")
    assert wt.codec == 1
    return wt, codec.decode(wire_copy(wt))


# ---------------------------------------------------------------------------- raw


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", RAW_DTYPES, ids=str)
def test_raw_round_trip_exact(dtype, shape):
    x = make(shape, dtype)
    wt = codec.encode(x, "x")
    assert wt.codec == 0 and wt.name == "x"
    assert wt.dtype == base.dtype_name(dtype) == str(dtype).removeprefix("torch.")
    assert wt.shape == shape
    assert wt.nbytes == x.numel() * x.element_size()
    assert_bit_exact(codec.decode(wire_copy(wt)), x)
    # Also straight from the encoder's own (possibly zero-copy) buffer.
    assert_bit_exact(codec.decode(wt, "cpu"), x)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64], ids=str)
def test_raw_non_finite_bit_exact(dtype):
    specials = torch.tensor([float("nan"), float("inf"), float("-inf"), -0.0, 0.0, 1.0], dtype=dtype)
    ibits = BITS[dtype]
    # NaNs with payloads and the sign bit set must survive too.
    nbits = specials.view(ibits).clone()
    if dtype == torch.float64:
        extra = torch.tensor([0x7FF0000000000001, -0x0007FFFFFFFFFFFF], dtype=torch.int64)  # sNaN, -NaN w/ payload
    elif dtype == torch.float32:
        extra = torch.tensor([0x7F800001, -0x003FFFFF, 1], dtype=torch.int32)  # sNaN, -NaN, min subnormal
    elif dtype == torch.float16:
        extra = torch.tensor([0x7C01, -0x01FF, 1], dtype=torch.int16)
    else:
        extra = torch.tensor([0x7F81, -0x003F, 1], dtype=torch.int16)
    x = torch.cat([nbits, extra]).view(dtype).reshape(1, -1)
    assert torch.isnan(x).sum() >= 3
    got = codec.decode(wire_copy(codec.encode(x, "x", "raw")))
    assert_bit_exact(got, x)


def test_raw_float8_nan_bit_exact():
    x = torch.tensor([0x7F, -1, 0x01, 0x7E, 0x00, -128], dtype=torch.int8).view(torch.float8_e4m3fn)
    got = codec.decode(wire_copy(codec.encode(x, "x", 0)))
    assert_bit_exact(got, x)


def test_raw_non_contiguous_input():
    base = make((4, 6), torch.float32)
    x = base.t()
    assert not x.is_contiguous()
    got = codec.decode(wire_copy(codec.encode(x, "x")))
    assert got.shape == (6, 4)
    assert torch.equal(got, x)


def test_raw_decode_result_is_writable_and_independent_of_readonly_bytes():
    x = make((3, 5), torch.float32)
    wt = wire_copy(codec.encode(x, "x"))
    got = codec.decode(wt)
    got += 1  # must not raise on read-only input bytes
    assert torch.equal(codec.decode(wt), x)


@pytest.mark.parametrize("dtype", [torch.complex64, torch.uint16, torch.float8_e4m3fnuz], ids=str)
def test_raw_encode_unsupported_dtype(dtype):
    x = torch.zeros(2, dtype=torch.float32).to(dtype)
    with pytest.raises(errors.LocalError, match="cannot cross the wire"):
        codec.encode(x, "x")


# ---------------------------------------------------------------------------- int8


@pytest.mark.parametrize("shape", [(5,), (1, 1, 1), (1, 16), (1, 1, 16), (1, 7, 13), (3, 11), (2, 97, 64)], ids=str)
@pytest.mark.parametrize("dtype", INT8_FLOATS, ids=str)
def test_int8_error_budget(dtype, shape):
    x = make(shape, dtype, seed=7)
    wt, y = int8_round_trip(x)
    c = shape[-1]
    assert wt.nbytes == 4 * c + x.numel()
    assert wt.meta == {}
    assert_within_int8_budget(x, y)


def test_int8_is_lossy_but_close():
    x = make((4, 256), torch.float32, seed=3)
    _, y = int8_round_trip(x)
    assert not torch.equal(x, y)
    assert (x - y).abs().max() > 0
    rel = ((x - y).norm() / x.norm()).item()
    assert rel < 0.01


def test_int8_scales_are_per_last_axis_channel():
    # One channel around 1e30, one around 1e-3: each keeps its own relative precision.
    g = torch.Generator().manual_seed(11)
    x = torch.randn(50, 3, generator=g)
    x[:, 0] *= 1e30
    x[:, 1] *= 1e-3
    _, y = int8_round_trip(x)
    assert_within_int8_budget(x, y)
    err1 = (x[:, 1] - y[:, 1]).abs().max().item()
    assert err1 <= x[:, 1].abs().max().item() / 127 / 2 * 1.001


@pytest.mark.parametrize("dtype", INT8_FLOATS, ids=str)
def test_int8_all_zero_is_exact(dtype):
    x = torch.zeros(3, 7, 13, dtype=dtype)
    _, y = int8_round_trip(x)
    assert y.dtype == dtype
    assert torch.equal(y, x)
    assert not torch.isnan(y).any()


@pytest.mark.parametrize("dtype", INT8_FLOATS, ids=str)
def test_int8_constant_channels(dtype):
    consts = torch.tensor([0.0, 1.0, -2.5, 1e-3, 300.0, -0.0, 7.0], dtype=torch.float64)
    x = consts.expand(13, 7).to(dtype).contiguous()
    _, y = int8_round_trip(x)
    assert_within_int8_budget(x, y)
    # zero channels are exact; every row of a constant channel decodes to the same value
    assert torch.equal(y[:, 0], torch.zeros(13, dtype=dtype))
    assert torch.equal(y[:, 5].abs(), torch.zeros(13, dtype=dtype))
    assert torch.equal(y, y[:1].expand_as(y))
    # constant +-c maps to q = +-127, so the value comes back up to float rounding
    torch.testing.assert_close(y.double(), x.double(), rtol=2**-7 if dtype == torch.bfloat16 else 1e-3, atol=0)


def test_int8_huge_float32_values():
    x = make((9, 17), torch.float32, seed=5) * 1e30
    assert torch.isfinite(x).all()
    _, y = int8_round_trip(x)
    assert torch.isfinite(y).all()
    assert_within_int8_budget(x, y)


def test_int8_near_float32_max():
    x = torch.tensor([[3.0e38, -3.4e38, 1.0], [1e38, 0.0, -1.0]], dtype=torch.float32)
    _, y = int8_round_trip(x)
    assert torch.isfinite(y).all()
    assert_within_int8_budget(x, y)


def test_int8_refuses_float64():
    x = torch.tensor([[1e300], [1.0], [-5e299]], dtype=torch.float64)
    with pytest.raises(errors.LocalError, match="send it raw"):
        codec.encode(x, "x", "int8")


@pytest.mark.parametrize("dtype", INT8_FLOATS, ids=str)
def test_int8_non_finite_policy(dtype):
    nan, inf = float("nan"), float("inf")
    # channel 0: finite absmax 2 ; channel 1: finite absmax 0.5 ; channel 2: only non-finite
    x = torch.tensor(
        [
            [1.0, 0.25, inf],
            [-2.0, nan, -inf],
            [nan, inf, nan],
            [inf, -inf, inf],
            [-inf, -0.5, -inf],
        ],
        dtype=dtype,
    )
    _, y = int8_round_trip(x)
    assert y.dtype == dtype
    assert torch.isfinite(y).all()
    want = torch.tensor(
        [
            [1.0, 0.25, 0.0],
            [-2.0, 0.0, 0.0],
            [0.0, 0.5, 0.0],
            [2.0, -0.5, 0.0],
            [-2.0, -0.5, 0.0],
        ],
        dtype=torch.float64,
    )
    # NaN -> 0 exactly
    assert y[2, 0].item() == 0.0 and y[1, 1].item() == 0.0
    # +-Inf -> +-finite absmax of the channel (up to quantization / output rounding)
    budget = torch.tensor([2.0, 0.5, 0.0], dtype=torch.float64) / 127 / 2 * 1.001
    slack = rounding_slack(dtype, want, y)
    assert bool(((y.double() - want).abs() <= budget + slack).all())
    assert y[3, 0] > 0 and y[4, 0] < 0 and y[3, 1] < 0


@pytest.mark.parametrize("shape", [(0,), (0, 4), (4, 0), (2, 0, 3)], ids=str)
@pytest.mark.parametrize("dtype", INT8_FLOATS, ids=str)
def test_int8_empty_tensors(dtype, shape):
    x = torch.empty(shape, dtype=dtype)
    wt, y = int8_round_trip(x)
    assert wt.meta == {"raw": True}
    assert wt.nbytes == 0
    assert y.shape == shape and y.dtype == dtype


@pytest.mark.parametrize("dtype", INT8_FLOATS, ids=str)
def test_int8_scalars_are_exact(dtype):
    for v in (3.14159, -1e-7, float("nan"), float("inf")):
        x = torch.tensor(v, dtype=dtype)
        wt, y = int8_round_trip(x)
        assert wt.meta == {"raw": True}
        assert y.shape == ()
        assert_bit_exact(y, x)


@pytest.mark.parametrize("dtype", [torch.int8, torch.int32, torch.uint8, torch.bool, torch.float8_e4m3fn], ids=str)
def test_int8_rejects_non_float_input(dtype):
    with pytest.raises(errors.LocalError, match="int8 codec needs a float tensor"):
        codec.encode(torch.zeros(2, 3).to(dtype), "x", "int8")


def test_int8_encode_does_not_modify_input():
    x = torch.tensor([[float("nan"), 1.0], [float("inf"), -2.0]])
    before = x.clone()
    codec.encode(x, "x", "int8")
    assert_bit_exact(x, before)


# ---------------------------------------------------------------------------- corrupt payloads


def test_raw_truncated_payload():
    wt = codec.encode(make((3, 5), torch.float32), "x")
    short = dataclasses.replace(wt, data=bytes(wt.data)[:-1])
    with pytest.raises(errors.CodecError, match="payload has 59 bytes"):
        codec.decode(short)
    with pytest.raises(errors.CodecError, match="payload has 61 bytes"):
        codec.decode(dataclasses.replace(wt, data=bytes(wt.data) + b"\x00"))
    with pytest.raises(errors.CodecError, match="payload has 0 bytes"):
        codec.decode(dataclasses.replace(wt, data=b""))


def test_raw_payload_for_scalar_and_empty():
    with pytest.raises(errors.CodecError):
        codec.decode(WireTensor("s", "float32", (), 0, b""))
    with pytest.raises(errors.CodecError):
        codec.decode(WireTensor("e", "float32", (0, 3), 0, b"\x00"))


def test_raw_huge_shape_does_not_allocate():
    wt = WireTensor("x", "float32", (2**31, 2**31, 2**31), 0, b"\x00" * 16)
    with pytest.raises(errors.CodecError, match="payload has 16 bytes"):
        codec.decode(wt)


@pytest.mark.parametrize("delta", [-1, 1, -4, 4])
def test_int8_payload_of_wrong_length(delta):
    wt = codec.encode(make((7, 13), torch.float32), "x", "int8")
    data = bytes(wt.data)
    data = data[:delta] if delta < 0 else data + b"\x00" * delta
    with pytest.raises(errors.CodecError, match=f"has {4 * 13 + 91 + delta} bytes, expected {4 * 13 + 91}"):
        codec.decode(dataclasses.replace(wt, data=data))


def test_int8_raw_fallback_truncated():
    wt = codec.encode(torch.tensor(2.0), "s", "int8")
    with pytest.raises(errors.CodecError):
        codec.decode(dataclasses.replace(wt, data=bytes(wt.data)[:-1]))


@pytest.mark.parametrize(
    "dtype, shape, meta",
    [
        ("int32", (2, 3), {}),
        ("uint8", (2, 3), {}),
        ("float32", (), {}),
        ("float32", (2, 0), {}),
    ],
)
def test_int8_inconsistent_descriptor(dtype, shape, meta):
    c = shape[-1] if shape else 0
    n = base.numel(shape)
    wt = WireTensor("x", dtype, shape, 1, b"\x00" * (4 * c + n), meta)
    with pytest.raises(errors.CodecError):
        codec.decode(wt)


def test_int8_garbage_payload_of_right_length_decodes_without_crashing():
    g = torch.Generator().manual_seed(0)
    data = torch.randint(0, 256, (4 * 8 + 5 * 8,), generator=g, dtype=torch.uint8).numpy().tobytes()
    y = codec.decode(WireTensor("x", "float16", (5, 8), 1, data))
    assert y.shape == (5, 8) and y.dtype == torch.float16


@pytest.mark.parametrize("wire_id", [8, 99, 65535])  # 2..7 and 15 are registered (codec.WIRE_IDS)
def test_unknown_codec_id(wire_id):
    wt = WireTensor("x", "float32", (1,), wire_id, b"\x00" * 4)
    with pytest.raises(errors.CodecError, match=f"unknown codec id {wire_id}"):
        codec.decode(wt)


@pytest.mark.parametrize("wire_id", [0, 1])
@pytest.mark.parametrize("dtype", ["complex64", "float", "", "qint8"])
def test_unknown_dtype(wire_id, dtype):
    wt = WireTensor("x", dtype, (1, 2), wire_id, b"\x00" * 8)
    with pytest.raises(errors.CodecError, match=f"unknown dtype '{dtype}'"):
        codec.decode(wt)


def test_codec_error_is_a_remote_protocol_error():
    assert issubclass(errors.CodecError, errors.RemoteProtocolError)
    with pytest.raises(errors.RemoteProtocolError):
        codec.decode(WireTensor("x", "float32", (4,), 0, b"\x00"))


def test_torch_runtime_errors_are_wrapped_as_codec_errors():
    class Boom(base.Codec):
        wire_id = 4242
        name = "boom"
        lossless = True

        def _decode(self, wt, device, state):
            raise RuntimeError("kaput")

    saved = dict(codec.CODECS), dict(codec._BY_NAME)
    try:
        codec.register(Boom())
        with pytest.raises(errors.CodecError, match="cannot decode 'x' with codec boom: kaput"):
            codec.decode(WireTensor("x", "float32", (1,), 4242, b"\x00" * 4))
    finally:
        codec.CODECS.clear()
        codec.CODECS.update(saved[0])
        codec._BY_NAME.clear()
        codec._BY_NAME.update(saved[1])
    assert 4242 not in codec.CODECS


# ---------------------------------------------------------------------------- registry


def test_wire_ids_are_stable():
    assert codec.by_name("raw").wire_id == 0
    assert codec.by_name("int8").wire_id == 1
    assert codec.by_id(0).name == "raw"
    assert codec.by_id(1).name == "int8"
    assert isinstance(codec.by_id(0), base.RawCodec)
    assert isinstance(codec.by_id(1), base.Int8Codec)
    assert codec.by_id(0).lossless is True
    assert codec.by_id(1).lossless is False


def test_wire_ids_and_names_are_unique():
    assert all(k == c.wire_id for k, c in codec.CODECS.items())
    assert len({c.name for c in codec.CODECS.values()}) == len(codec.CODECS)
    assert {0, 1} <= set(codec.available_ids())
    assert codec.available_ids() == sorted(codec.available_ids())


def test_wire_id_table_is_what_is_registered():
    assert {i: c.name for i, c in codec.CODECS.items()} == codec.WIRE_IDS
    codec.check_table(codec.CODECS.values())  # the import-time check passes on the real table


def test_wire_id_table_check_refuses_missing_and_duplicate_codecs():
    real = list(codec.CODECS.values())
    with pytest.raises(errors.LocalError, match=r"missing \{3: 'quant'\}"):
        codec.check_table([c for c in real if c.name != "quant"])
    with pytest.raises(errors.LocalError, match=r"registered twice: \[2, 'lossless'\]"):
        codec.check_table([*real, codec.by_name("lossless")])

    class Renamed(base.RawCodec):
        name = "raw2"

    with pytest.raises(errors.LocalError, match="raw2"):
        codec.check_table([Renamed() if c.wire_id == 0 else c for c in real])

    class Unlisted(base.RawCodec):
        wire_id = 9
        name = "unlisted"

    with pytest.raises(errors.LocalError, match="not in WIRE_IDS"):
        codec.check_table([*real, Unlisted()])


def test_register_duplicate_id_raises():
    class Dup(base.RawCodec):
        name = "raw-dup"

    before = dict(codec.CODECS)
    with pytest.raises(errors.LocalError, match="wire id 0 registered twice"):
        codec.register(Dup())
    assert codec.CODECS == before
    assert "raw-dup" not in codec._BY_NAME


def test_register_duplicate_name_raises():
    class Dup(base.Int8Codec):
        wire_id = 4243

    before = dict(codec.CODECS)
    with pytest.raises(errors.LocalError, match="name 'int8' registered twice"):
        codec.register(Dup())
    assert codec.CODECS == before
    assert 4243 not in codec.CODECS


def test_unknown_codec_name():
    with pytest.raises(errors.LocalError, match="unknown codec 'zstd'"):
        codec.by_name("zstd")
    with pytest.raises(errors.LocalError, match="unknown codec 'nope'"):
        codec.encode(torch.zeros(2), "x", "nope")


def test_unknown_codec_id_on_encode():
    with pytest.raises(errors.CodecError, match="unknown codec id 77"):
        codec.encode(torch.zeros(2), "x", 77)


def test_encode_by_id_matches_by_name():
    x = make((3, 4), torch.float32)
    assert bytes(codec.encode(x, "x", 1).data) == bytes(codec.encode(x, "x", "int8").data)
    assert bytes(codec.encode(x, "x", 0).data) == bytes(codec.encode(x, "x", "raw").data)


def test_unavailable_codec_refuses_to_encode():
    class Missing(base.RawCodec):
        wire_id = 4244
        name = "missing"

        def available(self):
            return "pip install something"

    saved = dict(codec.CODECS), dict(codec._BY_NAME)
    try:
        codec.register(Missing())
        assert 4244 not in codec.available_ids()
        with pytest.raises(errors.LocalError, match="not usable here: pip install something"):
            codec.encode(torch.zeros(2), "x", "missing")
    finally:
        codec.CODECS.clear()
        codec.CODECS.update(saved[0])
        codec._BY_NAME.clear()
        codec._BY_NAME.update(saved[1])


# ---------------------------------------------------------------------------- protocol + codec


def test_protocol_and_codec_round_trip():
    tensors = {
        "img": (make((2, 97, 64), torch.float32, seed=1), "raw"),
        "txt": (make((1, 7, 13), torch.bfloat16, seed=2), "raw"),
        "ids": (make((1, 13), torch.int64, seed=3), "raw"),
        "mask": (make((1, 13), torch.bool, seed=4), "raw"),
        "hidden": (make((1, 97, 64), torch.float16, seed=5), "int8"),
        "hidden32": (make((3, 11), torch.float32, seed=6), "int8"),
        "t": (torch.tensor(0.625), "int8"),
        "empty": (torch.empty(0, 4, dtype=torch.bfloat16), "int8"),
        "nothing": (torch.empty(0), "raw"),
    }
    wts = tuple(codec.encode(t, name, c) for name, (t, c) in tensors.items())
    msg = protocol.Forward(seq=3, arch="flux2", n_blocks=4, reply_codec=1, scalars={"g": 3.5}, tensors=wts)
    frame = protocol.encode_bytes(msg)
    (got,) = protocol.decode_all(frame)
    assert isinstance(got, protocol.Forward)
    assert (got.seq, got.arch, got.n_blocks, got.reply_codec, got.scalars) == (3, "flux2", 4, 1, {"g": 3.5})
    by_name = protocol.tensor_map(got.tensors)
    assert list(by_name) == list(tensors)
    for name, (x, c) in tensors.items():
        y = codec.decode(by_name[name], "cpu")
        if c == "raw" or x.ndim == 0 or x.numel() == 0:
            assert_bit_exact(y, x)
        else:
            assert_within_int8_budget(x, y)


def test_protocol_and_codec_round_trip_chunked():
    x = make((5, 33), torch.bfloat16, seed=9)
    frame = protocol.encode_bytes(protocol.Result(seq=1, tensors=(codec.encode(x, "out", "int8"),)))
    dec = protocol.FrameDecoder()
    msg = protocol.NEED_DATA
    for i in range(0, len(frame), 7):
        assert msg is protocol.NEED_DATA
        dec.feed(frame[i : i + 7])
        msg = dec.next_message()
    assert isinstance(msg, protocol.Result)
    assert_within_int8_budget(x, codec.decode(msg.tensors[0]))


def test_inconsistent_frame_passes_protocol_but_codec_rejects_it():
    # nbytes agrees with the body but not with dtype x shape: the codec must catch it.
    header = {"seq": 1, "tensors": [{"name": "o", "dtype": "float32", "shape": [4, 4], "codec": 0, "nbytes": 12}]}
    hb = json.dumps(header).encode()
    body = b"\x00" * 12
    frame = struct.pack("<4sHHIQI", b"MESH", constants.PROTOCOL_VERSION, 6, len(hb), 12, zlib.crc32(hb + body))
    (msg,) = protocol.decode_all(frame + hb + body)
    with pytest.raises(errors.CodecError, match="needs 64"):
        codec.decode(msg.tensors[0])


def test_pinned_receive_buffers_are_capped_and_released(monkeypatch):
    """Page-locked receive buffers (hostmem.pinned_buffer) stay under PINNED_RECEIVE_MAX_BYTES in
    all; past it, and where pinning fails, lazily committed buffers (hostmem.lazy_buffer) that are
    not counted. Freed buffers are counted out."""
    import gc

    real_empty = torch.empty

    def fake_pinned(*a, pin_memory=False, **kw):  # no CUDA here: an ordinary tensor stands in
        return real_empty(*a, **kw)

    monkeypatch.setattr(hostmem.torch, "empty", fake_pinned)
    monkeypatch.setattr(hostmem, "PINNED_RECEIVE_MAX_BYTES", 1000)
    base = hostmem.pinned_receive_bytes()
    a = hostmem.pinned_buffer(600)
    b = hostmem.pinned_buffer(600)  # would pass the cap: a lazy buffer, not counted
    assert a.nbytes == b.nbytes == 600 and not b.readonly
    assert hostmem.pinned_receive_bytes() == base + 600
    view = a[10:20]
    del a
    gc.collect()
    assert hostmem.pinned_receive_bytes() == base + 600  # a slice still holds the buffer
    del view
    gc.collect()
    assert hostmem.pinned_receive_bytes() == base
    assert type(hostmem.pinned_buffer(900).obj).__name__ == "ndarray"
    gc.collect()
    assert hostmem.pinned_receive_bytes() == base

    def refuse(*a, pin_memory=False, **kw):
        raise RuntimeError("no pinned memory")

    monkeypatch.setattr(hostmem.torch, "empty", refuse)
    fallback = hostmem.pinned_buffer(100)
    assert fallback.nbytes == 100 and not fallback.readonly and hostmem.pinned_receive_bytes() == base
