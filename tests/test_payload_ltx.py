"""LTX-AV payload: flatten on the client, rebuild on the server, without ComfyUI.

ComfyUI's CompressedTimestep and GuideAttentionMask are stood in for by classes with the
same names and ``__slots__`` (the payload duck-types them and the server builds whatever
class it is handed). The same round trip with ComfyUI's own classes runs in
test_ltxav_split.py.
"""

from __future__ import annotations

import json

import pytest
import torch
from comfyui_mesh import arch, payload, payload_ltx
from comfyui_mesh.arch import ltxav
from comfyui_mesh.errors import LocalError, RemoteProtocolError


class CompressedTimestep:
    __slots__ = ("data", "batch_size", "num_frames", "patches_per_frame", "feature_dim")

    @classmethod
    def make(cls, data: torch.Tensor, patches_per_frame: int) -> CompressedTimestep:
        ct = object.__new__(cls)
        ct.data, ct.patches_per_frame = data, patches_per_frame
        ct.batch_size, ct.num_frames, ct.feature_dim = data.shape
        return ct

    def expand(self) -> torch.Tensor:  # one row per frame -> one row per token
        b, f, p, d = self.batch_size, self.num_frames, self.patches_per_frame, self.feature_dim
        return self.data if p == 1 else self.data[:, :, None].expand(b, f, p, d).reshape(b, f * p, d)


class GuideAttentionMask:
    __slots__ = ("guide_start", "tracked_count", "noisy_mask", "tracked_mask")


CLASSES = {"CompressedTimestep": CompressedTimestep, "GuideAttentionMask": GuideAttentionMask}


