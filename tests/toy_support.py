"""One toy-back-half model call, as the tests against a Daedalus with ``--toy`` make it."""

from __future__ import annotations

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
