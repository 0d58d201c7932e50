"""The seam in CI: fake ModelPatcher -> icarus.split_model -> seam hook -> MeshClient -> TCP ->
DaedalusServer -> adapter.server_forward -> HeadStub, for every registered family, without ComfyUI.

The stand-in DiTs (tests/fake_dit.py) run on the CPU; the server (tests/seam_server.py) builds its
slim back half from the same seeded weights. Raw and lossless splits must be bit-identical to the
unsplit model, with CFG (cond and uncond in one batch of 2).
"""

from __future__ import annotations

import fake_dit
import pytest
import torch
from comfyui_mesh import arch, codec
from comfyui_mesh.config import ClientConfig
from comfyui_mesh.errors import LocalError
from comfyui_mesh.icarus import SplitSettings, split_model
from fake_comfy import FakeModelPatcher, LoRAAdapter, sample
from seam_server import TOKEN, serve

FAMILIES = sorted(arch.REGISTRY)
SIGMAS = torch.tensor([1.0, 0.7, 0.4])  # two steps, one model call each (CFG batched)


def standin(family: str) -> fake_dit.StandIn:
    s = fake_dit.STANDINS.get(family)
    assert s is not None, f"family {family!r} is registered but has no stand-in: add one to tests/fake_dit.py"
    return s


