"""The example workflows (workflows/*.json, written by workflows/build_workflows.py) against ComfyUI's
/object_info, built in a subprocess from the ComfyUI of COMFYUI_PATH (its built-in and extra nodes, and
this pack's nodes) exactly as ComfyUI's server builds it; skipped without COMFYUI_PATH.

Every node class, input name and widget value exists (values in range, in the combo list: model file
names excepted), every link joins an output and an input of the same type, every required input is
connected, and each Icarus node's n_blocks_remote fits the family its workflow is for (tiny.BENCH).
"""

from __future__ import annotations

import importlib.util
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from comfy_support import COMFY, needs_comfy

REPO = Path(__file__).resolve().parent.parent
WORKFLOWS = sorted((REPO / "workflows").glob("*.json"))
FRONTEND_ONLY = {"Note", "MarkdownNote", "PrimitiveNode", "Reroute"}  # nodes the frontend defines itself
ICARUS_NODES = {"MeshSplitFlux", "MeshSplitLTX"}
WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
MODEL_FILE_INPUTS = {"unet_name", "clip_name", "clip_name1", "clip_name2", "vae_name", "lora_name", "ckpt_name",
                     "text_encoder"}  # fmt: skip
# The workflows are written for this ComfyUI release and newer; older ones lack nodes and widgets.
WRITTEN_FOR = (0, 28)
# Hand-tuned splits older than the per-family examples: their notes predate the server command line
# and FLUX.2 Klein 9B keeps 8 of its 32 blocks remote (the bench default is 16).
HAND_TUNED = {"flux2-klein-9b.json", "flux2-dev-lora-two-sided.json", "ltx-2.3-t2v-audio.json"}

# Run in a fresh interpreter: loading ComfyUI's extra nodes imports a lot and changes global state.
OBJECT_INFO = """
import asyncio, json, sys
comfy, out = sys.argv[1], sys.argv[2]
from comfyui_mesh.tiny import import_comfy
import_comfy(comfy, cpu=True)
import comfyui_version, nodes
asyncio.run(nodes.init_extra_nodes(init_custom_nodes=False, init_api_nodes=False))
from comfyui_mesh import mesh_node, mesh_node_ltx
nodes.NODE_CLASS_MAPPINGS.update({**mesh_node.NODE_CLASS_MAPPINGS, **mesh_node_ltx.NODE_CLASS_MAPPINGS})

def node_info(cls):  # what ComfyUI's server answers for one node in /object_info (the fields used here)
    if hasattr(cls, "GET_NODE_INFO_V1"):
        return cls.GET_NODE_INFO_V1()
    types = cls.INPUT_TYPES()
    return {"input": types, "input_order": {k: list(v) for k, v in types.items()}, "output": cls.RETURN_TYPES}

info = {name: node_info(cls) for name, cls in nodes.NODE_CLASS_MAPPINGS.items()}
with open(out, "w") as f:
    json.dump({"version": comfyui_version.__version__, "object_info": info}, f, default=str)
"""


@pytest.fixture(scope="module")
def comfy_info(tmp_path_factory) -> tuple[tuple[int, ...], dict]:
    out = tmp_path_factory.mktemp("object_info") / "object_info.json"
    # cwd: "python -c" puts it first on sys.path; the repository root there would shadow ComfyUI's modules
    r = subprocess.run([sys.executable, "-c", OBJECT_INFO, COMFY, str(out)], capture_output=True, text=True,
                       timeout=300, cwd=out.parent)  # fmt: skip
    assert r.returncode == 0, f"building /object_info failed:\n{r.stderr[-4000:]}"
    data = json.loads(out.read_text())
    version = tuple(int(x) for x in re.findall(r"\d+", data["version"])[:2])
    return version, data["object_info"]


