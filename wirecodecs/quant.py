"""Quantizing activation codecs followed by the entropy stage (ids 3, 4, 5; see ``sections``).

All three view the tensor as [N, C] (C = last axis, the channels; N = every other axis),
apply the lossy non-finite policy (NaN -> 0, +-Inf -> +-largest finite magnitude of the
channel), work channel-major ([C, N]) so that each channel's symbols sit together for the
entropy coder, and send 0-d / empty tensors raw (``meta {"raw": true}``). They run on the
tensor's device: on a GPU everything but the ANS call is plain torch.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Generator
from typing import Any

import torch

from ..constants import CLIP_SPARSE_SNR_DB, MIN_CHANNEL_STD, Q4_SNR_DB
from ..errors import CodecError, LocalError
from ..protocol import WireTensor
from . import channels
from .backends import pick_backend
from .base import Staged, dtype_name, itemsize
from .channels import as_output, channel_major, lossy_geometry, meta_float, meta_int, output, param_float, param_int
from .fidelity import floor_db, misses_floor, target_db
from .sections import EntropyCodec, SectionReader, SectionWriter, get_planes, planes, put_planes, unplanes

MAX_Q = 1 << 20  # largest quantized magnitude (keeps float32 integer arithmetic exact)
SAMPLE_PAIRS = 1024  # token pairs per channel that decide "delta or not" and the sort order


def f32(v: float) -> float:
    """``v`` rounded to float32, so a step means the same number on every device."""
    return float(torch.tensor(v, dtype=torch.float32).item())


# ---------------------------------------------------------------------------- step choice


def centered_var(xt: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, variance) per row of float32 [C, N]; subtracts the means from ``xt`` in place.
    The variances are float64 on xt's device (one small host check for float32 overflow)."""
    n = xt.shape[1]
    mu = xt.sum(1, dtype=torch.float64).div_(n).float()  # float64 sums cannot overflow
    xt.sub_(mu[:, None])
    return mu, _row_norm(xt).square_().div_(max(n, 1))


def _row_norm(x: torch.Tensor) -> torch.Tensor:
    """float64 L2 norm of each row of float32 [C, N]. Squares overflow float32 beyond ~1e19: on the CPU
    a float32 norm checked for overflow (float64 only then); on a GPU float64 at once (no host round
    trip: a check would wait for everything queued on the GPU before the coder can go on)."""
    if channels.sync_free(x):
        return torch.linalg.vector_norm(x, dim=1, dtype=torch.float64)
    norm = torch.linalg.vector_norm(x, dim=1)
    if not bool(torch.isfinite(norm).all()):
        norm = torch.linalg.vector_norm(x, dim=1, dtype=torch.float64)
    return norm.double()


def spread_var(x: torch.Tensor) -> torch.Tensor:
    """Per-row variance (float64, x's device) of float32 [C, N] ``x``, left unchanged."""
    n = x.shape[1]
    if n == 0:
        return torch.zeros(x.shape[0], dtype=torch.float64, device=x.device)
    mu = x.sum(1, dtype=torch.float64).div_(n)
    ms = torch.linalg.vector_norm(x, dim=1, dtype=torch.float64).square_().div_(n)
    return (ms - mu.square()).clamp_(min=0)


def bf16_floor(s: torch.Tensor) -> torch.Tensor:
    """Largest bfloat16 <= s (s >= 0, finite): a scale rounded down keeps its channel's floor."""
    b = s.to(torch.bfloat16)
    high = b.float() > s
    return (b.view(torch.int16) - high.to(torch.int16)).view(torch.bfloat16)


def channel_steps(st: float, scales: torch.Tensor) -> torch.Tensor:
    """Per-channel quantizer steps: the shared standardized step ``st`` times the bfloat16
    channel scales, in float32. The same op on both sides (a temporal reference is bit-exact)."""
    return scales.float().mul_(st)


# The last resort for a channel that still misses its floor: step = HARD_SCALE * std / sqrt(SNR).
# The error before rounding is at most step / 2, and rounding to the output dtype at most doubles
# it (the input is on that dtype's grid, and the rounded value is the grid point nearest the
# reconstruction), so |x - x'| <= step and MSE <= var / SNR whatever the values.
HARD_SCALE = 1.0
# The shared step aims this much above the floor: a channel's measured MSE scatters around
# step^2 / 12 (about +-0.06 dB over 4096 tokens), and a channel that misses costs a requantization.
AIM_DB = 0.2


