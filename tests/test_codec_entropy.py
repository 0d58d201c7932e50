"""Entropy-coded codecs (ids 2..5, 15): exactness, error budgets, non-finite policy, bad payloads."""

from __future__ import annotations

import dataclasses
import importlib
import json
import math
import os

import pytest
import torch
from comfyui_mesh import codec, errors
from comfyui_mesh.protocol import WireTensor
from comfyui_mesh.wirecodecs import backends, fidelity, sections
from comfyui_mesh.wirecodecs.fidelity import channel_snr_db

LOSSY = ["quant", "q4", "clip-sparse"]
FLOATS = [torch.bfloat16, torch.float16, torch.float32]
SHAPES = [(1, 1, 8), (1, 97, 64), (2, 31, 17), (1, 1, 1), (3, 5)]  # 1 token, prime tokens/channels
BITS = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16, torch.float64: torch.int64}
HAVE_NVCOMP = torch.cuda.is_available() and backends.ANS.available() is None
# COMFYUI_MESH_TEST_DEVICE=cuda runs every round trip below on the GPU (nvCOMP ANS when present)
DEV = os.environ.get("COMFYUI_MESH_TEST_DEVICE", "cpu")


def wire_copy(wt: WireTensor) -> WireTensor:
    """What the peer's frame decoder hands over: fresh bytes, JSON-round-tripped meta."""
    return dataclasses.replace(wt, data=bytes(wt.data), meta=json.loads(json.dumps(wt.meta)))


def act(shape, dtype, seed=0, massive=False) -> torch.Tensor:
    """Activation-like: channel scales spread over two orders of magnitude, optional massive channel."""
    g = torch.Generator().manual_seed(seed)
    c = shape[-1]
    x = torch.randn(shape, generator=g, dtype=torch.float64) * torch.exp(
        torch.randn(c, generator=g, dtype=torch.float64)
    )
    if massive and c > 2:
        x[..., 1] += 400.0
    return x.to(dtype)


def round_trip(x, name, params=None):
    """Encode and decode on DEV; the result comes back on the CPU."""
    wt = codec.encode(x.to(DEV), "x", name, params or {})
    return wt, codec.decode(wire_copy(wt), DEV).cpu()


def assert_bit_exact(y, x):
    assert y.dtype == x.dtype and y.shape == x.shape
    if x.dtype in BITS:
        assert torch.equal(y.view(BITS[x.dtype]), x.view(BITS[x.dtype]))
    else:
        assert torch.equal(y, x)


def slack(dtype, x, y):
    """Rounding of the float32 result to the output dtype."""
    mag = torch.maximum(x.double().abs(), y.double().abs())
    return {torch.bfloat16: mag * 2**-8, torch.float16: mag * 2**-11 + 2**-24}.get(dtype, mag * 2**-23)


def rows(t):
    return t.double().reshape(-1, t.shape[-1])


def cosine(x, y):
    a, b = x.double().reshape(-1), y.double().reshape(-1)
    return float(torch.dot(a, b) / (a.norm() * b.norm()))


# ---------------------------------------------------------------------------- registry


def test_wire_ids_are_stable():
    want = {2: "lossless", 3: "quant", 4: "q4", 5: "clip-sparse", 6: "lossless-t", 7: "quant-t", 15: "auto"}
    for i, name in want.items():
        assert codec.by_id(i).name == name and codec.by_name(name).wire_id == i
    assert [codec.by_id(i).lossless for i in (2, 3, 4, 5, 6, 7)] == [True, False, False, False, True, False]
    assert [codec.by_id(i).stateful for i in (0, 1, 2, 3, 6, 7, 15)] == [False] * 4 + [True] * 3
    for i in range(8, 15):
        with pytest.raises(errors.CodecError, match=f"unknown codec id {i}"):
            codec.by_id(i)
    assert {2, 3, 4, 5, 6, 7} <= set(codec.available_ids())


def test_auto_id_is_never_decoded():
    with pytest.raises(errors.CodecError, match="never decoded"):
        codec.decode(WireTensor("x", "float32", (1,), 15, b"\x00" * 4))


# ---------------------------------------------------------------------------- lossless


