"""Receive buffers for big frames: the frame decoder's ``body_alloc``.

Big frames are received straight into page-locked memory (torch's caching host allocator),
from where tensors reach a GPU at DMA speed. Page-locked memory is taken from the OS for
good and cannot be swapped, so this process's receive buffers are capped at
``PINNED_RECEIVE_MAX_BYTES``; past the cap, where pinning is refused, and where no GPU takes
the tensors, ``lazy_buffer``: memory the OS commits page by page as bytes arrive, so a frame
that declares a huge body costs nothing until its bytes come (a zero-filled bytearray would
touch all of it at once, and hold the GIL while doing so).
"""

from __future__ import annotations

import threading
import weakref
from typing import Any

import numpy as np
import torch

from .constants import PINNED_RECEIVE_MAX_BYTES

_pinned_out = [0]  # bytes of page-locked receive buffers alive now
_pinned_lock = threading.Lock()


def _pinned_release(n: int) -> None:
    with _pinned_lock:
        _pinned_out[0] -= n


def lazy_buffer(n: int) -> memoryview:
    """``n`` writable, uninitialized bytes (a large ``numpy.empty`` is an anonymous mapping the
    OS fills in on first write)."""
    arr: Any = np.empty(n, dtype=np.uint8)
    return memoryview(arr)


def pinned_buffer(n: int) -> memoryview:
    """``n`` writable bytes of page-locked host memory (torch's caching host allocator, so
    blocks are reused from frame to frame), or of a plain bytearray where pinning is refused or
    would take this process's receive buffers past ``PINNED_RECEIVE_MAX_BYTES`` (page-locked
    memory is taken from the OS for good and cannot be swapped). The frame decoder receives big
    frames into it: from there tensors reach a GPU at DMA speed."""
    with _pinned_lock:
        if _pinned_out[0] + n > PINNED_RECEIVE_MAX_BYTES:
            return lazy_buffer(n)
        _pinned_out[0] += n
    try:
        host = torch.empty(n, dtype=torch.uint8, pin_memory=True)
    except RuntimeError:  # no CUDA, locked-memory limits, WSL
        _pinned_release(n)
        return lazy_buffer(n)
    arr: Any = host.numpy()  # the array keeps the tensor's memory alive, and views keep the array
    weakref.finalize(arr, _pinned_release, n)
    return memoryview(arr)


def pinned_receive_bytes() -> int:
    """Bytes of page-locked receive buffers alive now (``pinned_buffer``)."""
    return _pinned_out[0]


def receive_alloc() -> Any:
    """The frame decoder's ``body_alloc`` for this process: page-locked buffers where a CUDA
    GPU will take the tensors, else ``lazy_buffer``."""
    return pinned_buffer if torch.cuda.is_available() else lazy_buffer
