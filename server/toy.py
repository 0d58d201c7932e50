"""A model-free back half for tests, demos and the GUI smoke test.

``ToyModel`` is a stack of deterministic residual blocks on [B, L, C] tensors. The
server holds its last N blocks (``ToyBackend``); the client runs the first ones and
compares with the whole stack, exactly like the real split but with no ComfyUI.
"""

from __future__ import annotations

from typing import Any

import torch

from ..errors import LocalError, RemoteProtocolError
from ..fingerprint import fingerprint


class ToyModel:
    def __init__(self, total: int = 8, width: int = 64, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.weights = [torch.randn(width, width, generator=g) / width**0.5 for _ in range(total)]
        self.total, self.width = total, width

    @staticmethod
    def block(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        return x + torch.tanh(x @ w.to(x)) * 0.5 + bias.to(x)

    def run(self, x: torch.Tensor, bias: torch.Tensor, start: int = 0, stop: int | None = None) -> torch.Tensor:
        for w in self.weights[start:stop]:
            x = self.block(x, w, bias)
        return x

    def named_blocks(self, first: int) -> list[tuple[str, torch.Tensor]]:
        return [(f"blocks.{i}.weight", self.weights[i]) for i in range(first, self.total)]


class ToyBackend:
    arch = "toy"
    comfyui_version = ""

    def __init__(
        self,
        n_blocks: int,
        total: int = 8,
        width: int = 64,
        device: str = "cpu",
        seed: int = 0,
        ignored: tuple[str, ...] = (),
    ):
        """``ignored``: name prefixes of tensors it also takes and ignores (tests that load the server
        with more tensors than the toy model uses)."""
        self.model = ToyModel(total, width, seed)
        self.ignored = ignored
        self.n_blocks_max = total
        if not 0 < n_blocks <= total:
            raise LocalError(f"--n-blocks {n_blocks}: the toy model has {total} blocks: choose 1..{total}")
        self.n_blocks = n_blocks
        self.first = total - self.n_blocks
        self.device = torch.device(device)
        self.model_name = f"toy-{total}x{width}" + (f"-seed{seed}" if seed else "")  # seeds: distinct checkpoints
        self.fingerprint = fingerprint(self.model.named_blocks(self.first))

    def check_request(
        self, shapes: dict[str, tuple[int, ...] | None], dtypes: dict[str, str] | None = None
    ) -> str | None:
        """What is wrong with a request's tensors (name -> shape, dtype) before they are decoded, or None."""
        w = self.model.width
        for name, shape in shapes.items():
            if self.ignored and name.startswith(self.ignored):
                continue
            if name not in ("x", "bias"):
                return f"the toy back half takes tensors 'x' and 'bias', not {name[:64]!r}"
            if shape is not None and (not shape or shape[-1] != w):
                return f"tensor {name!r} has shape {list(shape)}; the toy back half takes width {w}"
            if (dtypes or {}).get(name, "float32") not in ("float16", "bfloat16", "float32", "float64"):
                return f"tensor {name!r} is {(dtypes or {})[name]}; the toy back half takes floating point"
        return None

    def forward(self, tensors: dict[str, torch.Tensor], scalars: dict[str, Any]) -> dict[str, torch.Tensor]:
        """Requests it cannot run are the peer's garbage (RemoteProtocolError: ``bad_request``)."""
        w = self.model.width
        x, bias = tensors.get("x"), tensors.get("bias")
        if x is None or bias is None:
            raise RemoteProtocolError(f"toy model expects tensors 'x' and 'bias', got {sorted(tensors)}")
        if x.ndim != 3 or x.shape[-1] != w or not x.is_floating_point():
            raise RemoteProtocolError(
                f"toy model expects x of shape [B, L, {w}], floating, got {list(x.shape)} {x.dtype}"
            )
        if bias.shape != (w,) or not bias.is_floating_point():
            raise RemoteProtocolError(
                f"toy model expects bias of shape [{w}], floating, got {list(bias.shape)} {bias.dtype}"
            )
        scale = scalars.get("scale", 1.0)
        if not isinstance(scale, (int, float)) or isinstance(scale, bool):
            raise RemoteProtocolError(f"toy model expects a number for scalar 'scale', got {type(scale).__name__}")
        out = self.model.run(x, bias, self.first)
        return {"out": out * float(scale)}

    def close(self) -> None:
        pass