@pytest.mark.parametrize(
    "dtype",
    FLOATS + [torch.float64, torch.int8, torch.uint8, torch.int32, torch.int64, torch.bool, torch.float8_e4m3fn],
    ids=str,
)
def test_lossless_is_bit_exact(dtype):
    for shape in [(1, 1, 8), (1, 97, 64), (2, 31, 17), (1, 1, 1), (4096,), (2, 3, 4, 5)]:
        if dtype == torch.bool:
            x = torch.rand(shape, generator=torch.Generator().manual_seed(1)) > 0.5
        elif dtype.is_floating_point:
            x = act(shape, torch.float32 if dtype == torch.float8_e4m3fn else dtype).to(dtype)
        else:
            info = torch.iinfo(dtype)
            x = torch.randint(max(info.min, -(2**40)), min(info.max, 2**40), shape, dtype=torch.int64).to(dtype)
        for layout in ("r", "c"):
            wt, y = round_trip(x, "lossless", {"layout": layout})
            assert wt.codec == 2 and wt.meta["l"] == (layout if x.ndim > 1 else "r")
            assert wt.meta["be"] == ("zstd" if DEV == "cpu" else backends.pick_backend({}, x.to(DEV).device).name)
            assert_bit_exact(y, x)


@pytest.mark.parametrize("dtype", FLOATS + [torch.float64], ids=str)
def test_lossless_keeps_nan_payloads_inf_and_negative_zero(dtype):
    x = act((64, 16), dtype)
    ib = BITS[dtype]
    special = torch.tensor([float("nan"), float("inf"), float("-inf"), -0.0], dtype=dtype).view(ib)
    payload_nan = (special[0] | 1).reshape(1)  # a NaN with a payload bit
    x.view(ib).reshape(-1)[:5] = torch.cat([special, payload_nan])
    _, y = round_trip(x, "lossless")
    assert_bit_exact(y, x)


def test_lossless_compresses_bf16_activations():
    x = act((1, 1024, 256), torch.bfloat16)
    wt, _ = round_trip(x, "lossless")
    assert wt.nbytes < 0.8 * x.numel() * 2
    assert len(wt.meta["s"]) == 2  # low byte plane, high byte plane


def test_incompressible_sections_are_stored():
    x = torch.randint(0, 256, (4096,), dtype=torch.uint8)
    wt, y = round_trip(x, "lossless")
    assert wt.meta["s"] == [[0, 4096, 4096]]  # kind 0: stored as is, decodable anywhere
    assert_bit_exact(y, x)


# ---------------------------------------------------------------------------- empty, 0-d, non-float


@pytest.mark.parametrize("name", ["lossless", *LOSSY, "lossless-t", "quant-t"])
@pytest.mark.parametrize("shape", [(), (0,), (0, 4), (4, 0), (2, 0, 3)], ids=str)
def test_empty_and_scalar_tensors_go_raw(name, shape):
    x = torch.full(shape, float("nan") if not shape else 0.0, dtype=torch.bfloat16)
    wt, y = round_trip(x, name)
    assert wt.meta == {"raw": True}
    assert_bit_exact(y, x)


@pytest.mark.parametrize("name", LOSSY + ["quant-t"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.int32, torch.uint8, torch.bool], ids=str)
def test_lossy_refuses_non_float16_32(name, dtype):
    with pytest.raises(errors.LocalError, match="send it raw or lossless"):
        codec.encode(torch.zeros(3, 4).to(dtype), "x", name)


# ---------------------------------------------------------------------------- error budgets