def _channel_mse(
    q: torch.Tensor,
    steps: torch.Tensor,
    z: torch.Tensor,
    mu: torch.Tensor,
    pred: torch.Tensor | None,
    dtype: torch.dtype,
) -> torch.Tensor:
    """Per-row MSE (float64 [C]) of what the decoder will hand over -- q * step + mu (+ pred), the
    same ops in the same order as ``dequant`` and the temporal decoder, rounded to ``dtype`` --
    against the input (z + mu (+ pred), which rounds back to the input's values)."""
    rec = (q * steps[:, None]).add_(mu[:, None])
    ref = z + mu[:, None]
    if pred is not None:
        rec = rec.add_(pred)
        ref = ref.add_(pred)
    rec, ref = as_output(rec, dtype), as_output(ref, dtype)
    return _row_norm(rec.sub_(ref)).square_().div_(z.shape[1])


def staged_standardized_steps(
    z: torch.Tensor,
    var: torch.Tensor,
    snr_db: float,
    mu: torch.Tensor,
    pred: torch.Tensor | None,
    dtype: torch.dtype,
) -> Generator[None, None, tuple[float, torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Staged (``Codec.staged_encode``; ``run_stages`` for one go): yields before the requantization's
    host round trips. Quantize the centered rows z (float32 [C, N]) so that EVERY channel keeps SNR >=
    ``snr_db`` against its spread ``var`` (float64 [C], the variance of the signal the caller
    measures fidelity against: z's own, or for a residual the frame's). ``mu`` (float32 [C])
    and ``pred`` (float32 [C, N] or None) are what the decoder adds back (the channel means, the
    prediction of a temporal frame) and ``dtype`` what it rounds to: the check measures the
    tensor the peer will use.

    One shared step d in the standardized domain: channel c's step is d * s_c with s_c ~ its
    standard deviation (a bfloat16 scale, sent as side information), so every channel gets
    about the same SNR 12 / d^2 whatever its magnitude -- massive channels no longer starve
    the others. Then checked: a channel whose measured MSE misses the floor (a lumpy
    distribution, a residual below half a step, coarse output rounding) gets its scale lowered
    by the miss and is requantized, twice at most, and if it still misses, gets the hard-bound
    step (``HARD_SCALE``). Channels with std < ``MIN_CHANNEL_STD`` get scale 0 (sent as their
    mean). Returns (d, scales bf16 [C], q float32 [C, N] integers, per-channel steps float32 [C])."""
    lin = 10.0 ** (snr_db / 10.0)
    d = f32(math.sqrt(12.0 / lin) * 10.0 ** (-AIM_DB / 20.0))
    std = var.sqrt().float()
    live = std >= MIN_CHANNEL_STD
    n = z.shape[1]
    amax = z.abs().amax(1) if n else torch.zeros_like(std)
    # at most MAX_Q levels a channel: a scale below amax / (MAX_Q d) is raised (only reached
    # far beyond any sensible floor)
    least = amax / (MAX_Q * d)
    scales = torch.where(live, torch.maximum(std, least), torch.zeros_like(std)).to(torch.bfloat16)
    steps = channel_steps(d, scales)
    safe = torch.where(steps > 0, steps, torch.full_like(steps, math.inf))
    q = torch.div(z, safe[:, None]).round_()
    if not n:
        return d, scales, q, steps
    target = var / lin
    mse = _channel_mse(q, steps, z, mu, pred, dtype)
    yield  # the requantization below picks the channels that missed: host round trips
    for attempt in range(3):
        idx = torch.nonzero(misses_floor(mse, var, snr_db, live)).squeeze(1)  # one host round trip
        if not idx.numel():
            break
        if attempt < 2:
            shrink = (target[idx] / mse[idx]).sqrt_().mul_(0.97).float()
            lower = scales[idx].float() * shrink
        else:
            lower = std[idx] * (HARD_SCALE / math.sqrt(lin) / d)
        scales.index_copy_(0, idx, bf16_floor(torch.maximum(lower, least[idx])))
        steps = channel_steps(d, scales)
        zi = z.index_select(0, idx)
        rows = zi.div(steps[idx][:, None]).round_()
        q.index_copy_(0, idx, rows)
        pi = pred.index_select(0, idx) if pred is not None else None
        mse.index_copy_(0, idx, _channel_mse(rows, steps[idx], zi, mu[idx], pi, dtype))
    return d, scales, q, steps


# ---------------------------------------------------------------------------- symbol streams


# Symbol classes by a channel's largest magnitude m: (max m, base, symbols per byte). Packing
# several small symbols into one byte (alphabet extension) lets a byte-oriented coder (zstd's
# Huffman stage) spend a fraction of a bit per symbol where one symbol per byte costs >= 1 bit.
# Class 0: all zero, nothing sent; class 5: wider than int8, zigzag-coded byte planes.
PACKS = ((0, 1, 0), (1, 3, 5), (2, 5, 3), (7, 15, 2), (127, 256, 1))


@functools.lru_cache(maxsize=64)
def const(values: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A small constant tensor, made once per device: building one from a Python list copies
    it from pageable host memory, which waits for everything queued on the GPU stream."""
    return torch.tensor(values, dtype=dtype, device=device)


def _pack(v: torch.Tensor, base: int, per: int) -> torch.Tensor:
    """Integers in [-(base-1)/2, (base-1)/2] -> bytes holding ``per`` base-``base`` digits each."""
    if per == 1:
        return v.reshape(-1).to(torch.int8).view(torch.uint8)
    u = v.reshape(-1).to(torch.int32) + (base - 1) // 2
    pad = (-u.numel()) % per
    if pad:
        u = torch.cat([u, u.new_zeros(pad)])
    weights = const(tuple(base**j for j in range(per)), torch.int32, u.device)
    return (u.reshape(-1, per) * weights).sum(1, dtype=torch.int32).to(torch.uint8)


def _unpack(b: torch.Tensor, base: int, per: int, m: int) -> torch.Tensor:
    """Inverse of ``_pack``: float32 [m]."""
    if per == 1:
        return b.view(torch.int8).float()
    u = b.to(torch.int32)
    digits = []
    for _ in range(per):
        digits.append(u % base)
        u = u // base
    return torch.stack(digits, 1).reshape(-1)[:m].float().sub_((base - 1) // 2)


def index_dtype(c: int) -> torch.dtype:
    """Channel indices travel as int16 below 32768 channels, else int32."""
    return torch.int16 if c < 32768 else torch.int32


def pack_bits(b: torch.Tensor) -> torch.Tensor:
    """bool [n] -> uint8 [ceil(n / 8)], least significant bit first."""
    pad = (-b.numel()) % 8
    u = torch.cat([b.to(torch.uint8), b.new_zeros(pad, dtype=torch.uint8)]) if pad else b.to(torch.uint8)
    weights = const(tuple(1 << j for j in range(8)), torch.uint8, b.device)
    return (u.reshape(-1, 8) * weights).sum(1, dtype=torch.int32).to(torch.uint8)


def unpack_bits(u: torch.Tensor, n: int) -> torch.Tensor:
    shifts = torch.arange(8, dtype=torch.uint8, device=u.device)
    return ((u[:, None] >> shifts) & 1).reshape(-1)[:n].bool()


def staged_put_symbols(w: SectionWriter, q: torch.Tensor) -> Generator[None, None, dict[str, Any]]:
    """Staged: yields before its first host round trip (the class counts). Entropy-code integer
    symbols q (int16/int32 [C, N], |q| < 2^20) per channel.

    Per channel: delta along tokens when a sample of token pairs says it is cheaper (smooth
    token grids; modifies ``q``); a class by the largest magnitude (``PACKS``); channels
    sorted by class then spread so each coder block sees one distribution; one section per
    class. Side info: channel order (int32), delta flags (uint8); meta ``cc`` (channels per
    class 0..5) and ``wb`` (byte planes of the wide class: 0, 2 or 4). The channel order is
    int16 below 32768 channels (else int32), the delta flags one bit each."""
    c, n = q.shape
    if n > 1:
        s = max(1, (n - 1) // SAMPLE_PAIRS)
        a, b = q[:, 0 : n - 1 : s].to(torch.int32), q[:, 1:n:s].to(torch.int32)
        cost_q = b.abs().sum(1, dtype=torch.int64)
        cost_d = (b - a).abs().sum(1, dtype=torch.int64)
        pred = (cost_d * 20) < (cost_q * 19)
        spread = torch.minimum(cost_q, cost_d)
        if channels.sync_free(q):  # every row's differences, the chosen rows taken: no host round trip
            diff = q.clone()
            diff[:, 1:] -= q[:, :-1]
            q.copy_(torch.where(pred[:, None], diff, q))
        else:
            idx = torch.nonzero(pred).squeeze(1)  # one host round trip; cheaper than touching every row
            if idx.numel():
                rows = q.index_select(0, idx)
                rows[:, 1:] = rows[:, 1:] - rows[:, :-1]
                q.index_copy_(0, idx, rows)
    else:
        pred = torch.zeros(c, dtype=torch.bool, device=q.device)
        spread = q[:, 0].abs().to(torch.int64)
    lo, hi = torch.aminmax(q, dim=1)
    mag = torch.maximum(-lo.to(torch.int64), hi.to(torch.int64))
    cls = torch.bucketize(mag, const(tuple(lim for lim, _, _ in PACKS), torch.int64, q.device))
    # class, then spread (< 2^32: at most 2047 sampled pairs of |q| <= 2^20) within a class
    order = torch.argsort((cls << 40) | spread, stable=True)
    counts_t = torch.zeros(6, dtype=torch.int64, device=q.device).scatter_add_(0, cls, torch.ones_like(cls))
    summary = torch.cat([counts_t, mag.max().reshape(1) if c else mag.new_zeros(1)])
    yield  # the first host round trip comes next
    host = summary.tolist()
    counts, top = host[:6], host[6]
    w.raw(order.to(index_dtype(c)))
    w.raw(pack_bits(pred))
    start = counts[0]
    for j in range(1, 5):
        if counts[j]:
            sel = order[start : start + counts[j]]
            w.coded(_pack(q.index_select(0, sel), PACKS[j][1], PACKS[j][2]))
        else:
            w.empty()
        start += counts[j]
    wb = 0
    if counts[5]:
        v = q.index_select(0, order[start:]).to(torch.int32)
        u = (v << 1) ^ (v >> 31)  # zigzag: small magnitudes -> small unsigned values
        wb = 2 if top < 32768 else 4
        for row in planes(u)[:wb]:
            w.coded(row)
    return {"cc": counts, "wb": wb}


def get_symbols(r: SectionReader, meta: dict[str, Any], c: int, n: int) -> torch.Tensor:
    """Inverse of ``staged_put_symbols``: float32 [C, N] holding the integers (exact below 2^24)."""
    counts = meta.get("cc")
    if (
        not isinstance(counts, list)
        or len(counts) != 6
        or not all(isinstance(k, int) and not isinstance(k, bool) and k >= 0 for k in counts)
        or sum(counts) != c
    ):
        raise CodecError(f"symbol class counts {counts!r} do not add up to {c} channels")
    wb = meta_int(meta, "wb", 0, 4)
    if (counts[5] > 0) != (wb in (2, 4)) or wb in (1, 3):
        raise CodecError(f"wide symbol planes wb={wb} inconsistent with {counts[5]} wide channels")
    order_h, order = r.raw_both(index_dtype(c), c, "channel order")
    order = order.long()
    pred = unpack_bits(r.raw_host(torch.uint8, -(-c // 8), "delta flags"), c)  # on the host
    oh = order_h.long()
    oh = torch.where((oh >= 0) & (oh < c), oh, c)  # out of range -> bin c, which is not checked
    if c and not bool((torch.bincount(oh, minlength=c + 1)[:c] == 1).all()):
        raise CodecError("channel order is not a permutation")
    # every row is written below unless it is class 0 (all zero)
    z = (torch.zeros if counts[0] else torch.empty)((c, n), dtype=torch.float32, device=r.device)
    start = counts[0]
    for j in range(1, 5):
        m = counts[j] * n
        _, base, per = PACKS[j]
        packed = r.coded(-(-m // per), f"class {j} symbols")
        if m:
            z.index_copy_(0, order[start : start + counts[j]], _unpack(packed, base, per, m).reshape(counts[j], n))
        start += counts[j]
    if counts[5]:
        m = counts[5] * n
        rows = [r.coded(m, f"wide symbols byte {j}") for j in range(wb)]
        rows += [torch.zeros(m, dtype=torch.uint8, device=r.device)] * (4 - wb)
        v = unplanes(rows, torch.int32).long() & 0xFFFFFFFF
        z.index_copy_(0, order[start:], ((v >> 1) ^ -(v & 1)).float().reshape(counts[5], n))
    idx = torch.nonzero(pred).squeeze(1)
    if n > 1 and idx.numel():
        idx = idx.to(z.device)
        z.index_copy_(0, idx, torch.cumsum(z.index_select(0, idx), dim=1))
    return z


def dequant(q: torch.Tensor, step: float | torch.Tensor, mu: torch.Tensor) -> torch.Tensor:
    """float32 [C, N] from integer-valued float32 q: q * step + mu_c, in place (``step`` one
    number or float32 [C] per channel). The same ops on both sides, so a temporal reference
    matches bit for bit."""
    if isinstance(step, torch.Tensor):
        return q.mul_(step[:, None]).add_(mu[:, None])
    return q.mul_(step).add_(mu[:, None])


# ---------------------------------------------------------------------------- shared-step core


def staged_shared_encode(
    w: SectionWriter,
    xt: torch.Tensor,
    params: dict[str, Any],
    dtype: torch.dtype,
    pred: torch.Tensor | None = None,
    want_rec: bool = False,
) -> Generator[None, None, tuple[dict[str, Any], torch.Tensor | None]]:
    """Staged (yields where ``staged_standardized_steps`` does). Quantize xt (float32 [C, N],
    consumed) -- or with ``pred`` (float32 [C, N]) the residual
    xt - pred -- and entropy-code the integers. ``dtype``: what the decoder rounds its result to.

    Default: the per-channel floor ``fidelity.target_db(params)`` (``snr_db``, or ``cosine`` on
    the standardized tensor; 27 dB) against the spread of xt (see ``staged_standardized_steps``);
    meta ``sd`` = 1, ``st`` = the standardized step, and a bfloat16 scale per channel after the
    means. With ``step`` in params: that one absolute step for every channel (no floor
    promised; the old explicit mode). Channel means (of the residual) are removed and sent as
    float32. Returns (meta, reconstruction [C, N] in float32, prediction included)."""
    spread = spread_var(xt) if pred is not None else None
    if pred is not None:
        xt = xt.sub_(pred)
    mu, var = centered_var(xt)
    if "step" in params:
        step = param_float(params, "step", 1.0, 1e-30, 3e38)
        if xt.numel():
            lo_t, hi_t = torch.aminmax(xt)
            span = max(-float(lo_t), float(hi_t))
            if span / step > MAX_Q:
                raise LocalError(f"quantizer step {step} is too small for values up to {span} (max {MAX_Q} levels)")
        step = f32(step)
        q = xt.div_(step).round_()
        w.raw(mu.contiguous())
        sym = q.to(torch.int32)
        rec = dequant(q, step, mu) if want_rec else None
        meta = yield from staged_put_symbols(w, sym)
        meta["st"] = step
    else:
        d, scales, q, steps = yield from staged_standardized_steps(
            xt, var if spread is None else spread, target_db(params), mu, pred, dtype
        )
        w.raw(mu.contiguous())
        w.raw(scales.contiguous())
        sym = q.to(torch.int32)  # (int16 where it fits took a host round trip to know)
        rec = dequant(q, steps, mu) if want_rec else None  # queued before the symbols' host round trip
        meta = yield from staged_put_symbols(w, sym)
        meta["st"] = d
        meta["sd"] = 1
    if rec is not None and pred is not None:
        rec = rec.add_(pred)
    return meta, rec


def shared_decode(r: SectionReader, meta: dict[str, Any], c: int, n: int) -> torch.Tensor:
    """Inverse of ``shared_encode``: float32 [C, N]."""
    step = meta_float(meta, "st", positive=True)
    sd = meta_int(meta, "sd", 0, 1) if "sd" in meta else 0
    mu = r.raw(torch.float32, c, "channel means")
    if not sd:
        return dequant(get_symbols(r, meta, c, n), step, mu)
    scales_h, scales = r.raw_both(torch.bfloat16, c, "channel scales")
    if c and not bool((torch.isfinite(scales_h) & (scales_h >= 0)).all()):
        raise CodecError("channel scales must be finite and not negative")
    return dequant(get_symbols(r, meta, c, n), channel_steps(step, scales), mu)


# ---------------------------------------------------------------------------- outlier channels


def outlier_channels(xt: torch.Tensor, ratio: float) -> torch.Tensor:
    """Rows of xt [C, N] whose absmax exceeds ``ratio`` x the median channel absmax (DiT
    "massive activations"), at most C/8 of them (the largest); sorted int64 indices."""
    c = xt.shape[0]
    if ratio <= 0 or c < 2 or xt.shape[1] == 0:
        return torch.zeros(0, dtype=torch.int64, device=xt.device)
    lo, hi = torch.aminmax(xt, dim=1)
    amax = torch.maximum(-lo, hi)
    med = float(amax.median())
    idx = torch.nonzero(amax > ratio * med).squeeze(1) if med > 0 else torch.nonzero(amax > 0).squeeze(1)
    cap = max(1, c // 8)
    if idx.numel() > cap:
        idx = idx[torch.topk(amax[idx], cap).indices]
    return torch.sort(idx).values


def put_outliers(w: SectionWriter, xt: torch.Tensor, idx: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Outlier channels kept exact in the input dtype (16 bits for bf16/fp16; after the NaN policy).
    Returns the other channels of xt, the ones left to quantize."""
    if not idx.numel():  # the same empty sections, without the tensor ops
        w.empty(1 + itemsize(dtype))
        return xt
    w.raw(idx.to(index_dtype(xt.shape[0])))
    put_planes(w, xt.index_select(0, idx).to(dtype))
    return xt.index_select(0, rest_of(xt.shape[0], idx))


def outliers_first(
    w: SectionWriter, t: torch.Tensor, params: dict[str, Any], default: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """``t`` channel-major, its outlier channels (``params["outliers"]``, else ``default``)
    written exactly: (the other channels, float32 [C - no, N]; the outlier indices)."""
    xt = channel_major(t)
    idx = outlier_channels(xt, param_float(params, "outliers", default, 0.0, 1e9))
    return put_outliers(w, xt, idx, t.dtype), idx


def get_outliers(r: SectionReader, no: int, c: int, n: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(channel indices, float32 [no, N] values)."""
    if no == 0:  # the empty sections, checked without tensor ops
        r.skip_empty(1 + itemsize(dtype), "outlier")
        return torch.zeros(0, dtype=torch.int64), torch.zeros((0, n))
    idx = r.raw(index_dtype(c), no, "outlier channels").long()
    if no and (int(idx.min()) < 0 or int(idx.max()) >= c or (no > 1 and not bool((idx[1:] > idx[:-1]).all()))):
        raise CodecError("outlier channel indices must be increasing and below the channel count")
    vals = get_planes(r, dtype, no * n, "outlier values").reshape(no, n).float()
    return idx, vals


def rest_of(c: int, idx: torch.Tensor) -> torch.Tensor:
    keep = torch.ones(c, dtype=torch.bool, device=idx.device)
    keep[idx] = False
    return torch.nonzero(keep).squeeze(1)


def merge_outliers(y: torch.Tensor, c: int, idx: torch.Tensor, vals: torch.Tensor) -> torch.Tensor:
    """[C - no, N] coded channels + exact outlier rows -> [C, N]."""
    if idx.numel() == 0:
        return y
    out = torch.empty((c, y.shape[1]), dtype=torch.float32, device=y.device)
    out.index_copy_(0, rest_of(c, idx), y)
    out.index_copy_(0, idx, vals)
    return out


# ---------------------------------------------------------------------------- codecs


class QuantCodec(EntropyCodec):
    """The default lossy codec: ONE quantizer step shared by all channels in the standardized
    domain (each channel's values over its bfloat16 scale ~ its standard deviation), integers
    entropy-coded. Every channel keeps the same SNR against its own spread, massive or quiet.

    Params: ``snr_db`` (per-channel floor in dB, default 27.0) or ``cosine`` (the old name:
    cosine on the per-channel standardized tensor; 0.999 = 27.0 dB), or ``step`` (one explicit
    absolute step for every channel: no floor); ``outliers`` (default 0 = off): channels with
    absmax > outliers x the median channel absmax are sent exactly (input dtype);
    ``backend`` (auto | zstd | ans).

    Error budget: for every channel c with std_c >= ``MIN_CHANNEL_STD`` (constants),
    SNR_c = var_c / mse_c >= the floor (checked on the encoder, channels that miss it are
    requantized under the hard bound), and |x - x'| <= step_c / 2 per element with step_c =
    ``meta["st"]`` x the channel's scale; before rounding to the output dtype. Channels below
    ``MIN_CHANNEL_STD`` are sent as their mean; outlier channels exactly."""

    wire_id = 3
    name = "quant"
    float_only = True

    def _encode_staged(
        self, t: torch.Tensor, name: str, params: dict[str, Any], state: dict[Any, Any] | None
    ) -> Staged:
        dname = dtype_name(t.dtype)
        w = SectionWriter(pick_backend(params, t.device))
        xt, idx = outliers_first(w, t, params, 0.0)
        meta, _ = yield from staged_shared_encode(w, xt, params, t.dtype)
        meta["no"] = int(idx.numel())
        data, meta = w.finish(meta)
        return WireTensor(name, dname, tuple(t.shape), self.wire_id, data, meta)

    def _decode(self, wt: WireTensor, device: torch.device, state: dict[Any, Any] | None) -> torch.Tensor:
        dtype, c, n = lossy_geometry(wt)
        no = meta_int(wt.meta, "no", 0, c)
        r = SectionReader(wt, device)
        idx, vals = get_outliers(r, no, c, n, dtype)
        y = shared_decode(r, wt.meta, c - no, n)
        r.done()
        return output(merge_outliers(y, c, idx, vals), dtype, tuple(wt.shape))


def bf16_ceil(s: torch.Tensor) -> torch.Tensor:
    """Smallest bfloat16 >= s (s >= 0, finite), so a rounded-up scale never clips."""
    b = s.to(torch.bfloat16)
    low = b.float() < s
    return (b.view(torch.int16) + low.to(torch.int16)).view(torch.bfloat16)


class Q4Codec(EntropyCodec):
    """4-bit symmetric quantization of each channel's deviation from its mean, one bfloat16
    scale per group of ``group`` consecutive tokens of a channel (default 32), then
    entropy-coded (nibble pairs; scales as byte planes; channel means float32).

    Params: ``group`` (even, 2..4096), ``outliers`` (default 8: channels with absmax > 8x the
    median are sent exactly; 0 = off), ``floor_db`` (default ``Q4_SNR_DB`` = 15 dB: every
    channel whose 4-bit SNR against its own spread misses it is sent exactly instead),
    ``backend``.
    Error budget: per channel SNR >= ``floor_db`` (constant channels: their mean); per element
    |x - x'| <= s_g / 2 with s_g the group's scale = absmax_g(x - mean) / 7 rounded up to
    bfloat16, plus output rounding; exact channels exact. About 4.5 bits/value before
    entropy coding, ~3.5-4 after. (Payloads without meta ``ct``, from before the centering,
    still decode.)"""

    wire_id = 4
    name = "q4"
    float_only = True

    def _encode(self, t: torch.Tensor, name: str, params: dict[str, Any], state: dict[Any, Any] | None) -> WireTensor:
        dname = dtype_name(t.dtype)
        g = param_int(params, "group", 32, 2, 4096)
        if g % 2:
            raise LocalError(f"q4 group={g} must be even")
        floor = floor_db(params, Q4_SNR_DB)
        w = SectionWriter(pick_backend(params, t.device))
        xt = channel_major(t)
        ratio_idx = outlier_channels(xt, param_float(params, "outliers", 8.0, 0.0, 1e9))
        z = xt.clone()
        mu, var = centered_var(z)
        c, n = z.shape
        ng = -(-n // g)
        if ng * g != n:
            padded = torch.zeros((c, ng * g), dtype=torch.float32, device=z.device)
            padded[:, :n] = z
            z = padded
        zg = z.reshape(c, ng, g)
        lo, hi = torch.aminmax(zg, dim=-1)
        scale = bf16_ceil(torch.maximum(-lo, hi) / 7.0)
        sf = scale.float()
        q = zg.div(torch.where(sf > 0, sf, torch.ones_like(sf))[..., None]).round_().clamp_(-7, 7)
        err = torch.linalg.vector_norm((q * sf[..., None] - zg).reshape(c, -1), dim=1, dtype=torch.float64)
        bad = torch.nonzero(misses_floor(err.square_().div_(n), var, floor)).squeeze(1)
        idx = torch.unique(torch.cat([ratio_idx, bad])) if bad.numel() else ratio_idx
        put_outliers(w, xt, idx, t.dtype)
        if idx.numel():
            keep = rest_of(c, idx)
            mu, scale, q = mu[keep], scale[keep], q.index_select(0, keep)
        nib = q.add_(8).to(torch.uint8).reshape(-1, 2)
        w.raw(mu.contiguous())
        put_planes(w, scale)
        w.coded(nib[:, 0] | (nib[:, 1] << 4))
        data, meta = w.finish({"g": g, "no": int(idx.numel()), "ct": 1})
        return WireTensor(name, dname, tuple(t.shape), self.wire_id, data, meta)

    def _decode(self, wt: WireTensor, device: torch.device, state: dict[Any, Any] | None) -> torch.Tensor:
        dtype, c, n = lossy_geometry(wt)
        g = meta_int(wt.meta, "g", 2, 4096)
        no = meta_int(wt.meta, "no", 0, c)
        ct = meta_int(wt.meta, "ct", 0, 1) if "ct" in wt.meta else 0
        if g % 2:
            raise CodecError(f"q4 group {g} is odd")
        cr = c - no
        ng = -(-n // g)
        size = itemsize(dtype)
        # its groups are padded: up to g/2 + 2 bytes a group even for one token
        r = SectionReader(wt, device, coded_limit=no * n * size + cr * ng * (g // 2 + 2))
        idx, vals = get_outliers(r, no, c, n, dtype)
        mu = r.raw(torch.float32, cr, "channel means") if ct else None
        scale = get_planes(r, torch.bfloat16, cr * ng, "group scales").float().reshape(cr, ng, 1)
        packed = r.coded(cr * ng * g // 2, "4-bit values")
        r.done()
        nib = torch.stack([packed & 15, packed >> 4], dim=1).reshape(cr, ng, g)
        y = nib.float().sub_(8.0).mul_(scale).reshape(cr, ng * g)[:, :n]
        if mu is not None:
            y = y.add_(mu[:, None])
        return output(merge_outliers(y, c, idx, vals), dtype, tuple(wt.shape))


class ClipSparseCodec(EntropyCodec):
    """The original project's "Nvenc LTX" quantization, entropy-coded instead of HEVC: per
    channel, clip to the [pct, 100 - pct] percentiles (default 0.5 %), 256 levels over that
    range (uint8), and every value outside it sent exactly as a sparse outlier (position
    deltas + value in the input dtype).

    Params: ``pct`` (0 < pct < 50, default 0.5), ``floor_db`` (default ``CLIP_SPARSE_SNR_DB``
    = 25 dB: a channel whose SNR against its own spread misses it has all its values sent as
    sparse exact values; by Chebyshev's inequality the clipped range is at most 2 std / sqrt(pct
    / 100) wide, so with enough tokens no channel of any distribution needs it), ``backend``.
    Error budget: per channel SNR >= ``floor_db`` (constant channels exact); inside the range
    |x - x'| <= (hi_c - lo_c) / 510 (half a level) plus output rounding; sparse values exact
    (after the NaN policy). Spends 8 bits on every channel, quiet or loud: the baseline the
    ``quant`` codec should beat at equal worst-channel SNR."""

    wire_id = 5
    name = "clip-sparse"
    float_only = True

    def _encode(self, t: torch.Tensor, name: str, params: dict[str, Any], state: dict[Any, Any] | None) -> WireTensor:
        dname = dtype_name(t.dtype)
        pct = param_float(params, "pct", 0.5, 1e-9, 49.999)
        w = SectionWriter(pick_backend(params, t.device))
        xt = channel_major(t)
        c, n = xt.shape
        tail = int(math.floor(pct / 100.0 * (n - 1)))
        lo = torch.kthvalue(xt, tail + 1, dim=1).values
        hi = torch.kthvalue(xt, n - tail, dim=1).values
        scale = (hi - lo) / 255.0
        safe = torch.where(scale > 0, scale, torch.ones_like(scale))
        outside = (xt < lo[:, None]) | (xt > hi[:, None])
        q = torch.minimum(torch.maximum(xt, lo[:, None]), hi[:, None]).sub_(lo[:, None]).div_(safe[:, None])
        q = q.round_().clamp_(0, 255)
        err = (q * scale[:, None] + lo[:, None] - xt).masked_fill_(outside, 0.0)
        mse = torch.linalg.vector_norm(err, dim=1, dtype=torch.float64).square_().div_(n)
        bad = misses_floor(mse, spread_var(xt), floor_db(params, CLIP_SPARSE_SNR_DB))
        if bool(bad.any()):
            outside |= bad[:, None]
        out_mask = outside.reshape(-1)
        pos = torch.nonzero(out_mask).squeeze(1)
        vals = xt.reshape(-1)[pos].to(t.dtype)
        w.raw(lo.contiguous())
        w.raw(scale.contiguous())
        w.coded(q.to(torch.uint8))
        gaps = torch.diff(pos, prepend=pos.new_zeros(1)) if pos.numel() else pos
        put_planes(w, gaps.to(torch.int32 if xt.numel() < 2**31 else torch.int64))
        put_planes(w, vals)
        data, meta = w.finish({"m": int(pos.numel())})
        return WireTensor(name, dname, tuple(t.shape), self.wire_id, data, meta)

    def _decode(self, wt: WireTensor, device: torch.device, state: dict[Any, Any] | None) -> torch.Tensor:
        dtype, c, n = lossy_geometry(wt)
        total = c * n
        m = meta_int(wt.meta, "m", 0, total)
        r = SectionReader(wt, device)
        lo = r.raw(torch.float32, c, "range low")
        scale = r.raw(torch.float32, c, "range step")
        q = r.coded(total, "8-bit values").reshape(c, n)
        gaps = get_planes(r, torch.int32 if total < 2**31 else torch.int64, m, "outlier positions").long()
        vals = get_planes(r, dtype, m, "outlier values")
        r.done()
        y = q.float().mul_(scale[:, None]).add_(lo[:, None])
        if m:
            pos = torch.cumsum(gaps, 0)
            if int(gaps[1:].min() if m > 1 else 1) < 1 or int(pos[0]) < 0 or int(pos[-1]) >= total:
                raise CodecError("sparse outlier positions are not increasing inside the tensor")
            y.view(-1)[pos] = vals.float()
        return output(y, dtype, tuple(wt.shape))
