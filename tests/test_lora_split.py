"""LoRA across the split, on tiny FLUX.2 through a real Daedalus process (CPU, ComfyUI needed).

Every adapter type ComfyUI loads is forwarded and gives the same sample as the unsplit model
with the same LoRA (bit-identical: both sides merge with ComfyUI's own math); a LoRA placed
after Icarus stays local; sets of identical shapes are told apart; server-side LoRA slots
cover the back half; two client processes with different LoRAs interleave correctly.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from comfy_support import (
    COMFY,
    Daedalus,
    check_lora_after_split,
    import_comfy,
    kohya_lora,
    make_flux2,
    needs_comfy,
    needs_narrow_flux2,
)

pytestmark = [needs_comfy, needs_narrow_flux2]

N = 3  # the last 3 single blocks (all of them) + final layer remote; doubles local
H = 256
REMOTE = ["single_blocks.1.linear1", "single_blocks.2.linear2", "final_layer.linear"]
LOCAL = ["double_blocks.0.img_attn.qkv"]
SHAPES = {  # [out, in] of each target weight
    "single_blocks.1.linear1": (9 * H, H),
    "single_blocks.2.linear2": (H, 4 * H),
    "final_layer.linear": (128, H),
    "double_blocks.0.img_attn.qkv": (3 * H, H),
}


def lora_tensors(kind: str, layer: str, seed: int, scale: float = 0.05) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out, inp = SHAPES[layer]
    x = "diffusion_model." + layer

    def r(*s):
        return torch.randn(*s, generator=g) * scale

    if kind in ("lora", "dora"):
        d = {f"{x}.lora_up.weight": r(out, 4), f"{x}.lora_down.weight": r(4, inp), f"{x}.alpha": torch.tensor(2.0)}
        if kind == "dora":
            d[f"{x}.dora_scale"] = 1 + r(out, 1)
        return d
    if kind == "loha":
        return {
            f"{x}.hada_w1_a": r(out, 2),
            f"{x}.hada_w1_b": r(2, inp),
            f"{x}.hada_w2_a": r(out, 2),
            f"{x}.hada_w2_b": r(2, inp),
        }
    if kind == "lokr":
        return {f"{x}.lokr_w1": r(4, 4), f"{x}.lokr_w2": r(out // 4, inp // 4)}
    if kind == "glora":
        return {
            f"{x}.a1.weight": r(inp, 4),
            f"{x}.a2.weight": r(4, inp),
            f"{x}.b1.weight": r(out, 4),
            f"{x}.b2.weight": r(4, inp),
        }
    if kind == "oft":
        return {f"{x}.oft_blocks": r(out // 16, 16, 16)}
    if kind == "boft":
        return {f"{x}.oft_blocks": r(2, out // 16, 16, 16), f"{x}.alpha": torch.tensor(1.0)}
    if kind == "diff":
        return {f"{x}.diff": r(out, inp)}
    if kind == "set":
        return {f"{x}.set_weight": torch.randn(out, inp, generator=g) / inp**0.5}
    raise ValueError(kind)


def make_lora(kind: str, layers: list[str], seed: int) -> dict[str, torch.Tensor]:
    d: dict[str, torch.Tensor] = {}
    for i, layer in enumerate(layers):
        d.update(lora_tensors(kind, layer, seed + i))
    return d


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    d = tmp_path_factory.mktemp("lora")
    weights = make_flux2(d / "tiny_flux2.safetensors", seed=0)
    comfy = import_comfy()
    __import__("comfy.sample")
    from safetensors.torch import save_file

    slot = make_lora("lora", REMOTE + LOCAL, seed=99)
    save_file(slot, str(d / "slot.safetensors"))
    # The same LoRA in Kohya key style: the server maps it by ORIGINAL block index.
    kohya = {}
    for k, v in slot.items():
        layer, suffix = (
            k[len("diffusion_model.") :].split(".lora_")
            if ".lora_" in k
            else k[len("diffusion_model.") :].rsplit(".", 1)
        )
        suffix = "lora_" + suffix if ".lora_" in k else suffix
        kohya["lora_unet_" + layer.replace(".", "_") + "." + suffix] = v
    save_file(kohya, str(d / "slot_kohya.safetensors"))
    srv = Daedalus(weights, N, d / "state")
    yield comfy, weights, srv, d
    srv.stop()


def sample(comfy, model, steps=3):
    from comfyui_mesh import tiny

    i = tiny.flux2_inputs()
    return comfy.sample.sample(model, i["noise"], steps, 2.5, "euler", "simple", i["positive"], i["negative"],
                               i["latent_image"], seed=0, disable_pbar=True)  # fmt: skip


def with_lora(comfy, model, lora, strength=0.8):
    return comfy.sd.load_lora_for_models(model, None, lora, strength, 0)[0]


def split(model, srv, forward=True):
    from comfyui_mesh.config import ClientConfig
    from comfyui_mesh.icarus import SplitSettings, split_model

    cfg = ClientConfig(port=srv.port, token=srv.token)
    return split_model(model, SplitSettings(n_remote=N, client=cfg, forward_loras=forward))


@pytest.mark.parametrize("kind", ["lora", "dora", "loha", "lokr", "glora", "oft", "boft", "diff", "set"])
def test_forwarded_lora_matches_unsplit(env, kind):
    comfy, weights, srv, _ = env
    base = comfy.sd.load_diffusion_model(str(weights))
    patched = with_lora(comfy, base, make_lora(kind, REMOTE + LOCAL, seed=1))
    ref = sample(comfy, patched)
    assert not torch.equal(ref, sample(comfy, base)), "the LoRA must change the output"
    m, run = split(patched, srv)
    assert run.lora is not None
    out = sample(comfy, m)
    assert torch.equal(out, ref), f"{kind}: max diff {(out - ref).abs().max()}"


def test_lora_on_the_original_after_a_split_run(env):
    """A LoRA loaded onto the unsplit MODEL after a split run of it reaches every block (issue #17)."""
    comfy, weights, srv, _ = env

    def load():
        return comfy.sd.load_diffusion_model(str(weights))

    lora = kohya_lora(weights, REMOTE + LOCAL, seed=30)
    check_lora_after_split(load(), load, lambda m: sample(comfy, m), srv, N, lora)


def test_bypass_mode_lora_is_forwarded(env):
    """A LoRA loaded in bypass mode (activation side) before Icarus reaches the server too."""
    comfy, weights, srv, _ = env
    base = comfy.sd.load_diffusion_model(str(weights))
    lora = make_lora("lora", REMOTE + LOCAL, seed=5)
    patched = comfy.sd.load_bypass_lora_for_models(base, None, lora, 0.8, 0)[0]
    ref = sample(comfy, patched)
    assert not torch.equal(ref, sample(comfy, base))
    m, run = split(patched, srv)
    assert run.lora is not None, "the bypass adapters on remote blocks must be forwarded"
    out = sample(comfy, m)
    # The server applies them as weight patches (same math, different rounding order).
    rel = ((out - ref).norm() / ref.norm()).item()
    assert rel < 1e-4, rel


def test_same_shapes_different_values_are_told_apart(env):
    comfy, weights, srv, _ = env
    base = comfy.sd.load_diffusion_model(str(weights))
    a, b = make_lora("lora", REMOTE, seed=10), make_lora("lora", REMOTE, seed=11)
    runs = []
    for lora in (a, b, a):
        patched = with_lora(comfy, base, lora)
        m, run = split(patched, srv)
        assert torch.equal(sample(comfy, m), sample(comfy, patched))
        runs.append(run)
    assert runs[0].lora[0] != runs[1].lora[0] and runs[0].lora[0] == runs[2].lora[0]
    assert runs[2].last_stats.consts_sent == 0, "a LoRA set the server already has is not resent"


def test_lora_after_icarus_stays_local(env):
    comfy, weights, srv, _ = env
    base = comfy.sd.load_diffusion_model(str(weights))
    lora = make_lora("lora", REMOTE + LOCAL, seed=3)
    m, run = split(base, srv)
    after = with_lora(comfy, m, lora)  # LoraLoader placed after Icarus
    local_only = with_lora(comfy, base, make_lora("lora", REMOTE + LOCAL, seed=3) | {})
    ref_local = with_lora(
        comfy, base, {k: v for k, v in lora.items() if any(k.startswith("diffusion_model." + x) for x in LOCAL)}
    )
    assert run.lora is None
    out = sample(comfy, after)
    assert torch.equal(out, sample(comfy, ref_local))
    assert not torch.equal(out, sample(comfy, local_only))


def test_forwarding_off_runs_the_back_half_without_it(env):
    comfy, weights, srv, _ = env
    base = comfy.sd.load_diffusion_model(str(weights))
    lora = make_lora("lora", REMOTE + LOCAL, seed=4)
    m, run = split(with_lora(comfy, base, lora), srv, forward=False)
    ref_local = with_lora(
        comfy, base, {k: v for k, v in lora.items() if any(k.startswith("diffusion_model." + x) for x in LOCAL)}
    )
    assert run.lora is None and torch.equal(sample(comfy, m), sample(comfy, ref_local))


def test_server_lora_slot_two_sided_pattern(env):
    """Big LoRA loaded on the server (slot) and after Icarus locally == LoRA on the whole model."""
    comfy, weights, _, d = env
    from safetensors.torch import load_file

    slot = load_file(str(d / "slot.safetensors"))
    srv = Daedalus(weights, N, d / "state2", extra=["--lora", f"{d / 'slot_kohya.safetensors'}:0.7"])
    try:
        base = comfy.sd.load_diffusion_model(str(weights))
        ref = sample(comfy, with_lora(comfy, base, slot, 0.7))
        m, _ = split(base, srv)
        out = sample(comfy, with_lora(comfy, m, slot, 0.7))
        assert torch.equal(out, ref)
        assert any("server LoRA slot_kohya.safetensors" in ln and " 3 layers" in ln for ln in srv.lines), srv.lines
    finally:
        srv.stop()


CLIENT = """
import sys, torch
sys.path.insert(0, {tests!r})
from test_lora_split import *
from comfy_support import import_comfy
comfy = import_comfy(); __import__("comfy.sample")
class S: port = {port}; token = {token!r}
base = comfy.sd.load_diffusion_model({weights!r})
patched = with_lora(comfy, base, make_lora("lora", REMOTE + LOCAL, seed={seed}))
m, run = split(patched, S)
out = sample(comfy, m, steps=8)
print("MATCH" if torch.equal(out, sample(comfy, patched, steps=8)) else "DIFF", flush=True)
"""


def test_two_clients_with_different_loras_interleave(env):
    _, weights, srv, _ = env
    before = len(srv.steps())
    tests = str(Path(__file__).parent)
    procs = [
        subprocess.Popen([sys.executable, "-c", CLIENT.format(tests=tests, port=srv.port, token=srv.token, weights=str(weights), seed=s)],
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env={"COMFYUI_PATH": COMFY, **__import__("os").environ})
        for s in (20, 21)
    ]  # fmt: skip
    outs = [p.communicate(timeout=300)[0] for p in procs]
    assert all(o.rstrip().endswith("MATCH") for o in outs), outs
    peers = [ln.split()[3] for ln in srv.steps()[before:]]
    assert len(set(peers)) == 2, "two connections served"
    switches = sum(1 for x, y in zip(peers, peers[1:], strict=False) if x != y)
    assert switches >= 2, f"requests did not interleave: {peers}"
