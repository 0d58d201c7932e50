"""HEVC codecs (ids 16, 17): packing geometry, libx265 round trips (lossless exact, lossy budget),
dtype/shape matrix, non-finite policy, bad payloads, frame limits, NVENC session cache and the
NVENC/NVDEC orchestration against fakes (the real GPU paths run in bench/hevc_gpu_check.py)."""

from __future__ import annotations

import dataclasses
import json
import math
import struct
import time
import zlib

import pytest
import torch

av = pytest.importorskip("av", reason="PyAV is not installed: pip install av (the 'codecs' extra)")

from comfyui_mesh import codec, errors  # noqa: E402
from comfyui_mesh.protocol import WireTensor  # noqa: E402
from comfyui_mesh.wirecodecs import base, channels, fidelity  # noqa: E402
from comfyui_mesh.wirecodecs import hevc as H  # noqa: E402
from comfyui_mesh.wirecodecs import hevc_engines as E  # noqa: E402
from comfyui_mesh.wirecodecs import hevc_layout as L  # noqa: E402

if E.x265_status() or E.pyav_decode_status():
    pytest.skip(f"PyAV lacks libx265/hevc: {E.x265_status() or E.pyav_decode_status()}", allow_module_level=True)

FLOATS = [torch.bfloat16, torch.float16, torch.float32]
FAST = {"x265_preset": "ultrafast"}


def wire_copy(wt: WireTensor) -> WireTensor:
    return dataclasses.replace(wt, data=bytes(wt.data), meta=json.loads(json.dumps(wt.meta)))


def smooth(shape, dtype=torch.float32, seed=0) -> torch.Tensor:
    """[..., N, C] with N a square grid: per-channel smooth fields, log-normal scales and means."""
    g = torch.Generator().manual_seed(seed)
    *lead, n, c = shape
    side = math.isqrt(n)
    assert side * side == n
    b = math.prod(lead) if lead else 1
    white = torch.randn(b * c, 1, side, side, generator=g)
    f = torch.nn.functional.avg_pool2d(white, 5, stride=1, padding=2, count_include_pad=False)
    f = torch.nn.functional.avg_pool2d(f, 5, stride=1, padding=2, count_include_pad=False)
    f = (f / f.std()).reshape(b, c, n).transpose(1, 2)
    sig = torch.exp(0.5 * torch.randn(c, generator=g))
    mu = 0.3 * sig * torch.randn(c, generator=g)
    return (mu + sig * f).reshape(shape).to(dtype)


def gauss(shape, dtype=torch.float32, seed=0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g) * torch.exp(torch.randn(shape[-1], generator=g))).to(dtype)


def round_trip(x, name="nvenc", params=None):
    wt = codec.encode(x, "x", name, {**FAST, **(params or {})})
    return wt, codec.decode(wire_copy(wt))


def reference(x: torch.Tensor, quant=L.QUANT_MINMAX, share_q=0.9) -> tuple[torch.Tensor, torch.Tensor]:
    """What a lossless HEVC round trip must return exactly (8-bit quantization alone), and the steps."""
    q, center, step = L.quantize(channels.channel_major(x), quant, share_q)
    return channels.output(L.dequantize(q, center, step), x.dtype, tuple(x.shape)), step


def bits_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    if a.element_size() == 2:
        return torch.equal(a.view(torch.int16), b.view(torch.int16))
    return torch.equal(a.view(torch.int32), b.view(torch.int32))


def cosine(a, b) -> float:
    return torch.nn.functional.cosine_similarity(a.double().flatten(), b.double().flatten(), dim=0).item()


def slack(dtype, x, y):
    mag = torch.maximum(x.double().abs(), y.double().abs())
    return {torch.bfloat16: mag * 2**-8, torch.float16: mag * 2**-11 + 2**-24}.get(dtype, mag * 2**-22)


# ---------------------------------------------------------------------------- registry, params


def test_registered_with_stable_ids():
    assert codec.by_name("nvenc").wire_id == 16 and codec.by_id(16).name == "nvenc"
    assert codec.by_name("hevc-orig").wire_id == 17
    assert codec.by_name("nvenc").available() is None  # libx265 is enough
    assert 16 in codec.available_ids() and 17 in codec.available_ids()
    assert not codec.by_name("nvenc").lossless


def test_node_params_map_and_extra_keys_ignored():
    x = smooth((1, 64, 12))
    # what mesh_node passes: qp / lossless / tile_dim plus other codecs' keys
    wt, y = round_trip(x, params={"qp": 18, "lossless": False, "tile_dim": 2, "cosine": 0.999, "backend": "zstd"})
    assert wt.codec == 16 and wt.meta == {"enc": "x265", "qp": 18}
    assert cosine(x, y) > 0.99
    wt, _ = round_trip(x, params={"qp": 30, "lossless": True, "tile_dim": 4})
    assert wt.meta == {"enc": "x265", "lossless": True}


