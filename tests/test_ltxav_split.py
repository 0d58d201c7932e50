"""LTX-AV split through real Daedalus processes, with ComfyUI's own model classes (CPU).

Skipped without COMFYUI_PATH. One server per style (LTX-2, LTX-2.3) serves every case of
that style; ``reconfigure`` moves the cut between cases.
"""

from __future__ import annotations

import pytest
import torch
from comfy_ltx_support import STYLES, load, ltx_sample, make_ltx, make_ltx_fp8, needs_ltx23, needs_ltxav
from comfy_support import (
    Daedalus,
    check_lora_after_split,
    import_comfy,
    kohya_lora,
    make_flux2,
    needs_narrow_flux2,
    split,
)

pytestmark = needs_ltxav  # ComfyUI with LTX-AV (0.8.0 or newer)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    d = tmp_path_factory.mktemp("ltxav")
    comfy = import_comfy()
    __import__("comfy.sample")
    weights = {s: make_ltx(d / f"tiny_{s}.safetensors", style=s, seed=0) for s in STYLES}
    servers = {}
    try:
        for s in STYLES:
            servers[s] = Daedalus(weights[s], 2, d / f"state_{s}")
        yield comfy, weights, servers, d
    finally:
        for srv in servers.values():
            srv.stop()


_REF: dict = {}


def reference(comfy, weights, style, audio):
    """Unsplit output (computed once per style and audio)."""
    key = (style, audio)
    if key not in _REF:
        model = load(comfy, weights[style])
        _REF[key] = ltx_sample(comfy, model, style, audio=audio)
    return _REF[key]


def assert_identical(out, ref):
    assert len(out) == len(ref)
    for o, r in zip(out, ref, strict=True):
        assert o.shape == r.shape and torch.equal(o, r), f"max diff {(o - r).abs().max()}"


@pytest.mark.parametrize("style", STYLES)
@pytest.mark.parametrize("n", [1, 2, 3])  # the last block, two, every block
def test_raw_split_is_bit_identical_with_cfg(setup, style, n):
    comfy, weights, servers, _ = setup
    ref = reference(comfy, weights, style, audio=5)
    model = load(comfy, weights[style])
    m, run = split(model, servers[style], n)
    out = ltx_sample(comfy, m, style, audio=5)
    assert run.calls == 2  # 2 steps, cond + uncond batched into one call each
    assert_identical(out, ref)
    assert out[1].abs().sum() > 0  # the audio stream came back through the server's audio head


@pytest.mark.parametrize("style", STYLES)
def test_video_only_latent_in_an_av_model_is_bit_identical(setup, style):
    comfy, weights, servers, _ = setup
    ref = reference(comfy, weights, style, audio=0)
    model = load(comfy, weights[style])
    m, run = split(model, servers[style], 2)
    out = ltx_sample(comfy, m, style, audio=0)
    assert len(out) == 1 and run.calls == 2
    assert_identical(out, ref)


@needs_ltx23
def test_reference_audio_tokens_match_unsplit(setup):
    """ID-LoRA reference audio: extra leading audio tokens the model drops before its audio head."""
    comfy, weights, servers, _ = setup
    ref_audio = {"ref_audio": {"tokens": torch.randn(1, 3, 128, generator=torch.Generator().manual_seed(9))}}
    model = load(comfy, weights["ltx23"])
    ref = ltx_sample(comfy, model, "ltx23", extra_cond=ref_audio)
    m, run = split(model, servers["ltx23"], 2)
    out = ltx_sample(comfy, m, "ltx23", extra_cond=ref_audio)
    assert run.calls == 2 and out[1].shape[2] == 5
    assert_identical(out, ref)


def test_spatial_denoise_mask_per_token_timesteps_match_unsplit(setup):
    """Inpainting: a spatial mask makes every timestep per token; they cross as unique rows + index."""
    comfy, weights, servers, _ = setup
    mask = torch.ones(1, 1, 4, 4, 4)
    mask[..., :2, :] = 0.0  # keep the top half of every frame
    kw = dict(video=(4, 4, 4), noise_mask=mask, steps=2)
    model = load(comfy, weights["ltx2"])
    ref = ltx_sample(comfy, model, "ltx2", **kw)
    stats: list = []
    m, _ = split(model, servers["ltx2"], 2, stats=stats, samehost=False)  # bytes counted on the socket
    assert_identical(ltx_sample(comfy, m, "ltx2", **kw), ref)
    # [2 x 64 tokens, 6 x 64] fp32 timestep table = 196 KB per step if sent per token; two distinct rows here
    assert stats[-1].bytes_out < 150_000, stats[-1].bytes_out


