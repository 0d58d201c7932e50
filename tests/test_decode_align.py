"""Raw tensors decoded on the CPU from a received frame start on an aligned address: CPU kernels
round differently on misaligned data, which broke bit-identity of CPU splits (found on Wan's stand-in)."""

from __future__ import annotations

import torch
from comfyui_mesh.constants import DECODE_ALIGN_BYTES
from comfyui_mesh.wirecodecs.base import from_bytes


def test_a_tensor_at_an_odd_offset_of_the_frame_is_copied_to_an_aligned_address():
    t = torch.randn(5, 7)
    raw = t.view(torch.uint8).reshape(-1).numpy().tobytes()
    frame = bytearray(DECODE_ALIGN_BYTES * 2 + len(raw))
    for offset in (1, 4, 25):
        base = torch.frombuffer(frame, dtype=torch.uint8).data_ptr()
        start = offset - base % DECODE_ALIGN_BYTES + DECODE_ALIGN_BYTES  # address = offset (mod alignment)
        frame[start : start + len(raw)] = raw
        out = from_bytes(memoryview(frame)[start : start + len(raw)], torch.float32, (5, 7))
        assert out.data_ptr() % DECODE_ALIGN_BYTES == 0
        assert torch.equal(out, t)


def test_an_aligned_tensor_is_not_copied():
    t = torch.randn(16)
    frame = t.view(torch.uint8).numpy()  # torch's CPU allocator: a 64-byte aligned address
    assert t.data_ptr() % DECODE_ALIGN_BYTES == 0
    out = from_bytes(memoryview(frame), torch.float32, (16,))
    assert out.data_ptr() == t.data_ptr() and torch.equal(out, t)