def build_module():
    spec = importlib.util.spec_from_file_location("build_workflows", REPO / "workflows" / "build_workflows.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _widget_inputs(info: dict) -> list[tuple[str, object, dict]]:
    """(name, type, options) of the inputs the frontend shows as widgets, in widgets_values order."""
    out = []
    order = info.get("input_order", {})
    for section in ("required", "optional"):
        specs = info["input"].get(section, {})
        for name in order.get(section, list(specs)):
            spec = specs[name]
            t, opts = spec[0], (spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {})
            if isinstance(t, list) or t in WIDGET_TYPES:
                out.append((name, t, opts))
    return out


def _check_value(where: str, name: str, t: object, opts: dict, v: object) -> None:
    if isinstance(t, list) or t == "COMBO":
        allowed = t if isinstance(t, list) else opts.get("options", [])
        if name in MODEL_FILE_INPUTS:  # model files: whatever the user has installed
            assert isinstance(v, str) and v.endswith((".safetensors", ".sft", ".gguf")), f"{where}: {v!r}"
        else:
            assert v in allowed, f"{where}: {v!r} not in {allowed}"
    elif t in ("INT", "FLOAT"):
        kind = int if t == "INT" else (int, float)
        assert isinstance(v, kind) and not isinstance(v, bool), f"{where}: {v!r} is not {t}"
        lo, hi = opts.get("min", v), opts.get("max", v)
        assert lo <= v <= hi, f"{where}: {v} outside {lo}..{hi}"
        if t == "INT" and opts.get("step", 1) > 1:  # the frontend would round it
            assert (v - opts.get("min", 0)) % opts["step"] == 0, f"{where}: {v} is not min + k * {opts['step']}"
    elif t == "BOOLEAN":
        assert isinstance(v, bool), f"{where}: {v!r} is not a BOOLEAN"
    elif t == "STRING":
        assert isinstance(v, str), f"{where}: {v!r} is not a STRING"


def test_the_builder_writes_the_committed_workflows(tmp_path, monkeypatch):
    mod = build_module()
    assert sorted(mod.FAMILIES) == [p.name for p in WORKFLOWS], "a workflow file the builder does not write"
    monkeypatch.setattr(mod, "HERE", tmp_path)
    mod.main()
    for p in WORKFLOWS:
        assert (tmp_path / p.name).read_text() == p.read_text(), f"{p.name}: run python workflows/build_workflows.py"


@pytest.mark.parametrize("path", WORKFLOWS, ids=[p.name for p in WORKFLOWS])
def test_icarus_splits_fit_the_family_and_the_note_names_the_server(path):
    from comfyui_mesh import arch, tiny

    _, bench_name, size = build_module().FAMILIES[path.name]
    bench = tiny.BENCH[bench_name]
    adapter = arch.get(bench.family)
    total = sum(bench.configs[size][adapter.config_keys[g]] for g in adapter.block_groups)
    wf = json.loads(path.read_text())
    icarus = [n for n in wf["nodes"] if n["type"] in ICARUS_NODES]
    assert icarus, "an example without Icarus"
    for n in icarus:
        assert (n["type"] == "MeshSplitLTX") == (bench.family == "ltxav"), n["type"]
        nb, host, port = n["widgets_values"][:3]
        assert 1 <= nb <= total, f"node {n['id']}: n_blocks_remote {nb} outside 1..{total} ({adapter.display})"
        assert (host, port) == ("127.0.0.1", 7777)
        if path.name not in HAND_TUNED:
            assert nb == bench.n_blocks[size], f"node {n['id']}: not the family's default n_blocks"
    if path.name in HAND_TUNED:
        return
    (note,) = [n["widgets_values"][0] for n in wf["nodes"] if n["type"] in ("Note", "MarkdownNote")]
    (cmd,) = re.findall(r"`(python -m comfyui_mesh\.server [^`]*)`", note)
    files = [n["widgets_values"][0] for n in wf["nodes"] if n["type"] == "UNETLoader"]
    assert re.findall(r"--weights \S*?([^/\s]+)(?=\s)", cmd) == files, cmd  # ONE Daedalus for every expert
    assert cmd.endswith(f"--n-blocks {icarus[0]['widgets_values'][0]}") and f"of {total})" in note, note


@needs_comfy
@pytest.mark.parametrize("path", WORKFLOWS, ids=[p.name for p in WORKFLOWS])
def test_example_workflow_matches_object_info(comfy_info, path):
    version, info = comfy_info
    wf = json.loads(path.read_text())
    nodes = {n["id"]: n for n in wf["nodes"]}
    if version < WRITTEN_FOR:  # older releases lack nodes and widgets (e.g. a loader's device option)
        pytest.skip(f"the workflows are written for ComfyUI >= 0.28; this one is {'.'.join(map(str, version))}")
    missing = sorted({n["type"] for n in nodes.values() if n["type"] not in info and n["type"] not in FRONTEND_ONLY})
    assert not missing, f"ComfyUI has no such node: {missing}"
    for n in nodes.values():
        where = f"{path.name} node {n['id']} {n['type']}"
        if n["type"] in FRONTEND_ONLY:
            continue
        spec = info[n["type"]]
        all_inputs = {**spec["input"].get("required", {}), **spec["input"].get("optional", {})}
        for inp in n.get("inputs", []):
            assert inp["name"] in all_inputs, f"{where}: no input {inp['name']!r}"
            if inp.get("link") is not None:
                t = all_inputs[inp["name"]][0]
                assert t == "*" or inp["type"] == t or inp["type"] in str(t).split(","), f"{where}.{inp['name']}"
        required_links = [k for k, s in spec["input"].get("required", {}).items() if not _widget_inputs(
            {"input": {"required": {k: s}}, "input_order": {"required": [k]}})]  # fmt: skip
        linked = {i["name"] for i in n.get("inputs", []) if i.get("link") is not None}
        assert set(required_links) <= linked, f"{where}: unconnected {set(required_links) - linked}"
        values = list(n.get("widgets_values", []))
        for name, t, opts in _widget_inputs(spec):
            if not values:
                break
            _check_value(f"{where}.{name}", name, t, opts, values.pop(0))
            if opts.get("control_after_generate"):
                assert values.pop(0) in ("fixed", "increment", "decrement", "randomize"), f"{where}.{name} control"
        assert not values, f"{where}: {len(values)} widget values more than the node has widgets"
        for slot, out in enumerate(n.get("outputs", [])):
            assert spec["output"][slot] == out["type"], f"{where}: output {slot} is {spec['output'][slot]}"
    for lid, src, src_slot, dst, dst_slot, t in wf["links"]:
        assert nodes[src]["outputs"][src_slot]["type"] == t and lid in nodes[src]["outputs"][src_slot]["links"]
        assert nodes[dst]["inputs"][dst_slot]["link"] == lid and nodes[dst]["inputs"][dst_slot]["type"] == t
