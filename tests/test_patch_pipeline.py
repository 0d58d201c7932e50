"""Displaced patch pipelining (patchpipe.py, icarus): a one-row model call as M patch calls.

The logic without ComfyUI (the partition, the stale keys / values store, the attention override, the
server's registry, the FORWARD scalar ``patch`` refused when malformed); then, with real ComfyUI
(COMFYUI_PATH) and a real Daedalus process on the CPU, tiny FLUX.2 at CFG 1: the warm-up calls are
bit-identical to the unsplit model, the patched ones after them differ from it (it pipelines) within a
bound measured here, M = 1 and CFG rows run exact, and Daedalus drops its stale keys / values at the
generation's end and when the connections close.
"""

from __future__ import annotations

import logging
import random
import time

import pytest
import torch
from comfy_support import flux2_daedalus, needs_comfy, needs_narrow_flux2, split
from comfyui_mesh import patchpipe
from comfyui_mesh.config import ClientConfig
from comfyui_mesh.constants import PATCH_MAX_COUNT, PATCH_MAX_TOKENS
from comfyui_mesh.errors import LocalError, MeshError, OverBudget, RemoteProtocolError
from comfyui_mesh.icarus import SplitSettings
from comfyui_mesh.patchpipe import KVRegistry, KVStore, PatchSpec
from toy_support import wait_for

# ---------------------------------------------------------------------------- the partition


def test_bands_cut_the_rows_evenly_on_multiples_and_never_empty():
    assert patchpipe.bands(8, 2) == [(0, 4), (4, 8)]
    assert patchpipe.bands(9, 4) == [(0, 3), (3, 5), (5, 7), (7, 9)]
    assert patchpipe.bands(3, 8) == [(0, 1), (1, 2), (2, 3)]  # fewer rows than patches
    assert patchpipe.bands(9, 2, multiple=2) == [(0, 6), (6, 9)]  # cells of 2 rows: 5 cells, the last half
    assert patchpipe.bands(5, 1) == [(0, 5)]
    for h in range(1, 40):
        for m in (1, 2, 3, 4, 8):
            cut = patchpipe.bands(h, m)
            assert cut[0][0] == 0 and cut[-1][1] == h and all(a < b for a, b in cut)
            assert all(cut[i][1] == cut[i + 1][0] for i in range(len(cut) - 1))
            assert max(b - a for a, b in cut) - min(b - a for a, b in cut) <= 1
    with pytest.raises(LocalError):
        patchpipe.bands(0, 2)


def test_specs_name_each_bands_tokens_row_major():
    specs = patchpipe.specs([(0, 3), (3, 5)], 5, 6)
    assert specs == [PatchSpec(0, 2, 0, 18, 30), PatchSpec(1, 2, 18, 12, 30)]
    assert patchpipe.specs([(0, 5)], 5, 6) == [PatchSpec.full(30)]
    cells = patchpipe.specs([(0, 4), (4, 7)], 7, 5, multiple=2)  # 4 x 3 cells of 2 x 2
    assert [(s.start, s.tokens, s.total) for s in cells] == [(0, 6, 12), (6, 6, 12)]


# ---------------------------------------------------------------------------- the FORWARD scalar


def test_the_patch_scalar_round_trips_and_garbage_is_refused_as_the_peers_fault():
    for spec in (PatchSpec.full(64), PatchSpec(1, 2, 32, 32, 64), PatchSpec(3, 4, 48, 16, 64)):
        assert PatchSpec.parse(spec.wire()) == spec
    bad = [
        None, 3, "0,2,0,1,2", [0, 2, 0, 1], [0, 2, 0, 1, 2, 3], [2, 2, 0, 1, 4], [-1, 2, 0, 1, 4],
        [0, 0, 0, 1, 4], [0, PATCH_MAX_COUNT + 1, 0, 1, 4], [0, 2, 3, 2, 4], [0, 2, -1, 1, 4], [0, 2, 0, 0, 4],
        [0, 2, 0, 1, PATCH_MAX_TOKENS + 1], [0, 1, 0, 3, 4], [0, 1, 1, 3, 4], [0, 2, 0, 4, 4], [0, 2, 0, 1.0, 4],
        [True, 2, 0, 1, 4], [0, 2, 0, "1", 4], [0, 2, 0, [1], 4], {"index": 0},
    ]  # fmt: skip
    for v in bad:
        with pytest.raises(RemoteProtocolError):
            PatchSpec.parse(v)
    rng = random.Random(16)
    for _ in range(2000):  # random garbage: refused cleanly or a spec that fits its own bounds
        v = [rng.choice([rng.randint(-3, 70), rng.randint(-(1 << 40), 1 << 40), 0.5, None, "x"]) for _ in range(5)]
        try:
            s = PatchSpec.parse(v)
        except RemoteProtocolError:
            continue
        assert 0 <= s.index < s.count and s.start + s.tokens <= s.total <= PATCH_MAX_TOKENS