def channel_step_bound(x, st):
    """The largest per-channel step ``quant`` may use: the standardized step ``st`` times the
    channel's standard deviation, rounded to bfloat16 (the floor check only lowers it)."""
    return st * rows(x).var(dim=0, correction=0).sqrt() * (1 + 2**-8)


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", FLOATS, ids=str)
@pytest.mark.parametrize("params", [{}, {"cosine": 0.995}, {"step": 0.05}, {"outliers": 4.0}], ids=str)
def test_quant_error_is_within_half_a_step(dtype, shape, params):
    x = act(shape, dtype, massive=True)
    wt, y = round_trip(x, "quant", params)
    step = wt.meta["st"]
    if "step" in params:
        assert step == pytest.approx(params["step"], rel=1e-7)
        assert "sd" not in wt.meta  # one absolute step: the old explicit mode
        bound = torch.full((x.shape[-1],), step, dtype=torch.float64)
    else:
        assert wt.meta["sd"] == 1
        bound = channel_step_bound(x, step)
    err = (rows(x) - rows(y)).abs()
    budget = bound / 2 * (1 + 1e-5) + slack(dtype, rows(x), rows(y)) + 1e-30
    assert bool((err <= budget).all()), float((err - budget).max())


@pytest.mark.parametrize("target", [0.999, 0.995, 0.98])
@pytest.mark.parametrize("dtype", FLOATS, ids=str)
def test_quant_meets_its_cosine_target_on_every_channel(dtype, target):
    """``cosine`` (the old parameter) now means the cosine of the per-channel standardized
    tensor: every channel keeps SNR >= 1 / (2 (1 - cosine))."""
    x = act((2, 256, 96), dtype, seed=3, massive=True)
    wt, y = round_trip(x, "quant", {"cosine": target})
    snr = channel_snr_db(x, y)
    floor = fidelity.snr_from_cosine(target)
    assert float(snr.min()) >= floor
    assert float(snr.median()) <= floor + 1.0  # and does not waste bits far beyond it


def test_quant_beats_per_channel_8_bit():
    x = act((1, 1024, 128), torch.bfloat16, seed=5)
    wt_clip, y_clip = round_trip(x, "clip-sparse")
    worst = float(channel_snr_db(x, y_clip).min())
    wt_q, y_q = round_trip(x, "quant", {"snr_db": worst})
    assert float(channel_snr_db(x, y_q).min()) >= worst  # equal worst-channel fidelity (~44 dB), fewer bytes
    assert wt_q.nbytes < wt_clip.nbytes
    wt_27, _ = round_trip(x, "quant", {"snr_db": 27.0})
    assert wt_27.nbytes < 0.65 * wt_clip.nbytes  # the default floor: ~4.9 bits/value against ~8.1


def test_quant_codes_smooth_token_runs_as_differences():
    g = torch.Generator().manual_seed(8)
    smooth = torch.cumsum(torch.randn(1, 2048, 32, generator=g) * 0.05, dim=1)  # random walks along tokens
    shuffled = smooth[:, torch.randperm(2048, generator=g)]  # same values per channel, no neighbours
    a, ya = round_trip(smooth, "quant", {"step": 0.02})
    b, yb = round_trip(shuffled, "quant", {"step": 0.02})
    assert a.nbytes < 0.6 * b.nbytes
    for x, y in ((smooth, ya), (shuffled, yb)):
        assert float((x.double() - y.double()).abs().max()) <= 0.01 * (1 + 1e-5) + 1e-6


def test_quant_outlier_channels_are_exact_and_target_applies_to_the_rest():
    x = act((1, 200, 64), torch.bfloat16, seed=2)
    x[..., 7] = (x[..., 7].float() * 300 + 5000).to(torch.bfloat16)
    wt, y = round_trip(x, "quant", {"outliers": 8.0, "cosine": 0.995})
    assert wt.meta["no"] == 1
    assert_bit_exact(y[..., 7].contiguous(), x[..., 7].contiguous())
    rest = [i for i in range(64) if i != 7]
    assert 1 - cosine(x[..., rest], y[..., rest]) <= 1.25 * 0.005


@pytest.mark.parametrize("shape", SHAPES + [(1, 33, 40)], ids=str)
@pytest.mark.parametrize("dtype", FLOATS, ids=str)
@pytest.mark.parametrize("group", [32, 2, 6])
def test_q4_error_within_half_a_group_scale(dtype, shape, group):
    x = act(shape, dtype, seed=4, massive=True)
    wt, y = round_trip(x, "q4", {"group": group})
    xr, yr = rows(x), rows(y)
    n, c = xr.shape
    idx = torch.arange(n) // group
    absmax = torch.zeros(idx.max().item() + 1, c, dtype=torch.float64).scatter_reduce(
        0, idx[:, None].expand(n, c), (xr - xr.mean(0)).abs(), "amax"
    )
    budget = (absmax / 14 * (1 + 2**-7))[idx] + slack(dtype, xr, yr) + 1e-30  # of the centered values
    outl = wt.meta["no"]
    err = (xr - yr).abs()
    assert bool((err <= budget).all()), float((err - budget).max())
    if outl:
        assert (err.amax(0) == 0).sum() >= outl


