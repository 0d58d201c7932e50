"""Per-channel fidelity: the measure every lossy codec's target and floor are stated in.

Trained diffusion transformers carry *massive activations*: a few channels hundreds of times
larger than the rest, on every token. A whole-tensor target (cosine, MSE) is then met by those
channels alone while the others may be rounded away. So fidelity is measured per channel:

    SNR_c = var_c / mse_c   (in dB: 10 log10),   var_c = variance of channel c over the tokens,
                                                  mse_c = mean squared error of channel c

with C = the last axis and the tokens every other axis. A channel whose standard deviation is
below ``MIN_CHANNEL_STD`` (absolute) counts as constant and is left out of the minimum (it may
be sent as its mean). The old ``cosine`` parameter keeps working and now means the cosine on
the per-channel standardized tensor: 1 - cos = 1 / (2 SNR), so cosine 0.999 is 27.0 dB.

Pure torch; no codec imports this module's callers.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from ..constants import DEFAULT_SNR_DB, MIN_CHANNEL_STD
from ..errors import LocalError

MAX_SNR_DB = 80.0  # beyond this a lossy codec is the wrong tool: use lossless


def db(ratio: float) -> float:
    return 10.0 * math.log10(ratio) if ratio > 0 else -math.inf


def snr_from_cosine(cosine: float) -> float:
    """The per-channel SNR (dB) that a cosine on the standardized tensor means."""
    if cosine >= 1.0:
        return math.inf
    return db(1.0 / (2.0 * (1.0 - cosine)))


def target_db(params: dict[str, Any], default: float = DEFAULT_SNR_DB) -> float:
    """The per-channel SNR floor a caller asks for, in dB: ``snr_db``, else ``cosine`` (the cosine
    on the standardized tensor, the old parameter), else ``default``. Our misuse: LocalError."""
    if "snr_db" in params:
        v = params["snr_db"]
        if not isinstance(v, (int, float)) or isinstance(v, bool) or not (0.0 <= v <= MAX_SNR_DB):
            raise LocalError(f"codec parameter snr_db={v!r} must be a number in [0, {MAX_SNR_DB}] (dB)")
        return float(v)
    if "cosine" in params:
        v = params["cosine"]
        if not isinstance(v, (int, float)) or isinstance(v, bool) or not (0.0 <= v <= 1.0):
            raise LocalError(f"codec parameter cosine={v!r} must be a number in [0.0, 1.0]")
        if v <= 0.5:
            return 0.0
        return min(snr_from_cosine(float(v)), MAX_SNR_DB)
    return default


def misses_floor(
    mse: torch.Tensor, var: torch.Tensor, floor_db: float, live: torch.Tensor | None = None
) -> torch.Tensor:
    """bool [C]: the channels whose SNR ``var / mse`` is below ``floor_db``. Constant channels
    (std < ``MIN_CHANNEL_STD``, or not ``live`` when the caller knows better) never are."""
    if live is None:
        live = var.sqrt() >= MIN_CHANNEL_STD
    return live & (mse * 10.0 ** (floor_db / 10.0) > var)


def channel_snr_db(x: torch.Tensor, y: torch.Tensor, min_std: float = MIN_CHANNEL_STD) -> torch.Tensor:
    """Per-channel SNR in dB of ``y`` against ``x`` (same shape, channels on the last axis),
    float64 on the CPU; +inf for an exact channel, NaN for a constant one (std < ``min_std``)."""
    a = x.detach().reshape(-1, x.shape[-1]).double()
    b = y.detach().reshape(-1, y.shape[-1]).to(a.device).double()
    var = (
        a.var(dim=0, correction=0) if a.shape[0] > 1 else torch.zeros(a.shape[1], dtype=torch.float64, device=a.device)
    )
    mse = (a - b).square().mean(0)
    out = 10.0 * torch.log10(var / mse)
    out = torch.where(mse == 0, torch.full_like(out, math.inf), out)
    return torch.where(var.sqrt() < min_std, torch.full_like(out, math.nan), out).cpu()


def summary(snr: torch.Tensor) -> tuple[float, float]:
    """(min, median) over the live channels of a ``channel_snr_db`` result; (inf, inf) if none."""
    live = snr[~torch.isnan(snr)]
    if live.numel() == 0:
        return math.inf, math.inf
    return float(live.min()), float(live.median())


def floor_db(params: dict[str, Any], default: float) -> float:
    """A fixed-rate codec's per-channel floor (``floor_db``, dB; q4, clip-sparse, nvenc): the
    channels below it are sent exactly. Not ``snr_db``/``cosine``: those set the quant family's
    rate, and the node passes them to every codec."""
    v = params.get("floor_db", default)
    if not isinstance(v, (int, float)) or isinstance(v, bool) or not (0.0 <= v <= MAX_SNR_DB):
        raise LocalError(f"codec parameter floor_db={v!r} must be a number in [0, {MAX_SNR_DB}] (dB)")
    return float(v)
