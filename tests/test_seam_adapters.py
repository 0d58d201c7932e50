"""The contract every registered family adapter keeps, checked on its stand-in DiT (tests/fake_dit.py).
A family registered without a stand-in fails here, by name."""

from __future__ import annotations

import fake_dit
import pytest
from comfyui_mesh import arch
from comfyui_mesh.errors import LocalError

FAMILIES = sorted(arch.REGISTRY)


def standin_model(family: str):
    assert family in fake_dit.STANDINS, f"family {family!r} has no stand-in: add one to tests/fake_dit.py"
    return fake_dit.build(family)


@pytest.mark.parametrize("family", FAMILIES)
def test_the_stand_in_is_detected_as_its_own_family_only(family):
    dm = standin_model(family)
    keys = set(dm.state_dict())
    a = arch.get(family)
    assert a.family == family and a.detect_model(dm) and a.detect_keys(keys)
    assert arch.for_model(dm) is a and arch.for_keys(keys) is a
    for other in FAMILIES:
        if other != family:
            assert not arch.get(other).detect_model(dm)
            assert not arch.get(other).detect_keys(keys)


@pytest.mark.parametrize("family", FAMILIES)
def test_the_adapter_names_what_the_model_has(family):
    dm = standin_model(family)
    a = arch.get(family)
    assert set(a.hook_names) | set(a.object_hooks) == set(a.block_groups) == set(a.config_keys)
    for g in a.block_groups:
        assert len(getattr(dm, g)) > 0
    for head in a.heads:
        assert hasattr(dm, head), f"head {head} missing on the {family} stand-in"
    assert set(a.client_heads()) <= set(a.heads)
    blocks_and_heads = set(a.block_groups) | set(a.heads)
    assert not blocks_and_heads & set(a.server_drops)
    assert a.count_blocks(dm.state_dict()) == {g: len(getattr(dm, g)) for g in a.block_groups}


@pytest.mark.parametrize("family", FAMILIES)
def test_plan_takes_a_tail_in_execution_order(family):
    dm = standin_model(family)
    a = arch.get(family)
    counts = {g: len(getattr(dm, g)) for g in a.block_groups}
    total = sum(counts.values())
    for n in range(total + 1):
        plan = a.plan(counts, n)
        assert sum(plan.remote.values()) == plan.n_remote == n
        # remote blocks are the last n in execution order: a group is remote only if every later one is all remote
        seen_partial = False
        for g in reversed(a.block_groups):
            r = plan.remote[g]
            assert 0 <= r <= counts[g]
            assert not (seen_partial and r), f"n={n}: {g} has remote blocks before a partly local group"
            seen_partial = seen_partial or r < counts[g]
            assert list(plan.remote_indices(g)) == list(range(counts[g] - r, counts[g]))
        if n:
            g, i = plan.seam(a.block_groups)
            assert plan.remote[g] and i == plan.first_remote(g)
            assert all(not plan.remote[h] for h in a.block_groups[: a.block_groups.index(g)])
        else:
            with pytest.raises(LocalError, match="nothing runs remotely"):
                plan.seam(a.block_groups)
    for bad in (-1, total + 1):
        with pytest.raises(LocalError, match=rf"choose 1\.\.{total}"):
            a.plan(counts, bad)


@pytest.mark.parametrize("family", FAMILIES)
def test_remote_key_and_original_key_are_inverses(family):
    dm = standin_model(family)
    a = arch.get(family)
    counts = {g: len(getattr(dm, g)) for g in a.block_groups}
    keys = list(dm.state_dict())
    for n in range(1, sum(counts.values()) + 1):
        plan = a.plan(counts, n)
        kept = {}
        for k in keys:
            slim = a.remote_key(k, plan)
            parts = a.split_key(k)
            if parts is not None:
                g, i, _ = parts
                assert (slim is not None) == (i >= plan.first_remote(g))
            else:
                assert (slim is not None) == any(k == h or k.startswith(h + ".") for h in a.heads)
            if slim is not None:
                assert a.original_key(slim, plan) == k
                kept[slim] = k
                slim_parts = a.split_key(slim)
                if slim_parts is not None:
                    assert 0 <= slim_parts[1] < plan.remote[slim_parts[0]]
        assert len(kept) == len(set(kept.values())), "two full keys map to one slim key"
        # the slim keys are exactly those of a model built with the cut counts
        slim_model = fake_dit.STANDINS[family].build(**{a.config_keys[g]: plan.remote[g] for g in a.block_groups})
        slim_keys = {k for k in slim_model.state_dict() if a.remote_key(a.original_key(k, plan), plan) is not None}
        assert slim_keys == set(kept)


