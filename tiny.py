"""Tiny random-weight models built with ComfyUI's own classes (tests, demo, benchmarks).

Imports ComfyUI lazily: call ``import_comfy(path)`` first (it puts the checkout on
sys.path and selects the CPU when asked).
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path
from typing import Any

import torch

# Tiny FLUX.2: width 256 (2 heads of 128), 2 double + 3 single blocks, text width 64.
FLUX2_TINY: dict[str, Any] = dict(
    in_channels=128,
    out_channels=128,
    vec_in_dim=None,
    context_in_dim=64,
    hidden_size=256,
    mlp_ratio=3.0,
    num_heads=2,
    depth=2,
    depth_single_blocks=3,
    axes_dim=[32, 32, 32, 32],
    theta=2000,
    patch_size=1,
    qkv_bias=False,
    guidance_embed=False,
    txt_ids_dims=[3],
    global_modulation=True,
    mlp_silu_act=True,
    ops_bias=False,
    default_ref_method="index",
    ref_index_scale=10.0,
)

# FLUX.2 Klein 9B / Dev shapes (for full-size random-weight speed runs).
FLUX2_KLEIN_9B = {
    **FLUX2_TINY,
    "context_in_dim": 12288,
    "hidden_size": 4096,
    "num_heads": 32,
    "depth": 8,
    "depth_single_blocks": 24,
}
FLUX2_DEV = {
    **FLUX2_TINY,
    "context_in_dim": 15360,
    "hidden_size": 6144,
    "num_heads": 48,
    "depth": 8,
    "depth_single_blocks": 48,
    "guidance_embed": True,
}


def import_comfy(path: str | Path, cpu: bool = True) -> Any:
    """Import ComfyUI from ``path`` (once per process); ``cpu`` forces ComfyUI's --cpu mode."""
    p = str(Path(path).resolve())
    if p not in sys.path:
        sys.path.insert(0, p)
    import comfy.cli_args

    if cpu:
        comfy.cli_args.args.cpu = True
    import comfy.model_management
    import comfy.sample
    import comfy.sd

    return comfy


def meta_shapes(
    cls: Any, config: dict[str, Any], dtype: torch.dtype = torch.float32, known: Any = None
) -> dict[str, tuple[int, ...]]:
    """Every tensor of ComfyUI model class ``cls`` built with ``config`` on the meta device (no memory).
    ``known``: the parameter names this release's class takes (older releases lack some); others are
    dropped."""
    import comfy.ops

    cfg = {k: v for k, v in config.items() if known is None or k in known}
    with torch.device("meta"):
        model = cls(dtype=dtype, device="meta", operations=comfy.ops.disable_weight_init, **cfg)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def write_random(
    path: str | Path,
    shapes: dict[str, tuple[int, ...]],
    seed: int,
    dtype: torch.dtype,
    device: str,
    meta: dict[str, str] | None = None,
    family: str = "",
    massive: int = 0,
    massive_gain: float = 100.0,
) -> Path:
    """Stream a random checkpoint of ``shapes`` to ``path``; ``device`` is where the random numbers are
    drawn (a GPU makes full-size models fast); ``massive`` > 0 plants that many massive channels in
    ``family``'s input projections (``plant_massive``)."""
    g = torch.Generator(device=device).manual_seed(seed)
    make = plant_massive(lambda n, s: _random_weight(n, s, g, device), family, massive, massive_gain)
    return write_safetensors_streaming(path, shapes, make, dtype, meta or {})


def make_flux2(
    path: str | Path,
    seed: int = 0,
    config: dict[str, Any] | None = None,
    dtype: torch.dtype = torch.float32,
    device: str = "cpu",
    massive: int = 0,
    massive_gain: float = 100.0,
) -> Path:
    """Save a random FLUX.2 checkpoint with ComfyUI key names (ComfyUI must be importable).

    ``device`` is where the random numbers are drawn (a GPU makes full-size models fast);
    ``massive`` > 0 plants that many massive channels (``plant_massive``)."""
    return write_random(
        path, flux2_shapes(config or FLUX2_TINY, dtype), seed, dtype, device, None, "flux2", massive, massive_gain
    )


def flux2_shapes(config: dict[str, Any], dtype: torch.dtype = torch.float32) -> dict[str, tuple[int, ...]]:
    """Every tensor of a FLUX.2 with ``config`` (built on the meta device: no memory)."""
    import comfy.ldm.flux.model as flux

    # Older ComfyUI releases (0.3.75) lack some FluxParams fields (txt_ids_dims): keep what this one has.
    return meta_shapes(flux.Flux, config, dtype, {f.name for f in dataclasses.fields(flux.FluxParams)})


def flux2_inputs(batch: int = 1, h: int = 4, w: int = 6, txt: int = 7, ctx: int = 64, seed: int = 1) -> dict[str, Any]:
    """Noise, positive/negative conditioning and an empty latent for comfy.sample.sample."""

    def rnd(*shape: int, s: int) -> torch.Tensor:
        return torch.randn(*shape, generator=torch.Generator().manual_seed(s))

    return {
        "noise": rnd(batch, 128, h, w, s=seed),
        "positive": [[rnd(1, txt, ctx, s=seed + 1), {}]],
        "negative": [[rnd(1, txt, ctx, s=seed + 2), {}]],
        "latent_image": torch.zeros(batch, 128, h, w),
    }


# ---------------------------------------------------------------------------- LTX-AV

