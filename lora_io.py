"""LoRA (and other weight patch) sets on the wire: safetensors + a versioned JSON layout.

A patch set is ComfyUI's ``ModelPatcher.patches`` restricted to the keys the server holds:
``{key: [(strength_patch, patch, strength_model, offset, function), ...]}`` where ``patch``
is a weight adapter object (``.name`` + ``.weights``: lora incl. DoRA/mid, loha, lokr,
glora, oft, boft), a legacy tuple such as ``("diff", (tensor,))`` / ``("set", (tensor,))``,
or a nested list ``[weight, *patches]``. Every tensor goes into the safetensors payload; the
structure goes into its metadata as JSON. No pickle, no eval: anything that is not a
tensor, number, string, bool, None, tuple or list (e.g. a Python callable in ``function``)
is refused with an error naming the key.

The set is identified by a content hash over keys, strengths, adapter types, offsets AND
tensor values, so two LoRAs with the same shapes but different weights never collide.
This module does not import ComfyUI: ``unpack`` takes the adapter classes as an argument.
"""

from __future__ import annotations

import hashlib
import json
import struct
from collections.abc import Callable
from typing import Any

import torch

from .errors import LocalError, RemoteProtocolError

LAYOUT_VERSION = 1
META_KEY = "comfyui_mesh_patches"
MAX_HEADER = 64 << 20  # safetensors JSON header bound (a LoRA on 400 layers stays far below)

Patches = dict[str, list[tuple[Any, ...]]]


class _Packer:
    def __init__(self) -> None:
        self.tensors: dict[str, torch.Tensor] = {}

    def value(self, v: Any, where: str) -> Any:
        if isinstance(v, torch.Tensor):
            name = f"t{len(self.tensors)}"
            self.tensors[name] = v.detach().to("cpu").contiguous().clone()
            return {"t": name}
        if v is None:
            return {"none": 1}
        if isinstance(v, (bool, int, float, str)):
            return {"v": v}
        if isinstance(v, (tuple, list)):
            return {"seq": [self.value(x, where) for x in v], "tuple": isinstance(v, tuple)}
        raise LocalError(f"cannot send the weight patch on {where}: it holds a {type(v).__name__}, not tensors/numbers")

    def patch(self, p: Any, where: str) -> dict[str, Any]:
        if isinstance(p, list):  # nested: [base weight, *patches]
            return {"form": "nested", "base": self.value(p[0], where), "patches": [self.entry(e, where) for e in p[1:]]}
        if isinstance(p, tuple) and len(p) == 2 and isinstance(p[0], str):
            return {"form": "tuple", "type": p[0], "args": self.value(p[1], where)}
        name = getattr(p, "name", None)
        weights = getattr(p, "weights", None)
        if isinstance(name, str) and weights is not None:
            return {"form": "adapter", "name": name, "weights": self.value(tuple(weights), where)}
        raise LocalError(f"cannot send the weight patch on {where}: unknown patch type {type(p).__name__}")

    def entry(self, e: tuple[Any, ...], where: str) -> dict[str, Any]:
        strength_patch, p, strength_model, offset, function = (tuple(e) + (None,) * 5)[:5]
        if function is not None:
            raise LocalError(
                f"cannot send the weight patch on {where}: it carries a Python function ({getattr(function, '__name__', function)}); "
                "load this LoRA on the server instead, and place its LoraLoader after Icarus"
            )
        return {
            "strength_patch": float(strength_patch),
            "strength_model": float(strength_model),
            "offset": self.value(offset, where),
            "patch": self.patch(p, where),
        }


def pack(patches: Patches) -> tuple[bytes, str]:
    """Serialize a patch set. Returns (safetensors bytes, content hash)."""
    from safetensors.torch import save

    pk = _Packer()
    layout = {
        "version": LAYOUT_VERSION,
        "keys": [{"key": k, "entries": [pk.entry(e, k) for e in patches[k]]} for k in sorted(patches)],
    }
    meta = json.dumps(layout, sort_keys=True, separators=(",", ":"))
    tensors = pk.tensors or {"_empty": torch.zeros(0)}
    blob = save(tensors, metadata={META_KEY: meta})
    return blob, patch_hash(meta, tensors)


