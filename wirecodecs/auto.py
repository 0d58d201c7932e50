"""``auto`` (id 15, never on the wire): the pure policy that picks codec and parameters per
link, GPUs and fidelity. No I/O: the client measures the link (``transport.MeshClient``) and
hands the result in as a ``LinkInfo``.

Inputs: the link, where the tensor lives (CUDA?), whether nvCOMP ANS runs here and the
server's device (from its CHALLENGE), and a per-channel fidelity floor (``fidelity``):
``snr_db`` (default 27 dB) or ``cosine`` (on the standardized tensor; ``1`` or ``lossless:
true`` means bit-exact).

The choice minimizes estimated encode + transfer + decode time over the candidates that
meet the floor on EVERY channel: ``raw``, ``lossless`` and ``quant-t`` at the floor. ``int8``
is never picked: its symmetric per-channel scale has no per-channel floor (a channel with a
large offset and a small spread keeps a few of its 255 levels; measured 3 dB on such a channel). Throughputs are rough constants (below), not measurements
of this machine: on a LAN the order of candidates is what matters, and it is robust.
The choice is returned as a report dict (``MeshClient.forward`` puts it in ``StepStats.codec``).
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Iterable
from typing import Any

import torch

from ..constants import DEFAULT_LINK_BPS
from ..errors import CodecError
from ..protocol import WireTensor
from .backends import ANS, ZSTD
from .base import LOSSY_DTYPES, Codec, Staged, dtype_name
from .fidelity import target_db

# Rough throughputs in bytes of *input* tensor per second, (encode, decode), by where the work
# runs: "gpu" (all on the GPU, nvCOMP ANS), "hybrid" (quantize on the GPU, zstd on the CPU),
# "cpu". CPU figures: a 2-core Xeon; GPU figures: an H200 with nvCOMP 6.0, host copies included,
# received bytes in page-locked memory (bench/ans_speed.py on a 37.7 MB Klein 9B seam, the LTX
# split's 102 MB raw seam for raw decode; docs/BENCHMARKS.md).
_SPEED = {
    "gpu": {"raw": (45e9, 38e9), "int8": (40e9, 16e9), "lossless": (20e9, 22e9), "quant-t": (9e9, 16e9)},
    "hybrid": {
        "raw": (math.inf, math.inf),
        "int8": (200e9, 200e9),
        "lossless": (0.6e9, 0.9e9),
        "quant-t": (1e9, 1.5e9),
    },
    "cpu": {
        "raw": (math.inf, math.inf),
        "int8": (0.2e9, 0.5e9),
        "lossless": (0.5e9, 0.8e9),
        "quant-t": (0.25e9, 0.5e9),
    },
}
LOSSLESS_RATIO = 1.35  # bf16 activations through byte planes (measured 1.3-1.45)


# What one coding call costs whatever its size (kernel launches, host round trips, Python), ms, by
# where it runs: an entropy coder on a GPU is mostly this (one H200: quant ~6 ms a call for a 4 MB
# slab or the whole 37.7 MB seam, its decode ~2 ms; lossless ~1.8 / 1.3 ms; bench/stream_bench.py).
_PER_CALL_MS = {
    "gpu": {"raw": (0.1, 0.1), "int8": (0.5, 0.5), "lossless": (1.8, 1.3), "quant-t": (6.0, 2.5)},
    "hybrid": {"raw": (0.0, 0.0), "int8": (0.5, 0.5), "lossless": (2.0, 2.0), "quant-t": (6.0, 3.0)},
    "cpu": {"raw": (0.0, 0.0), "int8": (0.2, 0.2), "lossless": (1.0, 1.0), "quant-t": (2.0, 1.0)},
}
# the speed-table row standing in for each codec (the temporal and clipped variants cost like their kind)
_KIND = {"raw": "raw", "int8": "int8", "lossless": "lossless", "lossless-t": "lossless"}


def slab_costs(
    codec_name: str, on_cuda: bool, peer_device: str, itemsize: int, floor_db: float = 27.0
) -> tuple[tuple[float, float], tuple[float, float], float]:
    """A first guess, before anything is measured, of what coding and decoding one slab costs with
    ``codec_name``: ((per-call ms, ms per MB) to encode here, the same to decode on the peer, coded /
    raw bytes). ``MeshClient`` refines the per-call parts from its calls (``streaming.CostTracker``)."""
    kind = _KIND.get(codec_name, "quant-t")
    ans = ANS.available() is None

    def where(cuda: bool) -> str:
        return ("gpu" if ans else "hybrid") if cuda else "cpu"

    here, there = where(on_cuda), where(peer_device.startswith("cuda"))
    enc_bps, dec_bps = _SPEED[here][kind][0], _SPEED[there][kind][1]
    ratio = {"raw": 1.0, "int8": 1.0 / max(itemsize, 1), "lossless": 1.0 / LOSSLESS_RATIO}.get(
        kind, quant_bits(floor_db) / 8 / max(itemsize, 1)
    )
    return (_PER_CALL_MS[here][kind][0], 1e9 / enc_bps), (_PER_CALL_MS[there][kind][1], 1e9 / dec_bps), ratio


def probe_rate(small: tuple[int, float], big: tuple[int, float] | None, rtt_ms: float) -> float:
    """A link's rate in bytes/s from timed probes, each (payload bytes, round-trip ms): the small
    one alone (its time less the empty round trip ``rtt_ms``), or with a bigger one the slope
    between the two, which leaves out what every frame costs whatever the link (sealing, copies,
    the pass through both event loops). The slope is kept between the big probe's own rate and
    twice it (two noisy times close together must not read as an infinite rate)."""
    b1, t1 = small
    rate = b1 / max(t1 - rtt_ms, 0.05) * 1e3
    if big is None:
        return rate
    b2, t2 = big
    own = b2 / max(t2 - rtt_ms, 0.05) * 1e3
    if b2 <= b1:
        return max(rate, own)
    slope = (b2 - b1) / max(t2 - t1, 1e-3) * 1e3
    return min(max(slope, own), 2.0 * own)


def big_probe_bytes(rate_bps: float, small: int, budget_ms: float, most: int) -> int:
    """The second probe's size: what ``rate_bps`` moves in ``budget_ms`` (at most ``most``), or 0
    when that is under twice the first probe's ``small`` bytes (a slow link: the first probe's fixed
    costs are already small against its wire time)."""
    n = min(int(rate_bps * budget_ms / 1e3), most)
    return n if n >= 2 * small else 0


@dataclasses.dataclass(frozen=True)
class LinkInfo:
    up_bps: float  # client -> server, bytes/s
    down_bps: float
    rtt_ms: float
    when: float  # time.monotonic() of the measurement
    how: str  # "measured" or "assumed"

    @classmethod
    def assumed(cls, bps: float = DEFAULT_LINK_BPS) -> LinkInfo:
        """A link nobody measured: ``bps`` both ways, no latency."""
        return cls(bps, bps, 0.0, time.monotonic(), "assumed")

    def report(self) -> dict[str, Any]:
        return {
            "up_MBps": round(self.up_bps / 1e6, 1),
            "down_MBps": round(self.down_bps / 1e6, 1),
            "rtt_ms": round(self.rtt_ms, 2),
            "how": self.how,
        }


def quant_bits(snr_db: float) -> float:
    """Expected bits/value of ``quant`` at a per-channel SNR floor (Gaussian bound + coder overhead)."""
    return max(1.0, 0.5 * math.log2(10.0 ** (snr_db / 10.0)) + 0.6)


def choose(
    nbytes: int,
    itemsize: int,
    on_cuda: bool,
    peer_device: str,
    link: LinkInfo,
    params: dict[str, Any],
) -> dict[str, Any]:
    """The codec for ``nbytes`` of activations sent up ``link``: a report with ``codec``,
    ``params``, ``reason``, ``estimates_ms``."""
    link_bps = link.up_bps
    exact = params.get("lossless") is True or (
        isinstance(params.get("cosine"), (int, float)) and params["cosine"] >= 1.0 and "snr_db" not in params
    )
    floor = math.inf if exact else target_db(params)
    peer_cuda = peer_device.startswith("cuda")
    ans = on_cuda and ANS.available() is None and peer_cuda
    backend = "ans" if ans else "zstd"
    if ZSTD.available() is not None and not ans:
        backend = ""  # no entropy coder at all: raw only

    def where(cuda: bool) -> str:
        return ("gpu" if ans else "hybrid") if cuda else "cpu"

    values = nbytes / max(itemsize, 1)
    sizes = {"raw": float(nbytes), "lossless": nbytes / LOSSLESS_RATIO}
    if math.isfinite(floor):
        sizes["quant-t"] = values * quant_bits(floor) / 8
    if not backend:
        sizes.pop("lossless", None)
        sizes.pop("quant-t", None)
    est = {}
    for name, size in sizes.items():
        enc, dec = _SPEED[where(on_cuda)][name][0], _SPEED[where(peer_cuda)][name][1]
        est[name] = (nbytes / enc + nbytes / dec + size / max(link_bps, 1.0)) * 1e3
    best = min(est, key=lambda k: est[k])
    chosen: dict[str, Any] = {}
    if best in ("lossless", "quant-t"):
        chosen["backend"] = backend
    if best == "quant-t":
        chosen["snr_db"] = floor
        for k in ("keyint",):
            if k in params:
                chosen[k] = params[k]
    reason = (
        f"link {link_bps / 1e6:.0f} MB/s, {'CUDA' if on_cuda else 'CPU'} tensor, entropy backend "
        f"{backend or 'none'}, fidelity floor {f'{floor:.1f} dB per channel' if math.isfinite(floor) else 'exact'}: "
        + ", ".join(f"{k} ~{v:.1f} ms" for k, v in sorted(est.items(), key=lambda kv: kv[1]))
    )
    return {"codec": best, "params": chosen, "reason": reason, "estimates_ms": est}


def choose_for(
    tensors: Iterable[torch.Tensor], link: LinkInfo, peer_device: str, params: dict[str, Any]
) -> dict[str, Any]:
    """``choose`` for the tensors of one call (their bytes, item size, CUDA or not); the
    report also carries the link it assumed (``link``)."""
    ts = list(tensors)
    nbytes = sum(t.numel() * t.element_size() for t in ts)
    itemsize = ts[0].element_size() if ts else 2
    on_cuda = any(t.device.type == "cuda" for t in ts)
    rep = choose(nbytes, itemsize, on_cuda, peer_device, link, params)
    rep["link"] = link.report()
    return rep


class AutoCodec(Codec):
    """Registry entry so ``auto`` is a valid codec name; encodes with the codec ``choose``
    picks (params: ``snr_db``/``cosine``/``lossless`` floor, ``link_bps``, ``peer_device``), found
    through ``lookup`` (the registry's ``by_name``, handed in by ``codec.py``). Payloads
    carry the chosen codec's id, so this id never appears on the wire."""

    wire_id = 15
    name = "auto"
    lossless = False
    stateful = True

    def __init__(self, lookup: Callable[[str], Codec]):
        self.lookup = lookup

    def staged_encode(
        self, t: torch.Tensor, name: str, params: dict[str, Any], state: dict[Any, Any] | None = None
    ) -> Staged:
        """The chosen codec's stages (``encode`` runs them all)."""
        on_cuda = t.device.type == "cuda"
        rep = choose(
            t.numel() * t.element_size(),
            t.element_size(),
            on_cuda,
            str(params.get("peer_device", "cuda" if on_cuda else "cpu")),
            LinkInfo.assumed(float(params.get("link_bps", DEFAULT_LINK_BPS))),
            params,
        )
        chosen = rep["codec"]
        if chosen == "quant-t" and dtype_name(t.dtype) not in LOSSY_DTYPES:
            chosen = "lossless" if "lossless" in rep["estimates_ms"] else "raw"  # not a float: exact only
        return self.lookup(chosen).staged_encode(t, name, rep["params"] if chosen == rep["codec"] else {}, state=state)

    def decode(self, wt: WireTensor, device: torch.device | str, state: dict[Any, Any] | None = None) -> torch.Tensor:
        raise CodecError(f"{wt.name!r} names codec 15 (auto), which is resolved before sending and never decoded")
