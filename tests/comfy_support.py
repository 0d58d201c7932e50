"""Helpers for tests that need a real ComfyUI checkout (COMFYUI_PATH); skipped without it.

Builds tiny random-weight models with ComfyUI's own classes and saves them as safetensors.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import os
import re
import time
from pathlib import Path

import pytest
from comfyui_mesh.errors import MeshError
from comfyui_proc import DaedalusProc

COMFY = os.environ.get("COMFYUI_PATH", "")


def missing_requirements(comfy: str) -> list[str]:
    """ComfyUI's essential requirements (its requirements.txt above "non essential") that this
    Python lacks, by distribution name."""
    req = Path(comfy) / "requirements.txt"
    if not req.is_file():
        return []
    missing = []
    for line in req.read_text(encoding="utf-8").splitlines():
        if "non essential" in line.lower():
            break
        m = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", line)
        if not m:
            continue
        try:
            importlib.metadata.distribution(m.group(1))
        except importlib.metadata.PackageNotFoundError:
            missing.append(m.group(1))
    return missing


def comfy_skip_reason(comfy: str) -> str | None:
    """Why the ComfyUI-level tests cannot run here, with the fix; None when they can."""
    if not comfy:
        return "needs a ComfyUI checkout: set COMFYUI_PATH (see README, 'Tests with ComfyUI')"
    if not (Path(comfy) / "comfy" / "sd.py").is_file():
        return f"COMFYUI_PATH={comfy} is not a ComfyUI checkout (no comfy/sd.py): point it at the ComfyUI folder"
    missing = missing_requirements(comfy)
    if missing:
        return (
            f"ComfyUI's requirements are missing in this Python ({', '.join(missing)}): "
            f'python -m pip install -r "{Path(comfy) / "requirements.txt"}"'
        )
    return None


SKIP_REASON = comfy_skip_reason(COMFY)
HAVE_COMFY = SKIP_REASON is None
needs_comfy = pytest.mark.skipif(not HAVE_COMFY, reason=SKIP_REASON or "")


def import_comfy():
    """Import ComfyUI on the CPU (once per process)."""
    from comfyui_mesh.tiny import import_comfy as _imp

    return _imp(COMFY, cpu=True)


def flux2_detected_heads(config: dict) -> int:
    """The head count the installed ComfyUI's detection gives a FLUX.2 of ``config`` (shapes only)."""
    import torch
    from comfyui_mesh.tiny import flux2_shapes

    import_comfy()
    import comfy.model_detection

    sd = {k: torch.empty(s, device="meta") for k, s in flux2_shapes(config).items()}
    return int(comfy.model_detection.model_config_from_unet(sd, "").unet_config["num_heads"])


def _narrow_flux2() -> bool:
    from comfyui_mesh.tiny import FLUX2_TINY

    return not HAVE_COMFY or flux2_detected_heads(FLUX2_TINY) == FLUX2_TINY["num_heads"]


# ComfyUI before 0.9 detects every FLUX.2 checkpoint as Dev (48 heads of 128): a tiny FLUX.2 loads
# there only at Dev width (tests/test_flux2_old_release.py), so the tiny-FLUX.2 suites skip.
NARROW_FLUX2 = _narrow_flux2()
needs_narrow_flux2 = pytest.mark.skipif(
    not NARROW_FLUX2,
    reason="this ComfyUI detects FLUX.2 only at Dev width (48 heads): tests/test_flux2_old_release.py covers it",
)


def _narrow_flux1() -> bool:
    """Whether the installed ComfyUI detects a tiny FLUX.1 at its own width (>= 0.9: heads = width / 128;
    before, every FLUX.1 / Chroma checkpoint gets the released 24 heads, so only 3072-wide ones load)."""
    if not HAVE_COMFY:
        return True
    import torch
    from comfyui_mesh.tiny import FLUX1_TINY, flux2_shapes

    import_comfy()
    import comfy.model_detection

    sd = {k: torch.empty(s, device="meta") for k, s in flux2_shapes(FLUX1_TINY).items()}
    return comfy.model_detection.model_config_from_unet(sd, "").unet_config["num_heads"] == FLUX1_TINY["num_heads"]


NARROW_FLUX1 = _narrow_flux1()
needs_narrow_flux1 = pytest.mark.skipif(
    not NARROW_FLUX1,
    reason="this ComfyUI detects FLUX.1 / Chroma only at the released width (24 heads): "
    "tests/test_flux1_split.py splits a released-width FLUX.1 there",
)