# ---------------------------------------------------------------------------- the store and the override


def _kv(b=1, h=2, n=10, d=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, h, n, d, generator=g), torch.randn(b, h, n, d, generator=g)


def test_an_exact_call_is_untouched_and_a_patch_sees_its_fresh_tokens_and_the_others_stale():
    text, total = 3, 8
    store = KVStore()
    k, v = _kv(n=text + total)
    ko, vo = store.attend(0, k, v, PatchSpec.full(total))
    assert ko is k and vo is v and len(store) == 1  # the exact call's own tensors: bit-identical
    assert store.nbytes == 2 * k[:, :, text:].numel() * 4
    k2, v2 = _kv(n=text + 3, seed=1)  # patch 1 of 2: tokens 5..7, with the text first
    spec = PatchSpec(1, 2, 5, 3, total)
    kp, vp = store.attend(0, k2, v2, spec)
    assert kp.shape == (1, 2, text + total, 4)
    assert torch.equal(kp[:, :, :text], k2[:, :, :text])  # fresh text
    assert torch.equal(kp[:, :, text : text + 5], k[:, :, text : text + 5])  # the other patch: stale
    assert torch.equal(kp[:, :, text + 5 :], k2[:, :, text:])  # this patch: fresh
    assert torch.equal(vp[:, :, text + 5 :], v2[:, :, text:])
    k3, v3 = _kv(n=text + 5, seed=2)  # patch 0 next sees patch 1's fresh tokens of this call
    kq, _ = store.attend(0, k3, v3, PatchSpec(0, 2, 0, 5, total))
    assert torch.equal(kq[:, :, text + 5 :], k2[:, :, text:])
    assert store.clear() == 2 * k[:, :, text:].numel() * 4 and len(store) == 0 and store.nbytes == 0


def test_a_patch_call_without_a_matching_exact_call_is_refused():
    store = KVStore(err=RemoteProtocolError, where=" (Daedalus)")
    k, v = _kv(n=6)
    with pytest.raises(RemoteProtocolError, match="patch_warmup >= 1"):
        store.attend(0, k, v, PatchSpec(0, 2, 0, 3, 6))  # nothing recorded
    store.attend(0, k, v, PatchSpec.full(6))
    with pytest.raises(RemoteProtocolError, match="recorded"):
        store.attend(0, k[:, :, :5], v[:, :, :5], PatchSpec(0, 2, 0, 3, 8))  # another size
    with pytest.raises(RemoteProtocolError, match="recorded"):
        store.attend(1, k, v, PatchSpec(0, 2, 0, 3, 6))  # an attention the exact call did not have
    with pytest.raises(LocalError, match="do not hold"):
        store.attend(0, k[:, :, :2], v[:, :, :2], PatchSpec(0, 2, 0, 3, 6))


def _sdpa(q, k, v, heads, skip_reshape=False, mask=None, **kw):
    return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def test_patches_of_an_unchanged_input_attend_as_the_full_call():
    """With nothing changed since the exact call, each patch's rows of attention are the full call's."""
    text, total = 2, 12
    q, k = _kv(n=text + total, seed=3)
    v, _ = _kv(n=text + total, seed=4)
    store = KVStore()
    full = patchpipe.attention_override(store, PatchSpec.full(total))(_sdpa, q, k, v, 2, skip_reshape=True)
    for spec in patchpipe.specs(patchpipe.bands(4, 3), 4, 3):
        rows = torch.cat((torch.arange(text), text + torch.arange(spec.start, spec.start + spec.tokens)))
        over = patchpipe.attention_override(store, spec)
        out = over(_sdpa, q[:, :, rows], k[:, :, rows], v[:, :, rows], 2, skip_reshape=True)
        torch.testing.assert_close(out[:, :, text:], full[:, :, text + spec.start : text + spec.start + spec.tokens])


def test_the_override_numbers_the_attentions_and_refuses_what_it_cannot_patch():
    store = KVStore()
    seen = []

    def func(q, k, v, heads, **kw):
        seen.append(k.shape[2])
        return q

    exact = patchpipe.attention_override(store, PatchSpec.full(4))
    k, v = _kv(n=6)
    for _ in range(3):
        exact(func, k, k, v, 2, skip_reshape=True, mask=torch.ones(1))  # an exact call may carry a mask
    assert len(store) == 3 and seen == [6, 6, 6]
    patch = patchpipe.attention_override(store, PatchSpec(0, 2, 0, 2, 4))
    patch(func, k[:, :, :4], k[:, :, :4], v[:, :, :4], 2, skip_reshape=True)
    assert seen[-1] == 6  # 2 text + 4 image tokens
    with pytest.raises(LocalError, match="attention mask"):
        patch(func, k[:, :, :4], k[:, :, :4], v[:, :, :4], 2, skip_reshape=True, mask=torch.ones(1))
    with pytest.raises(LocalError, match="layout"):
        patch(func, k, k, v, 2)


