"""HEVC codec (id 16) per-channel fidelity: the standardized shared step, the local check that
sends every channel below the floor exactly (layout version 2), and the fix-up section's checks.

The seam: [1, 1024, 256] bf16 on a 32 x 32 token grid, like a trained DiT's: most channels
smooth fields with token noise and log-normal scales, four massive channels (mean +-300, std 100,
varying smoothly over the grid), two quiet channels (std 0.01, nonzero mean) and one
heavy-tailed channel (four spikes of 50x its base std)."""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import math
import struct
import zlib

import pytest
import torch

av = pytest.importorskip("av", reason="PyAV is not installed: pip install av (the 'codecs' extra)")

from comfyui_mesh import codec, errors  # noqa: E402
from comfyui_mesh.constants import HEVC_SNR_DB  # noqa: E402
from comfyui_mesh.protocol import WireTensor  # noqa: E402
from comfyui_mesh.wirecodecs import fidelity  # noqa: E402
from comfyui_mesh.wirecodecs import hevc as H  # noqa: E402
from comfyui_mesh.wirecodecs import hevc_engines as E  # noqa: E402
from comfyui_mesh.wirecodecs import hevc_layout as L  # noqa: E402

if E.x265_status() or E.pyav_decode_status():
    pytest.skip(f"PyAV lacks libx265/hevc: {E.x265_status() or E.pyav_decode_status()}", allow_module_level=True)

FAST = {"x265_preset": "ultrafast"}
MASSIVE = (3, 77, 150, 201)
QUIET = {40: 0.2, 120: -0.1}
HEAVY = 99


def field(c: int, side: int, g: torch.Generator, passes: int = 2) -> torch.Tensor:
    """[side^2, c] smooth random fields over a side x side token grid, zero mean, unit std."""
    f = torch.randn(c, 1, side, side, generator=g)
    for _ in range(passes):
        f = torch.nn.functional.avg_pool2d(f, 5, stride=1, padding=2, count_include_pad=False)
    f = f.reshape(c, side * side)
    return ((f - f.mean(1, keepdim=True)) / f.std(1, keepdim=True)).t()