def test_q4_is_about_4_bits():
    x = act((1, 1024, 128), torch.bfloat16)
    wt, y = round_trip(x, "q4")
    assert 3.0 < 8 * wt.nbytes / x.numel() < 4.7
    assert cosine(x, y) > 0.99


@pytest.mark.parametrize("shape", SHAPES + [(1, 400, 12)], ids=str)
@pytest.mark.parametrize("dtype", FLOATS, ids=str)
def test_clip_sparse_inliers_within_half_a_level_outliers_exact(dtype, shape):
    x = act(shape, dtype, seed=6)
    if x.numel() > 100:
        x.view(-1)[::37] *= 50  # sparse spikes beyond the 99.5th percentile
    wt, y = round_trip(x, "clip-sparse", {"pct": 0.5})
    xr, yr = rows(x), rows(y)
    n = xr.shape[0]
    tail = math.floor(0.005 * (n - 1))
    lo = xr.float().kthvalue(tail + 1, dim=0).values.double()
    hi = xr.float().kthvalue(n - tail, dim=0).values.double()
    inside = (xr >= lo) & (xr <= hi)
    err = (xr - yr).abs()
    budget = (hi - lo) / 510 * (1 + 1e-5) + slack(dtype, xr, yr) + 1e-6 * xr.abs()
    assert bool((err[inside] <= budget.expand_as(err)[inside]).all())
    assert bool((err[~inside] == 0).all())
    assert wt.meta["m"] == int((~inside).sum())


@pytest.mark.parametrize("name", LOSSY)
@pytest.mark.parametrize("dtype", FLOATS, ids=str)
def test_constant_channels_and_all_zero(name, dtype):
    consts = torch.tensor([0.0, 1.0, -2.5, 1e-3, 300.0, -0.0, 7.0], dtype=torch.float64)
    x = consts.expand(13, 7).to(dtype).contiguous()
    _, y = round_trip(x, name)
    assert torch.equal(y, y[:1].expand_as(y))  # every token of a constant channel decodes alike
    torch.testing.assert_close(y.double(), x.double(), rtol=2**-7, atol=1e-6)
    z = torch.zeros(2, 9, 5, dtype=dtype)
    _, y0 = round_trip(z, name)
    assert torch.equal(y0, z)


@pytest.mark.parametrize("name", LOSSY)
def test_huge_values(name):
    x32 = act((1, 50, 9), torch.float32) * 1e30
    _, y = round_trip(x32, name)
    assert torch.isfinite(y).all()
    assert (x32.double() - y.double()).norm() / x32.double().norm() < 0.2
    x16 = torch.tensor([[65504.0, -65504.0, 1.0], [-60000.0, 0.5, 3.0], [1.0, 2.0, -65504.0]], dtype=torch.float16)
    _, y16 = round_trip(x16, name)
    assert torch.isfinite(y16).all()


@pytest.mark.parametrize("name", LOSSY)
@pytest.mark.parametrize("dtype", FLOATS, ids=str)
def test_lossy_non_finite_policy(name, dtype):
    nan, inf = float("nan"), float("inf")
    x = torch.tensor(
        [[1.0, 0.25, inf], [-2.0, nan, -inf], [nan, inf, nan], [inf, -inf, inf], [-inf, -0.5, -inf], [0.5, 0.1, nan]],
        dtype=dtype,
    )
    _, y = round_trip(x, name)
    assert torch.isfinite(y).all()
    # channel 0: finite absmax 2 -> +-Inf become +-2; channel 2 has no finite value -> everything 0
    assert y[3, 0] > 1.5 and y[4, 0] < -1.5
    assert y[3, 1] < -0.3
    assert abs(float(y[2, 0])) < 0.3 and abs(float(y[1, 1])) < 0.3  # NaN -> 0 (up to the quantizer)
    assert torch.equal(y[:, 2].abs(), torch.zeros(6, dtype=dtype))