def rnd(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def pe(b: int, t: int, same_rows: bool = True, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, bool]:
    cos, sin = rnd(1 if same_rows else b, 2, t, 4, seed=seed), rnd(1 if same_rows else b, 2, t, 4, seed=seed + 1)
    return cos.expand(b, -1, -1, -1).clone(), sin.expand(b, -1, -1, -1).clone(), True


def hook_args(b: int = 2, tv: int = 12, ta: int = 5, frames: int = 3, seed: int = 0, prompt: bool = True) -> dict:
    """Block-hook arguments shaped like ComfyUI's (video width 8, audio width 4, 6/9 AdaLN rows)."""
    rows = 9 if prompt else 6
    return {
        "img": (rnd(b, tv, 8, seed=seed), rnd(b, ta, 4, seed=seed + 1)),
        "v_context": rnd(b, 7, 8, seed=10),
        "a_context": rnd(b, 7, 4, seed=11),
        "attention_mask": None,
        "v_timestep": CompressedTimestep.make(rnd(b, frames, rows * 8, seed=seed + 2), tv // frames),
        "a_timestep": rnd(b, 1, rows * 4, seed=seed + 3),
        "v_pe": pe(b, tv, seed=20),
        "a_pe": pe(b, ta, seed=22),
        "v_cross_pe": pe(b, tv, seed=24),
        "a_cross_pe": pe(b, ta, seed=26),
        "v_cross_scale_shift_timestep": CompressedTimestep.make(rnd(b, 1, 32, seed=seed + 4), 1),
        "a_cross_scale_shift_timestep": rnd(b, 1, 16, seed=seed + 5),
        "v_cross_gate_timestep": CompressedTimestep.make(rnd(b, 1, 8, seed=seed + 6), 1),
        "a_cross_gate_timestep": rnd(b, 1, 4, seed=seed + 7),
        "transformer_options": {"run_ax": False, "a2v_cross_attn": 0, "patches_replace": {"dit": {}}},
        "self_attention_mask": None,
        "v_prompt_timestep": rnd(b, 1, 16, seed=seed + 8) if prompt else None,
        "a_prompt_timestep": rnd(b, 1, 8, seed=seed + 9) if prompt else None,
    }


def wire(coded, exact, consts, scalars):
    """What the server's backend receives: every tensor by name, scalars through JSON."""
    names = [*coded, *exact, *consts]
    assert len(names) == len(set(names)), "tensor names must be unique across coded/exact/consts"
    return {**coded, **exact, **consts}, json.loads(json.dumps(scalars, allow_nan=False))


def embs(args: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Embedded timesteps as adaln_single returns them: [B * rows, D], here one row per token."""
    ts = args["v_timestep"]
    b, f, p = ts.batch_size, ts.num_frames, ts.patches_per_frame
    per_frame = rnd(b, f, 8, seed=40)
    v_emb = per_frame[:, :, None].expand(b, f, p, 8).reshape(b * f * p, 8)
    return v_emb, rnd(b, 4, seed=41)


def same(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.shape == b.shape and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, (tuple, list)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    if type(a).__name__ in CLASSES:
        return type(b) is type(a) and all(same(getattr(a, s), getattr(b, s)) for s in type(a).__slots__)
    return a == b


@pytest.mark.parametrize("prompt", [True, False], ids=["ltx23", "ltx2"])
def test_round_trip_rebuilds_every_block_argument(prompt):
    args = hook_args(prompt=prompt)
    v_emb, a_emb = embs(args)
    coded, exact, consts, scalars = payload_ltx.flatten(args, v_emb, a_emb)
    assert set(coded) == {"vx", "ax"}
    assert {"v_context", "a_context", "v_pe", "a_pe", "v_cross_pe", "a_cross_pe"} == set(consts)
    call = payload_ltx.rebuild(*wire(coded, exact, consts, scalars), CLASSES)
    assert torch.equal(call.vx, args["img"][0]) and torch.equal(call.ax, args["img"][1])
    for key in payload_ltx.BLOCK_KEYS:
        assert same(args[key], call.block_kwargs[key]), key
    # transformer_options: only the four flags a block reads, as booleans
    assert call.flags == {"run_ax": False, "a2v_cross_attn": False}
    # the heads' embedded timesteps: video compressed like the block timestep, expands to per token
    assert isinstance(call.v_emb, CompressedTimestep) and call.v_emb.data.shape == (2, 3, 8)
    assert torch.equal(call.v_emb.expand().reshape(-1, 8), v_emb)
    assert torch.equal(call.a_emb, a_emb.reshape(2, 1, 4))


def test_compressed_timestep_travels_compressed_and_is_not_recompressed():
    args = hook_args(tv=12, frames=3)
    ts = args["v_timestep"]
    _, exact, _, scalars = payload_ltx.flatten(args, *embs(args))
    assert exact["v_timestep"] is ts.data  # the compressed rows themselves: [B, frames, 9 * D]
    assert scalars["layout"]["v_timestep"] == {"k": "ct", "i": [2, 3, 4, 72]}
    call = payload_ltx.rebuild(
        *wire({"vx": args["img"][0], "ax": args["img"][1]}, exact, _consts(args), scalars), CLASSES
    )
    rebuilt = call.block_kwargs["v_timestep"]
    assert rebuilt.patches_per_frame == 4 and rebuilt.num_frames == 3 and rebuilt.data.shape == (2, 3, 72)
    assert torch.equal(rebuilt.expand(), ts.expand())


def _consts(args):
    return payload_ltx.flatten(args, *embs(args))[2]


def test_rope_sent_once_per_batch_when_rows_are_equal():
    args = hook_args(b=2)
    consts = _consts(args)
    assert consts["v_pe"].shape == (2, 1, 2, 12, 4)  # (cos, sin) x one batch row
    args["v_pe"] = pe(2, 12, same_rows=False)
    assert _consts(args)["v_pe"].shape == (2, 2, 2, 12, 4)


def test_empty_audio_stream_goes_raw_and_round_trips():
    args = hook_args(ta=0)
    coded, exact, consts, scalars = payload_ltx.flatten(args, *embs(args))
    assert "ax" not in coded and exact["ax"].shape == (2, 0, 4)
    call = payload_ltx.rebuild(*wire(coded, exact, consts, scalars), CLASSES)
    assert call.ax.shape == (2, 0, 4) and call.block_kwargs["a_pe"][0].shape == (2, 2, 0, 4)


def test_per_token_tables_with_repeated_rows_go_as_unique_rows():
    args = hook_args(tv=96, frames=96)
    # a spatial denoise mask: one row per token, only two distinct values (masked / not)
    rows = rnd(2, 72, seed=5)
    pick = (torch.arange(2 * 96) % 3 == 0).long()
    data = rows[pick].reshape(2, 96, 72)
    args["v_timestep"] = CompressedTimestep.make(data, 1)
    args["img"] = (rnd(2, 96, 8), args["img"][1])
    args["v_pe"], args["v_cross_pe"] = pe(2, 96), pe(2, 96)
    v_emb = rnd(2 * 96, 8)
    coded, exact, consts, scalars = payload_ltx.flatten(args, v_emb, rnd(2, 4))
    assert exact["v_timestep"].shape == (2, 72) and exact["v_timestep.idx"].dtype == torch.int32
    call = payload_ltx.rebuild(*wire(coded, exact, consts, scalars), CLASSES)
    assert torch.equal(call.block_kwargs["v_timestep"].data, data)
    # bf16 rows are compared bit for bit
    t = data.to(torch.bfloat16)
    uniq, idx = payload.dedup_rows(t)
    assert uniq.dtype == torch.bfloat16 and torch.equal(uniq[idx.long()].reshape(t.shape), t)


def test_memo_hands_the_transport_the_same_tensor_while_values_are_unchanged():
    memo = payload.ConstMemo()
    first = hook_args(seed=0)
    _, _, c1, _ = payload_ltx.flatten(first, *embs(first), memo)
    second = hook_args(seed=1)  # a new step: new seam state and timesteps, constants recomputed (new objects)
    second["v_pe"] = tuple(x.clone() if isinstance(x, torch.Tensor) else x for x in second["v_pe"])
    _, _, c2, _ = payload_ltx.flatten(second, *embs(second), memo)
    assert all(c2[k] is c1[k] for k in c1), "unchanged constants must be the same objects (transport memo)"
    third = hook_args(seed=2)
    third["v_context"] = third["v_context"] + 1  # a new prompt
    _, _, c3, _ = payload_ltx.flatten(third, *embs(third), memo)
    assert c3["v_context"] is not c1["v_context"] and c3["v_pe"] is c1["v_pe"]
    # cond and uncond as separate calls alternate: both stay remembered
    _, _, c4, _ = payload_ltx.flatten(first, *embs(first), memo)
    assert c4["v_context"] is c1["v_context"]


def test_guide_attention_mask_round_trips():
    args = hook_args()
    g = object.__new__(GuideAttentionMask)
    g.guide_start, g.tracked_count, g.noisy_mask, g.tracked_mask = 8, 4, rnd(1, 1, 1, 12), rnd(1, 1, 4, 12)
    args["self_attention_mask"] = g
    coded, exact, consts, scalars = payload_ltx.flatten(args, *embs(args))
    assert "self_attention_mask" in consts and "self_attention_mask.1" in consts
    call = payload_ltx.rebuild(*wire(coded, exact, consts, scalars), CLASSES)
    assert same(call.block_kwargs["self_attention_mask"], g)


def test_client_refuses_what_cannot_cross():
    args = hook_args()
    with pytest.raises(LocalError, match="v_context"):
        payload_ltx.flatten({**args, "v_context": object()}, *embs(args))
    with pytest.raises(LocalError, match="embedded timesteps were not captured"):
        payload_ltx.flatten(args, None, None)
    with pytest.raises(LocalError, match="img"):
        payload_ltx.flatten({**args, "img": args["img"][0]}, *embs(args))


def _good():
    args = hook_args()
    return wire(*payload_ltx.flatten(args, *embs(args)))


@pytest.mark.parametrize(
    "damage",
    [
        lambda t, s: t.pop("v_pe"),
        lambda t, s: t.pop("vx"),
        lambda t, s: s.update(ltx=99),
        lambda t, s: s.update(batch=0),
        lambda t, s: s["layout"].update(v_timestep={"k": "ct", "i": [2, 3, 4]}),
        lambda t, s: s["layout"].update(v_timestep={"k": "ct", "i": [2, 5, 4, 72]}),
        lambda t, s: s["layout"].update(v_pe={"k": "t"}),
        lambda t, s: s["layout"].update(v_pe={"k": "pe", "split": "yes", "b": 2}),
        lambda t, s: s["layout"].update(bogus={"k": "t"}),
        lambda t, s: s["layout"].pop("a_emb"),
        lambda t, s: s.update(flags={"run_vx": 1}),
        lambda t, s: t.update(v_pe=torch.zeros(3, 1, 2, 12, 4)),
        lambda t, s: t.update(ax=torch.zeros(3, 5, 4)),
    ],
)
def test_server_rejects_garbage_as_protocol_errors(damage):
    t, s = _good()
    damage(t, s)
    with pytest.raises(RemoteProtocolError):
        payload_ltx.rebuild(t, s, CLASSES)


def test_row_index_out_of_range_is_a_protocol_error():
    args = hook_args(tv=96, frames=96)
    args["img"] = (rnd(2, 96, 8), args["img"][1])
    args["v_pe"], args["v_cross_pe"] = pe(2, 96), pe(2, 96)
    args["v_timestep"] = CompressedTimestep.make(torch.zeros(2, 96, 72), 1)
    t, s = wire(*payload_ltx.flatten(args, rnd(192, 8), rnd(2, 4)))
    t["v_timestep.idx"] = t["v_timestep.idx"] + 5
    with pytest.raises(RemoteProtocolError, match="out of range"):
        payload_ltx.rebuild(t, s, CLASSES)


def test_compress_like_matches_each_comfyui_layout():
    b, f, p, d = 2, 3, 4, 8
    per_frame = rnd(b, f, d)
    per_token = per_frame[:, :, None].expand(b, f, p, d).reshape(b * f * p, d)
    ts = CompressedTimestep.make(rnd(b, f, 6 * d), p)
    assert torch.equal(payload_ltx.compress_like(per_token, ts)[0], per_frame)  # compressed by the constructor
    assert torch.equal(payload_ltx.compress_like(per_frame.reshape(b * f, d), ts)[0], per_frame)  # per-frame path
    single = CompressedTimestep.make(rnd(b, 1, 6 * d), 1)
    assert payload_ltx.compress_like(rnd(b, d), single)[0].shape == (b, 1, d)
    with pytest.raises(LocalError, match="rows"):
        payload_ltx.compress_like(rnd(b * 5, d), ts)


def test_adapter_detection_and_keys():
    a = arch.get("ltxav")
    keys = {
        "adaln_single.emb.timestep_embedder.linear_1.bias",
        "audio_adaln_single.linear.weight",
        "transformer_blocks.0.attn1.to_q.weight",
        "transformer_blocks.1.attn1.to_q.weight",
        "scale_shift_table",
        "proj_out.weight",
        "audio_proj_out.bias",
        "patchify_proj.weight",
    }
    assert arch.for_keys(keys) is a
    with pytest.raises(LocalError, match="video-only LTXV"):
        arch.for_keys(keys - {"audio_adaln_single.linear.weight"})
    assert not ltxav.detect_keys(keys | {"pos_embed.proj.bias"})  # PixArt
    plan = a.plan(a.count_blocks(keys), 1)
    assert a.remote_key("transformer_blocks.1.attn1.to_q.weight", plan) == "transformer_blocks.0.attn1.to_q.weight"
    assert a.remote_key("transformer_blocks.0.attn1.to_q.weight", plan) is None
    assert a.remote_key("scale_shift_table", plan) == "scale_shift_table"  # a bare parameter head
    assert a.remote_key("audio_proj_out.bias", plan) == "audio_proj_out.bias"
    assert a.remote_key("patchify_proj.weight", plan) is None
    assert a.client_heads() == {"proj_out": "vx", "audio_proj_out": "ax"}
    assert arch.get("flux2").client_heads() == {"final_layer": "out"}


def test_video_only_model_is_refused_by_name():
    LTXVModel = type("LTXVModel", (), {})
    with pytest.raises(LocalError, match="video-only LTXV"):
        arch.for_model(LTXVModel())
    LTXAVModel = type("LTXAVModel", (), {"transformer_blocks": [], "audio_proj_out": None})
    assert arch.for_model(LTXAVModel()) is arch.get("ltxav")
