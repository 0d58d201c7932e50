"""The Icarus nodes' specs, without ComfyUI: saved-workflow compatibility and the /object_info flag."""

from __future__ import annotations

import pytest
from comfyui_mesh.errors import LocalError
from comfyui_mesh.mesh_node import ICARUS_FLAG, MeshSplitFlux
from comfyui_mesh.mesh_node_ltx import MeshSplitLTX

FLUX_ORDER = ["model", "n_blocks_remote", "remote_host", "remote_port", "codec_mode", "codec_qp", "codec_lossless",
              "codec_tile_dim", "forward_client_loras"]  # fmt: skip
LTX_ORDER = ["model", "n_blocks_remote", "remote_host", "remote_port", "codec_mode", "forward_client_loras"]


def test_input_names_and_order_stay_those_of_saved_workflows():
    flux, ltx = MeshSplitFlux.INPUT_TYPES(), MeshSplitLTX.INPUT_TYPES()
    assert list(flux["required"]) == FLUX_ORDER and list(ltx["required"]) == LTX_ORDER
    assert flux["hidden"] == ltx["hidden"] == {"unique_id": "UNIQUE_ID"}
    assert (
        flux["required"]["n_blocks_remote"][1]["default"] == 4 and ltx["required"]["n_blocks_remote"][1]["default"] == 8
    )
    assert flux["required"]["forward_client_loras"][1]["default"] is True
    assert ltx["required"]["forward_client_loras"][1]["default"] is False
    assert ltx["required"]["codec_mode"] == flux["required"]["codec_mode"]
    for spec in (flux, ltx):
        assert spec["required"]["model"][1][ICARUS_FLAG] is True  # how web/mesh.js finds Icarus nodes
    assert (MeshSplitFlux.DISPLAY, MeshSplitLTX.DISPLAY) == ("ComfyUI Mesh : Icarus", "ComfyUI Mesh : Icarus LTX")
    # inputs newer than the original's are optional: old workflows and API prompts without them validate
    assert list(flux["optional"]) == ["fidelity_db", "row_pipelining", "patch_pipelining", "patch_warmup"]
    assert list(ltx["optional"]) == ["fidelity_db", "row_pipelining"]  # no LTX-AV patch pipelining
    kind, opts = flux["optional"]["patch_pipelining"]
    assert kind == ["off", "2", "4", "8"] and opts["default"] == "off" and "APPROXIMATE" in opts["tooltip"]
    kind, opts = flux["optional"]["patch_warmup"]
    assert kind == "INT" and opts["default"] == 2 and opts["min"] == 1
    for spec in (flux, ltx):
        kind, opts = spec["optional"]["fidelity_db"]
        assert kind == "FLOAT" and opts["default"] == 27.0 and "per-channel" in opts["tooltip"].lower()
        kind, opts = spec["optional"]["row_pipelining"]
        assert kind == ["auto", "on", "off"] and opts["default"] == "auto" and "row by row" in opts["tooltip"]
    assert "FLUX" not in MeshSplitFlux.DISPLAY and MeshSplitLTX.DESCRIPTION.startswith("Split an LTX-AV model")


def test_bind_reads_positional_values_in_the_nodes_own_order():
    v = MeshSplitLTX.SPEC.bind((3, "h", 9, "quant"), {"forward_client_loras": True})
    assert (v["n_blocks_remote"], v["remote_host"], v["remote_port"], v["codec_mode"]) == (3, "h", 9, "quant")
    assert v["forward_client_loras"] is True and v["codec_qp"] == 18 and v["codec_tile_dim"] == 8
    assert MeshSplitLTX.SPEC.bind((), {})["n_blocks_remote"] == 8
    assert MeshSplitLTX.SPEC.bind((), {})["fidelity_db"] == 27.0
    assert MeshSplitFlux.SPEC.bind((), {"fidelity_db": 33.0})["fidelity_db"] == 33.0
    assert MeshSplitLTX.SPEC.bind((), {})["row_pipelining"] == "auto"
    assert MeshSplitFlux.SPEC.bind((), {"row_pipelining": "off"})["row_pipelining"] == "off"
    assert MeshSplitFlux.SPEC.bind((), {})["patch_pipelining"] == "off"  # old workflows: exact
    assert MeshSplitLTX.SPEC.bind((), {})["patch_pipelining"] == "off"
    with pytest.raises(TypeError):
        MeshSplitLTX.SPEC.bind((), {"codec_qp": 3})  # not an input of this node
    with pytest.raises(TypeError):
        MeshSplitLTX.SPEC.bind((3,), {"n_blocks_remote": 4})
    with pytest.raises(TypeError):
        MeshSplitLTX.SPEC.bind(tuple(range(8)), {})


class _Model:
    def __init__(self, dm):
        self.dm = dm

    def get_model_object(self, name):
        assert name == "diffusion_model"
        return self.dm


def test_a_variant_refuses_other_families_by_its_spec():
    class Flux:  # what arch/flux2 recognises
        params = type("P", (), {"global_modulation": True})()
        double_stream_modulation_img = final_layer = object()

    Flux.__name__ = "Flux"
    with pytest.raises(LocalError, match="use the 'ComfyUI Mesh : Icarus' node"):
        MeshSplitLTX().check_model(_Model(Flux()))
    with pytest.raises(LocalError, match=r"^ComfyUI Mesh : Icarus LTX: split not supported"):
        MeshSplitLTX().check_model(_Model(object()))
    MeshSplitFlux().check_model(_Model(object()))  # the generic node leaves it to split_model