@pytest.mark.parametrize(
    "params",
    [
        {"qp": 52},
        {"qp": -1},
        {"qp": 18.0},
        {"qp": True},
        {"tile_dim": 3},
        {"tile_dim": 16},
        {"lossless": "yes"},
        {"quant": "pca"},
        {"share_q": 2.0},
        {"encoder": "vaapi"},
        {"x265_preset": "placebo2"},
        {"row": -1},
    ],
    ids=str,
)
def test_bad_params_are_local_errors(params):
    with pytest.raises(errors.LocalError):
        codec.encode(smooth((1, 16, 4)), "x", "nvenc", params)


def test_refuses_non_float_and_float64():
    for t in (torch.zeros(4, 3, dtype=torch.int32), torch.zeros(4, 3, dtype=torch.float64)):
        with pytest.raises(errors.LocalError, match="send it raw"):
            codec.encode(t, "x", "nvenc", {})


# ---------------------------------------------------------------------------- geometry


@pytest.mark.parametrize("n", [1, 2, 3, 7, 97, 4096, 4099, 4608, 9973, 65537, 1 << 20])
def test_token_layout_never_a_strip(n):
    h, w = L.token_layout(n)
    assert h * w >= n and h * w - n < w
    if n >= 16:
        assert h > 1 and w > 1 and max(h, w) <= 2 * min(h, w) + 1, (n, h, w)
    g = L.Geometry(n, 4096, h, w, 8)
    if n <= 1 << 20:
        assert g.width <= L.HEVC_MAX_DIM and g.height <= L.HEVC_MAX_DIM
        assert g.width % L.HEVC_ALIGN == 0 and g.height % L.HEVC_ALIGN == 0
        assert min(g.width, g.height) >= L.HEVC_MIN_DIM


def test_token_layout_prefers_exact_grids():
    assert L.token_layout(4096) == (64, 64)
    assert L.token_layout(4608) == (72, 64)  # 512 text + 64 x 64 image tokens: image rows stay aligned
    assert L.token_layout(97) == (10, 10)  # prime: padded near-square, 3 pad tokens
    assert L.token_layout(4099) == (64, 65)
    assert L.token_layout(100, row=30) == (4, 30)
    assert L.original_layout(4608) == (64, 72) and L.original_layout(97) == (1, 97)


def test_frame_geometry_matches_the_original_for_flux():
    # FLUX at 1024^2: [1, 4096, 4096], tile 8 -> 22 frames of 512 x 512; tile 4 -> 86 of 256 x 256
    g = L.Geometry(4096, 4096, 64, 64, 8)
    assert (g.frames, g.width, g.height) == (22, 512, 512)
    g = L.Geometry(4096, 4096, 64, 64, 4)
    assert (g.frames, g.width, g.height) == (86, 256, 256)


@pytest.mark.parametrize("tile", L.TILE_DIMS)
def test_pack_unpack_inverse(tile):
    g0 = torch.Generator().manual_seed(tile)
    for n, c in [(1, 1), (97, 13), (64, 3 * tile * tile), (30, 200)]:
        h, w = L.token_layout(n)
        g = L.Geometry(n, c, h, w, tile)
        q = torch.randint(0, 256, (c, n), generator=g0, dtype=torch.int64).to(torch.uint8)
        for original in (False, True):
            frames = L.pack(q, g, original=original)
            assert frames.shape == (g.frames, 3, g.height, g.width) and frames.dtype == torch.uint8
            assert torch.equal(L.unpack(frames, g), q)


# ---------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("dtype", FLOATS, ids=str)
@pytest.mark.parametrize("tile", [1, 2, 4, 8])
def test_lossless_exact_through_x265(dtype, tile):
    x = gauss((1, 97, 24), dtype, seed=tile)  # prime token count, noise-like content
    wt, y = round_trip(x, params={"lossless": True, "tile_dim": tile})
    want, step = reference(x)
    assert bits_equal(y, want)  # the 8-bit planes crossed bit-exactly
    err = (y.double() - x.double()).abs().reshape(-1, 24)
    assert bool((err <= step.double() / 2 * (1 + 1e-5) + slack(dtype, x, y).reshape(-1, 24) + 1e-30).all())


def test_lossless_planes_bit_exact():
    x = smooth((1, 256, 40))
    g = L.Geometry(256, 40, 16, 16, 2)
    q, _, _ = L.quantize(channels.channel_major(x), L.QUANT_MINMAX)
    frames = L.pack(q, g)
    bits = E.encode_x265(frames, L.settings({"lossless": True, **FAST}))
    assert torch.equal(E.decode_pyav(memoryview(bits), g), frames)