@needs_ltx23
def test_constants_cross_once_per_generation(setup):
    comfy, weights, servers, _ = setup
    model = load(comfy, weights["ltx23"])
    stats: list = []
    m, _ = split(model, servers["ltx23"], 2, stats=stats, samehost=False)  # bytes counted on the socket
    ltx_sample(comfy, m, "ltx23", audio=5, steps=3)
    first, *rest = stats
    # contexts [2, 1024, 64] + [2, 1024, 32] fp32 and four RoPE tables: ~0.8 MB, on the first call only
    assert first.consts_sent == 6 and first.bytes_out > 700_000
    for s in rest:
        assert s.consts_sent == 0
        assert s.bytes_out < 64_000, "a later step resent constants"  # seam + timesteps: ~22 KB
    # a second generation on the same connection reuses them too
    stats.clear()
    ltx_sample(comfy, m, "ltx23", audio=5, steps=2)
    assert [s.consts_sent for s in stats] == [0, 0]


def test_int8_within_tolerance(setup):
    comfy, weights, servers, _ = setup
    ref = reference(comfy, weights, "ltx2", audio=5)
    model = load(comfy, weights["ltx2"])
    m, _ = split(model, servers["ltx2"], 2, codec="int8")
    out = ltx_sample(comfy, m, "ltx2", audio=5)
    # Stated budget: int8 per-channel at the seam keeps the 2-step sample within 1% relative L2 per stream.
    for o, r in zip(out, ref, strict=True):
        rel = ((o - r).norm() / r.norm()).item()
        assert 0 < rel < 1e-2, rel


def test_raising_and_lowering_n_without_restart_leaves_the_input_model_intact(setup):
    comfy, weights, servers, _ = setup
    ref = reference(comfy, weights, "ltx2", audio=5)
    model = load(comfy, weights["ltx2"])
    for n in (3, 1, 2):
        m, _ = split(model, servers["ltx2"], n)
        assert_identical(ltx_sample(comfy, m, "ltx2"), ref)
    assert_identical(ltx_sample(comfy, model, "ltx2"), ref)  # the unsplit input MODEL is unaffected
    dm = model.model.diffusion_model
    assert sum(1 for _ in dm.transformer_blocks[2].parameters()) > 0 and dm.proj_out.weight.numel() > 0


@needs_ltx23
def test_remote_weights_leave_the_client(setup):
    comfy, weights, servers, _ = setup
    model = load(comfy, weights["ltx23"])
    m, _ = split(model, servers["ltx23"], 2)
    ltx_sample(comfy, m, "ltx23", steps=1)
    assert m.model_size() < model.model_size()
    comfy.model_management.load_models_gpu([m])
    dm = m.model.diffusion_model
    assert sum(p.numel() for p in dm.transformer_blocks[1:].parameters()) == 0
    assert sum(p.numel() for p in dm.proj_out.parameters()) == 0
    assert sum(p.numel() for p in dm.audio_proj_out.parameters()) == 0
    assert sum(p.numel() for p in dm.transformer_blocks[0].parameters()) > 0
    comfy.model_management.unload_all_models()


def test_other_checkpoint_is_refused_by_fingerprint(setup):
    from comfyui_mesh.errors import VersionMismatch

    comfy, _, servers, d = setup
    other = make_ltx(d / "other_ltx2.safetensors", style="ltx2", seed=1)
    model = load(comfy, other)
    with pytest.raises(VersionMismatch, match="different back-half weights"):
        split(model, servers["ltx2"], 2)


def test_comfyui_compressed_timestep_round_trips_without_recompressing():
    import_comfy()
    import comfy.ldm.lightricks.av_model as av

    if not hasattr(av, "CompressedTimestep"):
        pytest.skip("this ComfyUI has no CompressedTimestep (added after 0.8): nothing to round-trip")
    CompressedTimestep, LTXAVModel = av.CompressedTimestep, av.LTXAVModel
    from comfyui_mesh import payload
    from comfyui_mesh.arch import ltxav

    b, f, p, d = 2, 3, 4, 6 * 8
    per_frame = torch.randn(b, f, 1, d)
    ct = CompressedTimestep(per_frame.expand(b, f, p, d).reshape(b, f * p, d), p)  # ComfyUI compresses
    assert ct.data.shape == (b, f, d) and ct.patches_per_frame == p
    parts = payload.parts_of("ct", ct)
    tensors, info = payload.pack("ct", "v_timestep", parts)
    assert tensors["v_timestep"] is ct.data  # compressed rows, not expanded
    classes = ltxav.comfy_classes(object.__new__(LTXAVModel))  # found through the model's own modules
    assert classes["CompressedTimestep"] is CompressedTimestep
    back = payload.build("ct", payload.unpack("ct", "v_timestep", tensors, info), classes)
    assert type(back) is CompressedTimestep and back.data is ct.data
    assert torch.equal(back.expand(), ct.expand())
    table = torch.randn(6, 8)
    for x, y in zip(back.expand_for_computation(table, b), ct.expand_for_computation(table, b), strict=True):
        assert torch.equal(x, y)