@pytest.mark.parametrize("name", ["lossless", *LOSSY])
def test_encode_does_not_modify_its_input(name):
    x = act((1, 40, 24), torch.bfloat16, massive=True)
    x[0, 0, 0] = float("nan")
    before = x.clone()
    codec.encode(x, "x", name, {})
    assert_bit_exact(x, before)


# ---------------------------------------------------------------------------- corrupt payloads


@pytest.mark.parametrize("name", ["lossless", *LOSSY])
def test_truncated_or_extended_payloads_raise(name):
    x = act((1, 61, 24), torch.bfloat16, seed=9)
    wt = wire_copy(codec.encode(x.to(DEV), "x", name))
    data = bytes(wt.data)
    for bad in (data[:-1], data[: len(data) // 2], b"", data + b"\x00"):
        with pytest.raises(errors.CodecError):
            codec.decode(dataclasses.replace(wt, data=bad), DEV)


@pytest.mark.parametrize("name", ["lossless", *LOSSY])
def test_bit_flips_raise_or_decode_to_the_right_shape(name):
    x = act((1, 61, 24), torch.bfloat16, seed=10)
    # zstd also on a GPU: nvCOMP faults the CUDA context on altered ANS bytes (docs/PROTOCOL.md:
    # the frame CRC stops accidental corruption before any decoder; a hostile peer is not covered)
    wt = wire_copy(codec.encode(x.to(DEV), "x", name, {"backend": "zstd"}))
    data = bytearray(wt.data)
    g = torch.Generator().manual_seed(0)
    for _ in range(40):
        bad = bytearray(data)
        for p in torch.randint(0, len(bad), (3,), generator=g).tolist():
            bad[p] ^= 1 << int(torch.randint(0, 8, (1,), generator=g))
        try:
            y = codec.decode(dataclasses.replace(wt, data=bytes(bad)), DEV)
        except errors.CodecError:
            continue
        assert y.shape == x.shape and y.dtype == x.dtype


BAD_META = [
    {"be": "gzip"},
    {"be": None},
    {"s": "x"},
    {"s": [[0, 1, 2]]},
    {"s": [[2, 4, 4]]},
    {"s": [[1, -1, 4]]},
    {"s": [[1, 2**62, 4]]},
    {"s": [[0, 1, 1]] * 65},
    {"st": float("nan")},
    {"st": -1.0},
    {"st": "1"},
    {"cc": [1, 2]},
    {"cc": "x"},
    {"cc": [0, 0, 0, 0, 0, 10**6]},
    {"cc": [-1, 0, 0, 0, 0, 17]},
    {"cc": [0, 0, 0, 0, 16, True]},
    {"wb": 3},
    {"no": 10**6},
    {"g": 3},
    {"m": -1},
    {"m": 10**9},
    {"l": "z"},
]


@pytest.mark.parametrize("name", ["lossless", *LOSSY])
def test_bad_meta_raises_codec_error(name):
    x = act((1, 40, 16), torch.float16, seed=11)
    wt = wire_copy(codec.encode(x.to(DEV), "x", name))
    tried = 0
    for patch in BAD_META:
        key = next(iter(patch))
        if key not in wt.meta and key not in ("be", "s"):
            continue
        tried += 1
        with pytest.raises(errors.CodecError):
            codec.decode(dataclasses.replace(wt, meta={**wt.meta, **patch}), DEV)
    assert tried >= 9


@pytest.mark.parametrize("name", ["lossless", *LOSSY])
def test_huge_shape_is_refused_before_allocating(name):
    wt = wire_copy(codec.encode(act((1, 8, 8), torch.bfloat16).to(DEV), "x", name))
    for shape in [(2**31, 2**31, 8), (1, 2**40, 8)]:
        with pytest.raises(errors.CodecError):
            codec.decode(dataclasses.replace(wt, shape=shape), DEV)
    with pytest.raises(errors.CodecError):
        codec.decode(dataclasses.replace(wt, shape=(1, 8, 9)), DEV)


@pytest.mark.parametrize("name", LOSSY)
@pytest.mark.parametrize("dtype", ["int8", "uint8", "float64", "bool"])
def test_lossy_payload_with_a_non_float_dtype(name, dtype):
    wt = wire_copy(codec.encode(act((1, 8, 8), torch.bfloat16), "x", name))
    with pytest.raises(errors.CodecError):
        codec.decode(dataclasses.replace(wt, dtype=dtype))


def test_zstd_frame_declaring_another_size_is_refused():
    zs = importlib.import_module("zstandard")
    frame = zs.ZstdCompressor().compress(b"\x00" * 1000)
    meta = {"be": "zstd", "s": [[1, 64, len(frame)]], "l": "r"}
    with pytest.raises(errors.CodecError, match="declares 1000 bytes"):
        codec.decode(WireTensor("x", "uint8", (64,), 2, frame, meta))
    junk = b"\x28\xb5\x2f\xfd" + b"\xff" * 20
    with pytest.raises(errors.CodecError):
        codec.decode(WireTensor("x", "uint8", (64,), 2, junk, {**meta, "s": [[1, 64, len(junk)]]}))


# ---------------------------------------------------------------------------- backends


@pytest.mark.skipif(HAVE_NVCOMP, reason="this machine can decode ANS")
def test_ans_payload_without_nvcomp_names_the_fix():
    meta = {"be": "ans", "s": [[1, 16, 10], [0, 16, 16], [0, 16, 16], [0, 16, 16]], "l": "r"}
    wt = WireTensor("x", "float32", (16,), 2, b"\x00" * 58, meta)
    with pytest.raises(errors.BackendUnavailable, match="nvidia-nvcomp") as e:
        codec.decode(wt)
    assert e.value.backend == "ans"
    assert isinstance(e.value, errors.CodecError)


def test_ans_payload_whose_sections_are_stored_decodes_anywhere():
    x = torch.randint(0, 256, (300,), dtype=torch.uint8)
    wt = WireTensor("x", "uint8", (300,), 2, bytes(x.numpy()), {"be": "ans", "s": [[0, 300, 300]], "l": "r"})
    assert_bit_exact(codec.decode(wt), x)


@pytest.mark.skipif(HAVE_NVCOMP, reason="this machine can encode ANS")
def test_backend_parameter_is_checked():
    x = act((1, 16, 8), torch.bfloat16)
    with pytest.raises(errors.LocalError, match="not usable here"):
        codec.encode(x, "x", "quant", {"backend": "ans"})
    with pytest.raises(errors.LocalError, match="must be one of"):
        codec.encode(x, "x", "quant", {"backend": "lz4"})
    assert codec.encode(x, "x", "lossless", {"backend": "auto"}).meta["be"] == "zstd"


def test_missing_zstandard_gives_install_hints(monkeypatch):
    real = importlib.import_module

    def fake(name, *a, **k):
        if name == "zstandard":
            raise ImportError("No module named 'zstandard'")
        return real(name, *a, **k)

    z = backends.ZstdBackend()
    monkeypatch.setattr(backends.importlib, "import_module", fake)
    assert "pip install zstandard" in (z.available() or "")
    with pytest.raises(errors.BackendUnavailable, match="pip install zstandard"):
        z.decompress(memoryview(b"abc"), 3, torch.device("cpu"))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float64, torch.uint8], ids=str)