def make_flux2(path: Path, seed: int = 0, massive: int = 0, massive_gain: float = 100.0, **overrides) -> Path:
    """Save a tiny random FLUX.2 checkpoint (ComfyUI key names) to ``path``; ``massive``: that
    many planted massive channels (``tiny.plant_massive``)."""
    from comfyui_mesh.tiny import FLUX2_TINY
    from comfyui_mesh.tiny import make_flux2 as _make

    import_comfy()
    return _make(path, seed=seed, config={**FLUX2_TINY, **overrides}, massive=massive, massive_gain=massive_gain)


class Daedalus(DaedalusProc):
    """Daedalus serving the last ``n_blocks`` of ``weights`` on the CPU (authentication on unless ``extra``
    has ``--no-auth``); ``port``, ``token``, ``lines``, ``steps()``, ``log()``, ``stop()``."""

    def __init__(self, weights: Path, n_blocks: int, state_dir: Path, extra: list[str] | None = None):
        super().__init__(
            ["--weights", str(weights), "--n-blocks", str(n_blocks), "--port", "0", "--device", "cpu",
             "--comfyui", COMFY, *(extra or [])],
            state_dir,
        )  # fmt: skip


def ksampler_node(model: list) -> dict:
    """The KSampler of the headless workflows: 2 Euler steps, CFG 2, conditioning from nodes 3/4,
    latent from node 5."""
    inputs = {"model": model, "seed": 0, "steps": 2, "cfg": 2.0, "sampler_name": "euler", "scheduler": "simple",
              "positive": ["3", 0], "negative": ["4", 0], "latent_image": ["5", 0], "denoise": 1.0}  # fmt: skip
    return {"class_type": "KSampler", "inputs": inputs}


def split(model, srv, n: int, codec: str = "raw", stats: list | None = None, **client):
    """Split ``model`` against Daedalus ``srv`` as the node does: the UI's Confirm (reconfigure to
    ``n`` blocks), ``split_model``, a fresh connection checked against the expectations (so the
    constants travel again), then the queue-time connect (arch, n_blocks, fingerprint).
    ``stats``: a list that collects each call's StepStats; ``client``: ClientConfig fields (e.g. the
    streaming slab size). Returns (model, run)."""
    from comfyui_mesh.config import ClientConfig
    from comfyui_mesh.icarus import SplitSettings, split_model
    from comfyui_mesh.transport import MeshClient, pooled_client

    cfg = ClientConfig(port=srv.port, token=srv.token, **client)
    probe = MeshClient(cfg)  # no expectations: what the UI's Confirm button does
    probe.reconfigure(n)
    probe.close()
    on_step = (lambda i, s: stats.append(s)) if stats is not None else None
    m, run = split_model(model, SplitSettings(n_remote=n, client=cfg, codec_name=codec, on_step=on_step))
    pooled_client(cfg, run.expect()).close()
    for attempt in range(50):  # a server with --max-clients may not have seen the probe's close yet
        try:
            run.client().connect()
            break
        except MeshError as e:
            if "clients, the limit" not in str(e) or attempt == 49:
                raise
            time.sleep(0.1)
    return m, run


@contextlib.contextmanager
def flux2_daedalus(d: Path, n_blocks: int):
    """A tiny FLUX.2 checkpoint in ``d``, ComfyUI imported (with comfy.sample) and a Daedalus serving the
    checkpoint's last ``n_blocks``: (comfy, weights, server); the server stops on exit."""
    weights = make_flux2(d / "tiny_flux2.safetensors", seed=0)
    comfy = import_comfy()
    __import__("comfy.sample")
    srv = Daedalus(weights, n_blocks, d / "state")
    try:
        yield comfy, weights, srv
    finally:
        srv.stop()


@contextlib.contextmanager
def headless_stack(tmp_path: Path, make_weights, model_name: str, n_blocks: int = 2):
    """Tiny model in tmp_path/models, a --no-auth Daedalus serving its last ``n_blocks``, and a
    headless ComfyUI with this pack and the fixture pack; both processes are always stopped."""
    from comfyui_proc import FIXTURE_PACK, ComfyUI

    models = tmp_path / "models" / "diffusion_models"
    models.mkdir(parents=True)
    weights = make_weights(models / model_name)
    daedalus = comfy = None
    try:
        daedalus = Daedalus(weights, n_blocks, tmp_path / "state", extra=["--no-auth"])
        comfy = ComfyUI(COMFY, tmp_path, extra_packs=(FIXTURE_PACK,), models=models)
        yield daedalus, comfy, tmp_path
    finally:
        if comfy is not None:
            comfy.stop()
        if daedalus is not None:
            daedalus.stop()


