"""Server-wide memory budgets: what all connections together may make Daedalus hold.

Each budget is a byte count taken *before* the memory is allocated and given back when it is
freed. Per-connection limits (``--max-request-mb``, ``--max-codec-state-mb``, the constants cache)
bound one peer; these bound the sum over every peer, so sixteen clients (or one client on sixteen
connections) cannot add up to more than the operator allowed (docs/PROTOCOL.md §3.1).

- ``inflight``: received frames (bodies of 1 MiB and more, from the moment their prefix is read)
  and the decoded tensors of the requests being served.
- ``consts``: every connection's cache of per-generation constants (LoRA blobs included).
- ``codec_state``: every connection's temporal-codec references.
"""

from __future__ import annotations

import ctypes
import os
import sys
import threading
import weakref
from collections import OrderedDict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from ..constants import MALLOC_ARENAS, MALLOC_MMAP_THRESHOLD_BYTES
from ..errors import OverBudget

T = TypeVar("T")


class Budget:
    """A byte budget shared by threads. ``take`` is all-or-nothing and never blocks."""

    def __init__(self, what: str, limit: int, setting: str):
        self.what = what  # "memory for requests in flight", for messages
        self.limit = limit
        self.setting = setting  # the CLI flag that raises it, for messages
        self.used = 0
        self.peak = 0
        self._lock = threading.Lock()

    def take(self, n: int) -> bool:
        with self._lock:
            if self.used + n > self.limit:
                return False
            self.used += n
            self.peak = max(self.peak, self.used)
            return True

    def give(self, n: int) -> None:
        with self._lock:
            self.used -= n

    def adjust(self, delta: int) -> None:
        """Account a change already checked by the caller (``refusal`` before it was made)."""
        with self._lock:
            self.used += delta
            self.peak = max(self.peak, self.used)

    def refusal(self, n: int, for_what: str) -> OverBudget:
        """The error for a request of ``n`` bytes that does not fit (now, or ever)."""
        if n > self.limit:
            return OverBudget(
                f"{for_what} needs {n} bytes, more than this server's whole budget of {self.limit} bytes for "
                f"{self.what} ({self.setting})",
                transient=False,
            )
        return OverBudget(
            f"{for_what} needs {n} bytes; other clients hold {self.used} of this server's {self.limit} bytes "
            f"for {self.what} ({self.setting}): try again shortly",
            transient=True,
        )

    def take_or_raise(self, n: int, for_what: str) -> None:
        if not self.take(n):
            raise self.refusal(n, for_what)

    @contextmanager
    def reserve(self, n: int, for_what: str) -> Iterator[None]:
        """Hold ``n`` bytes for the ``with`` block (raises ``OverBudget`` up front)."""
        self.take_or_raise(n, for_what)
        try:
            yield
        finally:
            self.give(n)

    def allocator(self, alloc: Callable[[int], memoryview]) -> Callable[[int], memoryview]:
        """A frame decoder's ``body_alloc`` whose buffers count against this budget for as long as
        they live (tensors that are views into a frame keep it, and its bytes, counted)."""

        def body_alloc(n: int) -> memoryview:
            self.take_or_raise(n, "a frame")
            try:
                view = alloc(n)
                owner = view.obj  # the array the view is over: alive while any view of it is
                weakref.finalize(owner, self.give, n)
            except BaseException:
                self.give(n)
                raise
            return view

        return body_alloc


_M_MMAP_THRESHOLD, _M_ARENA_MAX = -3, -8  # mallopt parameters (glibc malloc.h)


def tune_allocator() -> str:
    """Make freed buffers go back to the OS (glibc's ``mallopt``; constants.MALLOC_*): without it the
    budgets above bound what is held, but not what the allocator keeps after a burst. Call once at
    start, before the connection threads. Returns what was done, for the log."""
    if not sys.platform.startswith("linux"):
        return "allocator left as is (not Linux)"
    if "MALLOC_MMAP_THRESHOLD_" in os.environ or "MALLOC_ARENA_MAX" in os.environ:
        return "allocator left as the MALLOC_* environment variables set it"
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return "allocator left as is (no glibc mallopt)"
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    if mallopt(_M_MMAP_THRESHOLD, MALLOC_MMAP_THRESHOLD_BYTES) != 1 or mallopt(_M_ARENA_MAX, MALLOC_ARENAS) != 1:
        return "allocator left as is (mallopt refused)"
    return f"allocator: blocks >= {MALLOC_MMAP_THRESHOLD_BYTES >> 10} KiB from the OS, {MALLOC_ARENAS} arenas"


@dataclass
class Budgets:
    """The server-wide budgets (``ServerState.budgets``)."""

    inflight: Budget
    consts: Budget
    codec_state: Budget

    def report(self) -> dict[str, dict[str, int]]:
        return {
            name: {"used": b.used, "peak": b.peak, "limit": b.limit}
            for name, b in (("inflight", self.inflight), ("consts", self.consts), ("codec_state", self.codec_state))
        }


class SizedLRU(Generic[T]):
    """An LRU bounded in bytes, by its own (soft) limit and by a shared ``Budget`` (when given, hard).

    ``put`` evicts this cache's least recently used entries until the new one fits its own limit
    (the newest entry is kept even when it alone is over it); if the shared budget still has no room
    (others hold it), the entry is not kept and ``put`` says so."""

    def __init__(self, max_bytes: int, size_of: Callable[[T], int], pool: Budget | None = None):
        self.max_bytes = max_bytes
        self.size_of = size_of
        self.pool = pool
        self._d: OrderedDict[str, tuple[T, int]] = OrderedDict()
        self.bytes = 0

    def __len__(self) -> int:
        return len(self._d)

    def get(self, key: str) -> T | None:
        hit = self._d.get(key)
        if hit is None:
            return None
        self._d.move_to_end(key)
        return hit[0]

    def _evict_oldest(self) -> None:
        _, (_, n) = self._d.popitem(last=False)
        self.bytes -= n
        if self.pool is not None:
            self.pool.give(n)

    def put(self, key: str, value: T) -> bool:
        """Keep ``value`` under ``key``; False when it could not be kept (too big for the budgets)."""
        if key in self._d:
            return True
        n = self.size_of(value)
        while self._d and self.bytes + n > self.max_bytes:  # the newest is kept even if alone over the limit
            self._evict_oldest()
        while self.pool is not None and not self.pool.take(n):
            if not self._d:
                return False
            self._evict_oldest()
        self._d[key] = (value, n)
        self.bytes += n
        return True

    def clear(self) -> None:
        while self._d:
            self._evict_oldest()

    def values(self) -> Iterator[Any]:
        return (v for v, _ in self._d.values())


__all__ = ["Budget", "Budgets", "SizedLRU"]