def test_lossy_qp18_budget_on_smooth_data():
    x = smooth((1, 1024, 48), torch.bfloat16)
    wt, y = round_trip(x, params={"qp": 18, "tile_dim": 4})
    assert cosine(x, y) >= 0.995
    raw = x.numel() * 2
    assert wt.nbytes < raw / 3  # smooth data compresses well at QP 18
    wt51, y51 = round_trip(x, params={"qp": 51, "tile_dim": 4, "verify": False})  # no floor
    assert wt51.nbytes < wt.nbytes and cosine(x, y51) < cosine(x, y)
    # with the local check (default), QP 51 misses the floor: those channels travel exactly
    wtf, yf = round_trip(x, params={"qp": 51, "tile_dim": 4})
    assert wtf.nbytes > wt51.nbytes and fidelity.summary(fidelity.channel_snr_db(x, yf))[0] >= L.HEVC_SNR_DB


def test_shared_step_mode():
    x = gauss((1, 64, 32), seed=3)
    wt, y = round_trip(x, params={"quant": "shared", "lossless": True, "tile_dim": 2})
    want, step = reference(x, L.QUANT_SHARED)
    assert bits_equal(y, want)
    xc = x.reshape(-1, 32).double()
    rng, std = xc.amax(0) - xc.amin(0), xc.std(0, correction=0)
    s = torch.quantile(rng / (255 * std), 0.9).item()  # the shared step in units of each channel's std
    assert torch.allclose(step.double(), torch.maximum(rng / 255, s * std), rtol=1e-5)
    assert int((step.double() > rng / 255 * (1 + 1e-6)).sum()) >= 26  # most channels: the shared step
    assert bool(((y - x).abs().reshape(-1, 32) <= step / 2 * (1 + 1e-5) + 1e-6).all())
    assert struct.unpack_from("<B", wt.data, 5)[0] == L.QUANT_SHARED


def test_original_baseline_truncates_and_uses_its_layout():
    x = smooth((1, 64, 20))
    wt, y = round_trip(x, name="hevc-orig", params={"lossless": True})
    assert wt.codec == 17
    hdr = L.HEADER.unpack_from(wt.data)
    assert hdr[2] == L.QUANT_TRUNC and hdr[3] == 8 and (hdr[7], hdr[8]) == L.original_layout(64)
    want, step = reference(x, L.QUANT_TRUNC)
    assert bits_equal(y, want)
    d = (x.double() - y.double()).reshape(-1, 20)
    assert bool((d >= -1e-6).all()) and bool((d <= step.double() * (1 + 1e-5) + 1e-6).all())  # biased low
    assert d.mean() > 0
    # default QP 18 lossy, as the original
    wt, y = round_trip(x, name="hevc-orig")
    assert wt.meta == {"enc": "x265", "qp": 18}


def test_original_baseline_refuses_its_own_strip_bug():
    x = gauss((1, 4099, 3))
    with pytest.raises(errors.LocalError, match="1 x N strip"):
        codec.encode(x, "x", "hevc-orig", {})
    wt, y = round_trip(x, params={"tile_dim": 8, "lossless": True})  # ours: 64 x 65, fits
    assert bits_equal(y, reference(x)[0])


@pytest.mark.parametrize("n", [97, 4099])
def test_prime_token_counts(n):
    x = gauss((1, n, 3), torch.bfloat16, seed=n)
    wt, y = round_trip(x, params={"lossless": True, "tile_dim": 1})
    hdr = L.HEADER.unpack_from(wt.data)
    h, w, width, height = hdr[7], hdr[8], hdr[9], hdr[10]
    assert h > 1 and w > 1 and width <= L.HEVC_MAX_DIM and height <= L.HEVC_MAX_DIM
    assert bits_equal(y, reference(x)[0])


def test_one_token_and_constant_channels_exact():
    x = gauss((1, 1, 8), torch.bfloat16)
    for params in ({"lossless": True}, {"qp": 51}):
        wt, y = round_trip(x, params=params)
        assert bits_equal(y, x)  # one token: every channel is constant
    x = smooth((2, 64, 16))
    x[..., 3] = 7.25
    x[..., 9] = -1e-3
    x[..., 12] = 0.0
    for params in ({"lossless": True}, {"qp": 40}):
        wt, y = round_trip(x, params=params)
        for ch in (3, 9, 12):
            assert torch.equal(y[..., ch], x[..., ch])


@pytest.mark.parametrize("shape", [(), (0,), (0, 4), (3, 0), (2, 0, 5)], ids=str)
def test_empty_and_scalar_travel_raw(shape):
    """Documented: 0-d and empty tensors are sent raw inside the codec's id (meta {"raw": true})."""
    x = (torch.randn(shape) if shape else torch.tensor(1.5)).to(torch.bfloat16)
    wt, y = round_trip(x)
    assert wt.codec == 16 and wt.meta == {"raw": True} and wt.nbytes == x.numel() * 2
    assert y.shape == x.shape and y.dtype == x.dtype
    assert bits_equal(y.reshape(-1), x.reshape(-1))


