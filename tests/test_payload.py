"""Family-free payload machinery (payload.py): bitwise equality and the constants memo."""

from __future__ import annotations

import torch
from comfyui_mesh import payload


def test_same_bits_is_exact_where_torch_equal_is_not():
    z = torch.zeros(4)
    assert torch.equal(z, -z) and not payload.same_bits(z, -z)  # 0.0 vs -0.0
    nan = torch.full((3,), float("nan"))
    assert not torch.equal(nan, nan.clone()) and payload.same_bits(nan, nan.clone())
    assert not payload.same_bits(z, z.double()) and not payload.same_bits(z, z[:3])
    b = torch.tensor([True, False])
    assert payload.same_bits(b, b.clone()) and not payload.same_bits(b, ~b)
    u8 = torch.arange(5, dtype=torch.uint8)
    assert payload.same_bits(u8, u8.clone()) and not payload.same_bits(u8, u8 + 1)


def test_memo_hands_back_the_remembered_constant_while_its_bits_are_unchanged():
    memo = payload.ConstMemo()
    pe = torch.randn(1, 1, 6, 4, 2, 2)
    first = memo.tensor("pe", pe)
    assert first is pe and memo.misses == 1
    again = memo.tensor("pe", pe.clone())  # recomputed every call: a new object, same values
    assert again is pe and memo.hits == 1
    other = pe.clone()
    other[0, 0, 0, 0, 0, 0] = -other[0, 0, 0, 0, 0, 0] if other[0, 0, 0, 0, 0, 0] else -0.0
    assert memo.tensor("pe", other) is other  # any bit changed: the fresh tensor
    assert memo.tensor("pe", pe.clone()) is pe  # cond/uncond alternate: the last two stay remembered
    assert memo.tensors({"pe": pe.clone(), "mask": torch.ones(2)})["pe"] is pe
    memo.clear()
    fresh = pe.clone()
    assert memo.tensor("pe", fresh) is fresh


def test_memo_keeps_packed_arguments_apart_from_wire_tensors_of_the_same_name():
    memo = payload.ConstMemo()
    cos, sin = torch.randn(2, 3, 4), torch.randn(2, 3, 4)
    tensors, info = memo.pack("pe", "v_pe", (cos, sin, True))
    assert memo.tensor("v_pe", tensors["v_pe"]) is tensors["v_pe"]
    again, _ = memo.pack("pe", "v_pe", (cos.clone(), sin.clone(), True))
    assert again["v_pe"] is tensors["v_pe"]  # no torch.stack of cos/sin while unchanged