@needs_narrow_flux2
def test_node_accepts_ltxav_and_refuses_other_models(setup, monkeypatch):
    from comfyui_mesh import ui_events
    from comfyui_mesh.config import ClientConfig
    from comfyui_mesh.errors import LocalError
    from comfyui_mesh.mesh_node_ltx import MeshSplitLTX
    from comfyui_mesh.transport import MeshClient
    from comfyui_proc import free_port

    comfy, weights, servers, d = setup
    inputs = MeshSplitLTX.INPUT_TYPES()["required"]
    assert list(inputs) == [
        "model", "n_blocks_remote", "remote_host", "remote_port", "codec_mode", "forward_client_loras",
    ]  # fmt: skip
    assert inputs["n_blocks_remote"][1]["default"] == 8 and inputs["forward_client_loras"][1]["default"] is False
    srv = servers["ltx2"]
    monkeypatch.setenv("COMFYUI_MESH_TOKEN", srv.token)
    model = load(comfy, weights["ltx2"])
    probe = MeshClient(ClientConfig(port=srv.port, token=srv.token))
    probe.reconfigure(2)
    probe.close()
    banners = []
    monkeypatch.setattr(ui_events, "send_banner", lambda node_id, level, text: banners.append((node_id, level, text)))
    (m,) = MeshSplitLTX().configure(model, 2, "127.0.0.1", srv.port, "raw", False, unique_id="7")
    assert m is not model
    assert banners[-1][:2] == ("7", "ok"), banners  # MeshSplitFlux's UI hooks, inherited
    flux = comfy.sd.load_diffusion_model(str(make_flux2(d / "flux.safetensors")))
    with pytest.raises(LocalError, match="use the 'ComfyUI Mesh : Icarus' node"):
        MeshSplitLTX().configure(flux, 2, "127.0.0.1", srv.port, unique_id="8")
    assert banners[-1][:2] == ("8", "error") and "Icarus LTX splits LTX-AV" in banners[-1][2], banners
    with pytest.raises(LocalError, match=r"^ComfyUI Mesh : Icarus LTX \(node 9\): "):
        MeshSplitLTX().configure(model, 2, "127.0.0.1", free_port(), unique_id="9")
    assert banners[-1][:2] == ("9", "error"), banners


def test_server_logged_steps(setup):
    *_, servers, _ = setup
    for srv in servers.values():
        steps = srv.steps()
        assert steps and "forward" in steps[-1]


@pytest.mark.parametrize("prefix", ["", "model.diffusion_model."], ids=["unet", "full-checkpoint-keys"])
def test_fp8_checkpoint_quant_metadata_is_remapped_for_the_slim_load(setup, tmp_path, prefix):
    comfy, *_ = setup
    weights = make_ltx_fp8(tmp_path / "tiny_ltx2_fp8.safetensors", prefix=prefix)
    model = load(comfy, weights)
    if not hasattr(model.model.diffusion_model.transformer_blocks[2].attn1.to_q, "quant_format"):
        pytest.skip("this ComfyUI loads this fp8 file without its quantization metadata (nothing to remap)")
    assert model.model.diffusion_model.transformer_blocks[2].attn1.to_q.quant_format == "float8_e4m3fn"
    ref = ltx_sample(comfy, model, "ltx2")
    srv = Daedalus(weights, 2, tmp_path / "state")
    try:
        m, _ = split(model, srv, 2)  # the fingerprint covers the fp8 weights and their scales
        assert_identical(ltx_sample(comfy, m, "ltx2"), ref)
    finally:
        srv.stop()
    assert any("quantization" in ln.lower() for ln in srv.lines), "the server did not load the file as quantized"