def test_the_servers_registry_is_per_client_and_generation_and_bounded():
    reg = KVRegistry(limit=4096)
    a = reg.store("alice", "g1", session=1)
    assert reg.store("alice", "g1", session=2) is a  # the generation's other lane: the same store
    assert reg.store("bob", "g1", session=3) is not a and reg.store("alice", "g2", session=1) is not a
    k, v = _kv(n=8)  # 2 x 64 floats x 4 bytes = 512 bytes recorded
    a.attend(0, k, v, PatchSpec.full(8))
    assert reg.nbytes == 512 and len(reg) == 3
    assert reg.leave(1) == 0 and len(reg) == 2  # alice/g2 had only connection 1; g1's other lane holds it
    assert reg.end("alice", "g1") == 512 and reg.nbytes == 0
    assert reg.end("alice", "g1") == 0
    b = reg.store("bob", "g2", session=4)
    b.attend(0, k, v, PatchSpec.full(8))
    assert reg.leave(3) == 0 and reg.leave(4) == 512 and len(reg) == 0  # bob's closed: his stores go
    big = reg.store("carol", "g", session=5)
    kb, vb = _kv(n=1024)
    with pytest.raises(OverBudget, match="--max-patch-kv-mb") as e:
        big.attend(0, kb, vb, PatchSpec.full(1024))
    assert not e.value.transient and reg.nbytes == 0 and len(big) == 0  # refused: nothing held


def test_a_dropped_store_records_and_charges_nothing_more():
    reg = KVRegistry(limit=4096)
    assert reg.store("alice", "g", session=1, create=False) is None and len(reg) == 0  # a patch call first
    a = reg.store("alice", "g", session=1)
    k, v = _kv(n=8)
    a.attend(0, k, v, PatchSpec.full(8))
    assert reg.end("alice", "g") == 512 and reg.nbytes == 0
    # another lane's call still running on the dropped store: refused, and the budget stays untouched
    with pytest.raises(RemoteProtocolError, match="generation ended"):
        a.attend(1, k, v, PatchSpec.full(8))
    assert reg.nbytes == 0 and len(a) == 0
    b, c = reg.store("bob", "g", session=2), reg.store("carol", "g", session=3)
    b.attend(0, k, v, PatchSpec.full(8)), c.attend(0, k, v, PatchSpec.full(8))
    assert reg.drop_all() == 1024 and reg.nbytes == 0 and len(reg) == 0  # a reconfigure


def test_split_settings_refuse_a_patch_call_without_warm_up():
    with pytest.raises(LocalError, match="patch_warmup >= 1"):
        SplitSettings(n_remote=1, client=ClientConfig(port=1), patches=2, patch_warmup=0)


# ---------------------------------------------------------------------------- real ComfyUI, real Daedalus

STEPS = 6


@pytest.fixture(scope="module")
def flux(tmp_path_factory):
    d = tmp_path_factory.mktemp("patch_flux2")
    with flux2_daedalus(d, 3) as (comfy, weights, srv):
        yield comfy, weights, srv


def sample(comfy, model, cfg=1.0, steps=STEPS):
    """(final latent, the latent after each step): an 8 x 8 latent (64 image tokens), CFG 1."""
    noise = torch.randn(1, 128, 8, 8, generator=torch.Generator().manual_seed(1))
    pos = [[torch.randn(1, 7, 64, generator=torch.Generator().manual_seed(2)), {}]]
    neg = [[torch.randn(1, 7, 64, generator=torch.Generator().manual_seed(3)), {}]]
    seen: list[torch.Tensor] = []
    with torch.inference_mode():
        out = comfy.sample.sample(
            model, noise, steps, cfg, "euler", "simple", pos, neg, torch.zeros(1, 128, 8, 8), seed=0,
            callback=lambda i, x0, x, n: seen.append(x.clone()),
        )  # fmt: skip
    return out, seen


def patched(model, srv, patches: int, warmup: int = 2):
    m, run = split(model, srv, 3, samehost=False)
    run.settings.patches, run.settings.patch_warmup = patches, warmup
    return m, run


def _said(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if "patch pipelining" in r.getMessage()]


@pytest.fixture(scope="module")
def reference(flux):
    comfy, weights, _ = flux
    return sample(comfy, comfy.sd.load_diffusion_model(str(weights)))


