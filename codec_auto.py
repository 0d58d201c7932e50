"""``auto`` (id 15, never on the wire): pick codec and parameters per link, GPUs and fidelity.

Inputs: the link bandwidth the client measured to this server (``measure_link``: round
trips through PING, one carrying a payload up, one asking for an echo down; cached per
host:port for ``LINK_TTL_S``), where the tensor lives (CUDA?), whether nvCOMP ANS runs
here and the server's device (from its CHALLENGE), and a fidelity floor: ``cosine``
(default 0.999; ``1`` or ``lossless: true`` means bit-exact).

The choice minimizes estimated encode + transfer + decode time over the candidates that
meet the floor: ``raw``, ``lossless``, ``int8`` (cosine ~0.9999, only for floors <= 0.9999)
and ``quant-t`` at the floor. Throughputs are rough constants (below), not measurements
of this machine: on a LAN the order of candidates is what matters, and it is robust.
The choice is returned as a report dict (``MeshClient.forward`` puts it in
``StepStats.codec``) and logged when it changes.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import threading
import time
from typing import Any

import torch

from .codec import Codec, by_name, register
from .codec_entropy import ANS, ZSTD, param_float
from .errors import CodecError
from .protocol import WireTensor

log = logging.getLogger("comfyui_mesh")

LINK_TTL_S = 600.0
DEFAULT_LINK_BPS = 117e6  # gigabit Ethernet payload rate, when nothing was measured

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


@dataclasses.dataclass
class LinkInfo:
    up_bps: float  # client -> server, bytes/s
    down_bps: float
    rtt_ms: float
    when: float
    how: str  # "measured" or "assumed"


_LINKS: dict[tuple[str, int], LinkInfo] = {}
_LOCK = threading.Lock()


def cached_link(host: str, port: int) -> LinkInfo | None:
    with _LOCK:
        li = _LINKS.get((host.strip().lower(), port))
    if li is not None and time.monotonic() - li.when < LINK_TTL_S:
        return li
    return None


def measure_link(client: Any, probe_bytes: int = 2 << 20) -> LinkInfo:
    """Measure (and cache) the link to ``client``'s server with three PING round trips."""
    from .protocol import Ping

    hit = cached_link(client.cfg.host, client.cfg.port)
    if hit is not None:
        return hit
    rtt = min(client.ping(0)[0] for _ in range(2))
    payload = WireTensor("probe", "uint8", (probe_bytes,), 0, bytes(probe_bytes))
    t0 = time.perf_counter()
    client.request(Ping(seq=0, echo_bytes=0, tensors=(payload,)))
    up_ms = (time.perf_counter() - t0) * 1e3
    down_ms, _ = client.ping(probe_bytes)
    li = LinkInfo(
        up_bps=probe_bytes / max(up_ms - rtt, 0.05) * 1e3,
        down_bps=probe_bytes / max(down_ms - rtt, 0.05) * 1e3,
        rtt_ms=rtt,
        when=time.monotonic(),
        how="measured",
    )
    with _LOCK:
        _LINKS[(client.cfg.host.strip().lower(), client.cfg.port)] = li
    log.info(
        "ComfyUI-Mesh: link to %s: up %.0f MB/s, down %.0f MB/s, rtt %.1f ms",
        client.cfg.address,
        li.up_bps / 1e6,
        li.down_bps / 1e6,
        rtt,
    )
    return li


def quant_bits(cosine: float) -> float:
    """Expected bits/value of ``quant`` at a cosine target (Gaussian bound + coder overhead)."""
    return max(1.0, 0.5 * math.log2(1.0 / max(2.0 * (1.0 - cosine), 1e-12)) + 0.6)


