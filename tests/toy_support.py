"""Small helpers the server tests share: one toy-back-half model call, as the tests against a Daedalus
with ``--toy`` make it; waiting for a condition."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any


def toy_forward(c: Any, front: Any, bias: Any, codec_name: str = "raw", **kw: Any) -> Any:
    """``c.forward`` with the toy's seam ``x`` = ``front`` (through ``codec_name``) and its constant
    ``bias``; ``kw``: the other ``MeshClient.forward`` arguments (device, stream, codec_params, ...)."""
    return c.forward(
        arch="toy",
        n_blocks=3,
        coded={"x": front},
        exact={},
        consts={"bias": bias},
        scalars={},
        codec_name=codec_name,
        **kw,
    )


def wait_for(cond: Callable[[], Any], timeout: float = 10.0) -> bool:
    """Poll ``cond`` until it holds or ``timeout`` seconds pass; its last value as a bool."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return True
        time.sleep(0.02)
    return bool(cond())