# Tiny LTX-AV in the LTX-2 style: video 2 heads x 32, audio 2 heads x 16, 3 blocks, text width 64
# (the connectors' width must equal caption_channels). Detection needs this as metadata "config".
LTXAV2_TINY: dict[str, Any] = dict(
    num_attention_heads=2,
    attention_head_dim=32,
    cross_attention_dim=64,
    audio_num_attention_heads=2,
    audio_attention_head_dim=16,
    audio_cross_attention_dim=32,
    caption_channels=64,
    num_layers=3,
    rope_type="split",
    frequencies_precision="float64",
    connector_num_attention_heads=2,
    connector_attention_head_dim=32,
    connector_num_layers=1,
    connector_num_learnable_registers=8,
)
# LTX-2.3 style: gated attention, prompt AdaLN (9 AdaLN rows + prompt tables), the caption
# projection before the connectors (connector widths = stream widths), gated connectors.
LTXAV23_TINY: dict[str, Any] = {
    **LTXAV2_TINY,
    "apply_gated_attention": True,
    "cross_attention_adaln": True,
    "caption_proj_before_connector": True,
    "caption_projection_first_linear": False,
    "connector_apply_gated_attention": True,
    "audio_connector_num_attention_heads": 2,
    "audio_connector_attention_head_dim": 16,
}
# LTX-2.3-style flags at the released widths: 48 blocks of 32x128 video / 32x64 audio,
# 8-layer connectors; about 21 B parameters in the DiT (42 GB in bf16).
LTXAV23_FULL: dict[str, Any] = {
    **LTXAV23_TINY,
    "num_attention_heads": 32,
    "attention_head_dim": 128,
    "cross_attention_dim": 4096,
    "audio_num_attention_heads": 32,
    "audio_attention_head_dim": 64,
    "audio_cross_attention_dim": 2048,
    "caption_channels": 3840,
    "num_layers": 48,
    "connector_num_attention_heads": 32,
    "connector_attention_head_dim": 128,
    "audio_connector_num_attention_heads": 32,
    "audio_connector_attention_head_dim": 64,
    "connector_num_layers": 8,
    "connector_num_learnable_registers": 128,
}

_ST_NAMES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16"}


