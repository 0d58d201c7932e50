"""The Wan adapter without ComfyUI: release check, variant refusal, request checks (stand-in DiT)."""

from __future__ import annotations

import fake_dit
import pytest
import torch
from comfyui_mesh import arch
from comfyui_mesh.arch import wan
from comfyui_mesh.errors import LocalError, RemoteProtocolError


def test_blocks_of_an_older_release_are_refused_with_the_minimum_release():
    class OldBlock(torch.nn.Module):
        def forward(self, x, e, freqs, context):  # before context_img_len / transformer_options
            return x

    dm = fake_dit.build("wan")
    dm.blocks = torch.nn.ModuleList([OldBlock()])
    with pytest.raises(
        LocalError, match=rf"context_img_len, transformer_options: .*ComfyUI {wan.MIN_COMFYUI} or newer"
    ):
        arch.for_model(dm)


def test_a_subclass_of_wanmodel_is_refused_by_name():
    class VaceWanModel(fake_dit.WanModel):
        pass

    with pytest.raises(LocalError, match="Wan VaceWanModel model; ComfyUI-Mesh splits plain Wan"):
        arch.for_model(VaceWanModel())


def test_clip_tokens_are_read_from_the_model_call():
    x, t, ctx = torch.zeros(1), torch.zeros(1), torch.zeros(1)
    assert wan.call_info((x, t, ctx, torch.zeros(1, 257, 1280)), {}) == {"context_img_len": 257}
    assert wan.call_info((x, t, ctx), {"clip_fea": torch.zeros(2, 5, 8)}) == {"context_img_len": 5}
    assert wan.call_info((x, t, ctx, None), {}) == {"context_img_len": None}


def _request(b=2, n=8, dim=32):
    freqs = torch.zeros(1, n, 1, 8, 2, 2)
    t = {"x": torch.zeros(b, n, dim), "e0": torch.zeros(b, 1, 6, dim), "e": torch.zeros(b, 1, dim),
         "context": torch.zeros(b, 5, dim), "freqs": freqs}  # fmt: skip
    return t, {"context_img_len": None}


@pytest.mark.parametrize(
    "change,match",
    [
        (lambda t, s: t.pop("e"), "lacks tensors"),
        (lambda t, s: t.update(x=torch.zeros(2, 8, 16)), "width is 32"),
        (lambda t, s: t.update(e0=torch.zeros(2, 1, 5, 32)), "modulation e0"),
        (lambda t, s: t.update(e=torch.zeros(2, 1, 1, 32)), "time embedding"),
        (lambda t, s: t.update(context=torch.zeros(1, 5, 32)), "context"),
        (lambda t, s: t.update(freqs=torch.zeros(1, 9, 1, 8, 2, 2)), "RoPE"),
        (lambda t, s: s.update(context_img_len=6), "context_img_len"),
        (lambda t, s: s.update(context_img_len=True), "context_img_len"),
    ],
)
def test_garbage_requests_are_refused_before_any_block_runs(change, match):
    t, s = _request()
    change(t, s)
    with pytest.raises(RemoteProtocolError, match=match):
        wan._check(t, s, 32)


def test_a_well_formed_request_passes_the_checks():
    t, s = _request()
    assert wan._check(t, s, 32) is None
    s["context_img_len"] = 5
    assert wan._check(t, s, 32) == 5
