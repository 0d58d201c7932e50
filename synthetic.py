"""Activation data that looks like a trained diffusion transformer's, for the codec benchmark
and the fidelity tests (pure torch, no model).

Trained DiTs (FLUX, SD3, LTX) carry *massive activations*: a handful of hidden-state channels
whose spread over the tokens is hundreds of times the median channel's, present on every token
(image and text), sign-stable, varying from token to token with the image's layout, and
changing with the timestep. Random-weight models have none; a near-constant massive channel is
no test either (removing the channel mean takes it away). ``seam_steps`` makes sequences with
both kinds of structure a codec must keep.
"""

from __future__ import annotations

import math

import torch


def smooth_field(batch_c: int, h: int, w: int, g: torch.Generator, smooth: float = 0.7) -> torch.Tensor:
    """[batch_c, h * w] unit-variance fields: a blurred (spatially correlated) part mixed with
    white noise, ``smooth`` the share of the blurred part's variance."""
    white = torch.randn(batch_c, 1, h, w, generator=g)
    s = torch.nn.functional.avg_pool2d(white, 5, stride=1, padding=2, count_include_pad=False)
    s = torch.nn.functional.avg_pool2d(s, 5, stride=1, padding=2, count_include_pad=False)
    s = s / s.std().clamp(min=1e-6)
    return (math.sqrt(smooth) * s + math.sqrt(1 - smooth) * white).reshape(batch_c, h * w)


def seam_steps(
    steps: int,
    grid: tuple[int, int] = (32, 32),
    text: int = 0,
    channels: int = 1024,
    r: float = 0.3,
    massive: int = 4,
    massive_scale: float = 300.0,
    varying: bool = True,
    smooth: float = 0.7,
    batch: int = 1,
    seed: int = 0,
    dtype: torch.dtype = torch.bfloat16,
    device: str = "cpu",
) -> list[torch.Tensor]:
    """``steps`` tensors [batch, text + H*W, channels] with DiT-like statistics.

    Ordinary channels: log-normal scales and means, fields smooth over the H x W token grid,
    unstructured text tokens, step-to-step correlation with relative residual ``r`` (AR(1) on
    the centered signal: ||x_t - x_t-1|| / ||x_t|| ~ r).
    ``massive`` channels: with ``varying`` (default) their standard deviation over the tokens is
    ``massive_scale`` x the median channel's, sign-stable (|x| = m exp(0.35 f) with f a smooth
    field of the token grid, so every token carries the channel with its sign), on image and text
    tokens (text at a third of the level), growing by half over the steps and following their
    own slower AR(1) field. Without ``varying``: the old near-constant massive channels (mean
    100-300x the median scale, spread 3x), which a codec that removes channel means handles
    trivially."""
    g = torch.Generator().manual_seed(seed)
    h, w = grid
    c = channels
    sig = torch.exp(0.5 * torch.randn(c, generator=g))
    mu = 0.3 * sig * torch.randn(c, generator=g)
    big = torch.randperm(c, generator=g)[: min(massive, c)]
    median = float(sig.median())
    sign = torch.where(torch.rand(big.numel(), generator=g) < 0.5, -1.0, 1.0)
    if not varying:
        mu[big] = sign * median * (100 + 200 * torch.rand(big.numel(), generator=g))
        sig[big] *= 3.0

    def field() -> torch.Tensor:
        f = smooth_field(batch * c, h, w, g, smooth).reshape(batch, c, h * w).transpose(1, 2)
        return torch.cat([torch.randn(batch, text, c, generator=g), f], dim=1)

    def big_field() -> torch.Tensor:  # [batch, text + HW, k]: smooth over the grid, text tokens too
        f = smooth_field(batch * big.numel(), h, w, g, 0.95).reshape(batch, big.numel(), h * w).transpose(1, 2)
        return torch.cat([torch.randn(batch, text, big.numel(), generator=g), f], dim=1)

    # exp(0.35 f), f ~ N(0, 1): std / mean ~ 0.36, so m = scale * median / 0.36 gives the spread asked for
    level = sign * median * massive_scale / 0.36 * (0.8 + 0.4 * torch.rand(big.numel(), generator=g))
    text_level = torch.ones(text + h * w)
    text_level[:text] = 1.0 / 3.0
    rho = max(-1.0, 1.0 - r * r / 2.0)
    rho_big = max(-1.0, 1.0 - (r / 3) ** 2 / 2.0)
    z = field()
    zb = big_field()
    out = []
    for t in range(steps):
        grow = 1.0 + 0.5 * t / max(steps - 1, 1)  # massive channels grow with the timestep
        x = mu + sig * z
        if varying and big.numel():
            x[..., big] = level * grow * torch.exp(0.35 * zb) * text_level[None, :, None]
        elif big.numel():
            x[..., big] = mu[big] * grow + sig[big] * z[..., big]
        out.append(x.to(dtype).to(device))
        z = rho * z + math.sqrt(max(0.0, 1 - rho * rho)) * field()
        zb = rho_big * zb + math.sqrt(max(0.0, 1 - rho_big * rho_big)) * big_field()
    return out