def test_device_byte_plane_path_is_exact_on_the_cpu(dtype):
    """The shift-based split used on CUDA, run on the CPU: same bytes as the numpy path."""
    x = act((777,), torch.float64).to(dtype) if dtype.is_floating_point else torch.randint(0, 256, (777,)).to(dtype)
    a = sections.planes(x, host_numpy=False)
    b = sections.planes(x)
    assert all(torch.equal(p, q) for p, q in zip(a, b, strict=True))
    assert_bit_exact(sections.unplanes(a, dtype, host_numpy=False), x.reshape(-1))
    assert_bit_exact(sections.unplanes(b, dtype), x.reshape(-1))


@pytest.mark.skipif(not HAVE_NVCOMP, reason="needs nvidia.nvcomp (nvidia-nvcomp-cu12/13) and a CUDA GPU")
@pytest.mark.parametrize("name", ["lossless", "quant", "q4", "clip-sparse"])
def test_ans_on_the_gpu_round_trip(name):
    x = act((1, 1000, 64), torch.bfloat16, seed=12).cuda()
    wt = codec.encode(x, "x", name, {"backend": "ans"})
    assert wt.meta["be"] == "ans" and any(s[0] == 1 for s in wt.meta["s"])
    y = codec.decode(wire_copy(wt), "cuda")
    assert y.device.type == "cuda"
    ref = codec.decode(wire_copy(codec.encode(x.cpu(), "x", name, {"backend": "zstd"})))
    if name == "lossless":
        assert_bit_exact(y.cpu(), x.cpu())
    else:
        assert cosine(y.cpu(), ref) > 0.9999
    assert codec.decode(wire_copy(wt), "cpu").device.type == "cpu"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("name", ["lossless", "quant", "q4", "clip-sparse", "quant-t", "lossless-t"])