def choose(
    nbytes: int,
    itemsize: int,
    on_cuda: bool,
    peer_device: str,
    link_bps: float,
    params: dict[str, Any],
) -> dict[str, Any]:
    """The codec for ``nbytes`` of activations: a report with ``codec``, ``params``, ``reason``."""
    lossless_only = params.get("lossless") is True
    floor = 1.0 if lossless_only else param_float(params, "cosine", 0.999, 0.0, 1.0)
    peer_cuda = peer_device.startswith("cuda")
    ans = on_cuda and ANS.available() is None and peer_cuda
    backend = "ans" if ans else "zstd"
    if ZSTD.available() is not None and not ans:
        backend = ""  # no entropy coder at all: raw / int8 only

    def where(cuda: bool) -> str:
        return ("gpu" if ans else "hybrid") if cuda else "cpu"

    values = nbytes / max(itemsize, 1)
    sizes = {"raw": float(nbytes), "lossless": nbytes / LOSSLESS_RATIO}
    if floor < 1.0:
        sizes["quant-t"] = values * quant_bits(floor) / 8
        if floor <= 0.9999 and itemsize > 1:
            sizes["int8"] = values * 1.0
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
        chosen["cosine"] = floor
        for k in ("keyint",):
            if k in params:
                chosen[k] = params[k]
    reason = (
        f"link {link_bps / 1e6:.0f} MB/s, {'CUDA' if on_cuda else 'CPU'} tensor, entropy backend "
        f"{backend or 'none'}, fidelity floor {'exact' if floor >= 1.0 else f'cosine {floor}'}: "
        + ", ".join(f"{k} ~{v:.1f} ms" for k, v in sorted(est.items(), key=lambda kv: kv[1]))
    )
    return {"codec": best, "params": chosen, "reason": reason, "estimates_ms": est}


_LAST: dict[str, tuple[str, str]] = {}


def for_client(client: Any, coded: dict[str, torch.Tensor], params: dict[str, Any]) -> dict[str, Any]:
    """``choose`` for one ``MeshClient.forward`` call (connected, lock held): measures the
    link once per host:port and TTL, logs the choice when it changes, returns the report."""
    from .errors import MeshError

    try:
        link = measure_link(client)
    except MeshError as e:
        log.warning("ComfyUI-Mesh: cannot measure the link to %s (%s); assuming gigabit", client.cfg.address, e)
        link = LinkInfo(DEFAULT_LINK_BPS, DEFAULT_LINK_BPS, 0.0, time.monotonic(), "assumed")
    ts = list(coded.values())
    nbytes = sum(t.numel() * t.element_size() for t in ts)
    itemsize = ts[0].element_size() if ts else 2
    on_cuda = any(t.device.type == "cuda" for t in ts)
    peer = client.server.device if client.server is not None else ""
    rep = choose(nbytes, itemsize, on_cuda, peer, link.up_bps, params)
    rep["link"] = {
        "up_MBps": round(link.up_bps / 1e6, 1),
        "down_MBps": round(link.down_bps / 1e6, 1),
        "rtt_ms": round(link.rtt_ms, 2),
        "how": link.how,
    }
    sig = (rep["codec"], repr(sorted(rep["params"].items())))
    if _LAST.get(client.cfg.address) != sig:
        _LAST[client.cfg.address] = sig
        log.info("ComfyUI-Mesh auto codec for %s: %s %s (%s)", client.cfg.address, sig[0], rep["params"], rep["reason"])
    return rep


class AutoCodec(Codec):
    """Registry entry so ``auto`` is a valid codec name; encodes with the codec ``choose``
    picks (params: ``cosine``/``lossless`` floor, ``link_bps``, ``peer_device``). Payloads
    carry the chosen codec's id, so this id never appears on the wire."""

    wire_id = 15
    name = "auto"
    lossless = False
    stateful = True

    def encode(
        self, t: torch.Tensor, name: str, params: dict[str, Any], state: dict[Any, Any] | None = None
    ) -> WireTensor:
        on_cuda = t.device.type == "cuda"
        rep = choose(
            t.numel() * t.element_size(),
            t.element_size(),
            on_cuda,
            str(params.get("peer_device", "cuda" if on_cuda else "cpu")),
            float(params.get("link_bps", DEFAULT_LINK_BPS)),
            params,
        )
        chosen = rep["codec"]
        if chosen in ("int8", "quant-t") and t.dtype not in (torch.float16, torch.bfloat16, torch.float32):
            chosen = "lossless" if "lossless" in rep["estimates_ms"] else "raw"  # not a float: exact only
        c = by_name(chosen)
        if c.stateful:
            return c.encode(t, name, rep["params"], state=state)  # type: ignore[call-arg]
        return c.encode(t, name, rep["params"] if chosen == rep["codec"] else {})

    def decode(self, wt: WireTensor, device: torch.device | str, state: dict[Any, Any] | None = None) -> torch.Tensor:
        raise CodecError(f"{wt.name!r} names codec 15 (auto), which is resolved before sending and never decoded")


register(AutoCodec())
