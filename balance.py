"""Scheduling that sees both sides: which ``n_blocks_remote`` makes a step fastest.

Icarus measures every remote call of a generation (``CallTiming``: the client's front half, the
coding on both sides, the server's forward, the link) and, at the generation's end, asks ``suggest``
for the block count that minimizes the estimated step time. Nothing changes by itself: the answer is
a log line and a line under the node (``Suggestion.line``), e.g.
``n_blocks_remote 16 -> 22: client 61 ms, server 48 ms, link 9 ms per step; est. 0.21 -> 0.18 s/step``.

**The model.** Measured at ``n`` remote blocks of ``total``, a block costs the client
``front / (total - n)`` and the server ``forward / n`` per call (the embedders and the head are spread
over the blocks; the blocks of a family cost about the same per token: a FLUX double block runs each
token through one stream's weights, which match a single block's). Coding and the link do not depend
on ``n`` (the seam's size is the same at every block). At ``k`` blocks a call costs the client
``C = front_per_block * (total - k) + coding``, the server ``S = forward_per_block * k + its coding``,
the link ``L``. A step (one model call) of ``R`` remote calls takes

* ``serial`` (one call at a time, the batch as one call): ``R * (C + L + S)``; linear in ``k``, so the
  faster side gets every block it may hold;
* ``rows`` (row pipelining, ``rows.py``): ``C + L + S + (R - 1) * max(C, L, S)`` with two or more rows
  in flight (one in flight: ``max(C, L + S)``): the slowest stage sets the pace, so the sides balance.

**Hysteresis.** Another ``k`` is suggested only when its estimate beats the current one by
``BALANCE_MIN_GAIN`` (5 %); among equal estimates the one nearest the current ``n`` wins.

Pure: numbers in, a ``Suggestion`` out; no torch, no ComfyUI, no network (tests/test_balance.py).
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import dataclass, fields
from typing import Any, Literal

from .constants import BALANCE_MIN_CALLS, BALANCE_MIN_GAIN
from .errors import LocalError

Mode = Literal["rows", "serial"]


@dataclass(frozen=True)
class CallTiming:
    """One remote call (a whole model call, or one row of it), in ms."""

    front_ms: float  # client: the model call's start to its seam (embedders, local blocks, payload)
    coding_ms: float  # client: encoding the seam (not waiting for the front half) and decoding the reply
    server_ms: float  # server: its forward (the remote blocks and the head)
    server_coding_ms: float  # server: decoding the request and encoding the reply
    link_ms: float  # the round trip less the server's work: the bytes both ways and the latency


@dataclass(frozen=True)
class Setup:
    """What was measured and what may change."""

    n: int  # n_blocks_remote of the measured calls
    total: int  # blocks of the model
    lo: int  # the range n_blocks_remote may take (the family's plan, the server's model)
    hi: int
    mode: Mode = "serial"
    rows: int = 1  # remote calls per model call (rows pipelined: one per row)
    lanes: int = 1  # rows in flight (rows mode)

    def __post_init__(self) -> None:
        if not 1 <= self.n <= self.total:
            raise LocalError(f"n_blocks_remote={self.n} is outside 1..{self.total} (the model's blocks)")
        if not 1 <= self.lo <= self.hi <= self.total:
            raise LocalError(f"the range {self.lo}..{self.hi} is not within 1..{self.total}")
        if self.mode not in ("rows", "serial") or self.rows < 1 or self.lanes < 1:
            raise LocalError(f"mode {self.mode!r}, {self.rows} rows, {self.lanes} lanes: not a schedule")


@dataclass(frozen=True)
class Estimate:
    """One step at ``n`` remote blocks, in ms: each side's work and the link per step, and the step."""

    n: int
    client_ms: float
    server_ms: float
    link_ms: float
    step_ms: float

    @property
    def bound(self) -> str:
        """The part that takes longest: client, server or link."""
        parts = {"client": self.client_ms, "server": self.server_ms, "link": self.link_ms}
        return max(parts, key=lambda k: parts[k])


