"""The Icarus nodes in CI: their inputs, what configuring one returns, the banners under the node,
and the errors (each names its fix), driven with the fake ComfyUI of tests/fake_comfy.py and a
loopback Daedalus serving a stand-in DiT."""

from __future__ import annotations

import fake_dit
import pytest
import torch
from comfyui_mesh import arch, mesh_node, mesh_node_ltx, ui_events
from comfyui_mesh.auth import TokenStore
from comfyui_mesh.errors import LocalError
from fake_comfy import FakeModelPatcher, sample
from seam_server import TOKEN, serve

NODES = {**mesh_node.NODE_CLASS_MAPPINGS, **mesh_node_ltx.NODE_CLASS_MAPPINGS}
FLUX, LTX = NODES["MeshSplitFlux"], NODES["MeshSplitLTX"]
SIGMAS = torch.tensor([1.0, 0.5])


def run_node(cls, **inputs):
    node = cls()
    return getattr(node, cls.FUNCTION)(**inputs)


def patcher(family: str) -> FakeModelPatcher:
    return FakeModelPatcher(fake_dit.BaseModel(fake_dit.build(family)))


def inputs(cls, model, srv=None, port: int = 1, **over):
    """Every required input at its default, the model and the server's address filled in."""
    spec = cls.INPUT_TYPES()
    out = {}
    for name, (kind, *opts) in spec["required"].items():
        if name == "model":
            continue
        default = opts[0].get("default") if opts else None
        out[name] = default if default is not None else kind[0]
    out.update(model=model, unique_id="7", remote_host="127.0.0.1")
    out["remote_port"] = srv.address[1] if srv is not None else port
    out.update(over)
    return out


def test_input_names_and_order_stay_for_saved_workflows():
    flux = FLUX.INPUT_TYPES()
    assert list(flux["required"]) == ["model", "n_blocks_remote", "remote_host", "remote_port", "codec_mode",
                                      "codec_qp", "codec_lossless", "codec_tile_dim", "forward_client_loras"]  # fmt: skip
    ltx = LTX.INPUT_TYPES()
    assert list(ltx["required"]) == ["model", "n_blocks_remote", "remote_host", "remote_port", "codec_mode",
                                     "forward_client_loras"]  # fmt: skip
    assert ltx["required"]["n_blocks_remote"][1]["default"] == 8
    assert ltx["required"]["forward_client_loras"][1]["default"] is False
    assert flux["required"]["forward_client_loras"][1]["default"] is True
    for cls in (FLUX, LTX):
        spec = cls.INPUT_TYPES()
        assert spec["hidden"] == {"unique_id": "UNIQUE_ID"}
        assert cls.RETURN_TYPES == ("MODEL",) and callable(getattr(cls, cls.FUNCTION))
        assert "raw" in spec["required"]["codec_mode"][0]
        assert all(isinstance(o[1].get("tooltip"), str) for o in spec["required"].values() if len(o) > 1)
    display = {**mesh_node.NODE_DISPLAY_NAME_MAPPINGS, **mesh_node_ltx.NODE_DISPLAY_NAME_MAPPINGS}
    assert display == {"MeshSplitFlux": "ComfyUI Mesh : Icarus", "MeshSplitLTX": "ComfyUI Mesh : Icarus LTX"}


@pytest.mark.parametrize(("cls", "family", "n"), [(FLUX, "flux2", 5), (LTX, "ltxav", 2)])
def test_configure_returns_a_split_model_and_says_where_it_runs(comfy_env, cls, family, n):
    model = patcher(family)
    noise, pos, neg = fake_dit.STANDINS[family].inputs()
    ref, _ = sample(model, noise, SIGMAS, pos, neg)
    # the token comes from Icarus's token store in ComfyUI's user folder, never from the workflow
    with serve(family, n) as srv:
        TokenStore(comfy_env.user_dir / "comfyui-mesh" / "tokens.json").set("127.0.0.1", srv.address[1], TOKEN)
        (m,) = run_node(cls, **inputs(cls, model, srv, n_blocks_remote=n))
        assert m is not model and not model.object_patches
        out, _ = sample(m, noise, SIGMAS, pos, neg)
        assert srv.state.stats.steps == 1
    assert all(torch.equal(a, b) for a, b in zip(out, ref, strict=True)) if family == "ltxav" else torch.equal(out, ref)
    level, text = comfy_env.prompt_server.banners("7")[-1]
    assert level == "ok" and f"127.0.0.1:{srv.address[1]}" in text and f"last {n} blocks" in text
    # what /mesh/status reports for this node: the family it detected in its MODEL
    split = ui_events.splits_for(f"127.0.0.1:{srv.address[1]}")["7"]
    assert (split["family"], split["n_blocks"]) == (family, n) and split["family_display"] == arch.get(family).display
    stats = [d for e, d in comfy_env.prompt_server.events if e == "mesh-stats"]
    assert [d["call"] for d in stats] == [1] and stats[0]["node_id"] == "7" and stats[0]["bytes_out"] > 0