def test_forwarded_lora_matches_unsplit(setup):
    """A LoRA loaded before Icarus LTX covers remote blocks and a remote head: forwarded, it gives the
    unsplit model's output (the server merges with ComfyUI's own math)."""
    comfy, weights, servers, _ = setup
    base = load(comfy, weights["ltx2"])
    sd = base.model.diffusion_model.state_dict()
    layers = ["transformer_blocks.2.attn1.to_q", "transformer_blocks.1.audio_attn2.to_v",
              "transformer_blocks.2.ff.net.2", "proj_out", "audio_proj_out", "transformer_blocks.0.attn2.to_k"]  # fmt: skip
    g = torch.Generator().manual_seed(5)
    lora = {}
    for x in layers:
        out, inp = sd[x + ".weight"].shape
        lora[f"diffusion_model.{x}.lora_up.weight"] = torch.randn(out, 4, generator=g) * 0.1
        lora[f"diffusion_model.{x}.lora_down.weight"] = torch.randn(4, inp, generator=g) * 0.1
    patched = comfy.sd.load_lora_for_models(base, None, lora, 0.8, 0)[0]
    ref = ltx_sample(comfy, patched, "ltx2")
    assert not torch.equal(ref[0], reference(comfy, weights, "ltx2", audio=5)[0]), "the LoRA must change the output"
    m, run = split(patched, servers["ltx2"], 2)
    assert run.lora is not None
    assert_identical(ltx_sample(comfy, m, "ltx2"), ref)


def test_lora_on_the_original_after_a_split_run(setup):
    """A LoRA loaded onto the unsplit MODEL after a split run of it reaches every block (issue #17)."""
    comfy, weights, servers, _ = setup
    w = weights["ltx2"]
    layers = ["transformer_blocks.2.attn1.to_q", "transformer_blocks.1.audio_attn2.to_v", "proj_out", "audio_proj_out",
              "transformer_blocks.0.attn2.to_k"]  # fmt: skip
    lora = kohya_lora(w, layers, 8, 0.1)
    check_lora_after_split(
        load(comfy, w), lambda: load(comfy, w), lambda m: ltx_sample(comfy, m, "ltx2"), servers["ltx2"], 2, lora
    )


# relative L2 budget of the 2-step sample per lossy codec: int8-class codecs 1%; the quant family
# targets cosine 0.999 at the seam (about 4.5% relative error there), so 5%
# quant codes each seam at cosine 0.999 (relative L2 about 4.5e-2 per seam tensor); the final latent
# after two steps measured up to 6.5e-2 (ComfyUI 0.8.0's LTX-2 text path), hence 8e-2.
LOSSY_BUDGET = {"clip-sparse": 1e-2, "quant": 8e-2, "quant-t": 8e-2}


@pytest.mark.parametrize("codec", ["lossless", "lossless-t", "quant", "quant-t", "clip-sparse"])
def test_other_codecs_carry_both_streams(setup, codec):
    """Exact codecs stay bit-identical, lossy ones within their budget. Both seam streams (vx, ax)
    go through the codec; the temporal ones keep one state per stream."""
    comfy, weights, servers, _ = setup
    ref = reference(comfy, weights, "ltx2", audio=5)
    model = load(comfy, weights["ltx2"])
    m, _ = split(model, servers["ltx2"], 2, codec=codec)
    out = ltx_sample(comfy, m, "ltx2", audio=5)
    from comfyui_mesh import codec as codecs

    if codecs.by_name(codec).lossless:
        assert_identical(out, ref)
    else:
        for o, r in zip(out, ref, strict=True):
            assert 0 < ((o - r).norm() / r.norm()).item() < LOSSY_BUDGET[codec]


@pytest.mark.parametrize("codec_name", ["raw", "lossless"])
@pytest.mark.parametrize("path", ["samehost", "tcp"])
def test_bit_identical_through_each_path(setup, monkeypatch, path, codec_name):
    """Client and Daedalus share this host: the seam goes through shared memory (docs/PROTOCOL.md §11),
    or over TCP when the client turns the fast path off; both exact."""
    comfy, weights, servers, _ = setup
    style = STYLES[0]
    ref = reference(comfy, weights, style, audio=5)
    monkeypatch.setenv("COMFYUI_MESH_SAMEHOST", "1" if path == "samehost" else "0")
    stats: list = []
    m, _ = split(load(comfy, weights[style]), servers[style], 2, codec=codec_name, stats=stats)
    assert_identical(ltx_sample(comfy, m, style, audio=5), ref)
    assert stats and all(s.via == path for s in stats)