@dataclass(frozen=True)
class Suggestion:
    current: Estimate
    best: Estimate  # the suggested n (``current`` itself when no n is enough faster)
    mode: Mode
    lo: int
    hi: int
    calls: int  # remote calls it was measured from
    min_gain: float = BALANCE_MIN_GAIN  # the hysteresis it was made with

    @property
    def changed(self) -> bool:
        return self.best.n != self.current.n

    def line(self) -> str:
        c, b = self.current, self.best
        sides = f"client {c.client_ms:.0f} ms, server {c.server_ms:.0f} ms, link {c.link_ms:.0f} ms per step"
        if self.changed:
            return (
                f"n_blocks_remote {c.n} -> {b.n}: {sides}; est. {_s(c.step_ms)} -> {_s(b.step_ms)} s/step ({self.mode})"
            )
        why = (
            "the link bounds the step"
            if c.bound == "link"
            else f"no n in {self.lo}..{self.hi} is {self.min_gain:.0%} faster"
        )
        return f"n_blocks_remote {c.n} stays: {sides}; est. {_s(c.step_ms)} s/step ({self.mode}; {why})"

    def report(self) -> dict[str, Any]:
        """For the node UI's ``mesh-stats`` event (JSON)."""
        c, b = self.current, self.best
        return {
            "current": c.n,
            "suggested": b.n,
            "changed": self.changed,
            "mode": self.mode,
            "client_ms": round(c.client_ms, 1),
            "server_ms": round(c.server_ms, 1),
            "link_ms": round(c.link_ms, 1),
            "step_s": round(c.step_ms / 1e3, 4),
            "new_step_s": round(b.step_ms / 1e3, 4),
            "bound": c.bound,
            "range": [self.lo, self.hi],
            "calls": self.calls,
            "text": self.line(),
        }


def _s(ms: float) -> str:
    return f"{ms / 1e3:.3g}"


def typical(calls: Sequence[CallTiming]) -> CallTiming:
    """The median of each figure; the first call (constants, warm-up) is left out when there are
    more than ``BALANCE_MIN_CALLS``."""
    if not calls:
        raise LocalError("no remote calls were measured")
    use = calls[1:] if len(calls) > BALANCE_MIN_CALLS else calls
    return CallTiming(**{f.name: statistics.median(getattr(c, f.name) for c in use) for f in fields(CallTiming)})


def estimate(t: CallTiming, setup: Setup, k: int) -> Estimate:
    """The step at ``k`` remote blocks, from one typical call measured at ``setup.n``."""
    local = setup.total - setup.n
    server_block = t.server_ms / setup.n
    if local:
        client_base, client_block = 0.0, t.front_ms / local
    else:  # every block remote: the front half is the embedders; assume the client's blocks run as fast
        client_base, client_block = t.front_ms, server_block
    c = client_base + client_block * (setup.total - k) + t.coding_ms
    s = server_block * k + t.server_coding_ms
    link = t.link_ms
    r = setup.rows
    if setup.mode == "serial":
        step = r * (c + link + s)
    else:
        pace = max(c, link, s) if setup.lanes >= 2 else max(c, link + s)
        step = c + link + s + (r - 1) * pace
    return Estimate(k, r * c, r * s, r * link, step)


def suggest(calls: Sequence[CallTiming], setup: Setup, min_gain: float = BALANCE_MIN_GAIN) -> Suggestion | None:
    """The n_blocks_remote in ``setup.lo..hi`` with the fastest estimated step, or the current one
    when none beats it by ``min_gain``; None with fewer than ``BALANCE_MIN_CALLS`` calls measured."""
    if len(calls) < BALANCE_MIN_CALLS:
        return None
    t = typical(calls)
    current = estimate(t, setup, setup.n)
    options = [estimate(t, setup, k) for k in range(setup.lo, setup.hi + 1)]
    best = min(options, key=lambda e: (e.step_ms, abs(e.n - setup.n)))
    if best.step_ms > current.step_ms * (1.0 - min_gain):
        best = current
    return Suggestion(current, best, setup.mode, setup.lo, setup.hi, len(calls), min_gain)
