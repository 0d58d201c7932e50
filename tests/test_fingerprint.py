"""Back-half fingerprint: values, not the history of the tensors that hold them."""

import logging

import pytest
import torch
from comfyui_mesh.fingerprint import _sample_bytes, fingerprint


def _weights(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"blocks.0.w": torch.randn(64, 32, generator=g), "blocks.0.b": torch.randn(64, generator=g)}


def test_inference_tensor_moved_outside_inference_mode_reads_like_any_other():
    # ComfyUI loads under inference_mode and later moves the model with Module.to() outside it:
    # such parameters refuse every view; the fingerprint must still read their values.
    ref = _weights()
    with torch.inference_mode():
        m = torch.nn.Linear(32, 64)
        m.weight.copy_(ref["blocks.0.w"].double())
        m.bias.copy_(ref["blocks.0.b"].double())
    m.to(torch.float64)  # outside inference mode
    try:
        m.weight.reshape(-1)
    except RuntimeError as e:  # the condition this guards against
        assert "version counter" in str(e)
    else:
        pytest.skip("this torch no longer refuses views of such parameters: nothing to guard against")
    moved = {"blocks.0.w": m.weight, "blocks.0.b": m.bias}
    plain = {k: v.double() for k, v in ref.items()}
    assert _sample_bytes(m.weight) != b"?"
    assert fingerprint(moved.items()) == fingerprint(plain.items())


def test_values_dtype_and_names_change_the_fingerprint():
    a = fingerprint(_weights(0).items())
    assert fingerprint(_weights(0).items()) == a
    assert fingerprint(_weights(1).items()) != a
    assert fingerprint({k: v.half() for k, v in _weights(0).items()}.items()) != a
    assert fingerprint({"blocks.1" + k[8:]: v for k, v in _weights(0).items()}.items()) != a


def test_large_tensor_samples_the_last_element():
    t = torch.zeros(2**24 + 3, dtype=torch.uint8)
    before = _sample_bytes(t)
    t[-1] = 7
    assert _sample_bytes(t) != before


def test_unreadable_values_are_said_not_hidden(caplog):
    class Opaque(torch.Tensor):
        @classmethod
        def __torch_function__(cls, func, types, args=(), kwargs=None):
            if func.__name__ in ("reshape", "__getitem__"):
                raise NotImplementedError("no indexing here")
            return super().__torch_function__(func, types, args, kwargs or {})

    t = torch.ones(4).as_subclass(Opaque)
    with caplog.at_level(logging.WARNING, logger="comfyui_mesh"):
        assert _sample_bytes(t) == b"?"
    assert "not readable" in caplog.text and "no indexing here" in caplog.text
