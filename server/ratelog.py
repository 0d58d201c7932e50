"""A server-wide budget for log lines that a peer can cause (garbage frames, failed auth, handshake
timeouts): at most ``lines`` per ``interval_s`` seconds; past that the lines are counted, and the first
line of the next interval is preceded by one "suppressed K similar messages" summary."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any


class RateLimitedLog:
    def __init__(
        self,
        logger: logging.Logger,
        lines: int,
        interval_s: float,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.logger = logger
        self.lines = lines
        self.interval_s = interval_s
        self.clock = clock
        self._lock = threading.Lock()  # connection threads log concurrently
        self._start = clock()
        self._used = 0
        self.suppressed = 0  # in the current interval

    def log(self, level: int, msg: str, *args: Any) -> bool:
        """Log one line if the budget allows; returns whether it was written."""
        with self._lock:
            now = self.clock()
            summary = 0
            if now - self._start >= self.interval_s:
                summary, self.suppressed = self.suppressed, 0
                self._start, self._used = now, 0
            if summary:
                self.logger.warning("suppressed %d similar messages in the last %.0f s", summary, self.interval_s)
            if self._used >= self.lines:
                self.suppressed += 1
                return False
            self._used += 1
        self.logger.log(level, msg, *args)
        return True

    def warning(self, msg: str, *args: Any) -> bool:
        return self.log(logging.WARNING, msg, *args)

    def info(self, msg: str, *args: Any) -> bool:
        return self.log(logging.INFO, msg, *args)

    def flush(self) -> None:
        """Write the pending summary now (server shutdown)."""
        with self._lock:
            summary, self.suppressed = self.suppressed, 0
        if summary:
            self.logger.warning("suppressed %d similar messages", summary)


__all__ = ["RateLimitedLog"]