def kohya_lora(weights: Path, layers: list[str], seed: int, scale: float = 0.05) -> dict:
    """A rank-4 LoRA on ``layers`` (Linear weights named as in the checkpoint), in Kohya key names
    (every release maps them); shapes read from the file ``weights``."""
    import torch
    from safetensors import safe_open

    g = torch.Generator().manual_seed(seed)
    with safe_open(str(weights), framework="pt") as f:
        shapes = {x: f.get_slice(f"{x}.weight").get_shape() for x in layers}
    lora = {}
    for x, (out_f, in_f) in shapes.items():
        name = "lora_unet_" + x.replace(".", "_")
        lora[f"{name}.lora_up.weight"] = scale * torch.randn(out_f, 4, generator=g)
        lora[f"{name}.lora_down.weight"] = scale * torch.randn(4, in_f, generator=g)
        lora[f"{name}.alpha"] = torch.tensor(2.0)
    return lora


def stubs_in(model) -> list[str]:
    """Modules of ``model``'s diffusion model tree that are split stubs (remote blocks, heads)."""
    from comfyui_mesh.icarus import HeadStub, HookStub, RemoteStub

    tree = model.model.diffusion_model
    return [n for n, mod in tree.named_modules() if isinstance(mod, (RemoteStub, HookStub, HeadStub))]


def _same(a, b) -> bool:
    """Bit-identical samples: tensors, or sequences of tensors (LTX-AV: video, audio)."""
    import torch

    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    return a.shape == b.shape and torch.equal(a, b)


def _diff(a, b) -> float:
    if isinstance(a, (list, tuple)):
        return max(_diff(x, y) for x, y in zip(a, b, strict=True))
    return float((a - b).abs().max()) if a.shape == b.shape else float("inf")


def check_lora_after_split(model, load, sample, srv, n: int, lora: dict, strength: float = 0.8) -> None:
    """Issue #17: a split run leaves nothing behind in the module tree its clone shares with ``model``.

    Splits ``model`` at ``n`` blocks against ``srv`` and samples; then a LoRA loaded onto the ORIGINAL
    ``model`` (as a LoraLoader on the unsplit MODEL does, its key map read from the module tree) must
    give what the same LoRA gives on a freshly loaded model (``load()``), bit for bit, and the original
    without it the fresh model's sample; a second run of the split clone then re-installs its stubs
    and repeats its first sample. ``sample(model)`` -> the sampled latent (or a list of them; raw
    codec: exact). ``load=None`` (models too big for two copies in memory): the references come from
    ``model`` itself before the split, so ``model`` must not have been split before."""
    comfy = import_comfy()
    if load is None:
        ref = sample(model)
        ref_lora = sample(comfy.sd.load_lora_for_models(model, None, lora, strength, 0)[0])
    m, run = split(model, srv, n)
    first = sample(m)
    calls = run.calls
    left = stubs_in(model)  # read now: the next load of any clone restores the tree itself
    out = sample(comfy.sd.load_lora_for_models(model, None, lora, strength, 0)[0])
    plain = sample(model)
    if load is not None:
        fresh = load()
        ref = sample(fresh)
        ref_lora = sample(comfy.sd.load_lora_for_models(fresh, None, lora, strength, 0)[0])
        del fresh
    assert not _same(ref_lora, ref), "the LoRA must change the sample"
    assert _same(out, ref_lora), f"LoRA on the original after a split run: max diff {_diff(out, ref_lora)}"
    assert _same(plain, ref), f"the original MODEL must be unaffected by the split: max diff {_diff(plain, ref)}"
    assert not left, f"the split run left its stubs in the shared module tree: {left[:4]}"
    assert calls > 0 and _same(first, ref), f"split run: max diff {_diff(first, ref)}"
    again = sample(m)
    assert run.calls == calls, "the second split run must go through Daedalus again"
    assert _same(again, first), f"second split run: max diff {_diff(again, first)}"
    assert not stubs_in(model)