@pytest.mark.parametrize("backend", ["zstd", "auto"])
def test_gpu_payloads_decode_alike_on_gpu_and_cpu(name, backend):
    """The GPU code paths (one host round trip for the statistics, delta rows chosen on the
    device, batched ANS) write the same format: a GPU-encoded zstd payload decodes on the CPU
    to the same bits, a temporal stream included (encoder on the GPU, decoders on both)."""
    g = torch.Generator().manual_seed(13)
    x = act((1, 700, 96), torch.bfloat16, seed=13, massive=True)
    enc: dict = {}
    dec_gpu: dict = {}
    dec_cpu: dict = {}
    for _ in range(4):
        wt = wire_copy(codec.encode(x.cuda(), "x", name, {"backend": backend}, state=enc))
        yg = codec.decode(wt, "cuda", state=dec_gpu)
        if wt.meta["be"] == "zstd":
            assert_bit_exact(codec.decode(wt, "cpu", state=dec_cpu), yg.cpu())
        if name.startswith("lossless"):
            assert_bit_exact(yg.cpu(), x)
        else:
            assert cosine(yg.cpu(), x) > 0.998
        x = (x.float() * 0.95 + torch.randn(x.shape, generator=g) * 0.2).to(torch.bfloat16)


@pytest.mark.parametrize("bad", [-5, 64, "dup"])
def test_quant_channel_order_must_be_a_permutation(bad):
    x = act((1, 200, 64), torch.bfloat16, seed=14)
    wt = wire_copy(codec.encode(x.to(DEV), "x", "quant"))
    table = wt.meta["s"]
    # stored sections of 128 bytes: the bfloat16 channel scales, then the int16 channel order
    k = [i for i, e in enumerate(table) if e[1] == 64 * 2 and e[0] == 0][1]
    off = sum(e[2] for e in table[:k])
    data = bytearray(wt.data)
    order = torch.frombuffer(bytearray(data[off : off + 128]), dtype=torch.int16).clone()
    assert sorted(order.tolist()) == list(range(64))
    order[order.argmin()] = order[1 if order.argmin() == 0 else 0] if bad == "dup" else bad
    data[off : off + 128] = order.numpy().tobytes()
    with pytest.raises(errors.CodecError, match="permutation"):
        codec.decode(dataclasses.replace(wt, data=bytes(data)), DEV)


@pytest.fixture
def batched(monkeypatch):
    """Every SectionReader decodes its coded sections in one batch (what GPU ANS payloads do),
    here with zstd on the CPU, so the batching logic runs in CI."""
    init = sections.SectionReader.__init__

    def forced(self, *a, **kw):
        init(self, *a, **kw)
        self.batched = self.data.nbytes > 0

    monkeypatch.setattr(sections.SectionReader, "__init__", forced)