@pytest.mark.parametrize("dtype", FLOATS, ids=str)
@pytest.mark.parametrize("shape", [(5, 7), (2, 3, 11), (1, 16, 1), (4, 9, 2, 6)], ids=str)
def test_dtype_shape_matrix(dtype, shape):
    x = gauss(shape, dtype, seed=len(shape))
    wt, y = round_trip(x, params={"lossless": True, "tile_dim": 2})
    assert y.shape == x.shape and y.dtype == dtype and y.device.type == "cpu"
    assert bits_equal(y, reference(x)[0])


def test_huge_values_stay_finite():
    x = gauss((1, 64, 6))
    x[:, ::7, 0] = 3e38
    x[:, 1::7, 0] = -3e38
    x[..., 1] = 60000.0 + torch.arange(64.0)[None]  # near float16's max
    wt, y = round_trip(x, params={"lossless": True})
    assert bool(torch.isfinite(y).all())
    assert cosine(x[..., :2], y[..., :2]) > 0.999
    y16 = round_trip(x[..., 1:].to(torch.float16), params={"lossless": True})[1]
    assert bool(torch.isfinite(y16).all())


@pytest.mark.parametrize("dtype", FLOATS, ids=str)
def test_non_finite_policy(dtype):
    x = gauss((1, 64, 4), dtype)
    x[0, 3, 0] = float("nan")
    x[0, 5, 1] = float("inf")
    x[0, 6, 1] = float("-inf")
    x[0, 7, 2] = float("nan")
    x[0, 8, 2] = float("inf")
    wt, y = round_trip(x, params={"lossless": True})
    assert bool(torch.isfinite(y).all())
    fin = torch.where(torch.isfinite(x), x, torch.zeros_like(x)).double()
    amax = fin.abs().amax(1)[0]
    want, step = reference(x)
    assert bits_equal(y, want)
    tol = step.double() / 2 * 1.001 + slack(dtype, fin, y).max()
    assert abs(y[0, 3, 0].double()) <= tol[0]
    assert abs(y[0, 5, 1].double() - amax[1]) <= tol[1] and abs(y[0, 6, 1].double() + amax[1]) <= tol[1]
    assert abs(y[0, 7, 2].double()) <= tol[2] and abs(y[0, 8, 2].double() - amax[2]) <= tol[2]


def test_payload_layout_is_binary_and_length_checked():
    c = 24
    x = smooth((1, 64, c))
    wt, _ = round_trip(x, params={"tile_dim": 2})
    data = bytes(wt.data)
    magic, ver, quant, tile, flags, n, cc, h, w, fw, fh, nf, nbytes, crc = L.HEADER.unpack_from(data)
    assert (magic, ver, quant, tile, flags, n, cc, h, w) == (b"MHVC", 2, 0, 2, 0, 64, c, 8, 8)
    assert (fw, fh, nf) == (144, 144, 2)
    end = L.HEADER.size + 8 * c + nbytes
    assert len(data) == end + 4 and zlib.crc32(data[end - nbytes : end]) == crc
    assert data[end:] == b"\x00\x00\x00\x00"  # no fix-ups: every channel of smooth data is above the floor
    scales = torch.frombuffer(bytearray(data[L.HEADER.size : L.HEADER.size + 8 * c]), dtype=torch.float32)
    xc = x.reshape(-1, c)
    assert torch.allclose(scales[c:], (xc.amax(0) - xc.amin(0)) / 255)  # steps, float32, binary
    assert data[L.HEADER.size + 8 * c : L.HEADER.size + 8 * c + 4] == b"\x00\x00\x00\x01"  # Annex-B start code


# ---------------------------------------------------------------------------- bad payloads


C = 24  # channels of the bad-payload tests' tensor: 2 frames at tile 2


def _payload(x=None, params=None):
    x = smooth((1, 64, C)) if x is None else x
    return codec.encode(x, "x", "nvenc", {**FAST, "tile_dim": 2, **(params or {})})


def _with(wt, data: bytes, fix_crc=False) -> WireTensor:
    """``fix_crc``: everything after the side info is the bitstream; header fields made
    consistent with it and an empty fix-up section (K = 0) appended."""
    if fix_crc and len(data) >= L.HEADER.size:
        f = list(L.HEADER.unpack_from(data))
        side = 8 * f[6]
        f[13] = zlib.crc32(data[L.HEADER.size + side :])
        f[12] = max(0, len(data) - L.HEADER.size - side)
        data = L.HEADER.pack(*f) + data[L.HEADER.size :] + L.FIXUP_COUNT.pack(0)
    return dataclasses.replace(wt, data=data)


def _expect_codec_error(wt):
    t0 = time.monotonic()
    with pytest.raises(errors.CodecError):
        codec.decode(wt)
    assert time.monotonic() - t0 < 5


def _error_or_clean(wt, clean: torch.Tensor) -> bool:
    """A forged-consistent payload (valid CRC) reaches libavcodec: it must raise CodecError or
    give back exactly what the intact stream gives (x265's MD5 picture hashes catch the rest),
    never crash or hang. True when it raised."""
    t0 = time.monotonic()
    try:
        y = codec.decode(wt)
    except errors.CodecError:
        return True
    finally:
        assert time.monotonic() - t0 < 5
    assert y.shape == clean.shape and y.dtype == clean.dtype
    return False