def ltxav_shapes(config: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    """Every tensor of an LTXAVModel with ``config`` (built on the meta device: no memory)."""
    import comfy.ldm.lightricks.av_model

    return meta_shapes(comfy.ldm.lightricks.av_model.LTXAVModel, config)


# Input projections whose output rows become the hidden-state channels of every token: scaling a
# few rows plants "massive activations" (see ``plant_massive``). Per family, (weight, bias) keys.
MASSIVE_KEYS = {
    "flux2": (("img_in.weight", ""), ("txt_in.weight", "")),
    "ltxav": (
        ("patchify_proj.weight", "patchify_proj.bias"),
        ("audio_patchify_proj.weight", "audio_patchify_proj.bias"),
    ),
}


def massive_rows(hidden: int, count: int) -> list[int]:
    """The ``count`` hidden channels that ``plant_massive`` makes massive: spread evenly."""
    return [hidden * (2 * j + 1) // (2 * count) for j in range(min(count, hidden))]


def plant_massive(make: Any, family: str, count: int, gain: float) -> Any:
    """Wrap a weight maker so the model carries massive activations as trained DiTs do: ``count``
    output rows of each input projection scaled by ``gain`` (the channel then varies over the
    tokens with the input, ``gain`` times the others), and where the projection has a bias, a
    sign-stable offset of ``gain`` on those rows. The residual stream carries them through every
    block, so the split's seam has them."""
    if count <= 0:
        return make
    weights = {w: b for w, b in MASSIVE_KEYS[family]}
    biases = {b for _, b in MASSIVE_KEYS[family] if b}

    def planted(name: str, shape: tuple[int, ...]) -> torch.Tensor:
        t = make(name, shape)
        if name in weights or name in biases:
            rows = torch.tensor(massive_rows(shape[0], count), device=t.device)
            if name in weights:
                t[rows] *= gain
            else:
                t[rows] = gain * torch.where(rows % 2 == 0, 1.0, -1.0).to(t)
        return t

    return planted


def _random_weight(name: str, shape: tuple[int, ...], g: torch.Generator, device: str) -> torch.Tensor:
    """Random weights that keep the residual stream near unit variance (finite in bf16 over
    48 blocks): matrices ~ N(0, 1/fan_in), norm scales ~ 1, biases small."""
    if len(shape) > 1:
        return torch.randn(shape, generator=g, device=device) * (1.0 / shape[-1] ** 0.5)
    if name.endswith(".bias"):
        return 0.05 * torch.randn(shape, generator=g, device=device)
    return 1.0 + 0.1 * torch.randn(shape, generator=g, device=device)


def write_safetensors_streaming(
    path: str | Path,
    shapes: dict[str, tuple[int, ...]],
    make: Any,
    dtype: torch.dtype,
    metadata: dict[str, str],
) -> Path:
    """Write a safetensors file one tensor at a time (``make(name, shape)`` -> tensor), so a
    model larger than host memory can be written; the layout is the format's own."""
    import json
    import struct

    header: dict[str, Any] = {"__metadata__": metadata}
    item = torch.empty((), dtype=dtype).element_size()
    offset = 0
    for name, shape in shapes.items():
        n = item
        for s in shape:
            n *= s
        header[name] = {"dtype": _ST_NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    hb = json.dumps(header, separators=(",", ":")).encode()
    hb += b" " * (-len(hb) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(hb)))
        f.write(hb)
        for name, shape in shapes.items():
            t = make(name, shape).to(dtype).cpu().contiguous().reshape(-1)
            if t.numel():
                f.write(memoryview(t.view(torch.uint8).numpy()))
    return Path(path)


def make_ltxav(
    path: str | Path,
    seed: int = 0,
    config: dict[str, Any] | None = None,
    dtype: torch.dtype = torch.float32,
    device: str = "cpu",
    massive: int = 0,
    massive_gain: float = 100.0,
) -> Path:
    """Save a random LTX-AV checkpoint with ComfyUI key names and the metadata "config" that
    ComfyUI's detection reads (ComfyUI must be importable). Streams to disk; ``device`` is
    where the random numbers are drawn (a GPU makes full-size models fast); ``massive`` > 0
    plants that many massive channels in the video and audio streams (``plant_massive``)."""
    import json

    cfg = dict(config or LTXAV2_TINY)
    meta = {"config": json.dumps({"transformer": cfg})}
    return write_random(path, ltxav_shapes(cfg), seed, dtype, device, meta, "ltxav", massive, massive_gain)


def ltxav_inputs(
    batch: int = 1,
    frames: int = 2,
    h: int = 2,
    w: int = 3,
    audio: int = 5,
    txt: int = 7,
    ctx: int = 64,
    seed: int = 1,
    cond: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Noise, conditioning and an empty latent for comfy.sample.sample on an LTX-AV model.

    Latent video [B, 128, frames, h, w] and audio [B, 8, audio, 16] as ComfyUI's NestedTensor
    (audio=0: a video-only latent, which ComfyUI runs with an empty audio stream)."""
    from comfy.nested_tensor import NestedTensor

    def rnd(*shape: int, s: int) -> torch.Tensor:
        return torch.randn(*shape, generator=torch.Generator().manual_seed(s))

    video = (batch, 128, frames, h, w)
    out: dict[str, Any]
    out = {
        "positive": [[rnd(1, txt, ctx, s=seed + 1), dict(cond or {})]],
        "negative": [[rnd(1, txt, ctx, s=seed + 2), dict(cond or {})]],
    }
    if audio:
        a = (batch, 8, audio, 16)
        out["noise"] = NestedTensor([rnd(*video, s=seed), rnd(*a, s=seed + 3)])
        out["latent_image"] = NestedTensor([torch.zeros(video), torch.zeros(a)])
    else:
        out["noise"] = rnd(*video, s=seed)
        out["latent_image"] = torch.zeros(video)
    return out


# ---------------------------------------------------------------------------- family registry


@dataclasses.dataclass(frozen=True)
class BenchFamily:
    """How generic tests and ``bench/split_family.py`` build and sample one family's random model.

    ``make(path, seed=, config=, dtype=, device=)`` writes a checkpoint with ComfyUI key names;
    ``inputs(size, batch, seed)`` returns comfy.sample.sample's noise / positive / negative /
    latent_image for a config of ``configs`` (``size`` is its key: "tiny" always exists, the
    others are released shapes for full-size speed runs); ``n_blocks`` the default
    n_blocks_remote per size; ``cfg`` the CFG scale the family is sampled with."""

    family: str  # arch adapter family (wire name)
    make: Any
    configs: dict[str, dict[str, Any]]
    inputs: Any
    n_blocks: dict[str, int]
    cfg: float = 1.0
    # (path) -> MODEL, where comfy.sd.load_diffusion_model cannot load a config of ``configs`` (tiny
    # Chroma: ComfyUI's detection assumes the released approximator widths); None: that loader.
    load: Any = None


BENCH: dict[str, BenchFamily] = {}


def register_bench(spec: BenchFamily, name: str | None = None) -> BenchFamily:
    """Register ``spec`` under ``name`` (default: its family); a name registered twice is a bug."""
    key = name or spec.family
    if key in BENCH:
        raise ValueError(f"bench family {key!r} registered twice")
    BENCH[key] = spec
    return spec


def _flux2_bench_inputs(size: str, batch: int, seed: int) -> dict[str, Any]:
    ctx = BENCH["flux2"].configs[size]["context_in_dim"]
    hw = 4 if size == "tiny" else 64  # 1024² for the released shapes (FLUX.2 latents are /16)
    txt = 7 if size == "tiny" else 512
    return flux2_inputs(batch=batch, h=hw, w=hw + (2 if size == "tiny" else 0), txt=txt, ctx=ctx, seed=seed)


def _ltxav_bench_inputs(size: str, batch: int, seed: int) -> dict[str, Any]:
    c = BENCH["ltxav"].configs[size]
    ctx = c["cross_attention_dim"] + c["audio_cross_attention_dim"]  # processed (2.3) text features
    cond = {"frame_rate": 25.0}
    if size == "tiny":  # 64x64x17
        return ltxav_inputs(batch=batch, frames=3, h=2, w=2, audio=17, ctx=ctx, seed=seed, cond=cond)
    # 768x512x121 (LTX-2.3 shapes): 16 latent frames of 16x24, 121 audio latents (25 per second)
    return ltxav_inputs(batch=batch, frames=16, h=16, w=24, audio=121, txt=1024, ctx=ctx, seed=seed, cond=cond)


register_bench(
    BenchFamily(
        "flux2",
        make=make_flux2,
        configs={"tiny": FLUX2_TINY, "klein9b": FLUX2_KLEIN_9B, "dev": FLUX2_DEV},
        inputs=_flux2_bench_inputs,
        n_blocks={"tiny": 3, "klein9b": 16, "dev": 24},
    )
)
register_bench(
    BenchFamily(
        "ltxav",
        make=make_ltxav,
        configs={"tiny": LTXAV23_TINY, "full": LTXAV23_FULL},
        inputs=_ltxav_bench_inputs,
        n_blocks={"tiny": 1, "full": 8},
        cfg=3.0,
    )
)


# ---------------------------------------------------------------------------- FLUX.1 and Chroma

# Tiny FLUX.1 dev: width 256 (2 heads of 128: ComfyUI's detection derives the heads from the width
# over the FLUX.1 rope axes 16+56+56), 2 double + 3 single blocks, text width 64, pooled width 32.
FLUX1_TINY: dict[str, Any] = dict(
    in_channels=16,
    out_channels=16,
    vec_in_dim=32,
    context_in_dim=64,
    hidden_size=256,
    mlp_ratio=4.0,
    num_heads=2,
    depth=2,
    depth_single_blocks=3,
    axes_dim=[16, 56, 56],
    theta=10000,
    patch_size=2,
    qkv_bias=True,
    guidance_embed=True,
    txt_ids_dims=[],
)
FLUX1_SCHNELL_TINY = {**FLUX1_TINY, "guidance_embed": False}
# The released FLUX.1 shapes (dev, Kontext dev, schnell): 19 double + 38 single blocks, 3072 wide,
# T5-XXL text (4096) and CLIP-L pooled (768); about 11.9 B parameters (24 GB in bf16).
FLUX1_DEV = {
    **FLUX1_TINY,
    "vec_in_dim": 768,
    "context_in_dim": 4096,
    "hidden_size": 3072,
    "num_heads": 24,
    "depth": 19,
    "depth_single_blocks": 38,
}
FLUX1_SCHNELL = {**FLUX1_DEV, "guidance_embed": False}

# Tiny Chroma: FLUX.1-like blocks at width 256, an approximator 64 -> 64 x 2 -> 256.
CHROMA_TINY: dict[str, Any] = dict(
    in_channels=64,
    out_channels=64,
    context_in_dim=64,
    hidden_size=256,
    mlp_ratio=4.0,
    num_heads=2,
    depth=2,
    depth_single_blocks=3,
    axes_dim=[16, 56, 56],
    theta=10000,
    patch_size=2,
    qkv_bias=True,
    in_dim=64,
    out_dim=256,
    hidden_dim=64,
    n_layers=2,
    txt_ids_dims=[],
    vec_in_dim=None,
)
# Chroma1 (HD / base) shapes: FLUX.1-schnell blocks (19 + 38, 3072 wide), T5-XXL text, the approximator
# 64 -> 5120 x 5 -> 3072 (what ComfyUI's detection assumes); about 8.9 B parameters.
CHROMA_FULL = {
    **CHROMA_TINY,
    "context_in_dim": 4096,
    "hidden_size": 3072,
    "num_heads": 24,
    "depth": 19,
    "depth_single_blocks": 38,
    "out_dim": 3072,
    "hidden_dim": 5120,
    "n_layers": 5,
}


def make_flux1(
    path: str | Path,
    seed: int = 0,
    config: dict[str, Any] | None = None,
    dtype: torch.dtype = torch.float32,
    device: str = "cpu",
) -> Path:
    """Save a random FLUX.1 checkpoint with ComfyUI key names (ComfyUI must be importable); the same
    ``Flux`` class as FLUX.2, so its shapes come from ``flux2_shapes``."""
    return write_random(path, flux2_shapes(config or FLUX1_TINY, dtype), seed, dtype, device)


def chroma_shapes(config: dict[str, Any], dtype: torch.dtype = torch.float32) -> dict[str, tuple[int, ...]]:
    """Every tensor of a Chroma with ``config`` (built on the meta device: no memory)."""
    import comfy.ldm.chroma.model as chroma

    return meta_shapes(chroma.Chroma, config, dtype, {f.name for f in dataclasses.fields(chroma.ChromaParams)})


def make_chroma(
    path: str | Path,
    seed: int = 0,
    config: dict[str, Any] | None = None,
    dtype: torch.dtype = torch.float32,
    device: str = "cpu",
) -> Path:
    """Save a random Chroma checkpoint with ComfyUI key names (ComfyUI must be importable). A tiny one
    loads with ``load_chroma`` (ComfyUI's own loader assumes the released approximator widths)."""
    return write_random(path, chroma_shapes(config or CHROMA_TINY, dtype), seed, dtype, device)


def load_chroma(path: str | Path) -> Any:
    """A Chroma checkpoint as a MODEL (ModelPatcher), built with ComfyUI's detection, model and patcher
    classes as comfy.sd.load_diffusion_model does, plus the approximator widths read from the
    checkpoint's shapes (``arch.chroma.config_from_shapes``, as Daedalus's loader applies them)."""
    import comfy.model_detection
    import comfy.utils

    from .arch import chroma

    sd = comfy.utils.load_torch_file(str(path), safe_load=True)
    model_config = comfy.model_detection.model_config_from_unet(sd, "")
    model_config.unet_config.update(chroma.config_from_shapes({k: tuple(v.shape) for k, v in sd.items()}))
    return _patcher(model_config, sd, weight_dtype=comfy.utils.weight_dtype(sd))


def _patcher(
    model_config: Any, sd: dict[str, torch.Tensor], dtype: torch.dtype | None = None, **dtype_args: Any
) -> Any:
    """The ModelPatcher comfy.sd.load_diffusion_model makes of ``sd`` for a detected ``model_config``:
    inference dtype (``dtype``, else ComfyUI's choice), model, weights, load / offload devices."""
    import comfy.model_management as mm
    import comfy.model_patcher
    import comfy.utils

    device = mm.get_torch_device()
    supported = list(model_config.supported_inference_dtypes)
    params = comfy.utils.calculate_parameters(sd)
    unet_dtype = dtype or mm.unet_dtype(model_params=params, supported_dtypes=supported, **dtype_args)
    model_config.set_inference_dtype(unet_dtype, mm.unet_manual_cast(unet_dtype, device, supported))
    model = model_config.get_model(sd, "")
    model.load_model_weights(sd, "")
    return comfy.model_patcher.ModelPatcher(model, load_device=device, offload_device=mm.unet_offload_device())


def flux1_inputs(
    batch: int = 1,
    h: int = 4,
    w: int = 6,
    txt: int = 7,
    ctx: int = 64,
    pooled: int | None = 32,
    guidance: float | None = 3.5,
    ref: tuple[int, int] | None = None,
    seed: int = 1,
) -> dict[str, Any]:
    """Noise, conditioning and an empty latent for comfy.sample.sample on a FLUX.1 (or, with
    ``pooled=None`` and ``guidance=0``, Chroma) model: latents [B, 16, h, w]; ``pooled``: the CLIP
    pooled width (``y``); ``guidance``: the distilled guidance value (dev); ``ref``: (h, w) of one
    Kontext reference latent (``reference_latents``)."""

    def rnd(*shape: int, s: int) -> torch.Tensor:
        return torch.randn(*shape, generator=torch.Generator().manual_seed(s))

    def cond(s: int) -> dict[str, Any]:
        c: dict[str, Any] = {}
        if pooled:
            c["pooled_output"] = rnd(1, pooled, s=s + 10)
        if guidance is not None:
            c["guidance"] = guidance
        if ref is not None:
            c["reference_latents"] = [rnd(1, 16, *ref, s=seed + 20)]
        return c

    return {
        "noise": rnd(batch, 16, h, w, s=seed),
        "positive": [[rnd(1, txt, ctx, s=seed + 1), cond(seed + 1)]],
        "negative": [[rnd(1, txt, ctx, s=seed + 2), cond(seed + 2)]],
        "latent_image": torch.zeros(batch, 16, h, w),
    }


def _flux1_bench_inputs(size: str, batch: int, seed: int) -> dict[str, Any]:
    c = BENCH["flux1"].configs[size]
    guidance = 3.5 if c["guidance_embed"] else None
    if size == "tiny":
        return flux1_inputs(batch=batch, ctx=c["context_in_dim"], pooled=c["vec_in_dim"], guidance=guidance, seed=seed)
    # 1024² (latents /8), 512 T5 tokens
    return flux1_inputs(batch, 128, 128, 512, c["context_in_dim"], c["vec_in_dim"], guidance, seed=seed)


def _chroma_bench_inputs(size: str, batch: int, seed: int) -> dict[str, Any]:
    ctx = BENCH["chroma"].configs[size]["context_in_dim"]
    if size == "tiny":
        return flux1_inputs(batch=batch, ctx=ctx, pooled=None, guidance=0.0, seed=seed)
    return flux1_inputs(batch, 128, 128, 512, ctx, None, 0.0, seed=seed)  # 1024², 512 T5 tokens


register_bench(
    BenchFamily(
        "flux1",
        make=make_flux1,
        configs={"tiny": FLUX1_TINY, "dev": FLUX1_DEV, "schnell": FLUX1_SCHNELL},
        inputs=_flux1_bench_inputs,
        n_blocks={"tiny": 3, "dev": 28, "schnell": 28},
    )
)
register_bench(
    BenchFamily(
        "chroma",
        make=make_chroma,
        configs={"tiny": CHROMA_TINY, "full": CHROMA_FULL},
        inputs=_chroma_bench_inputs,
        n_blocks={"tiny": 3, "full": 28},
        cfg=4.0,
        load=load_chroma,
    )
)


# ---------------------------------------------------------------------------- Wan 2.1 / 2.2

# WanModel keyword arguments. ComfyUI's detection reads dim, ffn_dim, num_layers, in_dim, out_dim
# from the shapes, takes num_heads = dim // 128 and keeps text_dim 4096 / freq_dim 256 fixed, so a
# tiny Wan has heads of 128 and the real text width. I2V ("i2v") adds the CLIP image projection.
WAN_TINY: dict[str, Any] = dict(
    model_type="t2v", dim=256, ffn_dim=512, num_heads=2, num_layers=3, in_dim=16, out_dim=16, text_dim=4096
)
WAN_I2V_TINY: dict[str, Any] = {**WAN_TINY, "model_type": "i2v", "in_dim": 36}  # Wan 2.1 I2V: CLIP + concat
WAN22_I2V_TINY: dict[str, Any] = {**WAN_TINY, "in_dim": 36}  # Wan 2.2 I2V A14B experts: concat, no CLIP
WAN22_TI2V_TINY: dict[str, Any] = {**WAN_TINY, "in_dim": 48, "out_dim": 48}  # Wan 2.2 VAE latents
# Released shapes (Wan-AI configs, as ComfyUI detects them): 14B (Wan 2.1 T2V/I2V, each Wan 2.2
# A14B expert) and Wan 2.2 TI2V 5B.
WAN_14B: dict[str, Any] = {**WAN_TINY, "dim": 5120, "ffn_dim": 13824, "num_heads": 40, "num_layers": 40}
WAN_I2V_14B: dict[str, Any] = {**WAN_14B, "model_type": "i2v", "in_dim": 36}
WAN22_5B: dict[str, Any] = {
    **WAN_TINY,
    "dim": 3072,
    "ffn_dim": 14336,
    "num_heads": 24,
    "num_layers": 30,
    "in_dim": 48,
    "out_dim": 48,
}
WAN_CLIP_TOKENS, WAN_CLIP_DIM = 257, 1280  # CLIP-H penultimate hidden states (I2V)


def wan_shapes(config: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    """Every tensor of a WanModel with ``config`` (built on the meta device: no memory)."""
    import inspect

    import comfy.ldm.wan.model

    wan = comfy.ldm.wan.model.WanModel
    return meta_shapes(wan, config, known=inspect.signature(wan.__init__).parameters)


def make_wan(
    path: str | Path,
    seed: int = 0,
    config: dict[str, Any] | None = None,
    dtype: torch.dtype = torch.float32,
    device: str = "cpu",
) -> Path:
    """Save a random Wan checkpoint with ComfyUI key names (ComfyUI must be importable); streams
    to disk, ``device`` is where the random numbers are drawn."""
    return write_random(path, wan_shapes(config or WAN_TINY), seed, dtype, device)


def wan_inputs(
    batch: int = 1,
    channels: int = 16,
    frames: int = 3,
    h: int = 4,
    w: int = 6,
    txt: int = 7,
    seed: int = 1,
    image: int = 0,
    clip: bool = False,
) -> dict[str, Any]:
    """Noise, conditioning and an empty latent [B, channels, frames, h, w] for comfy.sample.sample
    on a Wan model. ``image`` > 0: I2V conditioning as WanImageToVideo sets it (a ``concat_latent_image``
    of ``image`` channels and a ``concat_mask`` keeping the first frame; ComfyUI builds ``c_concat``
    from them); ``clip``: a CLIP vision output (``clip_fea``, Wan 2.1 I2V)."""
    import types

    def rnd(*shape: int, s: int) -> torch.Tensor:
        return torch.randn(*shape, generator=torch.Generator().manual_seed(s))

    cond: dict[str, Any] = {}
    if image:
        mask = torch.ones(1, 1, frames, h, w)
        mask[:, :, :1] = 0.0
        cond.update(concat_latent_image=rnd(1, image, frames, h, w, s=seed + 3), concat_mask=mask)
    if clip:
        hidden = rnd(1, WAN_CLIP_TOKENS, WAN_CLIP_DIM, s=seed + 4)
        cond["clip_vision_output"] = types.SimpleNamespace(penultimate_hidden_states=hidden)
    return {
        "noise": rnd(batch, channels, frames, h, w, s=seed),
        "positive": [[rnd(1, txt, 4096, s=seed + 1), dict(cond)]],
        "negative": [[rnd(1, txt, 4096, s=seed + 2), dict(cond)]],
        "latent_image": torch.zeros(batch, channels, frames, h, w),
    }


def _wan_bench_inputs(name: str, image: int = 0, clip: bool = False) -> Any:
    def inputs(size: str, batch: int, seed: int) -> dict[str, Any]:
        c = BENCH[name].configs[size]
        ch = c["out_dim"]
        if size == "tiny":
            return wan_inputs(batch=batch, channels=ch, seed=seed, image=image, clip=clip)
        if ch == 48:  # TI2V 5B: 1280x704x121 through the Wan 2.2 VAE (/16 spatial, /4 temporal)
            return wan_inputs(batch=batch, channels=ch, frames=31, h=44, w=80, txt=512, seed=seed)
        # 14B: 832x480x81 (/8 spatial, /4 temporal)
        return wan_inputs(batch=batch, channels=ch, frames=21, h=60, w=104, txt=512, seed=seed, image=image, clip=clip)

    return inputs


register_bench(
    BenchFamily(
        "wan",
        make=make_wan,
        configs={"tiny": WAN_TINY, "14b": WAN_14B},
        inputs=_wan_bench_inputs("wan"),
        n_blocks={"tiny": 2, "14b": 20},
        cfg=5.0,
    )
)
register_bench(
    BenchFamily(
        "wan",
        make=make_wan,
        configs={"tiny": WAN_I2V_TINY, "14b": WAN_I2V_14B},
        inputs=_wan_bench_inputs("wan_i2v", image=16, clip=True),
        n_blocks={"tiny": 2, "14b": 20},
        cfg=5.0,
    ),
    name="wan_i2v",
)
register_bench(
    BenchFamily(
        "wan",
        make=make_wan,
        configs={"tiny": WAN22_TI2V_TINY, "5b": WAN22_5B},
        inputs=_wan_bench_inputs("wan22_5b"),
        n_blocks={"tiny": 2, "5b": 15},
        cfg=5.0,
    ),
    name="wan22_5b",
)


# ---------------------------------------------------------------------------- Qwen-Image

# ComfyUI's detection reads only in_channels and the block count of a Qwen-Image checkpoint (the
# widths are the model's defaults: 24 heads x 128 = 3072, text 3584); the tiny model keeps the head
# width (the RoPE axes (16, 56, 56) fill it) with one head and a narrow text input, so it is built
# from this config (``load_qwen_image``), and Daedalus reads the widths from the tensor shapes
# (``arch.qwen_image.config_from_shapes``).
QWEN_IMAGE_TINY: dict[str, Any] = dict(
    patch_size=2,
    in_channels=64,
    out_channels=16,
    num_layers=3,
    attention_head_dim=128,
    num_attention_heads=1,
    joint_attention_dim=64,
    axes_dims_rope=(16, 56, 56),
)
# Qwen-Image-Edit-2511 style: the checkpoint carries the ``__index_timestep_zero__`` marker, and
# reference images are modulated with timestep 0 (the model's batch of timesteps doubles).
QWEN_IMAGE_EDIT2511_TINY: dict[str, Any] = {**QWEN_IMAGE_TINY, "default_ref_method": "index_timestep_zero"}
# Qwen-Image / Qwen-Image-Edit(-2509) 20B as released (ComfyUI's defaults): 60 blocks of 3072
# (24 heads x 128), text 3584, 64 input channels (16 latent channels x 2x2 patches).
QWEN_IMAGE_FULL: dict[str, Any] = {
    **QWEN_IMAGE_TINY,
    "num_layers": 60,
    "num_attention_heads": 24,
    "joint_attention_dim": 3584,
}


def _qwen_image_class_config(config: dict[str, Any]) -> dict[str, Any]:
    """``config`` without the keys this release's QwenImageTransformer2DModel lacks (0.3.75: no
    default_ref_method / use_additional_t_cond)."""
    import inspect

    import comfy.ldm.qwen_image.model

    known = inspect.signature(comfy.ldm.qwen_image.model.QwenImageTransformer2DModel.__init__).parameters
    return {k: v for k, v in config.items() if k in known}


def qwen_image_shapes(config: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    """Every tensor of a QwenImageTransformer2DModel with ``config`` (meta device: no memory)."""
    import comfy.ldm.qwen_image.model

    return meta_shapes(comfy.ldm.qwen_image.model.QwenImageTransformer2DModel, _qwen_image_class_config(config))


def make_qwen_image(
    path: str | Path,
    seed: int = 0,
    config: dict[str, Any] | None = None,
    dtype: torch.dtype = torch.float32,
    device: str = "cpu",
) -> Path:
    """Save a random Qwen-Image checkpoint with ComfyUI key names (ComfyUI must be importable);
    ``device`` is where the random numbers are drawn (a GPU makes the 20B fast)."""
    return write_random(path, qwen_image_shapes(config or QWEN_IMAGE_TINY), seed, dtype, device)


def load_qwen_image(path: str | Path, config: dict[str, Any], dtype: torch.dtype | None = None) -> Any:
    """A ModelPatcher of the checkpoint at ``path`` built from ``config`` (what
    comfy.sd.load_diffusion_model does, minus the width detection ComfyUI lacks for Qwen-Image;
    at the released widths, ``comfy.sd.load_diffusion_model`` gives the same model)."""
    import comfy.model_detection
    import comfy.utils

    sd = comfy.utils.load_torch_file(str(path))
    unet_config = {"image_model": "qwen_image", **_qwen_image_class_config(config)}
    model_config = comfy.model_detection.model_config_from_unet_config(unet_config, sd)
    return _patcher(model_config, sd, dtype)


def qwen_image_inputs(
    batch: int = 1,
    h: int = 4,
    w: int = 6,
    txt: int = 7,
    ctx: int = 64,
    seed: int = 1,
    refs: tuple[tuple[int, int], ...] = (),
) -> dict[str, Any]:
    """Noise, positive/negative conditioning and an empty latent ([B, 16, 1, h, w], latent units)
    for comfy.sample.sample; ``refs``: (h, w) of reference latents for the edit models, set on both
    conditionings as ComfyUI's TextEncodeQwenImageEdit(Plus) does."""

    def rnd(*shape: int, s: int) -> torch.Tensor:
        return torch.randn(*shape, generator=torch.Generator().manual_seed(s))

    cond: dict[str, Any] = {}
    if refs:
        cond["reference_latents"] = [rnd(1, 16, 1, rh, rw, s=seed + 10 + i) for i, (rh, rw) in enumerate(refs)]
    return {
        "noise": rnd(batch, 16, 1, h, w, s=seed),
        "positive": [[rnd(1, txt, ctx, s=seed + 1), dict(cond)]],
        "negative": [[rnd(1, txt, ctx, s=seed + 2), dict(cond)]],
        "latent_image": torch.zeros(batch, 16, 1, h, w),
    }


def _qwen_image_bench_inputs(size: str, batch: int, seed: int, edit: bool = False) -> dict[str, Any]:
    ctx = QWEN_IMAGE_TINY["joint_attention_dim"] if size == "tiny" else QWEN_IMAGE_FULL["joint_attention_dim"]
    if size == "tiny":
        return qwen_image_inputs(batch=batch, seed=seed, ctx=ctx, refs=((4, 6),) if edit else ())
    if edit:  # 1024² output and one 1024² reference image: 2 x 4096 image tokens
        return qwen_image_inputs(batch=batch, h=128, w=128, txt=256, ctx=ctx, seed=seed, refs=((128, 128),))
    # 1328² (Qwen-Image's native square size): latent 166², 6889 image tokens; a 256-token prompt
    return qwen_image_inputs(batch=batch, h=166, w=166, txt=256, ctx=ctx, seed=seed)


for _name, _edit in (("qwen_image", False), ("qwen_image_edit", True)):
    register_bench(
        BenchFamily(
            "qwen_image",
            make=make_qwen_image,
            configs={"tiny": QWEN_IMAGE_TINY, "full": QWEN_IMAGE_FULL},
            inputs=lambda size, batch, seed, _e=_edit: _qwen_image_bench_inputs(size, batch, seed, edit=_e),
            n_blocks={"tiny": 2, "full": 30},
            cfg=4.0,
        ),
        name=_name,
    )


# ---------------------------------------------------------------------------- HunyuanVideo (1.5, 1.0)

# Tiny HunyuanVideo 1.5: what detection reads off the keys (ComfyUI's model_detection): heads of
# 128 (num_heads = width / 128), RoPE axes [16, 56, 56], ByT5 glyph text (1472 wide), a SigLIP
# vision projection of 1152 (which makes it 1.5), 65 input channels (32 noise + 32 I2V image latent
# + mask), 32 output channels, patch [1, 1, 1]. 3 double blocks, no single blocks, as 1.5 has.
HUNYUAN_VIDEO15_TINY: dict[str, Any] = dict(
    in_channels=65,
    out_channels=32,
    vec_in_dim=None,
    context_in_dim=64,
    hidden_size=256,
    mlp_ratio=4.0,
    num_heads=2,
    depth=3,
    depth_single_blocks=0,
    axes_dim=[16, 56, 56],
    theta=256,
    patch_size=[1, 1, 1],
    qkv_bias=True,
    guidance_embed=False,
    byt5=True,
    meanflow=False,
    use_cond_type_embedding=True,
    vision_in_dim=1152,
    meanflow_sum=True,
)
# HunyuanVideo 1.5 (8.3 B) at its released widths: 54 double blocks of 16 x 128, Qwen2.5-VL-7B text
# (3584), ByT5 (1472), SigLIP (1152).
HUNYUAN_VIDEO15_FULL: dict[str, Any] = {
    **HUNYUAN_VIDEO15_TINY,
    "context_in_dim": 3584,
    "hidden_size": 2048,
    "num_heads": 16,
    "depth": 54,
}
# Tiny HunyuanVideo 1.0 (same ComfyUI class): CLIP pooled vector (768), guidance embedding, 16 latent
# channels, patch [1, 2, 2], double AND single blocks; the released 1.0 has 20 + 40 of 24 x 128.
HUNYUAN_VIDEO10_TINY: dict[str, Any] = {
    **HUNYUAN_VIDEO15_TINY,
    "in_channels": 16,
    "out_channels": 16,
    "vec_in_dim": 768,
    "depth": 2,
    "depth_single_blocks": 2,
    "patch_size": [1, 2, 2],
    "guidance_embed": True,
    "byt5": False,
    "use_cond_type_embedding": False,
    "vision_in_dim": None,
    "meanflow_sum": False,
}


def hunyuan_video_shapes(config: dict[str, Any], dtype: torch.dtype = torch.float32) -> dict[str, tuple[int, ...]]:
    """Every tensor of a ComfyUI HunyuanVideo with ``config`` (built on the meta device: no memory)."""
    import comfy.ldm.hunyuan_video.model as hv

    # older releases lack meanflow_sum
    return meta_shapes(hv.HunyuanVideo, config, dtype, {f.name for f in dataclasses.fields(hv.HunyuanVideoParams)})


def make_hunyuan_video(
    path: str | Path,
    seed: int = 0,
    config: dict[str, Any] | None = None,
    dtype: torch.dtype = torch.float32,
    device: str = "cpu",
) -> Path:
    """Save a random HunyuanVideo checkpoint (1.5 by default) with ComfyUI key names."""
    return write_random(path, hunyuan_video_shapes(config or HUNYUAN_VIDEO15_TINY, dtype), seed, dtype, device)


def hunyuan_video15_inputs(
    batch: int = 1,
    frames: int = 2,
    h: int = 3,
    w: int = 4,
    txt: int = 7,
    ctx: int = 64,
    byt5: int = 0,
    vision: int = 0,
    image: bool = False,
    seed: int = 1,
) -> dict[str, Any]:
    """Noise, conditioning and an empty latent [B, 32, frames, h, w] for comfy.sample.sample on a
    HunyuanVideo 1.5. ``byt5``: that many ByT5 glyph tokens; ``image``: I2V as
    HunyuanVideo15ImageToVideo sets it (a start-frame latent + mask concatenated to the noise);
    ``vision``: that many SigLIP tokens (its clip_vision_output)."""
    from types import SimpleNamespace

    def rnd(*shape: int, s: int) -> torch.Tensor:
        return torch.randn(*shape, generator=torch.Generator().manual_seed(s))

    cond: dict[str, Any] = {"pooled_output": torch.zeros(1, 1)}  # the model reads it (1.5 has no vector_in)
    if byt5:
        cond["conditioning_byt5small"] = rnd(1, byt5, 1472, s=seed + 4)
    if image:
        start = torch.zeros(batch, 32, frames, h, w)
        start[:, :, :1] = rnd(batch, 32, 1, h, w, s=seed + 5)
        mask = torch.ones(1, 1, frames, h, w)
        mask[:, :, :1] = 0.0
        cond.update(concat_latent_image=start, concat_mask=mask)
    if vision:
        cond["clip_vision_output"] = SimpleNamespace(last_hidden_state=rnd(1, vision, 1152, s=seed + 6))
    return {
        "noise": rnd(batch, 32, frames, h, w, s=seed),
        "positive": [[rnd(1, txt, ctx, s=seed + 1), dict(cond)]],
        "negative": [[rnd(1, txt, ctx, s=seed + 2), dict(cond)]],
        "latent_image": torch.zeros(batch, 32, frames, h, w),
    }


def _hunyuan_video_bench_inputs(size: str, batch: int, seed: int) -> dict[str, Any]:
    ctx = BENCH["hunyuan_video"].configs[size]["context_in_dim"]
    if size == "tiny":
        return hunyuan_video15_inputs(batch=batch, ctx=ctx, byt5=3, seed=seed)
    # 848x480x121, the 480p default: latents are /16 in space, /4 in time -> 31 x 30 x 53 tokens
    return hunyuan_video15_inputs(batch=batch, frames=31, h=30, w=53, txt=256, ctx=ctx, byt5=32, seed=seed)


register_bench(
    BenchFamily(
        "hunyuan_video",
        make=make_hunyuan_video,
        configs={"tiny": HUNYUAN_VIDEO15_TINY, "full": HUNYUAN_VIDEO15_FULL},
        inputs=_hunyuan_video_bench_inputs,
        n_blocks={"tiny": 2, "full": 27},
        cfg=6.0,
    )
)


# ---------------------------------------------------------------------------- Z-Image / Lumina 2 (NextDiT)

# ComfyUI's detection knows a NextDiT only at its released widths (3840: Z-Image, 2304: Lumina 2;
# any other width gets no head count), so the smallest Z-Image it loads is 3840 wide: 2 layers plus
# the 2 + 2 refiner layers detection always builds (about 0.9 B parameters, 3.5 GB in float32). The
# caption width is free (64 here; Qwen3-4B's 2560 in the release); ``cap_pad_token`` makes detection
# pad sequences to multiples of 32, as Z-Image does.
ZIMAGE_TINY: dict[str, Any] = dict(
    patch_size=2,
    in_channels=16,
    dim=3840,
    n_layers=2,
    n_refiner_layers=2,
    n_heads=30,
    n_kv_heads=30,
    multiple_of=256,
    ffn_dim_multiplier=8.0 / 3.0,
    norm_eps=1e-5,
    qk_norm=True,
    cap_feat_dim=64,
    axes_dims=[32, 48, 48],
    axes_lens=[1536, 512, 512],
    rope_theta=256.0,
    z_image_modulation=True,
    time_scale=1000.0,
    pad_tokens_multiple=32,
)
# Z-Image Turbo (6 B) at its released shapes: 30 layers, Qwen3-4B text (2560).
ZIMAGE_TURBO: dict[str, Any] = {**ZIMAGE_TINY, "n_layers": 30, "cap_feat_dim": 2560}
# Lumina 2 (the same class and adapter): 2304 wide, 24 heads with 8 KV heads, Gemma-2 text (2304).
LUMINA2_TINY: dict[str, Any] = {
    **ZIMAGE_TINY,
    "dim": 2304,
    "n_heads": 24,
    "n_kv_heads": 8,
    "ffn_dim_multiplier": 4.0,
    "axes_dims": [32, 32, 32],
    "axes_lens": [300, 512, 512],
    "rope_theta": 10000.0,
    "z_image_modulation": False,
    "time_scale": 1.0,
    "pad_tokens_multiple": None,
}


def nextdit_shapes(config: dict[str, Any], dtype: torch.dtype = torch.float32) -> dict[str, tuple[int, ...]]:
    """Every tensor of a ComfyUI NextDiT with ``config`` (built on the meta device: no memory)."""
    import comfy.ldm.lumina.model

    return meta_shapes(comfy.ldm.lumina.model.NextDiT, config, dtype)


def make_zimage(
    path: str | Path,
    seed: int = 0,
    config: dict[str, Any] | None = None,
    dtype: torch.dtype = torch.float32,
    device: str = "cpu",
) -> Path:
    """Save a random Z-Image (or, with ``LUMINA2_TINY``, Lumina 2) checkpoint with ComfyUI key names."""
    return write_random(path, nextdit_shapes(config or ZIMAGE_TINY, dtype), seed, dtype, device)


def zimage_inputs(
    batch: int = 1, h: int = 4, w: int = 6, txt: int = 7, ctx: int = 64, seed: int = 1, neg_txt: int | None = None
) -> dict[str, Any]:
    """Noise, conditioning and an empty latent [B, 16, h, w] for comfy.sample.sample on a Z-Image
    (``neg_txt``: the negative prompt's token count, default ``txt``)."""

    def rnd(*shape: int, s: int) -> torch.Tensor:
        return torch.randn(*shape, generator=torch.Generator().manual_seed(s))

    return {
        "noise": rnd(batch, 16, h, w, s=seed),
        "positive": [[rnd(1, txt, ctx, s=seed + 1), {}]],
        "negative": [[rnd(1, neg_txt or txt, ctx, s=seed + 2), {}]],
        "latent_image": torch.zeros(batch, 16, h, w),
    }


def _zimage_bench_inputs(size: str, batch: int, seed: int) -> dict[str, Any]:
    ctx = BENCH["zimage"].configs[size]["cap_feat_dim"]
    if size == "tiny":
        return zimage_inputs(batch=batch, ctx=ctx, seed=seed)
    return zimage_inputs(batch=batch, h=128, w=128, txt=256, ctx=ctx, seed=seed)  # 1024² (latents are /8)


register_bench(
    BenchFamily(
        "lumina2",
        make=make_zimage,
        configs={"tiny": ZIMAGE_TINY, "turbo": ZIMAGE_TURBO},
        inputs=_zimage_bench_inputs,
        n_blocks={"tiny": 1, "turbo": 15},
        cfg=1.0,
    ),
    name="zimage",
)