def cut(family: str, where: str) -> int:
    """first: one block; middle: one block into the second-to-last group (or half of one group); all."""
    dm = fake_dit.build(family)
    counts = [len(getattr(dm, g)) for g in arch.get(family).block_groups]
    if where == "first":
        return 1
    if where == "all":
        return sum(counts)
    return counts[-1] + 1 if len(counts) > 1 else max(1, counts[0] // 2)


def patcher(family: str, seed: int = 0) -> FakeModelPatcher:
    return FakeModelPatcher(fake_dit.BaseModel(fake_dit.build(family, seed)))


def settings(srv, n: int, **kw) -> SplitSettings:
    host, port = srv.address
    return SplitSettings(n_remote=n, client=ClientConfig(host=host, port=port, token=TOKEN), **kw)


def equal(a, b) -> bool:
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    return torch.equal(a, b)


def rel_err(a, b) -> float:
    a = torch.cat([t.flatten() for t in a]) if isinstance(a, (list, tuple)) else a.flatten()
    b = torch.cat([t.flatten() for t in b]) if isinstance(b, (list, tuple)) else b.flatten()
    return float((a - b).norm() / b.norm())


def run_both(family: str, n: int, codec_name: str = "raw", model=None, ref=None, **sample_kw):
    """(unsplit sample, split sample, run, server) with the same inputs (``ref``: the unsplit
    sample of ``model``, when already known)."""
    model = model or patcher(family)
    noise, pos, neg = standin(family).inputs()
    if ref is None:
        ref, _ = sample(model, noise, SIGMAS, pos, neg, **sample_kw)
    with serve(family, n) as srv:
        m, run = split_model(model, settings(srv, n, codec_name=codec_name))
        out, guider = sample(m, noise, SIGMAS, pos, neg, **sample_kw)
        assert srv.state.stats.steps == guider.model_calls == run.calls == len(SIGMAS) - 1
    return ref, out, run, srv


@pytest.mark.parametrize("where", ["first", "middle", "all"])
@pytest.mark.parametrize("family", FAMILIES)
def test_raw_split_is_bit_identical_with_cfg(comfy_env, family, where):
    n = cut(family, where)
    model = patcher(family)
    ref, out, run, srv = run_both(family, n, model=model)
    assert equal(out, ref), f"{family} n={n}: split differs, rel {rel_err(out, ref):.2e}"
    assert run.plan.n_remote == n and sum(run.plan.remote.values()) == n
    # the constants went once, the seam state every call
    assert run.last_stats is not None and run.last_stats.consts_sent == 0 and run.last_stats.bytes_out > 0
    # the input MODEL is untouched: no patches added, and it still samples the same
    assert not model.object_patches and "patches_replace" not in model.model_options["transformer_options"]
    noise, pos, neg = standin(family).inputs()
    again, _ = sample(model, noise, SIGMAS, pos, neg)
    assert equal(again, ref)


# Stated budgets: relative L2 of the 2-step sample vs unsplit (tiny random stand-in, CFG 2; measured
# about half of each). Exact codecs must be bit-identical.
EXACT = ("lossless", "lossless-t")
LOSSY_BUDGET = {"int8": 1.5e-2, "clip-sparse": 1.5e-2, "quant": 1e-1, "quant-t": 1e-1, "q4": 2e-1}


@pytest.mark.parametrize("family", FAMILIES)
def test_exact_codecs_are_bit_identical_and_lossy_ones_within_budget(comfy_env, family):
    n = cut(family, "middle")
    model = patcher(family)
    ref, _, _, _ = run_both(family, n, model=model)
    ran = []
    for name in (*EXACT, *LOSSY_BUDGET):
        if codec.by_name(name).available():
            continue  # an optional dependency missing here; int8 and lossless need none
        _, out, _, _ = run_both(family, n, name, model=model, ref=ref)
        err = rel_err(out, ref)
        if name in EXACT:
            assert equal(out, ref), f"{family} {name}: rel {err:.2e}"
        else:
            assert 0 < err < LOSSY_BUDGET[name], f"{family} {name}: rel {err:.2e} (budget {LOSSY_BUDGET[name]})"
        ran.append(name)
    assert {"lossless", "int8"} <= set(ran)


@pytest.mark.parametrize("name", ["lossless-t", "quant-t"])
def test_the_server_releases_the_temporal_state_when_a_sampling_run_ends(comfy_env, name):
    """OUTER_SAMPLE closes the generation: the server's codec references go with it (END_STREAM),
    not at the next generation or when the connection closes."""
    if codec.by_name(name).available():
        pytest.skip(f"{name} is not available here")
    family = "flux2"
    n = cut(family, "middle")
    noise, pos, neg = standin(family).inputs()
    with serve(family, n) as srv:
        held: list[int] = []
        on_step = lambda call, stats: held.append(srv.state.stats.codec_state_bytes)  # noqa: E731
        m, run = split_model(patcher(family), settings(srv, n, codec_name=name, on_step=on_step))
        client, ended = run.client(), []
        end_stream = client.end_stream
        client.end_stream = lambda gen=None: (ended.append(gen), end_stream(gen))[1]  # type: ignore[method-assign]
        for generation in (1, 2):
            sample(m, noise, SIGMAS, pos, neg)
            assert run.generations == generation and run.generation is None
            assert len(held) == generation * (len(SIGMAS) - 1) and min(held) > 0  # held while sampling
            assert srv.state.stats.codec_state_bytes == 0  # released at the run's end
            assert run.client().connected  # by the message, not by a closed connection
        assert len(ended) == 2 and len(set(ended)) == 2 and all(isinstance(g, str) and g for g in ended)
        assert srv.state.stats.errors == 0  # both sides dropped the same state: no stream_reset
        assert srv.state.stats.steps == 2 * (len(SIGMAS) - 1)


@pytest.mark.parametrize("family", FAMILIES)
def test_forwarded_weight_patches_reach_the_server(comfy_env, family):
    """LoRAs loaded before Icarus: the remote part travels to the server (only it), the local part
    stays, and the split run equals the unsplit run with the whole LoRA merged."""
    n = cut(family, "middle")
    model = patcher(family)
    dm = model.model.diffusion_model
    adapter = arch.get(family)
    g = torch.Generator().manual_seed(5)
    last_group = adapter.block_groups[-1]
    first_group = adapter.block_groups[0]
    keys = [k for k in model.model.state_dict() if k.endswith("weight") and model.model.state_dict()[k].ndim == 2]
    local = next(k for k in keys if k.startswith(f"diffusion_model.{first_group}.0."))
    remote = [k for k in keys if k.startswith(f"diffusion_model.{last_group}.{len(getattr(dm, last_group)) - 1}.")]
    sd = model.model.state_dict()
    patches = {local: ("diff", (torch.randn(sd[local].shape, generator=g) * 0.05,))}
    patches[remote[0]] = ("diff", (torch.randn(sd[remote[0]].shape, generator=g) * 0.05,))
    out_f, in_f = sd[remote[1]].shape
    up, down = torch.randn(out_f, 2, generator=g) * 0.1, torch.randn(2, in_f, generator=g) * 0.1
    patches[remote[1]] = LoRAAdapter(set(), (up, down, 2.0, None, None, None))
    assert len(model.add_patches(patches, strength_patch=0.8)) == 3

    ref, out, run, srv = run_both(family, n, model=model)
    assert equal(out, ref), f"rel {rel_err(out, ref):.2e}"
    sets = srv.state.backend.lora_sets
    assert sets and set(sets[-1]) == {remote[0], remote[1]}, "only the remote keys travel"
    assert all(e[0][0] == pytest.approx(0.8) for e in sets[-1].values())

    # forward_loras off: the remote part stays behind (a warning), so the output differs
    noise, pos, neg = standin(family).inputs()
    with serve(family, n) as srv2:
        m, _ = split_model(model, settings(srv2, n, forward_loras=False))
        out2, _ = sample(m, noise, SIGMAS, pos, neg)
        assert not srv2.state.backend.lora_sets
    assert not equal(out2, ref)


# Chroma's model call takes control 5th, HunyuanVideo's 12th
@pytest.mark.parametrize("family", ["flux2", "flux1", "chroma", "hunyuan_video"])
def test_controlnet_residuals_on_remote_blocks_are_refused(comfy_env, family):
    n = cut(family, "middle")  # every single block and the last double block run remotely
    model = patcher(family)
    dm = model.model.diffusion_model
    depth = len(dm.double_blocks)
    noise, pos, neg = standin(family).inputs()
    res = torch.randn(2, 12, dm.hidden_size) * 0.1
    local_only = {"input": [res] + [None] * (depth - 1), "output": []}
    ref, out, _, _ = run_both(family, n, model=model, control=local_only)
    assert equal(out, ref), "a ControlNet on local blocks works across the split"
    with serve(family, n) as srv:
        m, _ = split_model(model, settings(srv, n))
        for control in ({"input": [None] * (depth - 1) + [res], "output": []}, {"input": [], "output": [res]}):
            with pytest.raises(LocalError, match="ControlNet .*lower n_blocks_remote"):
                sample(m, noise, SIGMAS, pos, neg, control=control)


@pytest.mark.parametrize("family", FAMILIES)
def test_n_blocks_out_of_range_is_refused_with_the_range(comfy_env, family):
    total = standin(family).total_blocks
    model = patcher(family)
    cfg = ClientConfig(port=1, token=TOKEN)
    for bad in (total + 1, -1):
        with pytest.raises(LocalError, match=rf"n_blocks_remote={bad} .*choose 1\.\.{total}"):
            split_model(model, SplitSettings(n_remote=bad, client=cfg))
    with pytest.raises(LocalError, match="codec"):
        split_model(model, SplitSettings(n_remote=1, client=cfg, codec_name="no-such-codec"))
    assert not model.object_patches


@pytest.mark.parametrize("family", FAMILIES)
def test_a_replaced_block_hook_is_named(comfy_env, family):
    """Another node that re-hooks a remote block after Icarus: the stub or the head says so. A block
    ComfyUI calls without a hook (``Adapter.object_hooks``) can only be swapped back by an object
    patch: the head says the remote half was not called."""
    n = cut(family, "first")
    model = patcher(family)
    adapter = arch.get(family)
    group = adapter.block_groups[-1]
    last = len(getattr(model.model.diffusion_model, group)) - 1
    noise, pos, neg = standin(family).inputs()
    with serve(family, n) as srv:
        m, _ = split_model(model, settings(srv, n))
        if group in adapter.object_hooks:
            name = f"diffusion_model.{group}.{last}"
            assert m.get_model_object(name) is not model.get_model_object(name)  # Icarus's hooking stub
            swapped_back = m.clone()
            swapped_back.add_object_patch(name, model.get_model_object(name))
            with pytest.raises(LocalError, match="without calling the remote half"):
                sample(swapped_back, noise, SIGMAS, pos, neg)
            return
        calls_original = m.clone()
        calls_original.set_model_patch_replace(
            lambda args, extra: extra["original_block"](args), "dit", adapter.hook_names[group], last
        )
        with pytest.raises(LocalError, match="put Icarus last"):
            sample(calls_original, noise, SIGMAS, pos, neg)
        skips_it = m.clone()
        skips_it.set_model_patch_replace(
            lambda args, extra: {k: args[k] for k in ("img", "txt") if k in args},
            "dit",
            adapter.hook_names[group],
            last,
        )
        with pytest.raises(LocalError, match="without calling the remote half"):
            sample(skips_it, noise, SIGMAS, pos, neg)


def test_lumina2_per_layer_model_patches_are_refused(comfy_env):
    """A model patch ComfyUI runs after every Z-Image layer (e.g. a Fun ControlNet) would act on remote
    layers: the split refuses the call; unsplit, the stand-in runs it (it changes the output)."""
    family = "lumina2"
    n = cut(family, "middle")
    model = patcher(family)
    noise, pos, neg = standin(family).inputs()
    ref, _ = sample(model, noise, SIGMAS, pos, neg)

    def patch(args: dict) -> dict:
        return {"img": args["img"] * 0.5}

    patched = model.clone()
    patched.model_options["transformer_options"]["patches"] = {"double_block": [patch]}
    out, _ = sample(patched, noise, SIGMAS, pos, neg)
    assert not equal(out, ref)
    with serve(family, n) as srv:
        m, _ = split_model(patched, settings(srv, n))
        with pytest.raises(LocalError, match="cannot cross the split"):
            sample(m, noise, SIGMAS, pos, neg)


def test_flux2_reference_images_and_a_step_callback(comfy_env, tmp_path, monkeypatch):
    """Reference-image tokens (dropped after the blocks) travel and come back padded; the step
    callback sees every call, and one that fails does not fail the step; the seam dump writes files."""
    family = "flux2"
    n = cut(family, "middle")
    model = patcher(family)
    noise, pos, neg = standin(family).inputs()
    refs = [torch.randn(2, 8, 2, 2, generator=torch.Generator().manual_seed(9))]
    ref, _ = sample(model, noise, SIGMAS, pos, neg, ref_latents=refs)
    seen = []

    def on_step(call, stats):
        seen.append((call, stats.bytes_out))
        raise RuntimeError("a UI callback that fails")

    dump = tmp_path / "dump" / "seam"
    monkeypatch.setenv("COMFYUI_MESH_SEAM_DUMP", str(dump))
    with serve(family, n) as srv:
        m, run = split_model(model, settings(srv, n, on_step=on_step))
        out, _ = sample(m, noise, SIGMAS, pos, neg, ref_latents=refs)
    assert equal(out, ref)
    assert [c for c, _ in seen] == [1, 2] and all(b > 0 for _, b in seen)
    assert sorted(p.name for p in dump.parent.iterdir()) == ["seam-img-0000.safetensors", "seam-img-0001.safetensors",
                                                            "seam-txt-0000.safetensors", "seam-txt-0001.safetensors"]  # fmt: skip


def test_ltxav_reference_audio_and_block_flags(comfy_env):
    """ID-LoRA reference-audio tokens are dropped before the audio head on the server too; the
    transformer_options flags a block reads travel with each call."""
    family = "ltxav"
    n = cut(family, "middle")
    model = patcher(family)
    model.model_options["transformer_options"]["v2a_cross_attn"] = False
    ref_audio = {"tokens": torch.randn(2, 3, 8, generator=torch.Generator().manual_seed(4))}
    ref, out, run, _ = run_both(family, n, model=model, ref_audio=ref_audio)
    assert equal(out, ref)
    noise, pos, neg = standin(family).inputs()
    plain, _ = sample(patcher(family), noise, SIGMAS, pos, neg, ref_audio=ref_audio)
    assert not equal(plain, ref), "the flag changes the output, so it is honoured on both sides"


def test_bypass_loras_on_remote_blocks_travel_as_weight_patches(comfy_env):
    """Bypass-mode LoRAs live in injections["bypass_lora"]; their remote part goes to the server."""
    from comfy.patcher_extension import PatcherInjection  # type: ignore[import-not-found]

    family = "flux2"
    n = cut(family, "first")
    model = patcher(family)
    target = model.model.diffusion_model.single_blocks[-1].linear2
    up, down = torch.randn(target.weight.shape[0], 2) * 0.1, torch.randn(2, target.weight.shape[1]) * 0.1

    class Hook:
        module, multiplier, adapter = target, 0.5, LoRAAdapter(set(), (up, down, None, None, None, None))

    class Manager:
        hooks = [Hook()]

    manager = Manager()

    def inject(patcher):
        return manager  # the manager sits in this closure, where Icarus reads it

    model.injections["bypass_lora"] = [PatcherInjection(inject, lambda p: None)]
    noise, pos, neg = standin(family).inputs()
    with serve(family, n) as srv:
        m, run = split_model(model, settings(srv, n))
        sample(m, noise, SIGMAS, pos, neg)
        patches = srv.state.backend.lora_sets[-1]
    (key,) = patches
    assert key == "diffusion_model.single_blocks.3.linear2.weight" and patches[key][0][0] == 0.5

    model.injections["bypass_lora"] = [PatcherInjection(lambda p: None, lambda p: None)]
    with pytest.raises(LocalError, match="bypass-mode LoRA .*cannot be read"):
        split_model(model, SplitSettings(n_remote=n, client=ClientConfig(port=1)))


def test_the_fake_sampler_runs_wrappers_like_comfyui(comfy_env):
    """The harness itself: OUTER_SAMPLE wraps the whole run once (class_obj: the guider), every
    model call goes through DIFFUSION_MODEL (class_obj: the diffusion model), the first registered
    wrapper is the outermost, and clones copy wrappers without sharing the lists. With COMFYUI_PATH
    set this runs against ComfyUI's own WrapperExecutor."""
    import comfy.patcher_extension as pe  # type: ignore[import-not-found]

    model = patcher("flux2")
    log = []

    def outer(name):
        def w(executor, *args, **kwargs):
            # ComfyUI's outer_sample arguments: (noise, latent_image, sampler, sigmas, ...)
            log.append((name, "in", type(executor.class_obj).__name__, torch.equal(args[3], SIGMAS)))
            try:
                return executor(*args, **kwargs)
            finally:
                log.append((name, "out"))

        return w

    def inner(executor, *args, **kwargs):
        log.append(("dm", type(executor.class_obj).__name__, "control" if args[6] is not None else None))
        return executor(*args, **kwargs)

    model.add_wrapper_with_key(pe.WrappersMP.OUTER_SAMPLE, "a", outer("a"))
    clone = model.clone()
    clone.add_wrapper_with_key(pe.WrappersMP.OUTER_SAMPLE, "b", outer("b"))
    clone.add_wrapper_with_key(pe.WrappersMP.DIFFUSION_MODEL, "c", inner)
    noise, pos, neg = standin("flux2").inputs()
    sample(clone, noise, SIGMAS, pos, neg, control={"input": [], "output": []})
    assert log == [("a", "in", "FakeGuider", True), ("b", "in", "FakeGuider", True), ("dm", "Flux", "control"),
                   ("dm", "Flux", "control"), ("b", "out"), ("a", "out")]  # fmt: skip
    log.clear()
    sample(model, noise, SIGMAS, pos, neg)
    assert log == [("a", "in", "FakeGuider", True), ("a", "out")]


def test_flux2_server_forward_refuses_garbage_as_protocol_errors(comfy_env):
    """What a peer could send wrong reaches the server's adapter as a RemoteProtocolError."""
    from comfyui_mesh.errors import RemoteProtocolError
    from seam_server import StandinBackend

    b = StandinBackend("flux2", cut("flux2", "middle"))  # one double block and every single block remote
    h = b.dm.hidden_size
    good = {"img": torch.randn(2, 12, h), "txt": torch.randn(2, 5, h), "mod_img": torch.randn(2, 1, 6 * h),
            "mod_txt": torch.randn(2, 1, 6 * h), "mod_single": torch.randn(2, 1, 3 * h), "vec": torch.randn(2, h),
            "pe": fake_dit.Flux().pe_embedder(torch.zeros(2, 17, 4))}  # fmt: skip
    scalars = {"seam": "double_blocks", "txt_len": 5, "img_len": 12}
    assert b.forward(dict(good), dict(scalars))["out"].shape == (2, 12, 8)
    bad = [
        ({k: v for k, v in good.items() if k != "pe"}, scalars, "lacks"),
        ({k: v for k, v in good.items() if k != "mod_txt"}, scalars, r"lacks tensors \['mod_txt'\]"),
        (good, {**scalars, "seam": "single_blocks"}, "first block is in double_blocks"),
        (good, {**scalars, "img_len": 40}, "do not fit"),
        (good, {"seam": "double_blocks"}, "lacks"),
    ]
    for tensors, s, match in bad:
        with pytest.raises(RemoteProtocolError, match=match):
            b.forward(dict(tensors), dict(s))
    with pytest.raises(RemoteProtocolError, match="carries none"):
        b.forward(dict(good), {**scalars, "lora": "0" * 64})


def test_the_fakes_leave_no_trace(tmp_path):
    """Outside the fixture nothing answers to ComfyUI's module names; with a real ComfyUI
    configured the fakes are never installed."""
    import sys

    import fake_comfy

    names = ("comfy", "comfy.model_patcher", "comfy.patcher_extension", "folder_paths", "comfyui_version", "server")
    before = {n: sys.modules.get(n) for n in names}
    with pytest.MonkeyPatch.context() as mp:
        h = fake_comfy.install(mp, tmp_path)
        import comfy.model_patcher  # type: ignore[import-not-found]

        fake = comfy.model_patcher.ModelPatcher is fake_comfy.FakeModelPatcher
        assert fake != h.real, "the fakes are installed exactly when no real ComfyUI is in use"
    after = {n: sys.modules.get(n) for n in names}
    assert after == before