def test_registry_errors_name_what_is_supported():
    with pytest.raises(LocalError, match="supported: " + ", ".join(FAMILIES)):
        arch.get("no-such-family")
    with pytest.raises(LocalError, match="registered twice"):
        arch.register(arch.get(FAMILIES[0]))
    with pytest.raises(LocalError, match="not a model ComfyUI-Mesh can split"):
        arch.for_keys({"some.weight"})
    with pytest.raises(LocalError, match="split not supported for Linear"):
        arch.for_model(__import__("torch").nn.Linear(2, 2))
    a = arch.get(FAMILIES[0])
    g = a.block_groups[0]
    with pytest.raises(LocalError, match="gaps"):
        a.count_blocks({f"{g}.0.w", f"{g}.2.w"})


def test_flux2_single_seam_text_length_without_img_slice():
    """ComfyUI before 0.9 puts no img_slice in transformer_options: the text length comes from the
    captured txt_in output; with img_slice it comes from there; with neither the call stops clearly."""
    import torch
    from comfyui_mesh.arch import SeamCall, flux2
    from comfyui_mesh.errors import LocalError
    from comfyui_mesh.payload import ConstMemo

    plan = flux2.ADAPTER.plan({"double_blocks": 2, "single_blocks": 3}, 2)
    x, vec = torch.randn(1, 10, 8), torch.randn(1, 8)
    mod = torch.randn(1, 1, 8)
    args = {"img": x, "vec": flux2.Mod(mod, mod, mod), "pe": torch.randn(1, 1, 10, 2, 2, 2), "transformer_options": {}}

    def payload(values, topts):
        sc = SeamCall(plan, "single_blocks", values, {}, {}, ConstMemo())
        return flux2.client_payload({**args, "transformer_options": topts}, sc)

    old = payload({"vec": vec, "txt": torch.randn(1, 4, 8)}, {})
    assert (old.scalars["txt_len"], old.scalars["img_len"]) == (4, 6)
    new = payload({"vec": vec, "txt": torch.randn(1, 4, 8)}, {"img_slice": [3, 10]})
    assert (new.scalars["txt_len"], new.scalars["img_len"]) == (3, 7)
    with pytest.raises(LocalError, match="text length was not captured"):
        payload({"vec": vec}, {})


def test_request_check_refuses_unknown_names_and_wrong_widths_before_decoding():
    class Dm:
        hidden_size = 256
        inner_dim = 64
        audio_inner_dim = 32

    flux = arch.get("flux2").request_check(Dm())
    assert flux({"img": (1, 24, 256), "txt": (1, 7, 256), "vec": (1, 256), "pe": None, "mod_img": (1, 1, 1536)}) is None
    assert "no tensor 'evil'" in flux({"img": (1, 24, 256), "evil": (1, 2)})
    assert "takes width 256" in flux({"x": (1, 31, 255)})
    assert "takes width 256" in flux({"img": ()})
    assert "floating-point" in flux({"img": (1, 24, 256)}, {"img": "int8"})
    assert flux({"img": (1, 24, 256), "pe": None}, {"img": "bfloat16", "pe": "float32"}) is None
    ltx = arch.get("ltxav").request_check(Dm())
    ok = {"vx": (2, 12, 64), "ax": (2, 5, 32), "v_timestep": (2, 1, 384), "v_timestep.idx": (2,), "v_pe": None}
    assert ltx(ok) is None
    assert ltx({**ok, "v_emb.1": (2, 64)}) is None
    assert "no tensor" in ltx({**ok, "v_timestep.2": (1,)})
    assert "takes width 32" in ltx({**ok, "ax": (2, 5, 64)})