def patch_hash(meta: str, tensors: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256(meta.encode())
    for name in sorted(tensors):
        t = tensors[name]
        h.update(f"|{name}|{t.dtype}|{list(t.shape)}|".encode())
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:32]


def _header(blob: bytes | bytearray | memoryview) -> dict[str, Any]:
    mv = memoryview(blob)
    if mv.nbytes < 8:
        raise RemoteProtocolError("patch blob is shorter than a safetensors header")
    (n,) = struct.unpack_from("<Q", mv, 0)
    if n > MAX_HEADER or 8 + n > mv.nbytes:
        raise RemoteProtocolError(f"patch blob header length {n} is out of bounds")
    try:
        head = json.loads(bytes(mv[8 : 8 + n]))
    except (ValueError, RecursionError) as e:
        raise RemoteProtocolError(f"patch blob header is not JSON: {type(e).__name__}") from None
    if not isinstance(head, dict):
        raise RemoteProtocolError("patch blob header must be an object")
    return head


def unpack(
    blob: bytes | bytearray | memoryview,
    adapters: dict[str, Callable[..., Any]],
    device: torch.device | str = "cpu",
) -> tuple[Patches, str]:
    """Rebuild a patch set. ``adapters`` maps adapter names to ``cls(loaded_keys, weights)``.

    Returns (patches, content hash); the hash is recomputed here, never trusted."""
    from safetensors.torch import load

    head = _header(blob)
    meta = (head.get("__metadata__") or {}).get(META_KEY)
    if not isinstance(meta, str):
        raise RemoteProtocolError("patch blob has no ComfyUI-Mesh layout")
    try:
        layout = json.loads(meta)
        tensors = load(bytes(blob))
    except Exception as e:  # safetensors raises its own error types on garbage
        raise RemoteProtocolError(f"patch blob does not load: {type(e).__name__}: {e}") from None
    if not isinstance(layout, dict) or layout.get("version") != LAYOUT_VERSION:
        raise RemoteProtocolError(
            f"patch layout version {layout.get('version') if isinstance(layout, dict) else '?'} unsupported"
        )
    digest = patch_hash(meta, tensors)

    def value(v: Any) -> Any:
        if not isinstance(v, dict):
            raise RemoteProtocolError("patch layout value must be an object")
        if "t" in v:
            t = tensors.get(v["t"])
            if t is None:
                raise RemoteProtocolError(f"patch layout names missing tensor {v['t']!r}")
            return t.to(device)
        if "none" in v:
            return None
        if "v" in v:
            if not isinstance(v["v"], (bool, int, float, str)):
                raise RemoteProtocolError("patch layout scalar has a bad type")
            return v["v"]
        if "seq" in v and isinstance(v["seq"], list):
            items = [value(x) for x in v["seq"]]
            return tuple(items) if v.get("tuple") else items
        raise RemoteProtocolError("patch layout value of unknown kind")

    def patch(p: Any) -> Any:
        form = p.get("form") if isinstance(p, dict) else None
        if form == "adapter":
            cls = adapters.get(p.get("name"))
            if cls is None:
                raise RemoteProtocolError(
                    f"adapter type {p.get('name')!r} is unknown to this server's ComfyUI; known: {sorted(adapters)}"
                )
            return cls(set(), value(p["weights"]))
        if form == "tuple" and isinstance(p.get("type"), str):
            return (p["type"], value(p["args"]))
        if form == "nested":
            return [value(p["base"]), *(entry(e) for e in p.get("patches", []))]
        raise RemoteProtocolError(f"patch form {form!r} unknown")

    def entry(e: Any) -> tuple[Any, ...]:
        if not isinstance(e, dict):
            raise RemoteProtocolError("patch entry must be an object")
        return (float(e["strength_patch"]), patch(e["patch"]), float(e["strength_model"]), value(e["offset"]), None)

    out: Patches = {}
    for item in layout.get("keys", []):
        if not isinstance(item, dict) or not isinstance(item.get("key"), str):
            raise RemoteProtocolError("patch layout key entry malformed")
        try:
            out[item["key"]] = [entry(e) for e in item.get("entries", [])]
        except (KeyError, TypeError, ValueError) as e:
            raise RemoteProtocolError(f"patch layout entry for {item['key']!r} malformed: {e}") from None
    return out, digest