# Measured on this tiny FLUX.2 (8 x 8 latent, 6 Euler steps, 2 warm-up calls): 57 dB at M = 2, 55 dB at 4.
MIN_PSNR_DB = {2: 45.0, 4: 42.0}


@needs_comfy
@needs_narrow_flux2
@pytest.mark.parametrize("patches", [2, 4])
def test_warm_up_is_exact_and_the_patched_steps_after_it_stay_close(flux, reference, caplog, patches):
    comfy, weights, srv = flux
    ref, ref_steps = reference
    m, run = patched(comfy.sd.load_diffusion_model(str(weights)), srv, patches, warmup=2)
    with caplog.at_level(logging.INFO, logger="comfyui_mesh"):
        out, steps = sample(comfy, m)
    assert run.calls == 2 + (STEPS - 2) * patches  # every patch went as a call of its own
    # the latent after step i comes from calls 0..i-1: the first three from the exact warm-up calls
    for i in range(3):
        assert torch.equal(steps[i], ref_steps[i]), f"step {i}"
    assert not torch.equal(steps[3], ref_steps[3])  # the first patched call: approximate
    db = patchpipe.psnr(out, ref)
    assert MIN_PSNR_DB[patches] <= db < float("inf"), f"{db:.1f} dB"
    said = _said(caplog)
    assert len(said) == 1 and f"on (approximate) from call 3: {patches} patches" in said[0]
    assert run.patch_kv.nbytes == 0 and run.generation is None  # the client's stale K/V went at the end
    assert wait_for(lambda: "patch K/V released (generation ended)" in _log(srv), timeout=20)


@needs_comfy
@needs_narrow_flux2
def test_warm_up_over_every_step_and_one_patch_are_exact(flux, reference):
    comfy, weights, srv = flux
    ref, _ = reference
    model = comfy.sd.load_diffusion_model(str(weights))
    m, run = patched(model, srv, 4, warmup=STEPS)
    assert torch.equal(sample(comfy, m)[0], ref) and run.calls == STEPS
    m, run = patched(model, srv, 1)
    assert torch.equal(sample(comfy, m)[0], ref) and run.calls == STEPS
    with pytest.raises(LocalError, match="patch_warmup"):
        SplitSettings(n_remote=3, client=ClientConfig(port=srv.port), patches=2, patch_warmup=0)


@needs_comfy
@needs_narrow_flux2
def test_calls_with_cfg_rows_run_exact_and_say_why(flux, caplog):
    comfy, weights, srv = flux
    model = comfy.sd.load_diffusion_model(str(weights))
    ref, _ = sample(comfy, model, cfg=2.0, steps=3)
    m, run = patched(model, srv, 2)
    run.settings.rows = "off"
    with caplog.at_level(logging.INFO, logger="comfyui_mesh"):
        out, _ = sample(comfy, m, cfg=2.0, steps=3)
    assert torch.equal(out, ref) and run.calls == 3
    said = _said(caplog)
    assert len(said) == 1 and "off, exact: the calls carry 2 rows" in said[0]


def _log(srv) -> str:
    return "".join(list(srv.lines))


@needs_comfy
@needs_narrow_flux2
def test_daedalus_drops_the_stale_kv_when_the_connections_close(flux, monkeypatch):
    """A client that vanishes without ending its generation: its stale keys / values go with its
    connections (here: END_STREAM never sent, then the pooled connections closed)."""
    from comfyui_mesh.transport import MeshClient, drop_pooled

    comfy, weights, srv = flux
    m, run = patched(comfy.sd.load_diffusion_model(str(weights)), srv, 2)
    monkeypatch.setattr(MeshClient, "end_stream", lambda self, gen=None: None)
    before = _log(srv).count("patch K/V released")
    sample(comfy, m, steps=3)
    time.sleep(0.3)
    assert _log(srv).count("patch K/V released") == before  # held: the generation never ended there
    drop_pooled("127.0.0.1", srv.port)
    assert wait_for(lambda: "patch K/V released (connection closed)" in _log(srv), timeout=20), _log(srv)
    assert "0 generation(s), 0.00 MB held" in _log(srv).split("patch K/V released (connection closed)")[-1]


@needs_comfy
@needs_narrow_flux2
def test_a_malformed_patch_field_is_refused_by_daedalus(flux, monkeypatch):
    comfy, weights, srv = flux
    m, run = patched(comfy.sd.load_diffusion_model(str(weights)), srv, 2)
    monkeypatch.setattr(PatchSpec, "wire", lambda self: [5, 2, 0, 1, 64])  # patch 5 of 2
    with pytest.raises(MeshError, match="patch 5 of 2"):
        sample(comfy, m, steps=3)