def test_truncated_payloads():
    wt = _payload()
    clean = codec.decode(wt)
    data = bytes(wt.data)
    raised = 0
    for cut in [0, 3, 10, L.HEADER.size - 1, L.HEADER.size, L.HEADER.size + 50, len(data) // 2, len(data) - 1]:
        _expect_codec_error(_with(wt, data[:cut]))  # the length check
        raised += _error_or_clean(_with(wt, data[:cut], fix_crc=True), clean)
    assert raised >= 6


def test_corrupted_bitstream_caught_by_crc_and_decoder():
    wt = _payload()
    clean = codec.decode(wt)
    data = bytearray(wt.data)
    start = L.HEADER.size + 8 * C
    rng = torch.Generator().manual_seed(0)
    changed = 0
    for _ in range(12):
        bad = bytearray(data)
        i = int(torch.randint(start, len(bad), (1,), generator=rng))
        bad[i] ^= 1 << int(torch.randint(0, 8, (1,), generator=rng))
        _expect_codec_error(_with(wt, bytes(bad)))  # the CRC
        forged = _with(wt, bytes(bad), fix_crc=True)
        if not _error_or_clean(forged, clean):
            assert bits_equal(codec.decode(forged), clean)  # decoded anyway: then it must be exact
        else:
            changed += 1
    assert changed >= 6
    # garbage with a valid CRC goes all the way into libavcodec and must come back as CodecError
    for seed in range(4):
        g = torch.Generator().manual_seed(seed)
        junk = torch.randint(0, 256, (len(data) - start,), generator=g, dtype=torch.int64).to(torch.uint8)
        _expect_codec_error(_with(wt, bytes(data[:start]) + junk.numpy().tobytes(), fix_crc=True))
    # a start code followed by junk, and an empty bitstream
    _expect_codec_error(_with(wt, bytes(data[:start]) + b"\x00\x00\x00\x01" + b"\xff" * 200, fix_crc=True))
    _expect_codec_error(_with(wt, bytes(data[:start]), fix_crc=True))


def test_valid_stream_of_wrong_geometry_or_count():
    wt = _payload()  # 2 frames of 144 x 144
    other = _payload(smooth((1, 1024, C)), {"tile_dim": 8})  # 1 frame of 256 x 256
    data, odata = bytes(wt.data), bytes(other.data)
    start = L.HEADER.size + 8 * C
    assert L.HEADER.unpack_from(data)[11] == 2
    _expect_codec_error(_with(wt, data[:start] + odata[start:], fix_crc=True))
    # one frame less, and one frame more, than the header declares
    x = smooth((1, 64, C))
    g = L.Geometry(64, C, 8, 8, 2)
    frames = L.pack(L.quantize(channels.channel_major(x), L.QUANT_MINMAX)[0], g)
    packets = E.x265_packets(frames, L.settings({"qp": 18, **FAST}))
    assert len(packets) == 2 and data[start:-4] == b"".join(packets)  # the encoder is deterministic
    _expect_codec_error(_with(wt, data[:start] + packets[0], fix_crc=True))
    three = E.x265_packets(torch.cat([frames, frames[:1]]), L.settings({"qp": 18, **FAST}))
    _expect_codec_error(_with(wt, data[:start] + b"".join(three), fix_crc=True))


@pytest.mark.parametrize(
    "field,value",
    [
        (0, b"XHVC"),
        (1, 3),
        (1, 0),
        (2, 9),
        (3, 3),
        (4, 8),
        (5, 65),
        (6, 23),
        (7, 1),
        (8, 65),
        (9, 160),
        (10, 128),
        (11, 3),
    ],
)
def test_bad_header_fields(field, value):
    wt = _payload()
    f = list(L.HEADER.unpack_from(wt.data))
    f[field] = value
    _expect_codec_error(_with(wt, L.HEADER.pack(*f) + bytes(wt.data)[L.HEADER.size :]))


def test_bad_scales_and_descriptor():
    wt = _payload()
    data = bytearray(wt.data)
    struct.pack_into("<f", data, L.HEADER.size + 4, float("nan"))
    _expect_codec_error(_with(wt, bytes(data)))
    data = bytearray(wt.data)
    struct.pack_into("<f", data, L.HEADER.size + 4 * C, -1.0)
    _expect_codec_error(_with(wt, bytes(data)))
    for bad in (
        dataclasses.replace(wt, shape=(1, 64, C + 1)),
        dataclasses.replace(wt, shape=(1, 65, C)),
        dataclasses.replace(wt, shape=()),
        dataclasses.replace(wt, dtype="int8"),
        dataclasses.replace(wt, shape=(1 << 20, 1 << 20, C)),
    ):
        _expect_codec_error(bad)


# ---------------------------------------------------------------------------- limits


def test_frame_over_hevc_limits_is_local_error():
    x = gauss((1, 2000, 3))
    with pytest.raises(errors.LocalError, match="8192"):
        codec.encode(x, "x", "nvenc", {"row": 2000, "tile_dim": 8})
    codec.encode(x, "x", "nvenc", {"row": 1000, "tile_dim": 8, **FAST})  # 8000 wide: fits
    # a million-token layout that fits at tile 8 but not with a forced long row
    g = L.Geometry(1 << 20, 16, *L.token_layout(1 << 20), 8)
    assert g.problem() is None
    # many channels of one token at tile 1 would need gigabytes of 144 x 144 frames
    with pytest.raises(errors.LocalError, match="bytes of video frames"):
        codec.encode(torch.randn(1, 30000), "x", "nvenc", {"tile_dim": 1})


# ---------------------------------------------------------------------------- NVENC session cache


class FakeSession:
    closed: list = []

    def __init__(self, key):
        self.key = key
        self.is_open = True

    def close(self):
        assert self.is_open, "closed twice"
        self.is_open = False
        FakeSession.closed.append(self.key)


def test_session_cache_lru_releases_sessions():
    FakeSession.closed = []
    cache = E.SessionCache(cap=2)
    made = {}

    def get(k):
        return cache.get(k, lambda: made.setdefault(k, FakeSession(k)) if k not in made else FakeSession(k))

    a, b = get("a"), get("b")
    assert get("a") is a and len(cache) == 2  # hit: a becomes most recent
    c = get("c")  # evicts b (least recent), not a
    assert FakeSession.closed == ["b"] and not b.is_open and a.is_open and c.is_open
    assert cache.keys() == ["a", "c"]
    cache.discard("a")
    assert FakeSession.closed == ["b", "a"] and cache.keys() == ["c"]
    cache.discard("zzz")  # unknown: no-op
    get("d")
    cache.close_all()
    assert sorted(FakeSession.closed) == ["a", "b", "c", "d"] and len(cache) == 0


def _planes_of(fr) -> list[torch.Tensor]:
    """A PyAV yuv444p frame's three planes as (H, W) tensors (line padding dropped)."""
    out = []
    for p in fr.planes:
        a = torch.frombuffer(bytearray(bytes(p)), dtype=torch.uint8).reshape(p.height, p.line_size)
        out.append(a[:, : p.width])
    return out


class FakeNvc:
    """Just enough of PyNvVideoCodec: encoder sessions (libx265 underneath), caps, a callback
    demuxer that splits an Annex-B stream into access units and a decoder (libavcodec underneath)."""

    class NV_ENC_PIC_FLAGS:  # noqa: N801
        FORCEIDR = 2

    class VideoPacketFlag:
        ENDOFPICTURE = 1

    class DisplayDecodeLatencyType:
        LOW = 1

    class cudaVideoCodec:  # noqa: N801
        HEVC = "hevc"

    def __init__(self, drop_packets=0):
        self.created: list = []
        self.destroyed = 0
        self.drop = drop_packets
        self.flags: list = []

    def GetEncoderCaps(self, gpuid=0, codec="hevc"):  # noqa: N802
        return {"support_yuv444_encode": 1, "support_lossless_encode": 1}

    def CreateEncoder(self, width, height, fmt, cpu_input, **kw):  # noqa: N802
        assert fmt == "YUV444" and cpu_input is False and kw["codec"] == "hevc" and kw["bf"] == "0"
        assert all(isinstance(v, str) for v in kw.values())
        nvc = self
        nvc.created.append((width, height, kw["constqp"], kw["tuning_info"]))

        class Enc:
            def __init__(self):
                self.frames = []

            def Encode(self, frame, flags=0):  # noqa: N802
                planes = frame.cuda()
                assert len(planes) == 3 and planes[0].__cuda_array_interface__["shape"] == (height, width, 1)
                nvc.flags.append(flags)
                self.frames.append(frame.tensor.clone())
                return []  # NVENC may hold packets back until EndEncode

            def EndEncode(self):  # noqa: N802
                pk = E.x265_packets(torch.stack(self.frames), L.settings({"lossless": True})) if self.frames else []
                self.frames = []
                return [{"data": p} for p in pk[: len(pk) - nvc.drop]]

            def __del__(self):
                nvc.destroyed += 1

        return Enc()

    def CreateDemuxer(self, feed):  # noqa: N802
        buf = bytearray()
        while True:
            chunk = bytearray(1000)  # the demuxer's buffer, filled by the callback
            k = feed(chunk)
            if not k:
                break
            buf += chunk[:k]
        ctx = av.CodecContext.create("hevc", "r")
        pkts = list(ctx.parse(bytes(buf))) + list(ctx.parse(None))

        class Pkt:
            def __init__(self, data):
                self.data, self.bsl, self.decode_flag = data, len(data), 0

        return iter([Pkt(bytes(p)) for p in pkts] + [Pkt(b"")])

    reset_after_eos = True  # a decoder takes a new stream after the end of the last one

    def CreateDecoder(self, **kw):  # noqa: N802
        assert kw["usedevicememory"] is True and kw["codec"] == "hevc" and kw["latency"] == 1
        self.decoders = getattr(self, "decoders", 0) + 1
        ctx = av.CodecContext.create("hevc", "r")
        reset = self.reset_after_eos

        class Frame:
            def __init__(self, fr):
                self.planes = _planes_of(fr)

            def cuda(self):
                return [p[:, :, None] for p in self.planes]  # (H, W, 1), as PyNvVideoCodec's CAI

        class Dec:
            def Decode(self, pkt):  # noqa: N802
                if not pkt.bsl:
                    out = [Frame(f) for f in ctx.decode(None)]
                    if reset:
                        ctx.flush_buffers()
                    return out
                assert pkt.decode_flag == 1  # ENDOFPICTURE on every access unit
                return [Frame(f) for f in ctx.decode(av.Packet(pkt.data))]

        return Dec()


@pytest.fixture
def fake_nvenc(monkeypatch):
    fake = FakeNvc()
    monkeypatch.setitem(base._IMPORTS, "PyNvVideoCodec", (fake, None))
    monkeypatch.setattr(E, "nvenc_status", lambda device=None: None)
    monkeypatch.setattr(E, "nvenc_caps", lambda device=None: {"support_lossless_encode": 1})
    monkeypatch.setitem(E._NVENC_STATE, "reuse", True)
    monkeypatch.setitem(E._NVENC_STATE, "broken", "")
    monkeypatch.setattr(E, "SESSIONS", E.SessionCache(cap=2))
    yield fake
    E.SESSIONS.close_all()


def test_nvenc_path_with_fake_encoder(fake_nvenc):
    x = gauss((1, 64, 30), torch.bfloat16)
    wt, y = round_trip(x, params={"lossless": True, "tile_dim": 2})  # 3 frames
    assert wt.meta["enc"] == "nvenc" and bits_equal(y, reference(x)[0])
    assert fake_nvenc.flags[0] == 2 and fake_nvenc.flags[1:] == [0, 0]  # IDR on frame 0 only
    round_trip(x, params={"lossless": True, "tile_dim": 2})
    assert len(fake_nvenc.created) == 1  # the session was reused
    round_trip(x, params={"qp": 20, "tile_dim": 2})
    round_trip(gauss((1, 1024, 3)), params={"qp": 20, "tile_dim": 8})
    assert [c[2:] for c in fake_nvenc.created] == [("0", "lossless"), ("20", "high_quality"), ("20", "high_quality")]
    assert len(E.SESSIONS) == 2 and fake_nvenc.destroyed >= 1  # cap 2: the lossless session was released
    E.close_sessions()
    assert len(E.SESSIONS) == 0


def test_nvenc_misbehaving_session_falls_back(fake_nvenc, caplog):
    fake_nvenc.drop = 1  # EndEncode loses a frame: packet boundaries cannot be trusted
    x = gauss((1, 64, 30))
    wt, y = round_trip(x, params={"lossless": True, "tile_dim": 2})
    assert wt.meta["enc"] == "x265" and bits_equal(y, reference(x)[0])
    assert E._NVENC_STATE["broken"] and len(E.SESSIONS) == 0
    with pytest.raises(errors.LocalError):
        codec.encode(x, "x", "nvenc", {"encoder": "nvenc"})


@pytest.fixture
def nvdec_state(monkeypatch):
    monkeypatch.setattr(E, "_DECODERS", {})
    monkeypatch.setitem(E._NVDEC_STATE, "reuse", True)
    monkeypatch.setitem(E._NVDEC_STATE, "broken", "")
    monkeypatch.setattr(E, "_ONCE", set())


def _stream(n=100, c=40, qp=24):
    x = gauss((1, n, c))
    wt = codec.encode(x, "x", "nvenc", {**FAST, "qp": qp, "tile_dim": 2, "verify": False})  # 4 frames, lossy
    p = L.parse_header(memoryview(bytes(wt.data)), "x", n, c, 4)
    return wt, p.head.geom, p.bits


def test_nvdec_orchestration_with_fake_decoder(nvdec_state):
    _, g, bits = _stream()
    cpu = E.decode_pyav(bits, g)
    fake = FakeNvc()
    for _ in range(3):
        gpu = E.decode_nvdec(bits, g, torch.device("cpu"), nvc=fake)
        assert torch.equal(gpu, cpu)  # HEVC decoding is exact: any conforming decoder gives these planes
    assert fake.decoders == 1 and len(E._DECODERS) == 1  # one decoder, reused
    _, g2, bits2 = _stream(64, 24, qp=30)  # another stream, other frame size, same decoder
    assert torch.equal(E.decode_nvdec(bits2, g2, torch.device("cpu"), nvc=fake), E.decode_pyav(bits2, g2))

    class Broken(FakeNvc):
        def CreateDecoder(self, **kw):  # noqa: N802
            raise RuntimeError("cuvidCreateDecoder failed")

    E._DECODERS.clear()
    with pytest.raises(E.NvdecFailed, match="cuvidCreateDecoder"):
        E.decode_nvdec(bits, g, torch.device("cpu"), nvc=Broken())

    class Short(FakeNvc):
        def CreateDemuxer(self, feed):  # noqa: N802
            return iter(list(super().CreateDemuxer(feed))[:3])

    E._DECODERS.clear()
    with pytest.raises(E.NvdecFailed, match="of 4 frames"):
        E.decode_nvdec(bits, g, torch.device("cpu"), nvc=Short())


def test_nvdec_decoder_that_cannot_be_reused(nvdec_state):
    _, g, bits = _stream()
    cpu = E.decode_pyav(bits, g)
    fake = FakeNvc()
    fake.reset_after_eos = False  # this decoder refuses a second stream
    for _ in range(3):
        assert torch.equal(E.decode_nvdec(bits, g, torch.device("cpu"), nvc=fake), cpu)
    assert E._NVDEC_STATE["reuse"] is False and fake.decoders == 3 and not E._DECODERS


def test_nvdec_failure_falls_back_to_cpu_unless_the_payload_is_bad(nvdec_state, monkeypatch):
    wt = _payload()  # before the fake NVDEC: the encoder's local check decodes too
    monkeypatch.setattr(H.HevcCodec, "_use_nvdec", staticmethod(lambda dev: True))
    calls = []

    def failing(bits, g, device, nvc=None):
        calls.append(1)
        raise E.NvdecFailed("surface copy failed")

    monkeypatch.setattr(E, "decode_nvdec", failing)
    start = L.HEADER.size + 8 * C
    junk = _with(wt, bytes(wt.data)[:start] + b"\x00\x00\x00\x01" + bytes(range(256)) * 3, fix_crc=True)
    with pytest.raises(errors.CodecError):
        codec.decode(junk)
    assert calls and E._NVDEC_STATE["broken"] == ""  # a bad payload is not NVDEC's fault
    x = smooth((1, 64, C))
    wt, y = round_trip(x, params={"tile_dim": 2, "lossless": True})
    assert bits_equal(y, reference(x)[0]) and "surface copy failed" in E._NVDEC_STATE["broken"]


def test_nvenc_unavailable_reason_and_x265_fallback_logged_once(caplog, monkeypatch):
    monkeypatch.setattr(E, "_ONCE", set())
    x = smooth((1, 16, 4))
    with caplog.at_level("WARNING", logger="comfyui_mesh"):
        for _ in range(3):
            wt = codec.encode(x, "x", "nvenc", FAST)
            assert wt.meta["enc"] == "x265"
    msgs = [r.getMessage() for r in caplog.records if "libx265" in r.getMessage()]
    assert len(msgs) == 1 and "NVENC is not usable here" in msgs[0]
    if not torch.cuda.is_available():
        assert "CUDA" in E.nvenc_status()
        with pytest.raises(errors.LocalError, match="encoder=nvenc is not usable"):
            codec.encode(x, "x", "nvenc", {"encoder": "nvenc"})


# ---------------------------------------------------------------------------- through a split


def test_loopback_split_with_hevc_both_ways():
    """A toy split over a real connection: the front half's output goes up as HEVC, the reply
    comes back as HEVC; the result matches running the model locally within the 8-bit budget."""
    from comfyui_mesh.config import ClientConfig, ServerConfig
    from comfyui_mesh.server.core import DaedalusServer, ServerState
    from comfyui_mesh.server.toy import ToyBackend, ToyModel
    from comfyui_mesh.transport import MeshClient

    token = "0123456789abcdef0123456789abcdef"
    srv = DaedalusServer(ServerState(ServerConfig(port=0, device="cpu", n_blocks=3), ToyBackend, token=token))
    host, port = srv.start()
    try:
        c = MeshClient(ClientConfig(host=host, port=port, token=token), expect={"arch": "toy", "n_blocks": 3})
        g = torch.Generator().manual_seed(0)
        model, bias = ToyModel(), torch.randn(64, generator=g)
        front = model.run(torch.randn(2, 97, 64, generator=g), bias, 0, 5)
        want = model.run(front, bias, 5)
        for name, params in (("nvenc", {"lossless": True, "tile_dim": 4}), ("hevc-orig", {})):
            out, stats = c.forward(
                arch="toy",
                n_blocks=3,
                coded={"x": front},
                exact={},
                consts={"bias": bias},
                scalars={},
                codec_name=name,
                codec_params={**FAST, **params},
                reply_codec=name,
            )
            assert stats.codec["codec"] == name
            assert stats.bytes_out < front.numel() * 4
            assert cosine(out["out"], want) > 0.999, name
        c.close()
    finally:
        srv.shutdown()