def seam(n: int = 1024, c: int = 256, seed: int = 0, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    side = math.isqrt(n)
    x = field(c, side, g) * 0.9 + 0.3 * torch.randn(n, c, generator=g)
    sig = torch.exp(0.5 * torch.randn(c, generator=g))
    x = x * sig + 0.3 * sig * torch.randn(c, generator=g)
    m = field(len(MASSIVE), side, g, passes=3)
    for k, ch in enumerate(MASSIVE):
        x[:, ch % c] = (300.0 if k % 2 == 0 else -300.0) + 100.0 * m[:, k]
    q = field(len(QUIET), side, g)
    for k, (ch, mu) in enumerate(QUIET.items()):
        x[:, ch % c] = mu + 0.01 * q[:, k]
    x[:, HEAVY % c] = torch.randn(n, generator=g)
    x[torch.randperm(n, generator=g)[:4], HEAVY % c] = torch.tensor([50.0, -50.0, 50.0, 50.0])
    return x.reshape(1, n, c).to(dtype)


@pytest.fixture(scope="module")
def x() -> torch.Tensor:
    return seam()


def round_trip(x: torch.Tensor, params: dict) -> tuple[WireTensor, torch.Tensor]:
    wt = codec.encode(x, "x", "nvenc", {**FAST, **params})
    return wt, codec.decode(dataclasses.replace(wt, data=bytes(wt.data)))


def parsed(wt: WireTensor) -> L.Parsed:
    c = wt.shape[-1]
    return L.parse_header(
        memoryview(bytes(wt.data)), wt.name, math.prod(wt.shape) // c, c, 2 if wt.dtype != "float32" else 4
    )


def fixed(wt: WireTensor) -> list[int]:
    return parsed(wt).fix_idx.tolist()


# ---------------------------------------------------------------------------- the floor


@pytest.mark.parametrize("quant", ["minmax", "shared"])
@pytest.mark.parametrize(
    "lossless,floor_db", [(False, None), (True, None), (True, 35.0)], ids=["qp18", "lossless", "lossless-35dB"]
)
def test_every_live_channel_keeps_the_floor(x, quant, lossless, floor_db):
    params = {"quant": quant, "lossless": lossless} | ({} if floor_db is None else {"floor_db": floor_db})
    floor = HEVC_SNR_DB if floor_db is None else floor_db
    wt, y = round_trip(x, params)
    snr = fidelity.channel_snr_db(x, y)
    assert fidelity.summary(snr)[0] >= floor
    fix = fixed(wt)
    assert len(fix) <= 8  # only the outliers travel exactly
    for ch in fix:  # exact, in the input dtype
        assert torch.equal(y[..., ch], x[..., ch])
    assert not set(MASSIVE) & set(fix)  # the massive channels keep their floor in the video
    if not lossless or floor_db:
        assert HEAVY in fix  # the heavy-tailed channel misses the floor in the video (measured 13.6 / 29.2 dB)
    # without the check no floor is promised: the same channels fall below it
    wt0, y0 = round_trip(x, params | {"verify": False})
    assert fixed(wt0) == []
    assert wt0.nbytes < wt.nbytes if fix else wt0.nbytes == wt.nbytes
    snr0 = fidelity.channel_snr_db(x, y0)
    assert all(float(snr0[ch]) < floor for ch in fix)


def test_the_check_decodes_with_the_peers_decoder_path(monkeypatch):
    """Lossy: the encoder decodes its own stream once, through the codec's decoder selection
    (NVDEC on a CUDA tensor where it works, else libavcodec); lossless or verify=false: no decode."""
    calls: list[str] = []
    real = H.HevcCodec._planes

    def spy(self, bits, g, dev):
        calls.append(dev.type)
        return real(self, bits, g, dev)

    monkeypatch.setattr(H.HevcCodec, "_planes", spy)
    x = seam(256, 16, seed=5)
    codec.encode(x, "x", "nvenc", {**FAST, "tile_dim": 2})
    assert calls == ["cpu"]
    codec.encode(x, "x", "nvenc", {**FAST, "tile_dim": 2, "lossless": True})
    codec.encode(x, "x", "nvenc", {**FAST, "tile_dim": 2, "verify": False})
    assert calls == ["cpu"]


def test_floor_db_sets_the_floor_and_the_quant_familys_params_do_not(x):
    """``floor_db`` is the floor; ``snr_db``/``cosine`` (what the node passes every codec for the
    quant family) leave nvenc at its own default, so they cannot push it to raw."""
    wt, y = round_trip(x, {"floor_db": 27.0})
    assert fidelity.summary(fidelity.channel_snr_db(x, y))[0] >= 27.0
    base = round_trip(x, {})[0]
    assert len(fixed(wt)) > len(fixed(base))
    for other in ({"cosine": 0.999}, {"snr_db": 40.0}):
        assert fixed(round_trip(x, other)[0]) == fixed(base)


def test_raw_when_the_fixups_cost_more_than_the_tensor(x):
    """A floor above what QP 18 gives most channels (measured median 26.5 dB with the shared step):
    nearly every channel would travel exactly, so the raw tensor goes instead, exact."""
    wt, y = round_trip(x, {"quant": "shared", "floor_db": 40.0})
    assert wt.meta == {"raw": True} and wt.nbytes == x.numel() * 2 and torch.equal(y, x)
    wt, y = round_trip(x, {"quant": "shared", "floor_db": 40.0, "verify": False})  # no check, no raw
    assert wt.meta.get("raw") is None and wt.nbytes < x.numel()


def test_check_rounds_through_the_output_dtype():
    """The check measures what the peer will see, after its rounding to the output dtype: an
    error of 0.3 on float16's 0.5 grid near 1000 becomes 0.5 (10.5 dB -> 6.0 dB at std 1)."""
    g = torch.Generator().manual_seed(1)
    x = (1000.0 + torch.randn(2, 4096, generator=g)).half().float()  # on float16's grid, std ~1
    y = x + 0.3
    var = x.var(1, correction=0)
    assert bool((10 * torch.log10(var / 0.09) > 8.0).all()) and bool((10 * torch.log10(var / 0.25) < 8.0).all())
    ref = L.floor_ref(x)
    assert ref.scale is None
    assert L.below_floor(ref, y.clone(), 8.0, torch.float32).tolist() == []
    assert L.below_floor(ref, y.clone(), 8.0, torch.float16).tolist() == [0, 1]
    assert L.below_floor(ref, y.clone(), 5.0, torch.float16).tolist() == []
    x[1] = 1000.0  # constant channels are never listed
    assert L.below_floor(L.floor_ref(x), y.clone(), 8.0, torch.float16).tolist() == [0]


def test_check_of_huge_values():
    """Values near float32's maximum: each channel is scaled by a power of two, same verdicts."""
    g = torch.Generator().manual_seed(4)
    x = torch.randn(3, 1000, generator=g)
    y = x + torch.tensor([0.01, 0.3, 1.0])[:, None] * torch.randn(3, 1000, generator=g)
    want = L.below_floor(L.floor_ref(x), y.clone(), 20.0, torch.float32).tolist()
    assert want == [1, 2]
    big = L.floor_ref(x * 2.0**120)
    assert big.scale is not None and bool(torch.isfinite(big.var).all())
    assert L.below_floor(big, y * 2.0**120, 20.0, torch.float32).tolist() == want


# ---------------------------------------------------------------------------- the shared step


def test_shared_step_is_standardized(x):
    """quant="shared": step_c = max(range_c / 255, S std_c), so a quiet channel gets the SNR of a
    normal one (the old absolute step gave it a few levels: ~30 dB less)."""
    xf = x.float()  # float32: no input rounding to hide the quiet channels' quantization
    wt, y = round_trip(xf, {"quant": "shared", "lossless": True, "verify": False})
    snr = fidelity.channel_snr_db(xf, y)
    normal = [c for c in range(x.shape[-1]) if c not in (*MASSIVE, *QUIET, HEAVY)]
    typical = float(snr[normal].median())
    for ch in QUIET:
        assert abs(float(snr[ch]) - typical) < 3.0, (float(snr[ch]), typical)
    step = torch.frombuffer(bytearray(parsed(wt).side), dtype=torch.float32)[x.shape[-1] :]
    std = xf.reshape(-1, x.shape[-1]).std(0, correction=0)
    ratio = step / std
    assert float(ratio[normal].std() / ratio[normal].mean()) < 0.05  # one step in std units for most


# ---------------------------------------------------------------------------- the fix-up section


C, N = 24, 256
SPIKY = [5, 11, 17]


def _fixed_payload(dtype=torch.float32) -> tuple[WireTensor, torch.Tensor]:
    """Smooth channels on a 16 x 16 grid; three carry one spike of 60x their std and miss the floor."""
    g = torch.Generator().manual_seed(2)
    f = torch.randn(C, 1, 16, 16, generator=g)
    f = torch.nn.functional.avg_pool2d(f, 3, stride=1, padding=1, count_include_pad=False).reshape(C, N).t()
    x = f / f.std(0) * torch.exp(torch.randn(C, generator=g))
    for ch in SPIKY:
        x[ch, ch] = 60.0 * x[:, ch].std()
    x = x[None].to(dtype)
    wt = codec.encode(x, "x", "nvenc", {**FAST, "tile_dim": 2})
    return wt, x


def _trailer(wt: WireTensor) -> tuple[bytes, int, list[int], bytes]:
    """(everything before the fix-up section, K, indices, values' bytes)."""
    data = bytes(wt.data)
    nbytes = L.HEADER.unpack_from(data)[12]
    end = L.HEADER.size + 8 * C + nbytes
    (k,) = struct.unpack_from("<I", data, end)
    idx = list(struct.unpack_from(f"<{k}I", data, end + 4))
    return data[:end], k, idx, data[end + 4 + 4 * k :]


def _build(wt: WireTensor, head: bytes, k: int, idx: list[int], vals: bytes) -> WireTensor:
    return dataclasses.replace(wt, data=head + struct.pack(f"<I{len(idx)}I", k, *idx) + vals)


def _expect_codec_error(wt: WireTensor) -> None:
    with pytest.raises(errors.CodecError):
        codec.decode(wt)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_fixup_section_layout(dtype):
    wt, x = _fixed_payload(dtype)
    head, k, idx, vals = _trailer(wt)
    size = x.element_size()
    assert L.HEADER.unpack_from(head)[1] == 2 and k == 3 and idx == SPIKY
    assert len(vals) == k * N * size
    rows = torch.frombuffer(bytearray(vals), dtype=dtype).view(k, N)
    assert torch.equal(rows, x[0, :, idx].t())  # channel-major, the input's exact values
    y = codec.decode(wt)
    assert torch.equal(y[..., idx], x[..., idx])
    assert fidelity.summary(fidelity.channel_snr_db(x, y))[0] >= HEVC_SNR_DB


def test_fixup_garbage_is_a_codec_error():
    wt, x = _fixed_payload()
    head, k, idx, vals = _trailer(wt)
    row = N * 4
    assert torch.equal(codec.decode(_build(wt, head, k, idx, vals)), codec.decode(wt))  # the rebuild is faithful
    data = bytes(wt.data)
    for cut in (1, 3, 4, len(vals) // 2, len(vals) + 4 * k):  # truncated anywhere in the section
        _expect_codec_error(dataclasses.replace(wt, data=data[:-cut]))
    _expect_codec_error(dataclasses.replace(wt, data=data + b"\x00"))  # trailing bytes
    _expect_codec_error(dataclasses.replace(wt, data=head))  # no section at all in a version-2 payload
    _expect_codec_error(_build(wt, head, k, idx[:-1] + [C], vals))  # index out of range
    _expect_codec_error(_build(wt, head, k, idx[:-1] + [2**32 - 1], vals))  # index that is negative as int32
    _expect_codec_error(_build(wt, head, k, [idx[0]] + idx[:-1], vals))  # duplicated index
    _expect_codec_error(_build(wt, head, k, idx[::-1], vals))  # not ascending
    _expect_codec_error(_build(wt, head, k - 1, idx[:-1], vals))  # values for one channel more than the count
    _expect_codec_error(_build(wt, head, k, idx, vals[:-row]))  # values for one channel less
    big = C + 1  # count > C, with a byte length that would match it: refused before anything is read
    _expect_codec_error(_build(wt, head, big, list(range(big)), bytes(big * row)))
    _expect_codec_error(dataclasses.replace(wt, data=head + struct.pack("<I", 2**32 - 1)))  # huge count
    nan = bytearray(vals)
    struct.pack_into("<f", nan, 8, float("nan"))
    _expect_codec_error(_build(wt, head, k, idx, bytes(nan)))  # non-finite values
    _expect_codec_error(dataclasses.replace(wt, data=head + struct.pack("<I", k) + bytes(4 * k) + vals))  # all zero


def test_version_1_payloads_still_decode():
    """A version-1 payload (as written before the fix-up section existed: the same bytes without
    the trailer, version byte 1) decodes to what its version-2 twin without fix-ups gives."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(1, 64, C, generator=g).to(torch.bfloat16)
    wt = codec.encode(x, "x", "nvenc", {**FAST, "tile_dim": 2, "verify": False})
    data = bytearray(wt.data)
    assert data[4] == 2 and data[-4:] == b"\x00\x00\x00\x00"
    v1 = data[:-4]
    v1[4] = 1
    y2 = codec.decode(wt)
    y1 = codec.decode(dataclasses.replace(wt, data=bytes(v1)))
    assert torch.equal(y1.view(torch.int16), y2.view(torch.int16))
    _expect_codec_error(dataclasses.replace(wt, data=bytes(v1) + b"\x00\x00\x00\x00"))  # v1 has no section
    for ver in (0, 3, 255):
        bad = bytearray(data)
        bad[4] = ver
        _expect_codec_error(dataclasses.replace(wt, data=bytes(bad)))


# A version-1 payload written by the code before layout version 2 (commit 68d1c53): x =
# (linspace(-2, 3, 48).reshape(1, 16, 3) ** 3) in bfloat16, nvenc tile_dim 1 QP 18, libx265
# ultrafast; zlib + base64. Its decoded bfloat16 bits had this SHA-256 then.
V1_PAYLOAD = """
eNrz9QhzZmRgZBBgYGBgBmIWKJ4AxYxA/AJIcLyb7sXAcMuB4QC3I4ODluO7t29tLS1/2iYnM9uBlDkw8jD+/8/CATJlHphksNnF
5ACScmJkRBWfwOTC0q17KSix2MEBJAIk2JtAKl0YDxQ2CwEZGoxrlDVmVqgIsDc0bVojXPPENLcp5vdqFx/Ds///+7Dp/eE0SH3v
7fey+vL0z8EbuIK095j8F16WXyZ5T/inZfOn6KPtc/sy5r/ND/mX+GZp0eozp0Xkvp+2uSv5+UPirTPn2j37bz/262Rdt9EiOleS
r7j4EesVJxeF3Wm6tp+Ot4hWHKq0K7tj/HWvnuxcfs15lumX7M9Uu8yU8uSef0FXae6f7Uw3ZZ8YH5VWnF+u/uhesIPV9jJhj+0t
GoYLUqtSHmyLqD2lLStw4dgFhumsJ2UsZgTwTa/bcE3he2K+B29G41+tC9sfyv01r83YdiDTkSX3WVNBFbvzunnCBSX6rpyTPwmF
rX72tnqhZYR9f8IdhaB/51gVt3A6Ft4/rrGo4vdd64XN0jNDbX/Fr9i14EApn3yXw4fHN2rc/8fYJTKuVO/fvNn2wm8jm7cLsnYo
nnY4Kp79OGeqUNqHg0cnT2RdOVnEdrOPAwM7MHYZAxhbDBn2/S0v409cIltrtNVXKHBdenqUV8H5RZZaysdUtTk5KlsPG3w/kpLp
9uXEm6dnp9babmgAAJAo2K0=
"""
V1_DECODED_SHA256 = "b9e4d7a99e921e6fbbe2799fb112683e2e563fd037f1fa2dd8cb4ff2bcf2b0db"


def test_stored_version_1_payload_decodes_as_before():
    data = zlib.decompress(base64.b64decode("".join(V1_PAYLOAD.split())))
    assert data[:5] == b"MHVC\x01"
    wt = WireTensor("x", "bfloat16", (1, 16, 3), 16, data, {"enc": "x265", "qp": 18})
    y = codec.decode(wt)
    assert hashlib.sha256(y.view(torch.int16).numpy().tobytes()).hexdigest() == V1_DECODED_SHA256
    _expect_codec_error(dataclasses.replace(wt, data=data + b"\x00"))


def test_baseline_still_writes_version_1():
    """hevc-orig (id 17) is the original's scheme: no check, no fix-ups, layout version 1."""
    x = seam(dtype=torch.float32)
    wt = codec.encode(x, "x", "hevc-orig", {**FAST, "floor_db": 60.0})
    data = bytes(wt.data)
    assert data[4] == 1 and len(data) == L.HEADER.size + 8 * 256 + L.HEADER.unpack_from(data)[12]
    y = codec.decode(wt)
    assert fidelity.channel_snr_db(x, y)[HEAVY] < 60.0


def test_verify_and_floor_params_are_checked():
    x = torch.randn(1, 64, 8)
    for bad in ({"verify": "yes"}, {"verify": 1}, {"floor_db": -1}, {"floor_db": 200}, {"floor_db": "20"}):
        with pytest.raises(errors.LocalError):
            codec.encode(x, "x", "nvenc", {**FAST, **bad})
