"""Patch-set serialization: every form round-trips, the hash sees tensor values, garbage is refused."""

from __future__ import annotations

import pytest
import torch
from comfyui_mesh import lora_io
from comfyui_mesh.errors import LocalError, RemoteProtocolError


class FakeAdapter:
    def __init__(self, loaded_keys, weights, name="lora"):
        self.loaded_keys, self.weights, self.name = loaded_keys, weights, name


def make(name):
    return lambda keys, weights: FakeAdapter(keys, weights, name)


ADAPTERS = {n: make(n) for n in ("lora", "loha", "lokr", "glora", "oft", "boft")}


def sample_patches(seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    return {
        "single_blocks.0.linear1.weight": [
            (1.0, FakeAdapter(set(), (r(8, 2), r(2, 4), 4.0, None, None, None)), 1.0, None, None),  # lora
            (0.5, FakeAdapter(set(), (r(8, 2), r(2, 4), 2.0, r(2, 2), r(8, 1), None), "lora"), 1.0, (0, 0, 8), None),
        ],
        "single_blocks.0.linear2.weight": [(0.7, ("diff", (r(4, 4),)), 1.0, None, None)],
        "single_blocks.1.linear2.weight": [(1.0, ("set", (r(4, 4),)), 0.9, None, None)],
        "final_layer.linear.weight": [
            (1.0, FakeAdapter(set(), (r(2, 2), r(2, 2), None, None), "loha"), 1.0, None, None)
        ],
        "x.weight": [(1.0, [r(4, 4), (1.0, ("diff", (r(4, 4),)), 1.0, None, None)], 1.0, None, None)],
        "y.weight": [(1.0, FakeAdapter(set(), (r(3, 3), True, 1e-3, "name", [1, 2]), "oft"), 1.0, None, None)],
    }


def same(a, b):
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, FakeAdapter):
        return isinstance(b, FakeAdapter) and a.name == b.name and same(tuple(a.weights), tuple(b.weights))
    if isinstance(a, (tuple, list)):
        return type(a) is type(b) and len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    return a == b


def test_round_trip_every_form():
    p = sample_patches()
    blob, h = lora_io.pack(p)
    q, h2 = lora_io.unpack(blob, ADAPTERS)
    assert h == h2 and set(q) == set(p)
    for k in p:
        assert same(p[k], q[k]), k


def test_hash_sees_values_not_just_shapes():
    _, h0 = lora_io.pack(sample_patches(0))
    _, h1 = lora_io.pack(sample_patches(1))
    _, h0b = lora_io.pack(sample_patches(0))
    assert h0 == h0b and h0 != h1
    p = sample_patches(0)
    p["single_blocks.0.linear2.weight"] = [(0.8, *p["single_blocks.0.linear2.weight"][0][1:])]
    assert lora_io.pack(p)[1] != h0, "strength changes the hash"


def test_empty_set():
    blob, h = lora_io.pack({})
    q, h2 = lora_io.unpack(blob, ADAPTERS)
    assert q == {} and h == h2


def test_callables_are_refused_with_the_key():
    p = {"a.weight": [(1.0, ("diff", (torch.ones(2),)), 1.0, None, lambda w: w)]}
    with pytest.raises(LocalError, match="a.weight.*Python function"):
        lora_io.pack(p)
    with pytest.raises(LocalError, match="b.weight"):
        lora_io.pack({"b.weight": [(1.0, ("diff", (object(),)), 1.0, None, None)]})


def test_unknown_adapter_and_garbage_are_remote_errors():
    blob, _ = lora_io.pack(sample_patches())
    with pytest.raises(RemoteProtocolError, match="unknown to this server"):
        lora_io.unpack(blob, {"lora": make("lora")})
    for bad in (b"", b"\xff" * 8, b"\x10\x00\x00\x00\x00\x00\x00\x00{}", bytes(blob[:-10])):
        with pytest.raises(RemoteProtocolError):
            lora_io.unpack(bad, ADAPTERS)