@pytest.mark.parametrize(("cls", "family"), [(FLUX, "flux2"), (LTX, "ltxav")])
def test_zero_blocks_returns_the_model_unchanged(comfy_env, cls, family):
    model = patcher(family)
    (m,) = run_node(cls, **inputs(cls, model, n_blocks_remote=0))
    assert m is model
    assert comfy_env.prompt_server.banners("7") == [("info", "n_blocks_remote is 0: the whole model runs locally")]


def test_errors_name_the_fix_and_show_under_the_node(comfy_env, monkeypatch):
    flux, ltx = patcher("flux2"), patcher("ltxav")
    cases = [
        (LTX, flux, {}, "ComfyUI Mesh : Icarus LTX splits LTX-AV .*use the 'ComfyUI Mesh : Icarus' node"),
        (LTX, FakeModelPatcher(fake_dit.BaseModel(fake_dit.LTXVModel())), {}, "video-only LTXV"),
        (FLUX, FakeModelPatcher(fake_dit.BaseModel(torch.nn.Linear(2, 2))), {}, "split not supported for Linear"),
        (
            FLUX,
            flux,
            {"codec_mode": "no-such-codec"},
            "cannot be used here: .*; usable here: raw, auto, lossless, quant",
        ),
        (FLUX, flux, {"n_blocks_remote": 99}, r"has 7 blocks .*choose 1\.\.7"),
        # nothing listens on port 1: the node says so at queue time, with its name and id
        (FLUX, flux, {"n_blocks_remote": 2}, r"ComfyUI Mesh : Icarus \(node 7\): .*127\.0\.0\.1:1"),
        (LTX, ltx, {"n_blocks_remote": 2}, r"ComfyUI Mesh : Icarus LTX \(node 7\)"),
    ]
    for cls, model, over, match in cases:
        comfy_env.prompt_server.events.clear()
        with pytest.raises(LocalError, match=match):
            run_node(cls, **inputs(cls, model, **over))
        ((level, text),) = comfy_env.prompt_server.banners("7")
        assert level == "error" and text
        assert not model.object_patches


def test_a_server_with_another_cut_or_model_is_named(comfy_env, monkeypatch):
    monkeypatch.setenv("COMFYUI_MESH_TOKEN", TOKEN)  # the token store's override for every server
    model = patcher("flux2")
    with serve("flux2", 3) as srv:
        with pytest.raises(LocalError, match="holds the last 3 blocks but n_blocks_remote is 4"):
            run_node(FLUX, **inputs(FLUX, model, srv, n_blocks_remote=4))
    with serve("flux2", 3, seed=1) as srv:
        with pytest.raises(LocalError, match="different back-half weights"):
            run_node(FLUX, **inputs(FLUX, model, srv, n_blocks_remote=3))
    with serve("ltxav", 3) as srv:
        with pytest.raises(LocalError, match="serves a ltxav model"):
            run_node(FLUX, **inputs(FLUX, model, srv, n_blocks_remote=3))
    with serve("flux2", 3, version="0.1.0") as srv:
        with pytest.raises(LocalError, match="loads its model with ComfyUI 0.1.0, this ComfyUI is"):
            run_node(FLUX, **inputs(FLUX, model, srv, n_blocks_remote=3))


def test_an_old_comfyui_is_named_with_its_version(comfy_env, monkeypatch):
    import comfy.model_patcher as mp  # type: ignore[import-not-found]

    monkeypatch.setattr(mp, "ModelPatcher", type("ModelPatcher", (), {"clone": None}))
    with pytest.raises(LocalError, match="lacks ModelPatcher.add_object_patch.*update ComfyUI"):
        run_node(FLUX, **inputs(FLUX, patcher("flux2"), n_blocks_remote=2))


def test_fidelity_db_sets_the_quant_floor_of_the_seam(comfy_env):
    """The node's fidelity_db reaches the codec: a higher floor sends more bytes and lands closer
    to the unsplit result; leaving it out (an old workflow) uses the 27 dB default."""
    model = patcher("flux2")
    noise, pos, neg = fake_dit.STANDINS["flux2"].inputs()
    ref, _ = sample(model, noise, SIGMAS, pos, neg)
    sent, errs = {}, {}
    with serve("flux2", 5) as srv:
        TokenStore(comfy_env.user_dir / "comfyui-mesh" / "tokens.json").set("127.0.0.1", srv.address[1], TOKEN)
        for db in ("warm-up", None, 15.0, 40.0):  # the first call also carries the per-connection constants
            over = {"codec_mode": "quant", "n_blocks_remote": 5}
            if isinstance(db, float):
                over["fidelity_db"] = db
            (m,) = run_node(FLUX, **inputs(FLUX, model, srv, **over))
            before = len(comfy_env.prompt_server.events)
            out, _ = sample(m, noise, SIGMAS, pos, neg)
            stats = [d for e, d in comfy_env.prompt_server.events[before:] if e == "mesh-stats"]
            sent[db] = sum(d["bytes_out"] for d in stats)
            errs[db] = float((out.double() - ref.double()).norm() / ref.double().norm())
    assert sent[15.0] < sent[None] < sent[40.0]
    assert errs[40.0] < errs[None] < errs[15.0]
