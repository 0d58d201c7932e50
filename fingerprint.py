"""Fingerprint of the back half: names, shapes, dtypes and sampled weight bytes.

Both sides compute it over the same full-model key names (the client from its own copy
before stripping, the server from its slim copy mapped back to the original names), so
a different checkpoint, a different block count or a different weight dtype shows up in
the handshake instead of as a wrong image.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Iterable
from typing import Any

import torch

SAMPLES_PER_TENSOR = 16
log = logging.getLogger("comfyui_mesh")
_warned: set[str] = set()


def _sample_bytes(t: Any) -> bytes:
    try:
        # ``.data``, not views of ``t``: a parameter created under inference_mode and later moved by
        # Module.to() outside it (ComfyUI loading a model onto the GPU and back) refuses every view
        # ("Inference tensors do not track version counter"); its ``.data`` reads fine.
        base = t.data if isinstance(t, torch.Tensor) else t
        flat = base.reshape(-1)
        n = flat.numel()
        if n == 0:
            return b""
        k = min(SAMPLES_PER_TENSOR, n)
        # Integer arithmetic: float linspace rounds n - 1 up past the end for n > 2**24.
        idx = torch.tensor(sorted({i * (n - 1) // max(k - 1, 1) for i in range(k)}), device=flat.device)
        s = flat[idx].cpu().contiguous()
        return s.view(torch.uint8).numpy().tobytes()
    except (RuntimeError, TypeError, NotImplementedError, AttributeError) as e:
        # Quantized tensor subclasses that can't be indexed: names/shapes/dtypes still count. Said
        # once per kind, since the other side may read the same tensor fine (a mismatch to explain).
        why = f"{type(t).__name__}: {type(e).__name__}: {e}"
        if why not in _warned:
            _warned.add(why)
            log.warning("fingerprint: weight values of a %s are not readable, only its shape counts", why)
        return b"?"


# Debugging a mismatch: set this to a path prefix on both machines; each process writes one line
# per tensor (name|shape|dtype|sampled bytes) to <prefix>-<pid>.txt, so `diff` names the culprit.
DUMP_ENV = "COMFYUI_MESH_FINGERPRINT_DUMP"


def fingerprint(items: Iterable[tuple[str, Any]]) -> str:
    h = hashlib.sha256()
    dump = os.environ.get(DUMP_ENV)
    lines = []
    for name, t in sorted(items, key=lambda kv: kv[0]):
        head = f"{name}|{tuple(t.shape)}|{str(t.dtype).replace('torch.', '')}|"
        sample = _sample_bytes(t)
        h.update(head.encode())
        h.update(sample)
        if dump:
            lines.append(head + sample.hex())
    digest = h.hexdigest()[:32]
    if dump:
        with open(f"{dump}-{os.getpid()}.txt", "a") as f:
            f.write(f"# fingerprint {digest}\n" + "\n".join(lines) + "\n")
    return digest
