"""What the lossy codecs share: parameter and meta parsing, the channel-major float32 view
with the non-finite policy, and the cast back to the output dtype.

Parameters come from our caller (misuse: ``LocalError``); meta comes from the peer
(garbage: ``CodecError``). Lossy non-finite policy: NaN -> 0, +-Inf -> +-the channel's
largest finite magnitude (docs/PROTOCOL.md).
"""

from __future__ import annotations

import math
from typing import Any

import torch

from ..errors import CodecError, LocalError
from ..protocol import WireTensor
from .base import LOSSY_DTYPES, numel, torch_dtype

# ---------------------------------------------------------------------------- our parameters


def param_float(params: dict[str, Any], key: str, default: float, lo: float, hi: float) -> float:
    """A caller's codec parameter (our side: misuse is a LocalError)."""
    v = params.get(key, default)
    if not isinstance(v, (int, float)) or isinstance(v, bool) or not (lo <= v <= hi):
        raise LocalError(f"codec parameter {key}={v!r} must be a number in [{lo}, {hi}]")
    return float(v)


def param_int(params: dict[str, Any], key: str, default: int, lo: int, hi: int) -> int:
    v = params.get(key, default)
    if not isinstance(v, int) or isinstance(v, bool) or not (lo <= v <= hi):
        raise LocalError(f"codec parameter {key}={v!r} must be an integer in {lo}..{hi}")
    return v


def param_choice(params: dict[str, Any], key: str, default: str, allowed: tuple[str, ...]) -> str:
    v = params.get(key, default)
    if v not in allowed:
        raise LocalError(f"codec parameter {key}={v!r} must be one of {list(allowed)}")
    return str(v)


# ---------------------------------------------------------------------------- untrusted meta


def meta_int(meta: dict[str, Any], key: str, lo: int, hi: int) -> int:
    v = meta.get(key)
    if not isinstance(v, int) or isinstance(v, bool) or not lo <= v <= hi:
        raise CodecError(f"codec meta {key!r} = {v!r} is not an integer in {lo}..{hi}")
    return v


def meta_float(meta: dict[str, Any], key: str, positive: bool = False) -> float:
    v = meta.get(key)
    if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v) or (positive and v <= 0):
        raise CodecError(f"codec meta {key!r} = {v!r} is not a finite{' positive' if positive else ''} number")
    return float(v)


def meta_str(meta: dict[str, Any], key: str, allowed: tuple[str, ...]) -> str:
    v = meta.get(key)
    if v not in allowed:
        raise CodecError(f"codec meta {key!r} = {v!r} is not one of {list(allowed)}")
    return str(v)


# ---------------------------------------------------------------------------- channel-major views


def sync_free(t: torch.Tensor) -> bool:
    """Code ``t`` without host round trips (``.item()``, ``nonzero``, a Python ``bool`` of a tensor):
    on a GPU each one waits for everything queued before it (the front half's blocks, the peer's
    kernels on a shared GPU) and stops the coder from queueing its next kernels, so there the
    codecs do a little more arithmetic instead (a whole-tensor ``torch.where`` for a picked subset).
    On the CPU a round trip costs nothing and the smaller work wins."""
    return t.is_cuda


def sanitize(x: torch.Tensor, dim: int = 0) -> torch.Tensor:
    """The lossy non-finite policy on a float32 2-D tensor whose channels run along the other
    axis than ``dim`` (tokens): NaN -> 0, +-Inf -> +-the channel's largest finite magnitude."""
    # One cheap reduction decides (an overflow only costs the slow path); not on a GPU (``sync_free``).
    if not sync_free(x) and bool(torch.isfinite(x.sum(dim)).all()):
        return x
    finite = torch.nan_to_num(x, nan=0.0, posinf=0.0, neginf=0.0)
    absmax = finite.abs().amax(dim=dim, keepdim=True).expand_as(x)
    out = torch.where(torch.isposinf(x), absmax, finite)
    return torch.where(torch.isneginf(x), -absmax, out)


def channel_major(t: torch.Tensor) -> torch.Tensor:
    """A fresh float32 [C, N] copy of ``t`` viewed as [N, C] (C = last axis), with the lossy
    non-finite policy applied: the layout every quantizer works in (safe to modify)."""
    x = t.detach().reshape(-1, t.shape[-1])
    if x.dtype in (torch.float16, torch.bfloat16):  # transpose 16-bit words, then widen: 2x faster
        xt = x.view(torch.int16).t().contiguous().view(x.dtype).float()
    else:
        xt = torch.empty((x.shape[1], x.shape[0]), dtype=torch.float32, device=x.device).copy_(x.t())
    return sanitize(xt, dim=1)


def output(yt: torch.Tensor, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
    """float32 [C, N] -> the tensor in ``dtype`` and ``shape`` (16-bit: narrow first, then
    transpose 16-bit words, which is much faster than transposing floats). Clamped to the
    dtype's finite range: a value within half a step of float16's 65504 must not become inf."""
    fmax = torch.finfo(dtype).max
    yt = yt.clamp_(-fmax, fmax)
    if dtype in (torch.float16, torch.bfloat16):
        return yt.to(dtype).view(torch.int16).t().contiguous().view(dtype).reshape(shape)
    return yt.t().contiguous().reshape(shape)


def as_output(yt: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """float32 [C, N] (modified) with the values ``output`` would hand over in ``dtype``, still
    float32 [C, N]: what a fidelity check must measure."""
    if dtype == torch.float32:
        return yt
    fmax = torch.finfo(dtype).max
    return yt.clamp_(-fmax, fmax).to(dtype).float()


def lossy_geometry(wt: WireTensor) -> tuple[torch.dtype, int, int]:
    """(dtype, channels, tokens) of a lossy payload's descriptor."""
    if wt.dtype not in LOSSY_DTYPES:
        raise CodecError(f"lossy payload for {wt.name!r} has dtype {wt.dtype}")
    c = wt.shape[-1]
    total = numel(wt.shape)
    return torch_dtype(wt.dtype), c, (total // c if c else 0)