@pytest.mark.parametrize(
    ("name", "shape", "params"),
    [
        ("lossless", (1, 97, 64), {}),
        ("quant", (1, 97, 64), {"outliers": 4.0}),
        ("clip-sparse", (1, 400, 12), {}),
        ("q4", (1, 97, 64), {}),
        ("q4", (1, 3072), {"group": 32}),  # one token a channel: groups padded 32x
        ("q4", (2, 64, 3072), {"group": 4096}),
    ],
    ids=str,
)
def test_batched_section_decoding_matches_the_sequential_one(batched, name, shape, params):
    x = act(shape, torch.bfloat16, seed=15, massive=True)
    wt = wire_copy(codec.encode(x, "x", name, params))
    y = codec.decode(wt)
    assert y.shape == x.shape
    if name == "lossless":
        assert_bit_exact(y, x)
    else:
        assert cosine(y, x) > 0.99


def test_batched_decoding_refuses_inflated_tables_before_decoding(batched, monkeypatch):
    x = torch.randint(0, 4, (1, 200, 64), generator=torch.Generator().manual_seed(16)).float() * 1.5
    wt = wire_copy(codec.encode(x, "x", "lossless", {}))
    calls = []
    monkeypatch.setattr(backends.ZstdBackend, "decompress", lambda self, *a: calls.append(a))
    table = [list(e) for e in wt.meta["s"]]
    coded = [i for i, e in enumerate(table) if e[0] == 1]
    assert len(coded) >= 2  # the first is checked against its expected size; the batch covers the rest
    k = coded[-1]
    table[k][1] = 9 * x.numel() * 4  # declares more than 8x the tensor
    with pytest.raises(errors.CodecError, match="more than its format allows"):
        codec.decode(dataclasses.replace(wt, meta={**wt.meta, "s": table}))
    assert calls == []
    table[k][1], table[k][2] = 0, table[k][2]  # a coded section that holds nothing
    with pytest.raises(errors.CodecError, match="bad section entry"):
        codec.decode(dataclasses.replace(wt, meta={**wt.meta, "s": table}))


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -1.0])
def test_quant_channel_scales_must_be_finite_and_not_negative(bad):
    x = act((1, 200, 64), torch.bfloat16, seed=14)
    wt = wire_copy(codec.encode(x.to(DEV), "x", "quant"))
    table = wt.meta["s"]
    k = [i for i, e in enumerate(table) if e[1] == 64 * 2 and e[0] == 0][0]  # the bfloat16 channel scales
    off = sum(e[2] for e in table[:k])
    data = bytearray(wt.data)
    scales = torch.frombuffer(bytearray(data[off : off + 128]), dtype=torch.bfloat16).clone()
    assert bool((scales > 0).all())
    scales[5] = bad
    data[off : off + 128] = scales.view(torch.uint8).numpy().tobytes()
    with pytest.raises(errors.CodecError, match="channel scales"):
        codec.decode(dataclasses.replace(wt, data=bytes(data)), DEV)


def test_every_lossy_codec_keeps_every_channel_above_its_floor_on_massive_channels():
    """Token-varying massive channels (spread ~300x the median's, sign-stable) on image and text
    tokens, plus quiet channels with an offset: the old whole-tensor step rounded every ordinary
    channel to its mean here (0 dB); now each codec keeps its floor on every channel."""
    from comfyui_mesh.synthetic import seam_steps

    x = seam_steps(1, grid=(24, 24), text=32, channels=192, massive=6, seed=3)[0]
    x[..., 10] = (7.0 + 0.01 * torch.randn(x.shape[:-1])).to(x.dtype)  # quiet channel far from zero
    x[..., 11] = (0.02 * torch.randn(x.shape[:-1])).to(x.dtype)
    floors = {"quant": 27.0 - 0.02, "q4": 15.0, "clip-sparse": 25.0}  # quant: cosine 0.999 = 26.99 dB
    for name, floor in floors.items():
        wt, y = round_trip(x, name, {"cosine": 0.999})
        snr = channel_snr_db(x, y)
        assert float(snr.min()) >= floor, (name, snr.argmin(), float(snr.min()))
    wt, y = round_trip(x, "quant", {"snr_db": 35.0})
    assert float(channel_snr_db(x, y).min()) >= 35.0
