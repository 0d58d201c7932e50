"""Tiny torch stand-ins for ComfyUI's DiTs, one per registered split family (``STANDINS``): FLUX.2 and
FLUX.1 ``Flux``, ``Chroma``, LTX-AV ``LTXAVModel``, Qwen-Image ``QwenImageTransformer2DModel``, Wan
``WanModel``, ``HunyuanVideo`` and Z-Image / Lumina 2 ``NextDiT`` (CPU, deterministic; the later
families in sections of their own at the end, each naming the ComfyUI code it was read from).

They match what Icarus and the ``arch`` adapters rely on, read from ComfyUI's
comfy/ldm/flux/model.py + layers.py and comfy/ldm/lightricks/model.py + av_model.py (and
written here, much smaller, not copied):

* class names (``Flux``, ``LTXAVModel``, ``LTXVModel``, ``CompressedTimestep``,
  ``GuideAttentionMask``: the LTX adapter finds the last two in the model's own module), the
  attribute names of blocks, heads, embedders and modulation layers, and the state-dict keys the
  adapters detect a family by;
* ``forward`` runs the ``DIFFUSION_MODEL`` wrappers of ``transformer_options`` around ``_forward``
  (positional arguments in ComfyUI's order, so a wrapper finds ``control`` at index 6);
* the block loops call ``transformer_options["patches_replace"]["dit"][(name, i)](args,
  {"original_block": fn})`` with ComfyUI's args dict, and update hidden states in place;
  ``NextDiT`` calls its layers directly, as ComfyUI does (Icarus hooks them by object patches);
* block call signatures are ComfyUI's, so ``arch/*.server_forward`` can call them.

The maths is a small but complete transformer (attention with RoPE, modulation from the time
vector, gated MLPs), so a wrong tensor at the seam changes the output. ``BaseModel`` wraps a
diffusion model the way ComfyUI's ``model_base`` does (``apply_model`` -> ``diffusion_model(...)``).
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F  # noqa: N812


def _wrapped(dm: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], transformer_options: dict) -> Any:
    pe = sys.modules["comfy.patcher_extension"]
    wrappers = pe.get_all_wrappers(pe.WrappersMP.DIFFUSION_MODEL, transformer_options)
    return pe.WrapperExecutor.new_class_executor(dm._forward, dm, wrappers).execute(*args, **kwargs)


def timestep_embedding(t: torch.Tensor, dim: int, time_factor: float = 1000.0) -> torch.Tensor:
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32) / half)
    args = (t.float() * time_factor)[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def rms_norm(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)


class RMSNorm(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x) * self.weight


def _dit_hook(transformer_options: dict, key: tuple[str, int]) -> Any:
    return transformer_options.get("patches_replace", {}).get("dit", {}).get(key)


# ============================================================================= FLUX.2


@dataclass
class FluxParams:
    in_channels: int = 8
    out_channels: int = 8
    context_in_dim: int = 16
    hidden_size: int = 48
    mlp_ratio: float = 2.0
    num_heads: int = 3
    depth: int = 3
    depth_single_blocks: int = 4
    axes_dim: list[int] = field(default_factory=lambda: [4, 4, 4, 4])
    theta: int = 2000
    global_modulation: bool = True
    guidance_embed: bool = False
    vec_in_dim: int | None = None
    txt_ids_dims: list[int] = field(default_factory=lambda: [3])
    default_ref_method: str = "index"
    ref_index_scale: float = 10.0


def rope(pos: torch.Tensor, dim: int, theta: int) -> torch.Tensor:
    """[..., n] positions -> [..., n, dim/2, 2, 2] rotation matrices (float32)."""
    omega = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
    ang = pos.double()[..., None] * omega
    cos, sin = torch.cos(ang), torch.sin(ang)
    return torch.stack([cos, -sin, sin, cos], dim=-1).reshape(*ang.shape, 2, 2).float()


def apply_rope(x: torch.Tensor, pe: torch.Tensor) -> torch.Tensor:
    x2 = x.float().reshape(*x.shape[:-1], -1, 1, 2)
    out = pe[..., 0] * x2[..., 0] + pe[..., 1] * x2[..., 1]
    return out.reshape(*x.shape).type_as(x)


def flux_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pe: torch.Tensor, mask: torch.Tensor | None
) -> torch.Tensor:
    """q, k, v [B, heads, L, d] -> [B, L, heads*d]."""
    q, k = apply_rope(q, pe), apply_rope(k, pe)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    return out.transpose(1, 2).reshape(q.shape[0], q.shape[2], -1)


class EmbedND(nn.Module):
    def __init__(self, dim: int, theta: int, axes_dim: list[int]):
        super().__init__()
        self.dim, self.theta, self.axes_dim = dim, theta, axes_dim

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        emb = torch.cat([rope(ids[..., i], self.axes_dim[i], self.theta) for i in range(ids.shape[-1])], dim=-3)
        return emb.unsqueeze(1)


class MLPEmbedder(nn.Module):
    def __init__(self, in_dim: int, hidden_dim: int):
        super().__init__()
        self.in_layer = nn.Linear(in_dim, hidden_dim, bias=False)
        self.silu = nn.SiLU()
        self.out_layer = nn.Linear(hidden_dim, hidden_dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out_layer(self.silu(self.in_layer(x)))


@dataclass
class ModulationOut:
    shift: torch.Tensor
    scale: torch.Tensor
    gate: torch.Tensor


class Modulation(nn.Module):
    def __init__(self, dim: int, double: bool):
        super().__init__()
        self.is_double = double
        self.multiplier = 6 if double else 3
        self.lin = nn.Linear(dim, self.multiplier * dim, bias=False)

    def forward(self, vec: torch.Tensor) -> tuple[ModulationOut, ModulationOut | None]:
        if vec.ndim == 2:
            vec = vec[:, None, :]
        out = self.lin(F.silu(vec)).chunk(self.multiplier, dim=-1)
        return ModulationOut(*out[:3]), ModulationOut(*out[3:]) if self.is_double else None


class QKNorm(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.query_norm = RMSNorm(dim)
        self.key_norm = RMSNorm(dim)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.query_norm(q).to(v), self.key_norm(k).to(v)


class SelfAttention(nn.Module):
    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.norm = QKNorm(dim // num_heads)
        self.proj = nn.Linear(dim, dim, bias=False)


class SiLUActivation(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = x.chunk(2, dim=-1)
        return F.silu(a) * b


def _mlp(hidden: int, mlp_hidden: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Linear(hidden, 2 * mlp_hidden, bias=False), SiLUActivation(), nn.Linear(mlp_hidden, hidden, bias=False)
    )


def _mod(x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor | None = None) -> torch.Tensor:
    return torch.addcmul(shift, x, scale) if shift is not None else x * scale


def _heads(qkv: torch.Tensor, heads: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    q, k, v = qkv.view(qkv.shape[0], qkv.shape[1], 3, heads, -1).permute(2, 0, 3, 1, 4)
    return q, k, v


class DoubleStreamBlock(nn.Module):
    def __init__(self, hidden: int, num_heads: int, mlp_ratio: float, modulation: bool = False):
        super().__init__()
        self.num_heads = num_heads
        if modulation:  # FLUX.1: each block modulates from the time vector itself
            self.img_mod = Modulation(hidden, double=True)
            self.txt_mod = Modulation(hidden, double=True)
        mlp_hidden = int(hidden * mlp_ratio)
        self.img_norm1 = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.img_attn = SelfAttention(hidden, num_heads)
        self.img_norm2 = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.img_mlp = _mlp(hidden, mlp_hidden)
        self.txt_norm1 = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.txt_attn = SelfAttention(hidden, num_heads)
        self.txt_norm2 = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.txt_mlp = _mlp(hidden, mlp_hidden)

    def forward(
        self,
        img: torch.Tensor,
        txt: torch.Tensor,
        vec: Any,
        pe: torch.Tensor,
        attn_mask: torch.Tensor | None = None,
        modulation_dims_img: Any = None,
        modulation_dims_txt: Any = None,
        transformer_options: dict | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if modulation_dims_img is not None or modulation_dims_txt is not None:
            raise NotImplementedError("stand-in: per-token modulation is not modelled")
        (im1, im2), (tm1, tm2) = (self.img_mod(vec), self.txt_mod(vec)) if hasattr(self, "img_mod") else vec
        iq, ik, iv = _heads(self.img_attn.qkv(_mod(self.img_norm1(img), 1 + im1.scale, im1.shift)), self.num_heads)
        iq, ik = self.img_attn.norm(iq, ik, iv)
        tq, tk, tv = _heads(self.txt_attn.qkv(_mod(self.txt_norm1(txt), 1 + tm1.scale, tm1.shift)), self.num_heads)
        tq, tk = self.txt_attn.norm(tq, tk, tv)
        attn = flux_attention(
            torch.cat((tq, iq), 2), torch.cat((tk, ik), 2), torch.cat((tv, iv), 2), pe=pe, mask=attn_mask
        )
        t_attn, i_attn = attn[:, : txt.shape[1]], attn[:, txt.shape[1] :]
        img += self.img_attn.proj(i_attn) * im1.gate
        img += self.img_mlp(_mod(self.img_norm2(img), 1 + im2.scale, im2.shift)) * im2.gate
        txt += self.txt_attn.proj(t_attn) * tm1.gate
        txt += self.txt_mlp(_mod(self.txt_norm2(txt), 1 + tm2.scale, tm2.shift)) * tm2.gate
        return img, txt


class SingleStreamBlock(nn.Module):
    def __init__(self, hidden: int, num_heads: int, mlp_ratio: float, modulation: bool = False):
        super().__init__()
        if modulation:
            self.modulation = Modulation(hidden, double=False)
        self.hidden_size, self.num_heads = hidden, num_heads
        self.mlp_hidden = int(hidden * mlp_ratio)
        self.linear1 = nn.Linear(hidden, 3 * hidden + 2 * self.mlp_hidden, bias=False)
        self.linear2 = nn.Linear(hidden + self.mlp_hidden, hidden, bias=False)
        self.norm = QKNorm(hidden // num_heads)
        self.pre_norm = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.mlp_act = SiLUActivation()

    def forward(
        self,
        x: torch.Tensor,
        vec: Any,
        pe: torch.Tensor,
        attn_mask: torch.Tensor | None = None,
        modulation_dims: Any = None,
        transformer_options: dict | None = None,
    ) -> torch.Tensor:
        if modulation_dims is not None:
            raise NotImplementedError("stand-in: per-token modulation is not modelled")
        if hasattr(self, "modulation"):
            vec, _ = self.modulation(vec)
        qkv, mlp = torch.split(
            self.linear1(_mod(self.pre_norm(x), 1 + vec.scale, vec.shift)),
            [3 * self.hidden_size, 2 * self.mlp_hidden],
            -1,
        )
        q, k, v = _heads(qkv, self.num_heads)
        q, k = self.norm(q, k, v)
        attn = flux_attention(q, k, v, pe=pe, mask=attn_mask)
        x += self.linear2(torch.cat((attn, self.mlp_act(mlp)), 2)) * vec.gate
        return x


class LastLayer(nn.Module):
    def __init__(self, hidden: int, out_channels: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden, out_channels, bias=False)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden, 2 * hidden, bias=False))

    def forward(self, x: torch.Tensor, vec: torch.Tensor, modulation_dims: Any = None) -> torch.Tensor:
        if vec.ndim == 2:
            vec = vec[:, None, :]
        shift, scale = self.adaLN_modulation(vec).chunk(2, dim=-1)
        return self.linear(_mod(self.norm_final(x), 1 + scale, shift))


class Flux(nn.Module):
    """FLUX.2's DiT: ComfyUI's ``Flux`` with ``global_modulation`` (patch size 1); without it, FLUX.1's
    (per-block modulation, guidance and pooled-text embedders: ``flux1``)."""

    def __init__(self, **kwargs: Any):
        super().__init__()
        p = self.params = FluxParams(**kwargs)
        self.hidden_size, self.num_heads = p.hidden_size, p.num_heads
        self.in_channels, self.out_channels = p.in_channels, p.out_channels
        self.pe_embedder = EmbedND(p.hidden_size // p.num_heads, p.theta, p.axes_dim)
        self.img_in = nn.Linear(p.in_channels, p.hidden_size, bias=False)
        self.time_in = MLPEmbedder(256, p.hidden_size)
        self.vector_in = MLPEmbedder(p.vec_in_dim, p.hidden_size) if p.vec_in_dim else None
        self.guidance_in = MLPEmbedder(256, p.hidden_size) if p.guidance_embed else nn.Identity()
        self.txt_in = nn.Linear(p.context_in_dim, p.hidden_size, bias=False)
        self.txt_norm = None
        own = not p.global_modulation
        self.double_blocks = nn.ModuleList(
            DoubleStreamBlock(p.hidden_size, p.num_heads, p.mlp_ratio, own) for _ in range(p.depth)
        )
        self.single_blocks = nn.ModuleList(
            SingleStreamBlock(p.hidden_size, p.num_heads, p.mlp_ratio, own) for _ in range(p.depth_single_blocks)
        )
        self.final_layer = LastLayer(p.hidden_size, p.out_channels)
        if p.global_modulation:
            self.double_stream_modulation_img = Modulation(p.hidden_size, double=True)
            self.double_stream_modulation_txt = Modulation(p.hidden_size, double=True)
            self.single_stream_modulation = Modulation(p.hidden_size, double=False)

    def forward(
        self,
        x: torch.Tensor,
        timestep: torch.Tensor,
        context: torch.Tensor,
        y: Any = None,
        guidance: Any = None,
        ref_latents: Any = None,
        control: Any = None,
        transformer_options: dict | None = None,
        **kwargs: Any,
    ) -> torch.Tensor:
        to = transformer_options or {}
        return _wrapped(self, (x, timestep, context, y, guidance, ref_latents, control, to), kwargs, to)

    def process_img(self, x: torch.Tensor, index: float = 0) -> tuple[torch.Tensor, torch.Tensor]:
        b, c, h, w = x.shape
        img = x.reshape(b, c, h * w).transpose(1, 2)
        ids = torch.zeros(h, w, len(self.params.axes_dim))
        ids[..., 0] = index
        ids[..., 1] = torch.arange(h, dtype=torch.float32)[:, None]
        ids[..., 2] = torch.arange(w, dtype=torch.float32)[None, :]
        return img, ids.reshape(1, h * w, -1).expand(b, -1, -1)

    def _forward(
        self,
        x: torch.Tensor,
        timestep: torch.Tensor,
        context: torch.Tensor,
        y: Any = None,
        guidance: Any = None,
        ref_latents: Any = None,
        control: Any = None,
        transformer_options: dict | None = None,
        **kwargs: Any,
    ) -> torch.Tensor:
        to = transformer_options or {}
        b, _, h, w = x.shape
        img, img_ids = self.process_img(x)
        img_tokens = img.shape[1]
        if ref_latents is not None:  # the "index" reference method: tokens appended, axis 0 = 10 * k
            counts = []
            for k, ref in enumerate(ref_latents, start=1):
                r, r_ids = self.process_img(ref, index=k * self.params.ref_index_scale)
                img, img_ids = torch.cat([img, r], 1), torch.cat([img_ids, r_ids], 1)
                counts.append(r.shape[1])
            to = {**to, "reference_image_num_tokens": counts}
        txt_ids = torch.zeros(b, context.shape[1], len(self.params.axes_dim))
        for i in self.params.txt_ids_dims:
            txt_ids[..., i] = torch.arange(context.shape[1], dtype=torch.float32)
        out = self.forward_orig(
            img, img_ids, context, txt_ids, timestep, control, to, kwargs.get("attention_mask"), y, guidance
        )
        out = out[:, :img_tokens]
        return out.transpose(1, 2).reshape(b, self.out_channels, h, w)

    def forward_orig(
        self,
        img: torch.Tensor,
        img_ids: torch.Tensor,
        txt: torch.Tensor,
        txt_ids: torch.Tensor,
        timesteps: torch.Tensor,
        control: Any,
        transformer_options: dict,
        attn_mask: torch.Tensor | None,
        y: torch.Tensor | None = None,
        guidance: torch.Tensor | None = None,
    ) -> torch.Tensor:
        to = dict(transformer_options)
        img = self.img_in(img)
        vec = self.time_in(timestep_embedding(timesteps, 256).to(img.dtype))
        if self.params.guidance_embed and guidance is not None:
            vec = vec + self.guidance_in(timestep_embedding(guidance, 256).to(img.dtype))
        if self.vector_in is not None:
            y = y if y is not None else torch.zeros(img.shape[0], self.params.vec_in_dim)
            vec = vec + self.vector_in(y)
        txt = self.txt_in(txt)
        pe = self.pe_embedder(torch.cat((txt_ids, img_ids), dim=1))
        vec_orig = vec
        glob = self.params.global_modulation
        dvec = (
            (self.double_stream_modulation_img(vec_orig), self.double_stream_modulation_txt(vec_orig)) if glob else vec
        )
        to["total_blocks"], to["block_type"] = len(self.double_blocks), "double"
        for i, block in enumerate(self.double_blocks):
            to["block_index"] = i
            hook = _dit_hook(to, ("double_block", i))
            if hook is not None:

                def block_wrap(args: dict, _block: nn.Module = block) -> dict:
                    o = {}
                    o["img"], o["txt"] = _block(
                        img=args["img"],
                        txt=args["txt"],
                        vec=args["vec"],
                        pe=args["pe"],
                        attn_mask=args.get("attn_mask"),
                        transformer_options=args.get("transformer_options"),
                    )
                    return o

                args = {
                    "img": img,
                    "txt": txt,
                    "vec": dvec,
                    "pe": pe,
                    "attn_mask": attn_mask,
                    "transformer_options": to,
                }
                out = hook(args, {"original_block": block_wrap})
                img, txt = out["img"], out["txt"]
            else:
                img, txt = block(img=img, txt=txt, vec=dvec, pe=pe, attn_mask=attn_mask, transformer_options=to)
            if control is not None:
                add = control.get("input", [])[i] if i < len(control.get("input", [])) else None
                if add is not None:
                    img[:, : add.shape[1]] += add
        img = torch.cat((txt, img), 1)
        svec = self.single_stream_modulation(vec_orig)[0] if glob else vec
        to["total_blocks"], to["block_type"] = len(self.single_blocks), "single"
        to["img_slice"] = [txt.shape[1], img.shape[1]]
        for i, block in enumerate(self.single_blocks):
            to["block_index"] = i
            hook = _dit_hook(to, ("single_block", i))
            if hook is not None:

                def single_wrap(args: dict, _block: nn.Module = block) -> dict:
                    return {
                        "img": _block(
                            args["img"],
                            vec=args["vec"],
                            pe=args["pe"],
                            attn_mask=args.get("attn_mask"),
                            transformer_options=args.get("transformer_options"),
                        )
                    }

                args = {"img": img, "vec": svec, "pe": pe, "attn_mask": attn_mask, "transformer_options": to}
                img = hook(args, {"original_block": single_wrap})["img"]
            else:
                img = block(img, vec=svec, pe=pe, attn_mask=attn_mask, transformer_options=to)
            if control is not None:
                add = control.get("output", [])[i] if i < len(control.get("output", [])) else None
                if add is not None:
                    img[:, txt.shape[1] : txt.shape[1] + add.shape[1]] += add
        img = img[:, txt.shape[1] :]
        return self.final_layer(img, vec_orig)


# ============================================================================= LTX-AV


class CompressedTimestep:
    """A per-token timestep table stored one row per frame (ComfyUI's slots and methods)."""

    __slots__ = ("data", "batch_size", "num_frames", "patches_per_frame", "feature_dim")

    def __init__(self, tensor: torch.Tensor, patches_per_frame: int | None, per_frame: bool = False):
        self.batch_size, n, self.feature_dim = tensor.shape
        if per_frame and patches_per_frame is not None:
            self.patches_per_frame, self.num_frames, self.data = patches_per_frame, n, tensor
        elif patches_per_frame is not None and n >= patches_per_frame and n % patches_per_frame == 0:
            self.patches_per_frame = patches_per_frame
            self.num_frames = n // patches_per_frame
            self.data = tensor.view(self.batch_size, self.num_frames, patches_per_frame, -1)[:, :, 0].contiguous()
        else:
            self.patches_per_frame, self.num_frames, self.data = 1, n, tensor

    def expand(self) -> torch.Tensor:
        if self.patches_per_frame == 1:
            return self.data
        e = self.data.unsqueeze(2).expand(self.batch_size, self.num_frames, self.patches_per_frame, self.feature_dim)
        return e.reshape(self.batch_size, -1, self.feature_dim)

    def expand_for_computation(self, table: torch.Tensor, batch_size: int, indices: slice = slice(None)) -> tuple:
        rows = self.data.reshape(batch_size, self.data.shape[1], table.shape[0], -1)[:, :, indices]
        vals = (table[indices][None, None].to(self.data) + rows).unbind(dim=2)
        if self.patches_per_frame == 1:
            return vals
        return tuple(
            v.unsqueeze(2)
            .expand(batch_size, self.num_frames, self.patches_per_frame, -1)
            .reshape(batch_size, -1, v.shape[-1])
            for v in vals
        )


class GuideAttentionMask:
    """Per-guide self-attention attenuation (only its slots matter here)."""

    __slots__ = ("guide_start", "tracked_count", "noisy_mask", "tracked_mask")


def ltx_rope(pos: torch.Tensor, heads: int, head_dim: int, batch: int) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """Split-mode RoPE for positions [L] -> (cos, sin [B, heads, L, head_dim/2], True)."""
    half = head_dim // 2
    freqs = 1.0 / (10000 ** (torch.arange(half, dtype=torch.float64) / half))
    ang = pos.double()[:, None] * freqs[None] + torch.arange(heads, dtype=torch.float64)[:, None, None] * 0.1
    cos, sin = torch.cos(ang).float(), torch.sin(ang).float()
    return cos.expand(batch, -1, -1, -1).clone(), sin.expand(batch, -1, -1, -1).clone(), True


def _apply_ltx_rope(x: torch.Tensor, pe: Any) -> torch.Tensor:
    cos, sin = pe[0], pe[1]
    a, b = x.chunk(2, dim=-1)
    return torch.cat([a * cos - b * sin, b * cos + a * sin], dim=-1)


class CrossAttention(nn.Module):
    def __init__(self, query_dim: int, context_dim: int | None, heads: int, dim_head: int):
        super().__init__()
        inner = heads * dim_head
        self.heads = heads
        self.to_q = nn.Linear(query_dim, inner)
        self.to_k = nn.Linear(context_dim or query_dim, inner)
        self.to_v = nn.Linear(context_dim or query_dim, inner)
        self.q_norm = RMSNorm(inner)
        self.k_norm = RMSNorm(inner)
        self.to_out = nn.Sequential(nn.Linear(inner, query_dim))

    def forward(
        self,
        x: torch.Tensor,
        context: torch.Tensor | None = None,
        mask: Any = None,
        pe: Any = None,
        k_pe: Any = None,
        transformer_options: dict | None = None,
    ) -> torch.Tensor:
        ctx = x if context is None else context
        q, k, v = self.q_norm(self.to_q(x)), self.k_norm(self.to_k(ctx)), self.to_v(ctx)
        b, h = x.shape[0], self.heads
        q, k, v = (t.view(b, t.shape[1], h, -1).transpose(1, 2) for t in (q, k, v))
        if pe is not None:
            q = _apply_ltx_rope(q, pe)
            k = _apply_ltx_rope(k, pe if k_pe is None else k_pe)
        if isinstance(mask, GuideAttentionMask):
            raise NotImplementedError("stand-in: guide attention masks are not modelled")
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.to_out(out.transpose(1, 2).reshape(b, x.shape[1], -1))


def _ff(dim: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(approximate="tanh"), nn.Linear(2 * dim, dim))


class BasicAVTransformerBlock(nn.Module):
    def __init__(self, v_dim: int, v_heads: int, a_dim: int, a_heads: int):
        super().__init__()
        self.attn1 = CrossAttention(v_dim, None, v_heads, v_dim // v_heads)
        self.attn2 = CrossAttention(v_dim, v_dim, v_heads, v_dim // v_heads)
        self.audio_attn1 = CrossAttention(a_dim, None, a_heads, a_dim // a_heads)
        self.audio_attn2 = CrossAttention(a_dim, a_dim, a_heads, a_dim // a_heads)
        self.audio_to_video_attn = CrossAttention(v_dim, a_dim, a_heads, a_dim // a_heads)
        self.video_to_audio_attn = CrossAttention(a_dim, v_dim, a_heads, a_dim // a_heads)
        self.ff = _ff(v_dim)
        self.audio_ff = _ff(a_dim)
        self.scale_shift_table = nn.Parameter(torch.randn(6, v_dim) / v_dim**0.5)
        self.audio_scale_shift_table = nn.Parameter(torch.randn(6, a_dim) / a_dim**0.5)
        self.scale_shift_table_a2v_ca_audio = nn.Parameter(torch.randn(5, a_dim) / a_dim**0.5)
        self.scale_shift_table_a2v_ca_video = nn.Parameter(torch.randn(5, v_dim) / v_dim**0.5)

    @staticmethod
    def ada(table: torch.Tensor, batch: int, ts: Any, indices: slice = slice(None)) -> tuple:
        if isinstance(ts, CompressedTimestep):
            return ts.expand_for_computation(table, batch, indices)
        rows = ts.reshape(batch, ts.shape[1], table.shape[0], -1)[:, :, indices]
        return (table[indices][None, None].to(ts) + rows).unbind(dim=2)

    def forward(
        self,
        x: tuple[torch.Tensor, torch.Tensor],
        v_context: Any = None,
        a_context: Any = None,
        attention_mask: Any = None,
        v_timestep: Any = None,
        a_timestep: Any = None,
        v_pe: Any = None,
        a_pe: Any = None,
        v_cross_pe: Any = None,
        a_cross_pe: Any = None,
        v_cross_scale_shift_timestep: Any = None,
        a_cross_scale_shift_timestep: Any = None,
        v_cross_gate_timestep: Any = None,
        a_cross_gate_timestep: Any = None,
        transformer_options: dict | None = None,
        self_attention_mask: Any = None,
        v_prompt_timestep: Any = None,
        a_prompt_timestep: Any = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        to = transformer_options or {}
        vx, ax = x
        run_vx, run_ax = to.get("run_vx", True), to.get("run_ax", True) and ax.numel() > 0
        run_a2v = run_vx and to.get("a2v_cross_attn", True) and ax.numel() > 0
        run_v2a = run_ax and to.get("v2a_cross_attn", True)
        b = vx.shape[0]
        if run_vx:
            shift, scale = self.ada(self.scale_shift_table, b, v_timestep, slice(0, 2))
            out = self.attn1(rms_norm(vx) * (1 + scale) + shift, pe=v_pe, mask=self_attention_mask)
            vx.addcmul_(out, self.ada(self.scale_shift_table, b, v_timestep, slice(2, 3))[0])
            q = rms_norm(vx) if v_prompt_timestep is None else rms_norm(vx) * (1 + v_prompt_timestep.mean(1, True))
            vx.add_(self.attn2(q, context=v_context, mask=attention_mask))
        if run_ax:
            shift, scale = self.ada(self.audio_scale_shift_table, b, a_timestep, slice(0, 2))
            out = self.audio_attn1(rms_norm(ax) * (1 + scale) + shift, pe=a_pe)
            ax.addcmul_(out, self.ada(self.audio_scale_shift_table, b, a_timestep, slice(2, 3))[0])
            q = rms_norm(ax) if a_prompt_timestep is None else rms_norm(ax) * (1 + a_prompt_timestep.mean(1, True))
            ax.add_(self.audio_attn2(q, context=a_context, mask=attention_mask))
        if run_a2v or run_v2a:
            vn, an = rms_norm(vx), rms_norm(ax)
            a_ss = self.ada(self.scale_shift_table_a2v_ca_audio[:4], b, a_cross_scale_shift_timestep)
            v_ss = self.ada(self.scale_shift_table_a2v_ca_video[:4], b, v_cross_scale_shift_timestep)
            if run_a2v:
                out = self.audio_to_video_attn(
                    vn * (1 + v_ss[0]) + v_ss[1], context=an * (1 + a_ss[0]) + a_ss[1], pe=v_cross_pe, k_pe=a_cross_pe
                )
                vx.addcmul_(out, self.ada(self.scale_shift_table_a2v_ca_video[4:], b, v_cross_gate_timestep)[0])
            if run_v2a:
                out = self.video_to_audio_attn(
                    an * (1 + a_ss[2]) + a_ss[3], context=vn * (1 + v_ss[2]) + v_ss[3], pe=a_cross_pe, k_pe=v_cross_pe
                )
                ax.addcmul_(out, self.ada(self.scale_shift_table_a2v_ca_audio[4:], b, a_cross_gate_timestep)[0])
        if run_vx:
            shift, scale = self.ada(self.scale_shift_table, b, v_timestep, slice(3, 5))
            out = self.ff(rms_norm(vx) * (1 + scale) + shift)
            vx.addcmul_(out, self.ada(self.scale_shift_table, b, v_timestep, slice(5, 6))[0])
        if run_ax:
            shift, scale = self.ada(self.audio_scale_shift_table, b, a_timestep, slice(3, 5))
            out = self.audio_ff(rms_norm(ax) * (1 + scale) + shift)
            ax.addcmul_(out, self.ada(self.audio_scale_shift_table, b, a_timestep, slice(5, 6))[0])
        return vx, ax


class TimestepEmbedder(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.linear_1 = nn.Linear(64, dim)
        self.act = nn.SiLU()
        self.linear_2 = nn.Linear(dim, dim)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return self.linear_2(self.act(self.linear_1(timestep_embedding(t, 64, time_factor=1.0))))


class TimestepEmbedding(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.timestep_embedder = TimestepEmbedder(dim)

    def forward(self, t: torch.Tensor, hidden_dtype: Any = None, **_: Any) -> torch.Tensor:
        return self.timestep_embedder(t).to(hidden_dtype or torch.float32)


class AdaLayerNormSingle(nn.Module):
    """timestep [N] -> (coefficient * dim modulation [N, k*dim], embedded timestep [N, dim])."""

    def __init__(self, dim: int, coefficient: int = 6):
        super().__init__()
        self.emb = TimestepEmbedding(dim)
        self.silu = nn.SiLU()
        self.linear = nn.Linear(dim, coefficient * dim)

    def forward(
        self, timestep: torch.Tensor, added_cond_kwargs: Any = None, batch_size: int = 1, hidden_dtype: Any = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        emb = self.emb(timestep, hidden_dtype=hidden_dtype)
        return self.linear(self.silu(emb)), emb


@dataclass
class LTXParams:
    in_channels: int = 8  # video latent channels (patch size 1)
    audio_in_channels: int = 8  # audio latent channels x frequency bins, patchified
    caption_channels: int = 12
    num_attention_heads: int = 2
    attention_head_dim: int = 16
    audio_num_attention_heads: int = 2
    audio_attention_head_dim: int = 8
    num_layers: int = 4


class LTXVModel(nn.Module):
    """Video-only LTXV: only its name matters (the adapters refuse it)."""

    def __init__(self, **kwargs: Any):
        super().__init__()
        self.transformer_blocks = nn.ModuleList([nn.Linear(4, 4)])


class LTXAVModel(LTXVModel):
    """LTX-2.x audio+video DiT: one list of AV blocks, both output heads."""

    def __init__(self, **kwargs: Any):
        nn.Module.__init__(self)
        p = self.params = LTXParams(**kwargs)
        self.inner_dim = v = p.num_attention_heads * p.attention_head_dim
        self.audio_inner_dim = a = p.audio_num_attention_heads * p.audio_attention_head_dim
        self.patchify_proj = nn.Linear(p.in_channels, v)
        self.audio_patchify_proj = nn.Linear(p.audio_in_channels, a)
        self.adaln_single = AdaLayerNormSingle(v)
        self.audio_adaln_single = AdaLayerNormSingle(a)
        self.av_ca_video_scale_shift_adaln_single = AdaLayerNormSingle(v, 4)
        self.av_ca_a2v_gate_adaln_single = AdaLayerNormSingle(v, 1)
        self.av_ca_audio_scale_shift_adaln_single = AdaLayerNormSingle(a, 4)
        self.av_ca_v2a_gate_adaln_single = AdaLayerNormSingle(a, 1)
        self.caption_projection = nn.Linear(p.caption_channels, v)
        self.audio_caption_projection = nn.Linear(p.caption_channels, a)
        self.transformer_blocks = nn.ModuleList(
            BasicAVTransformerBlock(v, p.num_attention_heads, a, p.audio_num_attention_heads)
            for _ in range(p.num_layers)
        )
        self.scale_shift_table = nn.Parameter(torch.randn(2, v) / v**0.5)
        self.norm_out = nn.LayerNorm(v, elementwise_affine=False, eps=1e-6)
        self.proj_out = nn.Linear(v, p.in_channels)
        self.audio_scale_shift_table = nn.Parameter(torch.randn(2, a) / a**0.5)
        self.audio_norm_out = nn.LayerNorm(a, elementwise_affine=False, eps=1e-6)
        self.audio_proj_out = nn.Linear(a, p.audio_in_channels)

    def forward(
        self,
        x: list[torch.Tensor],
        timestep: Any,
        context: torch.Tensor,
        attention_mask: Any = None,
        frame_rate: float = 25,
        transformer_options: dict | None = None,
        keyframe_idxs: Any = None,
        **kwargs: Any,
    ) -> list[torch.Tensor]:
        if isinstance(timestep, (tuple, list)) and len(timestep) == 2:
            timestep, kwargs["a_timestep"] = timestep
        else:
            kwargs["a_timestep"] = timestep
        to = transformer_options or {}
        denoise_mask = kwargs.pop("denoise_mask", None)
        args = (x, timestep, context, attention_mask, frame_rate, to, keyframe_idxs)
        return _wrapped(self, args, {"denoise_mask": denoise_mask, **kwargs}, to)

    def _forward(
        self,
        x: list[torch.Tensor],
        timestep: torch.Tensor,
        context: torch.Tensor,
        attention_mask: Any,
        frame_rate: float = 25,
        transformer_options: dict | None = None,
        keyframe_idxs: Any = None,
        denoise_mask: Any = None,
        **kwargs: Any,
    ) -> list[torch.Tensor]:
        to = transformer_options or {}
        p = self.params
        v_lat, a_lat = x
        b, _, frames, h, w = v_lat.shape
        ppf = h * w
        vx = self.patchify_proj(v_lat.flatten(2).transpose(1, 2))  # [B, F*h*w, D]
        ax = self.audio_patchify_proj(a_lat.permute(0, 2, 1, 3).flatten(2))  # [B, T, Da]
        ref = kwargs.get("ref_audio")
        n_ref = 0
        if isinstance(ref, dict) and isinstance(ref.get("tokens"), torch.Tensor):  # ID-LoRA reference audio
            tokens = self.audio_patchify_proj(ref["tokens"])
            n_ref = tokens.shape[1]
            ax = torch.cat([tokens, ax], 1)
        dtype = vx.dtype
        # timesteps: video one row per frame (compressed), audio per token (reference tokens at t=0)
        v_ts = timestep.float().view(b, 1).expand(b, frames)
        v_t, v_emb = self.adaln_single(v_ts.flatten() * 1000, batch_size=b, hidden_dtype=dtype)
        v_timestep = CompressedTimestep(v_t.view(b, frames, -1), ppf, per_frame=True)
        v_embedded = CompressedTimestep(v_emb.view(b, frames, -1), ppf, per_frame=True)
        a_ts = kwargs["a_timestep"].float().view(b, 1).expand(b, ax.shape[1]).clone()
        a_ts[:, :n_ref] = 0
        a_t, a_emb = self.audio_adaln_single(a_ts.flatten() * 1000, batch_size=b, hidden_dtype=dtype)
        v_tok = timestep.float().view(b, 1).expand(b, frames * ppf).flatten() * 1000
        vss, _ = self.av_ca_video_scale_shift_adaln_single(v_tok, batch_size=b, hidden_dtype=dtype)
        a2v, _ = self.av_ca_a2v_gate_adaln_single(v_tok.flip(0), batch_size=b, hidden_dtype=dtype)
        ass, _ = self.av_ca_audio_scale_shift_adaln_single(a_ts.flatten() * 1000, batch_size=b, hidden_dtype=dtype)
        v2a, _ = self.av_ca_v2a_gate_adaln_single(a_ts.flatten() * 500, batch_size=b, hidden_dtype=dtype)
        v_cross_ss = CompressedTimestep(vss.view(b, frames * ppf, -1), ppf)
        v_cross_gate = CompressedTimestep(a2v.view(b, frames * ppf, -1), ppf)
        a_cross_ss, a_cross_gate = ass.view(b, ax.shape[1], -1), v2a.view(b, ax.shape[1], -1)
        a_timestep, a_embedded = a_t.view(b, ax.shape[1], -1), a_emb.view(b, ax.shape[1], -1)
        v_context, a_context = self.caption_projection(context), self.audio_caption_projection(context)
        if attention_mask is not None:  # [B, L] keep = 1 -> additive [B, 1, 1, L]
            attention_mask = ((attention_mask.to(dtype) - 1) * 1e4).view(b, 1, 1, -1)
        v_pos = torch.arange(frames * ppf, dtype=torch.float32)
        a_pos = torch.arange(ax.shape[1], dtype=torch.float32)
        v_pe = ltx_rope(v_pos, p.num_attention_heads, p.attention_head_dim, b)
        a_pe = ltx_rope(a_pos, p.audio_num_attention_heads, p.audio_attention_head_dim, b)
        v_cross_pe = ltx_rope(v_pos // ppf, p.audio_num_attention_heads, p.audio_attention_head_dim, b)
        a_cross_pe = ltx_rope(a_pos * frames / max(ax.shape[1], 1), p.audio_num_attention_heads,
                              p.audio_attention_head_dim, b)  # fmt: skip
        block_args = {
            "v_context": v_context,
            "a_context": a_context,
            "attention_mask": attention_mask,
            "v_timestep": v_timestep,
            "a_timestep": a_timestep,
            "v_pe": v_pe,
            "a_pe": a_pe,
            "v_cross_pe": v_cross_pe,
            "a_cross_pe": a_cross_pe,
            "v_cross_scale_shift_timestep": v_cross_ss,
            "a_cross_scale_shift_timestep": a_cross_ss,
            "v_cross_gate_timestep": v_cross_gate,
            "a_cross_gate_timestep": a_cross_gate,
            "self_attention_mask": None,
            "v_prompt_timestep": None,
            "a_prompt_timestep": None,
        }
        for i, block in enumerate(self.transformer_blocks):
            hook = _dit_hook(to, ("double_block", i))
            if hook is not None:

                def block_wrap(args: dict, _block: nn.Module = block) -> dict:
                    kw = {k: args.get(k) for k in block_args}
                    return {"img": _block(args["img"], transformer_options=args["transformer_options"], **kw)}

                out = hook({"img": (vx, ax), **block_args, "transformer_options": to}, {"original_block": block_wrap})
                vx, ax = out["img"]
            else:
                vx, ax = block((vx, ax), transformer_options=to, **block_args)
        # output heads
        if n_ref:
            ax = ax[:, n_ref:]
            if a_embedded.shape[1] > 1:
                a_embedded = a_embedded[:, n_ref:]
        ve = v_embedded.expand()
        table = self.scale_shift_table[None, None].to(device=vx.device, dtype=vx.dtype) + ve[:, :, None]
        vx = self.proj_out(self.norm_out(vx) * (1 + table[:, :, 1]) + table[:, :, 0])
        table = self.audio_scale_shift_table[None, None].to(device=a_embedded.device, dtype=a_embedded.dtype)
        table = table + a_embedded[:, :, None]
        ax = self.audio_proj_out(self.audio_norm_out(ax) * (1 + table[:, :, 1]) + table[:, :, 0])
        v_out = vx.transpose(1, 2).reshape(b, -1, frames, h, w)
        a_out = ax.view(b, a_lat.shape[2], a_lat.shape[1], a_lat.shape[3]).permute(0, 2, 1, 3)
        return [v_out, a_out]


# ============================================================================= FLUX.1 + Chroma


def flux1(**kwargs: Any) -> Flux:
    """FLUX.1 dev's DiT (``Flux`` without global modulation, guidance and pooled-text embedders)."""
    cfg: dict[str, Any] = dict(global_modulation=False, guidance_embed=True, vec_in_dim=6, axes_dim=[4, 4, 8])
    cfg["txt_ids_dims"] = []
    return Flux(**{**cfg, **kwargs})


class Approximator(nn.Module):
    """Chroma's ``distilled_guidance_layer``: [B, rows, 64] -> [B, rows, hidden]."""

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int, n_layers: int):
        super().__init__()
        self.in_proj = nn.Linear(in_dim, hidden_dim)
        self.layers = nn.ModuleList(MLPEmbedder(hidden_dim, hidden_dim) for _ in range(n_layers))
        self.norms = nn.ModuleList(RMSNorm(hidden_dim) for _ in range(n_layers))
        self.out_proj = nn.Linear(hidden_dim, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.in_proj(x)
        for layer, norm in zip(self.layers, self.norms, strict=True):
            x = x + layer(norm(x))
        return self.out_proj(x)


class ChromaLastLayer(nn.Module):
    def __init__(self, hidden: int, out_channels: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden, out_channels)

    def forward(self, x: torch.Tensor, vec: Any) -> torch.Tensor:
        shift, scale = vec
        return self.linear(torch.addcmul(shift, 1 + scale, self.norm_final(x)))


def _double_wrap(block: nn.Module, args: dict) -> dict:
    img, txt = block(
        img=args["img"],
        txt=args["txt"],
        vec=args["vec"],
        pe=args["pe"],
        attn_mask=args.get("attn_mask"),
        transformer_options=args.get("transformer_options"),
    )
    return {"img": img, "txt": txt}


def _single_wrap(block: nn.Module, args: dict) -> dict:
    x = block(
        args["img"],
        vec=args["vec"],
        pe=args["pe"],
        attn_mask=args.get("attn_mask"),
        transformer_options=args.get("transformer_options"),
    )
    return {"img": x}


class Chroma(nn.Module):
    """Chroma's DiT: FLUX-style blocks without modulation weights, fed rows of the approximator's output
    (ComfyUI's ``Chroma.get_modulations`` layout: singles, doubles' image rows, their text rows, final last)."""

    MOD_ROWS = 344

    def __init__(self, **kwargs: Any):
        super().__init__()
        p = self.params = FluxParams(**{"axes_dim": [4, 4, 8], "txt_ids_dims": [], **kwargs})
        self.hidden_size, self.num_heads = p.hidden_size, p.num_heads
        self.in_channels, self.out_channels = p.in_channels, p.out_channels
        self.pe_embedder = EmbedND(p.hidden_size // p.num_heads, p.theta, p.axes_dim)
        self.img_in = nn.Linear(p.in_channels, p.hidden_size)
        self.txt_in = nn.Linear(p.context_in_dim, p.hidden_size)
        self.distilled_guidance_layer = Approximator(16, 32, p.hidden_size, 2)
        self.double_blocks = nn.ModuleList(
            DoubleStreamBlock(p.hidden_size, p.num_heads, p.mlp_ratio) for _ in range(p.depth)
        )
        self.single_blocks = nn.ModuleList(
            SingleStreamBlock(p.hidden_size, p.num_heads, p.mlp_ratio) for _ in range(p.depth_single_blocks)
        )
        self.final_layer = ChromaLastLayer(p.hidden_size, p.out_channels)
        self.skip_mmdit: list[int] = []
        self.skip_dit: list[int] = []

    def mod(self, mods: torch.Tensor, row: int) -> ModulationOut:
        return ModulationOut(mods[:, row : row + 1], mods[:, row + 1 : row + 2], mods[:, row + 2 : row + 3])

    def forward(
        self,
        x: torch.Tensor,
        timestep: torch.Tensor,
        context: torch.Tensor,
        guidance: Any = None,
        control: Any = None,
        transformer_options: dict | None = None,
        **kwargs: Any,
    ) -> torch.Tensor:
        to = transformer_options or {}
        return _wrapped(self, (x, timestep, context, guidance, control, to), kwargs, to)

    def _forward(
        self,
        x: torch.Tensor,
        timestep: torch.Tensor,
        context: torch.Tensor,
        guidance: Any = None,
        control: Any = None,
        transformer_options: dict | None = None,
        **kwargs: Any,
    ) -> torch.Tensor:
        to = dict(transformer_options or {})
        b, _, h, w = x.shape
        img = self.img_in(x.reshape(b, x.shape[1], h * w).transpose(1, 2))
        ids = torch.zeros(h, w, 3)
        ids[..., 1] = torch.arange(h, dtype=torch.float32)[:, None]
        ids[..., 2] = torch.arange(w, dtype=torch.float32)[None, :]
        img_ids = ids.reshape(1, h * w, 3).expand(b, -1, -1)
        txt_ids = torch.zeros(b, context.shape[1], 3)
        g = guidance if guidance is not None else torch.zeros_like(timestep)
        t_g = torch.cat([timestep_embedding(timestep, 4), timestep_embedding(g, 4)], dim=1)
        index = timestep_embedding(torch.arange(self.MOD_ROWS, dtype=torch.float32), 8, time_factor=1.0)
        inp = torch.cat([t_g[:, None].expand(-1, self.MOD_ROWS, -1), index[None].expand(b, -1, -1)], dim=-1)
        mods = self.distilled_guidance_layer(inp.to(img.dtype))
        txt = self.txt_in(context)
        pe = self.pe_embedder(torch.cat((txt_ids, img_ids), dim=1))
        mask = kwargs.get("attention_mask")
        ns, nd = len(self.single_blocks), len(self.double_blocks)
        to["total_blocks"], to["block_type"] = nd, "double"
        for i, block in enumerate(self.double_blocks):
            to["block_index"] = i
            if i in self.skip_mmdit:
                continue
            o_img, o_txt = 3 * ns + 6 * i, 3 * ns + 6 * nd + 6 * i
            dvec = (
                (self.mod(mods, o_img), self.mod(mods, o_img + 3)),
                (self.mod(mods, o_txt), self.mod(mods, o_txt + 3)),
            )
            hook = _dit_hook(to, ("double_block", i))
            if hook is not None:
                args = {"img": img, "txt": txt, "vec": dvec, "pe": pe, "attn_mask": mask, "transformer_options": to}
                out = hook(args, {"original_block": partial(_double_wrap, block)})
                img, txt = out["img"], out["txt"]
            else:
                img, txt = block(img=img, txt=txt, vec=dvec, pe=pe, attn_mask=mask, transformer_options=to)
            if control is not None:
                add = control.get("input", [])[i] if i < len(control.get("input", [])) else None
                if add is not None:
                    img += add
        img = torch.cat((txt, img), 1)
        to["total_blocks"], to["block_type"] = ns, "single"
        to["img_slice"] = [txt.shape[1], img.shape[1]]
        for i, block in enumerate(self.single_blocks):
            to["block_index"] = i
            if i in self.skip_dit:
                continue
            svec = self.mod(mods, 3 * i)
            hook = _dit_hook(to, ("single_block", i))
            if hook is not None:
                args = {"img": img, "vec": svec, "pe": pe, "attn_mask": mask, "transformer_options": to}
                img = hook(args, {"original_block": partial(_single_wrap, block)})["img"]
            else:
                img = block(img, vec=svec, pe=pe, attn_mask=mask, transformer_options=to)
            if control is not None:
                add = control.get("output", [])[i] if i < len(control.get("output", [])) else None
                if add is not None:
                    img[:, txt.shape[1] :] += add
        img = self.final_layer(img[:, txt.shape[1] :], vec=(mods[:, -2:-1], mods[:, -1:]))
        return img.transpose(1, 2).reshape(b, self.out_channels, h, w)


# ============================================================================= Qwen-Image


@dataclass
class QwenParams:
    patch_size: int = 2
    in_channels: int = 16  # 4 latent channels x 2x2 patches
    out_channels: int = 4
    num_layers: int = 4
    attention_head_dim: int = 16
    num_attention_heads: int = 2
    joint_attention_dim: int = 12
    axes_dims_rope: tuple[int, int, int] = (4, 6, 6)


class QwenFeedForward(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.net = nn.ModuleList([nn.Linear(dim, 2 * dim), nn.GELU(approximate="tanh"), nn.Linear(2 * dim, dim)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for m in self.net:
            x = m(x)
        return x


class QwenAttention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        for name in ("to_q", "to_k", "to_v", "add_q_proj", "add_k_proj", "add_v_proj"):
            setattr(self, name, nn.Linear(dim, dim))
        self.norm_q, self.norm_k = RMSNorm(dim // heads), RMSNorm(dim // heads)
        self.norm_added_q, self.norm_added_k = RMSNorm(dim // heads), RMSNorm(dim // heads)
        self.to_out = nn.ModuleList([nn.Linear(dim, dim)])
        self.to_add_out = nn.Linear(dim, dim)

    def forward(self, img, txt, mask, pe):  # type: ignore[no-untyped-def]
        b, li, lt = img.shape[0], img.shape[1], txt.shape[1]

        def split(t: torch.Tensor) -> torch.Tensor:
            return t.view(b, t.shape[1], self.heads, -1).transpose(1, 2)

        q = torch.cat([self.norm_added_q(split(self.add_q_proj(txt))), self.norm_q(split(self.to_q(img)))], dim=2)
        k = torch.cat([self.norm_added_k(split(self.add_k_proj(txt))), self.norm_k(split(self.to_k(img)))], dim=2)
        v = torch.cat([split(self.add_v_proj(txt)), split(self.to_v(img))], dim=2)
        attn_mask = None
        if mask is not None:  # additive text mask, as ComfyUI builds it
            attn_mask = torch.zeros(b, 1, 1, lt + li, dtype=img.dtype)
            attn_mask[:, 0, 0, :lt] = mask
        out = flux_attention(q, k, v, pe, attn_mask)
        return self.to_out[0](out[:, lt:]), self.to_add_out(out[:, :lt])


class QwenImageTransformerBlock(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.img_mod = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))
        self.txt_mod = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.attn = QwenAttention(dim, heads)
        self.img_mlp, self.txt_mlp = QwenFeedForward(dim), QwenFeedForward(dim)

    def forward(
        self,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        encoder_hidden_states_mask: torch.Tensor | None,
        temb: torch.Tensor,
        image_rotary_emb: torch.Tensor | None = None,
        timestep_zero_index: int | None = None,
        transformer_options: dict | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        assert timestep_zero_index is None, "the stand-in has no index_timestep_zero"
        img, txt = hidden_states, encoder_hidden_states
        im = self.img_mod(temb)[:, None].chunk(6, dim=-1)
        tm = self.txt_mod(temb)[:, None].chunk(6, dim=-1)
        a_img, a_txt = self.attn(
            _mod(self.norm1(img), 1 + im[1], im[0]), _mod(self.norm1(txt), 1 + tm[1], tm[0]),
            encoder_hidden_states_mask, image_rotary_emb,
        )  # fmt: skip
        img, txt = img + im[2] * a_img, txt + tm[2] * a_txt
        img = img + im[5] * self.img_mlp(_mod(self.norm1(img), 1 + im[4], im[3]))
        txt = txt + tm[5] * self.txt_mlp(_mod(self.norm1(txt), 1 + tm[4], tm[3]))
        return txt, img


class QwenTimeEmbed(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.timestep_embedder = nn.Module()
        self.timestep_embedder.linear_1 = nn.Linear(32, dim)
        self.timestep_embedder.linear_2 = nn.Linear(dim, dim)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        e = self.timestep_embedder
        return e.linear_2(F.silu(e.linear_1(timestep_embedding(t, 32))))


class QwenLastLayer(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.linear = nn.Linear(dim, 2 * dim)
        self.norm = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        scale, shift = self.linear(F.silu(emb)).chunk(2, dim=1)
        return self.norm(x) * (1 + scale[:, None]) + shift[:, None]


class QwenImageTransformer2DModel(nn.Module):
    """Qwen-Image's MMDiT: ComfyUI's ``QwenImageTransformer2DModel`` (joint blocks, reference latents
    appended as image tokens and cut after the head, ControlNet residuals after each block)."""

    def __init__(self, **kwargs: Any):
        super().__init__()
        p = self.params = QwenParams(**kwargs)
        self.patch_size, self.out_channels = p.patch_size, p.out_channels
        self.inner_dim = dim = p.num_attention_heads * p.attention_head_dim
        self.pe_embedder = EmbedND(p.attention_head_dim, 10000, list(p.axes_dims_rope))
        self.time_text_embed = QwenTimeEmbed(dim)
        self.txt_norm = RMSNorm(p.joint_attention_dim)
        self.img_in = nn.Linear(p.in_channels, dim)
        self.txt_in = nn.Linear(p.joint_attention_dim, dim)
        self.transformer_blocks = nn.ModuleList(
            QwenImageTransformerBlock(dim, p.num_attention_heads) for _ in range(p.num_layers)
        )
        self.norm_out = QwenLastLayer(dim)
        self.proj_out = nn.Linear(dim, p.patch_size**2 * p.out_channels)

    def process_img(self, x: torch.Tensor, index: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        b, c, t, h, w = x.shape
        x = (
            x.view(b, c, t, h // 2, 2, w // 2, 2)
            .permute(0, 2, 3, 5, 1, 4, 6)
            .reshape(b, t * (h // 2) * (w // 2), c * 4)
        )
        ids = torch.zeros(t, h // 2, w // 2, 3)
        ids[..., 0] = index
        ids[..., 1] = torch.arange(h // 2)[:, None]
        ids[..., 2] = torch.arange(w // 2)[None, :]
        return x, ids.reshape(1, -1, 3).expand(b, -1, -1)

    def forward(self, x, timestep, context, attention_mask=None, ref_latents=None, additional_t_cond=None,
                transformer_options=None, **kwargs):  # type: ignore[no-untyped-def]  # fmt: skip
        transformer_options = {} if transformer_options is None else transformer_options
        args = (x, timestep, context, attention_mask, ref_latents, additional_t_cond, transformer_options)
        return _wrapped(self, args, kwargs, transformer_options)

    def _forward(self, x, timesteps, context, attention_mask=None, ref_latents=None, additional_t_cond=None,
                 transformer_options=None, control=None, **kwargs):  # type: ignore[no-untyped-def]  # fmt: skip
        transformer_options = {} if transformer_options is None else transformer_options
        mask = attention_mask
        if mask is not None and not torch.is_floating_point(mask):
            mask = (mask - 1).to(x.dtype) * torch.finfo(x.dtype).max
        img, img_ids = self.process_img(x)
        num_embeds = img.shape[1]
        for i, ref in enumerate(ref_latents or []):
            r, r_ids = self.process_img(ref, index=i + 1)
            img, img_ids = torch.cat([img, r], dim=1), torch.cat([img_ids, r_ids], dim=1)
        txt_ids = torch.arange(context.shape[1]).reshape(1, -1, 1).repeat(x.shape[0], 1, 3).float() + 8
        img = self.img_in(img)
        txt = self.txt_in(self.txt_norm(context))
        temb = self.time_text_embed(timesteps)
        pe = self.pe_embedder(torch.cat((txt_ids, img_ids), dim=1)).contiguous()
        for i, block in enumerate(self.transformer_blocks):
            transformer_options["block_index"] = i
            hook = _dit_hook(transformer_options, ("double_block", i))
            if hook is not None:

                def fn(a: dict, _b: nn.Module = block) -> dict:
                    t, im = _b(
                        a["img"], a["txt"], mask, a["vec"], a["pe"], transformer_options=a["transformer_options"]
                    )
                    return {"txt": t, "img": im}

                out = hook({"img": img, "txt": txt, "vec": temb, "pe": pe, "transformer_options": transformer_options},
                           {"original_block": fn})  # fmt: skip
                img, txt = out["img"], out["txt"]
            else:
                txt, img = block(img, txt, mask, temb, pe, transformer_options=transformer_options)
            if control is not None:
                add = control.get("input") or []
                if i < len(add) and add[i] is not None:
                    img[:, : add[i].shape[1]] += add[i]
        img = self.proj_out(self.norm_out(img, temb))[:, :num_embeds]
        b, c, t, h, w = x.shape
        img = img.view(b, t, h // 2, w // 2, c, 2, 2).permute(0, 4, 1, 2, 5, 3, 6)
        return img.reshape(b, c, t, h, w)


# ============================================================================= BaseModel + builders


class BaseModel(nn.Module):
    """``comfy.model_base.BaseModel``'s role: holds ``diffusion_model`` and maps conds to its call."""

    def __init__(self, diffusion_model: nn.Module):
        super().__init__()
        self.diffusion_model = diffusion_model

    def apply_model(self, x: Any, t: torch.Tensor, transformer_options: dict, **conds: Any) -> Any:
        dm = self.diffusion_model
        if isinstance(dm, LTXAVModel):
            context = conds.pop("context")
            mask = conds.pop("attention_mask", None)
            return dm(x, (t, t), context, attention_mask=mask, transformer_options=transformer_options, **conds)
        context = conds.pop("context")
        return dm(x, t, context=context, control=conds.pop("control", None), transformer_options=transformer_options,
                  **conds)  # fmt: skip


def init_weights(module: nn.Module, seed: int) -> nn.Module:
    """Deterministic weights from ``seed`` (every parameter in state-dict order)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name.endswith("norm.weight"):  # RMSNorm scales (query_norm, key_norm, q_norm, k_norm) near 1
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=g))
            else:
                fan_in = p.shape[-1] if p.ndim > 1 else p.shape[0]
                p.copy_(torch.randn(p.shape, generator=g) / fan_in**0.5)
    return module


@dataclass
class StandIn:
    """How to build and drive one family's stand-in."""

    family: str
    build: Any  # (**config) -> diffusion model (random init; call init_weights for the seeded one)
    inputs: Any  # (seed) -> (noise, positive conds, negative conds)
    total_blocks: int


def flux2_inputs(seed: int = 1) -> tuple[Any, dict, dict]:
    g = torch.Generator().manual_seed(seed)
    p = FluxParams()
    noise = torch.randn(1, p.in_channels, 3, 4, generator=g)
    pos = {"context": torch.randn(1, 5, p.context_in_dim, generator=g)}
    neg = {"context": torch.randn(1, 5, p.context_in_dim, generator=g)}
    return noise, pos, neg


def ltxav_inputs(seed: int = 1) -> tuple[Any, dict, dict]:
    g = torch.Generator().manual_seed(seed)
    p = LTXParams()
    noise = [torch.randn(1, p.in_channels, 2, 2, 3, generator=g), torch.randn(1, 2, 5, 4, generator=g)]
    mask = torch.ones(1, 6)
    mask[:, -2:] = 0
    pos = {"context": torch.randn(1, 6, p.caption_channels, generator=g), "attention_mask": mask}
    neg = {"context": torch.randn(1, 6, p.caption_channels, generator=g), "attention_mask": torch.ones(1, 6)}
    return noise, pos, neg


def flux1_inputs(seed: int = 1) -> tuple[Any, dict, dict]:
    """FLUX.1 dev conds: text, pooled text ``y`` and the guidance value, per row."""
    noise, pos, neg = flux2_inputs(seed)
    g = torch.Generator().manual_seed(seed + 100)
    pos.update(y=torch.randn(1, 6, generator=g), guidance=torch.tensor([3.5]))
    neg.update(y=torch.randn(1, 6, generator=g), guidance=torch.tensor([3.5]))
    return noise, pos, neg


def chroma_inputs(seed: int = 1) -> tuple[Any, dict, dict]:
    noise, pos, neg = flux2_inputs(seed)
    pos["guidance"] = neg["guidance"] = torch.tensor([0.0])
    return noise, pos, neg


def qwen_image_inputs(seed: int = 1) -> tuple[Any, dict, dict]:
    """A padded negative prompt (the text mask crosses); reference latents: tests/test_qwen_image_split.py."""
    g = torch.Generator().manual_seed(seed)
    p = QwenParams()
    noise = torch.randn(1, p.in_channels // 4, 1, 4, 6, generator=g)
    mask = torch.ones(1, 5, dtype=torch.long)
    mask[:, -1] = 0
    pos = {"context": torch.randn(1, 5, p.joint_attention_dim, generator=g), "attention_mask": torch.ones_like(mask)}
    neg = {"context": torch.randn(1, 5, p.joint_attention_dim, generator=g), "attention_mask": mask}
    return noise, pos, neg


STANDINS: dict[str, StandIn] = {
    "flux1": StandIn("flux1", flux1, flux1_inputs, FluxParams().depth + FluxParams().depth_single_blocks),
    "chroma": StandIn("chroma", Chroma, chroma_inputs, FluxParams().depth + FluxParams().depth_single_blocks),
    "flux2": StandIn("flux2", Flux, flux2_inputs, FluxParams().depth + FluxParams().depth_single_blocks),
    "ltxav": StandIn("ltxav", LTXAVModel, ltxav_inputs, LTXParams().num_layers),
    "qwen_image": StandIn("qwen_image", QwenImageTransformer2DModel, qwen_image_inputs, QwenParams().num_layers),
}


def build(family: str, seed: int = 0, **config: Any) -> nn.Module:
    return init_weights(STANDINS[family].build(**config), seed)


# ============================================================================= Wan 2.1 / 2.2
# Read from ComfyUI's comfy/ldm/wan/model.py (WanModel, WanAttentionBlock, Head): attribute and
# key names, the block hook's args ({"img": x, "txt": context, "vec": e0, "pe": freqs}), the block
# and head call signatures, e0 [B, 1, 6, dim] and e [B, 1, dim], RoPE [1, L, 1, d/2, 2, 2].


@dataclass
class WanParams:
    model_type: str = "t2v"
    in_dim: int = 4
    out_dim: int = 4
    dim: int = 32
    ffn_dim: int = 64
    freq_dim: int = 16
    text_dim: int = 12
    num_heads: int = 2
    num_layers: int = 4


def wan_rope1(x: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
    """x [B, L, heads, d], freqs [1, L, 1, d/2, 2, 2] (ComfyUI's apply_rope1)."""
    x2 = x.float().reshape(*x.shape[:-1], -1, 1, 2)
    return (freqs[..., 0] * x2[..., 0] + freqs[..., 1] * x2[..., 1]).reshape(*x.shape).type_as(x)


class WanAttention(nn.Module):
    def __init__(self, dim: int, heads: int, image: bool = False):
        super().__init__()
        self.heads = heads
        self.q, self.k, self.v, self.o = (nn.Linear(dim, dim) for _ in range(4))
        self.norm_q, self.norm_k = RMSNorm(dim), RMSNorm(dim)
        if image:  # WanI2VCrossAttention: separate keys/values for the CLIP image tokens
            self.k_img, self.v_img = nn.Linear(dim, dim), nn.Linear(dim, dim)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        b, n, h = q.shape[0], q.shape[1], self.heads
        q, k, v = (t.view(b, t.shape[1], h, -1).transpose(1, 2) for t in (q, k, v))
        return F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, -1)

    def self_attn(self, x: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
        b, n, h = x.shape[0], x.shape[1], self.heads
        q = wan_rope1(self.norm_q(self.q(x)).view(b, n, h, -1), freqs).reshape(b, n, -1)
        k = wan_rope1(self.norm_k(self.k(x)).view(b, n, h, -1), freqs).reshape(b, n, -1)
        return self.o(self.attend(q, k, self.v(x)))

    def cross_attn(self, x: torch.Tensor, context: torch.Tensor, context_img_len: int | None) -> torch.Tensor:
        q = self.norm_q(self.q(x))
        if not hasattr(self, "k_img"):
            return self.o(self.attend(q, self.norm_k(self.k(context)), self.v(context)))
        img, txt = context[:, :context_img_len], context[:, context_img_len:]
        out = self.attend(q, self.norm_k(self.k(txt)), self.v(txt)) + self.attend(q, self.k_img(img), self.v_img(img))
        return self.o(out)


class WanAttentionBlock(nn.Module):
    def __init__(self, dim: int, ffn_dim: int, heads: int, image: bool):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.self_attn = WanAttention(dim, heads)
        self.norm3 = nn.LayerNorm(dim, eps=1e-6)
        self.cross_attn = WanAttention(dim, heads, image)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.ffn = nn.Sequential(nn.Linear(dim, ffn_dim), nn.GELU(approximate="tanh"), nn.Linear(ffn_dim, dim))
        self.modulation = nn.Parameter(torch.randn(1, 6, dim) / dim**0.5)

    def forward(
        self,
        x: torch.Tensor,
        e: torch.Tensor,
        freqs: torch.Tensor,
        context: torch.Tensor,
        context_img_len: int | None = 257,
        transformer_options: dict | None = None,
    ) -> torch.Tensor:
        m = (self.modulation.unsqueeze(0) + e).unbind(2)  # e [B, T, 6, dim] -> 6 x [B, T, dim]
        x = x.contiguous()  # as ComfyUI's block does (the patch embedding's tokens are a transposed view)
        x = x + self.self_attn.self_attn(self.norm1(x) * (1 + m[1]) + m[0], freqs) * m[2]
        x = x + self.cross_attn.cross_attn(self.norm3(x), context, context_img_len)
        return x + self.ffn(self.norm2(x) * (1 + m[4]) + m[3]) * m[5]


class WanHead(nn.Module):
    def __init__(self, dim: int, out: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.head = nn.Linear(dim, out)
        self.modulation = nn.Parameter(torch.randn(1, 2, dim) / dim**0.5)

    def forward(self, x: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
        m = (self.modulation.unsqueeze(0) + e.unsqueeze(2)).unbind(2)
        return self.head(self.norm(x) * (1 + m[1]) + m[0])


class WanModel(nn.Module):
    """Wan 2.1 / 2.2's DiT (patch 1x2x2); ``model_type="i2v"``: CLIP image tokens before the text."""

    patch = (1, 2, 2)

    def __init__(self, **kwargs: Any):
        super().__init__()
        p = self.params = WanParams(**kwargs)
        self.dim, self.out_dim = p.dim, p.out_dim
        self.patch_embedding = nn.Conv3d(p.in_dim, p.dim, kernel_size=self.patch, stride=self.patch)
        self.text_embedding = nn.Sequential(nn.Linear(p.text_dim, p.dim), nn.GELU(approximate="tanh"))
        self.time_embedding = nn.Sequential(nn.Linear(p.freq_dim, p.dim), nn.SiLU(), nn.Linear(p.dim, p.dim))
        self.time_projection = nn.Sequential(nn.SiLU(), nn.Linear(p.dim, 6 * p.dim))
        image = p.model_type == "i2v"
        self.blocks = nn.ModuleList(
            WanAttentionBlock(p.dim, p.ffn_dim, p.num_heads, image) for _ in range(p.num_layers)
        )
        self.head = WanHead(p.dim, p.out_dim * 4)
        self.img_emb = nn.Linear(8, p.dim) if image else None

    def forward(
        self,
        x: torch.Tensor,
        timestep: torch.Tensor,
        context: torch.Tensor,
        clip_fea: Any = None,
        time_dim_concat: Any = None,
        transformer_options: dict | None = None,
        **kwargs: Any,
    ) -> torch.Tensor:
        to = transformer_options or {}
        return _wrapped(self, (x, timestep, context, clip_fea, time_dim_concat, to), kwargs, to)

    def _forward(
        self,
        x: torch.Tensor,
        timestep: torch.Tensor,
        context: torch.Tensor,
        clip_fea: Any = None,
        time_dim_concat: Any = None,
        transformer_options: dict | None = None,
        **kwargs: Any,
    ) -> torch.Tensor:
        to = transformer_options or {}
        p = self.params
        x = self.patch_embedding(x)
        t, h, w = x.shape[2:]
        x = x.flatten(2).transpose(1, 2)
        e = self.time_embedding(timestep_embedding(timestep.flatten(), p.freq_dim)).reshape(
            timestep.shape[0], -1, p.dim
        )
        e0 = self.time_projection(e).unflatten(2, (6, p.dim))
        context = self.text_embedding(context)
        context_img_len = None
        if clip_fea is not None:
            if self.img_emb is not None:
                context = torch.cat([self.img_emb(clip_fea), context], dim=1)
            context_img_len = clip_fea.shape[-2]
        d = p.dim // p.num_heads
        axes = [d - 4 * (d // 6), 2 * (d // 6), 2 * (d // 6)]
        ids = torch.stack(torch.meshgrid(*(torch.arange(n, dtype=torch.float32) for n in (t, h, w)), indexing="ij"), -1)
        ids = ids.reshape(1, -1, 3)
        freqs = torch.cat([rope(ids[..., i], axes[i], 10000) for i in range(3)], dim=-3).unsqueeze(2)
        for i, block in enumerate(self.blocks):
            hook = _dit_hook(to, ("double_block", i))
            if hook is not None:

                def block_wrap(args: dict, _block: nn.Module = block) -> dict:
                    img = _block(args["img"], context=args["txt"], e=args["vec"], freqs=args["pe"],
                                 context_img_len=context_img_len, transformer_options=args["transformer_options"])  # fmt: skip
                    return {"img": img}

                args = {"img": x, "txt": context, "vec": e0, "pe": freqs, "transformer_options": to}
                x = hook(args, {"original_block": block_wrap})["img"]
            else:
                x = block(
                    x, e=e0, freqs=freqs, context=context, context_img_len=context_img_len, transformer_options=to
                )
        x = self.head(x, e)
        b, c = x.shape[0], p.out_dim
        x = x.view(b, t, h, w, *self.patch, c)
        return torch.einsum("bfhwpqrc->bcfphqwr", x).reshape(b, c, t, h * 2, w * 2)


def wan_inputs(seed: int = 1) -> tuple[Any, dict, dict]:
    g = torch.Generator().manual_seed(seed)
    p = WanParams()
    noise = torch.randn(1, p.in_dim, 2, 4, 4, generator=g)
    pos = {"context": torch.randn(1, 5, p.text_dim, generator=g)}
    neg = {"context": torch.randn(1, 5, p.text_dim, generator=g)}
    return noise, pos, neg


STANDINS["wan"] = StandIn("wan", WanModel, wan_inputs, WanParams().num_layers)


# ============================================================================= HunyuanVideo 1.5 / 1.0
# Read from ComfyUI's comfy/ldm/hunyuan_video/model.py (HunyuanVideo, TokenRefiner): the FLUX-style
# double/single blocks with their own modulation, the text order of releases after 0.8 (text first:
# this module's ``DoubleStreamBlock`` takes no ``flipped_img_txt``, which ``arch.hunyuan_video``
# reads), ``_forward``'s positional arguments (ref_latent 10th, control 12th), the block hooks' args
# (``attention_mask``, ``modulation_dims_*``), ``img_slice`` for the single blocks, final_layer on
# the image tokens. Patch size 1x1x1 (1.5's); no ByT5 / vision / guiding frame / reference latent.


@dataclass
class HunyuanVideoParams:
    in_channels: int = 4
    out_channels: int = 4
    context_in_dim: int = 12
    hidden_size: int = 32
    mlp_ratio: float = 2.0
    num_heads: int = 2
    depth: int = 2
    depth_single_blocks: int = 2
    axes_dim: list[int] = field(default_factory=lambda: [4, 6, 6])
    theta: int = 256
    patch_size: list[int] = field(default_factory=lambda: [1, 1, 1])
    vec_in_dim: int | None = None
    guidance_embed: bool = False


class PatchEmbed(nn.Module):
    """[B, C, T, H, W] -> tokens [B, T*H*W, hidden] (patch 1x1x1)."""

    def __init__(self, in_channels: int, hidden: int, patch: list[int]):
        super().__init__()
        self.proj = nn.Conv3d(in_channels, hidden, kernel_size=patch, stride=patch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class TokenRefinerBlock(nn.Module):
    def __init__(self, hidden: int, heads: int):
        super().__init__()
        self.heads = heads
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden, 2 * hidden))
        self.norm1 = nn.LayerNorm(hidden, eps=1e-6)
        self.self_attn = nn.Module()
        self.self_attn.qkv = nn.Linear(hidden, 3 * hidden)
        self.self_attn.proj = nn.Linear(hidden, hidden)
        self.norm2 = nn.LayerNorm(hidden, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(hidden, 2 * hidden), nn.SiLU(), nn.Linear(2 * hidden, hidden))

    def forward(self, x: torch.Tensor, c: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        g1, g2 = self.adaLN_modulation(c).chunk(2, dim=1)
        q, k, v = _heads(self.self_attn.qkv(self.norm1(x)), self.heads)
        attn = F.scaled_dot_product_attention(q, k, v, attn_mask=mask).transpose(1, 2).reshape(x.shape)
        x = x + self.self_attn.proj(attn) * g1[:, None]
        return x + self.mlp(self.norm2(x)) * g2[:, None]


class TokenRefiner(nn.Module):
    """HunyuanVideo's ``txt_in``: text tokens refined under the timestep and the mean text token."""

    def __init__(self, text_dim: int, hidden: int, heads: int, n_blocks: int = 1):
        super().__init__()
        self.input_embedder = nn.Linear(text_dim, hidden)
        self.t_embedder = MLPEmbedder(256, hidden)
        self.c_embedder = MLPEmbedder(text_dim, hidden)
        self.individual_token_refiner = nn.Module()
        self.individual_token_refiner.blocks = nn.ModuleList(TokenRefinerBlock(hidden, heads) for _ in range(n_blocks))

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        c = self.t_embedder(timestep_embedding(timesteps, 256, time_factor=1.0)) + self.c_embedder(x.mean(1))
        m = None
        if mask is not None:  # additive [B, L] -> [B, 1, L, L], masked as a row or a column
            m = mask[:, None, None, :].expand(-1, 1, mask.shape[1], -1)
            m = m + m.transpose(2, 3)
        x = self.input_embedder(x)
        for block in self.individual_token_refiner.blocks:
            x = block(x, c, m)
        return x


class HunyuanVideo(nn.Module):
    """HunyuanVideo 1.5's DiT shape (by default both block groups, as 1.0 has them)."""

    def __init__(self, **kwargs: Any):
        super().__init__()
        p = self.params = HunyuanVideoParams(**kwargs)
        self.patch_size, self.out_channels = p.patch_size, p.out_channels
        self.hidden_size, self.num_heads = p.hidden_size, p.num_heads
        self.pe_embedder = EmbedND(p.hidden_size // p.num_heads, p.theta, p.axes_dim)
        self.img_in = PatchEmbed(p.in_channels, p.hidden_size, p.patch_size)
        self.time_in = MLPEmbedder(256, p.hidden_size)
        self.vector_in = MLPEmbedder(p.vec_in_dim, p.hidden_size) if p.vec_in_dim else None
        self.guidance_in = MLPEmbedder(256, p.hidden_size) if p.guidance_embed else nn.Identity()
        self.txt_in = TokenRefiner(p.context_in_dim, p.hidden_size, p.num_heads)
        self.double_blocks = nn.ModuleList(
            DoubleStreamBlock(p.hidden_size, p.num_heads, p.mlp_ratio, modulation=True) for _ in range(p.depth)
        )
        self.single_blocks = nn.ModuleList(
            SingleStreamBlock(p.hidden_size, p.num_heads, p.mlp_ratio, modulation=True)
            for _ in range(p.depth_single_blocks)
        )
        self.final_layer = LastLayer(p.hidden_size, math.prod(p.patch_size) * p.out_channels)
        self.cond_type_embedding = nn.Embedding(3, p.hidden_size)  # 1.5: text / ByT5 / vision token types

    def forward(self, x, timestep, context, y=None, txt_byt5=None, clip_fea=None, guidance=None, attention_mask=None,
                guiding_frame_index=None, ref_latent=None, disable_time_r=False, control=None, transformer_options=None,
                **kwargs):  # type: ignore[no-untyped-def]  # fmt: skip
        to = {} if transformer_options is None else transformer_options
        args = (x, timestep, context, y, txt_byt5, clip_fea, guidance, attention_mask, guiding_frame_index,
                ref_latent, disable_time_r, control, to)  # fmt: skip
        return _wrapped(self, args, kwargs, to)

    def _forward(self, x, timestep, context, y=None, txt_byt5=None, clip_fea=None, guidance=None, attention_mask=None,
                 guiding_frame_index=None, ref_latent=None, disable_time_r=False, control=None,
                 transformer_options=None, **kwargs):  # type: ignore[no-untyped-def]  # fmt: skip
        if any(v is not None for v in (txt_byt5, clip_fea, guiding_frame_index, ref_latent)):
            raise NotImplementedError(
                "stand-in: ByT5, vision, guiding-frame and reference-latent inputs are not modelled"
            )
        to = dict(transformer_options or {})
        p = self.params
        b, _, t, h, w = x.shape
        img = self.img_in(x)
        vec = self.time_in(timestep_embedding(timestep, 256, time_factor=1.0))
        if self.vector_in is not None:
            vec = vec + self.vector_in(y[:, : p.vec_in_dim])
        if p.guidance_embed and guidance is not None:
            vec = vec + self.guidance_in(timestep_embedding(guidance, 256))
        txt_mask = attention_mask
        if txt_mask is not None and not torch.is_floating_point(txt_mask):
            txt_mask = (txt_mask - 1).to(img.dtype) * torch.finfo(img.dtype).max
        txt = self.txt_in(context, timestep, txt_mask)
        txt = txt + self.cond_type_embedding(torch.zeros_like(txt[:, :, 0], dtype=torch.long))
        img_ids = torch.stack(
            torch.meshgrid(*(torch.arange(n, dtype=torch.float32) for n in (t, h, w)), indexing="ij"), -1
        ).reshape(1, -1, 3)
        txt_ids = torch.zeros(1, txt.shape[1], 3)
        pe = self.pe_embedder(torch.cat((txt_ids, img_ids), dim=1))
        img_len, txt_len = img.shape[1], txt.shape[1]
        attn_mask = None
        if txt_mask is not None:  # additive, over the joint [text | image] sequence
            attn_mask = torch.zeros(b, 1, 1, txt_len + img_len, dtype=img.dtype)
            attn_mask[:, 0, 0, :txt_len] = txt_mask
        mod_img = mod_txt = None  # per-token modulation spans: only with a guiding frame (1.0 I2V)
        to["total_blocks"], to["block_type"] = len(self.double_blocks), "double"
        for i, block in enumerate(self.double_blocks):
            to["block_index"] = i
            hook = _dit_hook(to, ("double_block", i))
            if hook is not None:

                def block_wrap(a: dict, _b: nn.Module = block) -> dict:
                    im, tx = _b(img=a["img"], txt=a["txt"], vec=a["vec"], pe=a["pe"], attn_mask=a["attention_mask"],
                                modulation_dims_img=a["modulation_dims_img"],
                                modulation_dims_txt=a["modulation_dims_txt"],
                                transformer_options=a["transformer_options"])  # fmt: skip
                    return {"img": im, "txt": tx}

                args = {"img": img, "txt": txt, "vec": vec, "pe": pe, "attention_mask": attn_mask,
                        "modulation_dims_img": mod_img, "modulation_dims_txt": mod_txt, "transformer_options": to}  # fmt: skip
                out = hook(args, {"original_block": block_wrap})
                img, txt = out["img"], out["txt"]
            else:
                img, txt = block(img=img, txt=txt, vec=vec, pe=pe, attn_mask=attn_mask, modulation_dims_img=mod_img,
                                 modulation_dims_txt=mod_txt, transformer_options=to)  # fmt: skip
            add = (control or {}).get("input") or []
            if i < len(add) and add[i] is not None:
                img += add[i]
        img = torch.cat((txt, img), 1)
        to["total_blocks"], to["block_type"] = len(self.single_blocks), "single"
        to["img_slice"] = [txt_len, img.shape[1]]
        for i, block in enumerate(self.single_blocks):
            to["block_index"] = i
            hook = _dit_hook(to, ("single_block", i))
            if hook is not None:

                def single_wrap(a: dict, _b: nn.Module = block) -> dict:
                    return {"img": _b(a["img"], vec=a["vec"], pe=a["pe"], attn_mask=a["attention_mask"],
                                      modulation_dims=a["modulation_dims"], transformer_options=a["transformer_options"])}  # fmt: skip

                args = {"img": img, "vec": vec, "pe": pe, "attention_mask": attn_mask, "modulation_dims": mod_img,
                        "transformer_options": to}  # fmt: skip
                img = hook(args, {"original_block": single_wrap})["img"]
            else:
                img = block(img, vec=vec, pe=pe, attn_mask=attn_mask, modulation_dims=mod_img, transformer_options=to)
            add = (control or {}).get("output") or []
            if i < len(add) and add[i] is not None:
                img[:, txt_len : txt_len + img_len] += add[i]
        img = self.final_layer(img[:, txt_len : txt_len + img_len], vec, modulation_dims=mod_img)
        return img.view(b, t, h, w, self.out_channels).permute(0, 4, 1, 2, 3).contiguous()


def hunyuan_video_inputs(seed: int = 1) -> tuple[Any, dict, dict]:
    """A padded negative prompt: the text mask crosses as a constant."""
    g = torch.Generator().manual_seed(seed)
    p = HunyuanVideoParams()
    noise = torch.randn(1, p.in_channels, 2, 2, 3, generator=g)
    mask = torch.ones(1, 5, dtype=torch.long)
    mask[:, -2:] = 0
    pos = {"context": torch.randn(1, 5, p.context_in_dim, generator=g), "attention_mask": torch.ones_like(mask)}
    neg = {"context": torch.randn(1, 5, p.context_in_dim, generator=g), "attention_mask": mask}
    return noise, pos, neg


STANDINS["hunyuan_video"] = StandIn(
    "hunyuan_video",
    HunyuanVideo,
    hunyuan_video_inputs,
    HunyuanVideoParams().depth + HunyuanVideoParams().depth_single_blocks,
)


# ============================================================================= Z-Image / Lumina 2
# Read from ComfyUI's comfy/ldm/lumina/model.py (NextDiT, JointTransformerBlock, FinalLayer): the
# refiners before the joint [caption | image] sequence, ``layers`` called directly (no
# ``patches_replace`` hook: Icarus swaps the remote ones for hooking stubs, named by the layer's
# forward signature), the "double_block" model patches after each layer, final_layer on the whole
# sequence, unpatchify by the caption length, and the negated output. Z-Image's modulation (time
# embedding min(dim, 256) wide, no SiLU before the layers' adaLN); no token padding, no Omni inputs.


@dataclass
class NextDiTParams:
    patch_size: int = 2
    in_channels: int = 4
    dim: int = 32
    n_layers: int = 4
    n_refiner_layers: int = 1
    n_heads: int = 2
    cap_feat_dim: int = 12
    axes_dims: tuple[int, int, int] = (4, 6, 6)
    rope_theta: float = 256.0
    freq_dim: int = 32


class JointAttention(nn.Module):
    def __init__(self, dim: int, n_heads: int):
        super().__init__()
        self.n_heads, self.head_dim = n_heads, dim // n_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.out = nn.Linear(dim, dim, bias=False)
        self.q_norm, self.k_norm = RMSNorm(self.head_dim), RMSNorm(self.head_dim)

    def forward(self, x: torch.Tensor, x_mask: Any, freqs_cis: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        q, k, v = (t.view(b, n, self.n_heads, self.head_dim) for t in self.qkv(x).chunk(3, dim=-1))
        q, k = apply_rope(self.q_norm(q), freqs_cis), apply_rope(self.k_norm(k), freqs_cis)
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=x_mask)
        return self.out(out.transpose(1, 2).reshape(b, n, -1))


class LuminaFeedForward(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.w1, self.w3 = nn.Linear(dim, 2 * dim, bias=False), nn.Linear(dim, 2 * dim, bias=False)
        self.w2 = nn.Linear(2 * dim, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class JointTransformerBlock(nn.Module):
    def __init__(self, layer_id: int, dim: int, n_heads: int, modulation: bool = True):
        super().__init__()
        self.layer_id = layer_id
        self.attention = JointAttention(dim, n_heads)
        self.feed_forward = LuminaFeedForward(dim)
        self.attention_norm1, self.attention_norm2 = RMSNorm(dim), RMSNorm(dim)
        self.ffn_norm1, self.ffn_norm2 = RMSNorm(dim), RMSNorm(dim)
        self.modulation = modulation
        if modulation:  # Z-Image: no SiLU before the adaLN projection
            self.adaLN_modulation = nn.Sequential(nn.Linear(min(dim, 256), 4 * dim))

    def forward(
        self,
        x: torch.Tensor,
        x_mask: Any,
        freqs_cis: torch.Tensor,
        adaln_input: torch.Tensor | None = None,
        timestep_zero_index: Any = None,
        transformer_options: dict | None = None,
    ) -> torch.Tensor:
        if timestep_zero_index is not None:
            raise NotImplementedError("stand-in: Z-Image Omni's timestep-zero spans are not modelled")
        if not self.modulation:
            x = x + self.attention_norm2(self.attention(self.attention_norm1(x), x_mask, freqs_cis))
            return x + self.ffn_norm2(self.feed_forward(self.ffn_norm1(x)))
        assert adaln_input is not None
        scale_msa, gate_msa, scale_mlp, gate_mlp = self.adaLN_modulation(adaln_input).chunk(4, dim=1)
        attn = self.attention(self.attention_norm1(x) * (1 + scale_msa[:, None]), x_mask, freqs_cis)
        x = x + gate_msa[:, None].tanh() * self.attention_norm2(attn)
        ff = self.feed_forward(self.ffn_norm1(x) * (1 + scale_mlp[:, None]))
        return x + gate_mlp[:, None].tanh() * self.ffn_norm2(ff)


class LuminaFinalLayer(nn.Module):
    def __init__(self, dim: int, out: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(dim, out)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(min(dim, 256), dim))

    def forward(self, x: torch.Tensor, c: torch.Tensor, timestep_zero_index: Any = None) -> torch.Tensor:
        if timestep_zero_index is not None:
            raise NotImplementedError("stand-in: Z-Image Omni's timestep-zero spans are not modelled")
        return self.linear(self.norm_final(x) * (1 + self.adaLN_modulation(c)[:, None]))


class NextDiT(nn.Module):
    """Z-Image's DiT: ComfyUI's ``NextDiT`` (refiners, then one list of joint layers)."""

    def __init__(self, **kwargs: Any):
        super().__init__()
        p = self.params = NextDiTParams(**kwargs)
        self.patch_size, self.in_channels, self.out_channels = p.patch_size, p.in_channels, p.in_channels
        self.dim, self.n_heads = p.dim, p.n_heads
        self.x_embedder = nn.Linear(p.patch_size**2 * p.in_channels, p.dim)
        self.noise_refiner = nn.ModuleList(
            JointTransformerBlock(i, p.dim, p.n_heads) for i in range(p.n_refiner_layers)
        )
        self.context_refiner = nn.ModuleList(
            JointTransformerBlock(i, p.dim, p.n_heads, modulation=False) for i in range(p.n_refiner_layers)
        )
        self.t_embedder = nn.Module()
        self.t_embedder.mlp = nn.Sequential(
            nn.Linear(p.freq_dim, min(p.dim, 1024)), nn.SiLU(), nn.Linear(min(p.dim, 1024), min(p.dim, 256))
        )
        self.cap_embedder = nn.Sequential(RMSNorm(p.cap_feat_dim), nn.Linear(p.cap_feat_dim, p.dim))
        self.layers = nn.ModuleList(JointTransformerBlock(i, p.dim, p.n_heads) for i in range(p.n_layers))
        self.final_layer = LuminaFinalLayer(p.dim, p.patch_size**2 * p.in_channels)
        self.rope_embedder = EmbedND(p.dim // p.n_heads, int(p.rope_theta), list(p.axes_dims))

    def forward(self, x, timesteps, context, num_tokens=None, attention_mask=None, **kwargs):  # type: ignore[no-untyped-def]
        return _wrapped(self, (x, timesteps, context, num_tokens, attention_mask), kwargs,
                        kwargs.get("transformer_options", {}))  # fmt: skip

    def _forward(self, x, timesteps, context, num_tokens=None, attention_mask=None, ref_latents=(), ref_contexts=(),
                 siglip_feats=(), transformer_options=None, **kwargs):  # type: ignore[no-untyped-def]  # fmt: skip
        if ref_latents or ref_contexts or siglip_feats:
            raise NotImplementedError("stand-in: Z-Image Omni's reference inputs are not modelled")
        to = {} if transformer_options is None else transformer_options
        p = self.params
        b, c, h, w = x.shape
        ph, pw = h // p.patch_size, w // p.patch_size
        adaln = self.t_embedder.mlp(timestep_embedding(1.0 - timesteps, p.freq_dim))
        cap = self.cap_embedder(context)
        cap_ids = torch.zeros(1, cap.shape[1], 3)
        cap_ids[..., 0] = torch.arange(cap.shape[1], dtype=torch.float32) + 1
        img = self.x_embedder(
            x.view(b, c, ph, p.patch_size, pw, p.patch_size).permute(0, 2, 4, 3, 5, 1).flatten(3).flatten(1, 2)
        )
        img_ids = torch.zeros(ph, pw, 3)
        img_ids[..., 0] = cap.shape[1] + 1
        img_ids[..., 1] = torch.arange(ph, dtype=torch.float32)[:, None]
        img_ids[..., 2] = torch.arange(pw, dtype=torch.float32)[None, :]
        cap_freqs = self.rope_embedder(cap_ids).movedim(1, 2)
        img_freqs = self.rope_embedder(img_ids.reshape(1, -1, 3)).movedim(1, 2)
        for layer in self.context_refiner:
            cap = layer(cap, None, cap_freqs, transformer_options=to)
        for layer in self.noise_refiner:
            img = layer(img, None, img_freqs, adaln, timestep_zero_index=None, transformer_options=to)
        cap_len = cap.shape[1]
        joint, freqs, mask = torch.cat((cap, img), 1), torch.cat((cap_freqs, img_freqs), 1), None
        patches = to.get("patches", {})
        to["total_blocks"], to["block_type"] = len(self.layers), "double"
        joint_input = joint
        for i, layer in enumerate(self.layers):
            to["block_index"] = i
            joint = layer(joint, mask, freqs, adaln, timestep_zero_index=None, transformer_options=to)
            for patch in patches.get("double_block", []):
                out = patch({"img": joint[:, cap_len:], "img_input": joint_input[:, cap_len:], "txt": joint[:, :cap_len],
                             "pe": freqs[:, cap_len:], "vec": adaln, "x": x, "block_index": i,
                             "transformer_options": to})  # fmt: skip
                if "img" in out:
                    joint[:, cap_len:] = out["img"]
        out = self.final_layer(joint, adaln, timestep_zero_index=None)[:, cap_len : cap_len + ph * pw]
        out = out.view(b, ph, pw, p.patch_size, p.patch_size, c).permute(0, 5, 1, 3, 2, 4)
        return -out.reshape(b, c, h, w)


def lumina2_inputs(seed: int = 1) -> tuple[Any, dict, dict]:
    g = torch.Generator().manual_seed(seed)
    p = NextDiTParams()
    noise = torch.randn(1, p.in_channels, 4, 6, generator=g)
    pos = {"context": torch.randn(1, 5, p.cap_feat_dim, generator=g)}
    neg = {"context": torch.randn(1, 5, p.cap_feat_dim, generator=g)}
    return noise, pos, neg


STANDINS["lumina2"] = StandIn("lumina2", NextDiT, lumina2_inputs, NextDiTParams().n_layers)
