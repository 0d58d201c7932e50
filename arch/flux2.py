"""FLUX.2 (Dev, Klein 4B, Klein 9B): ComfyUI's ``Flux`` class with global modulation.

Execution order is double_blocks then single_blocks, then final_layer. The server holds
the last N blocks (singles from the end, then doubles from the end) plus final_layer and
returns the model output for the main image tokens only, [B, L_img, 128].

Per call the client sends:
  coded  the seam state: ``img`` + ``txt`` (seam in the doubles) or ``x`` = cat(txt, img)
  exact  ``vec`` (the un-modulated time vector, for final_layer), ``mod_img`` / ``mod_txt``
         (double-block modulation, [B, 1, 6H]) when doubles are remote, ``mod_single``
         ([B, 1, 3H]) when singles are remote; a few KB
  consts ``pe`` (RoPE, [B, 1, L, 64, 2, 2] fp32) and ``attn_mask``: once per generation
The modulation is computed by the client (it has the weights anyway), so the server
never loads the 0.1-0.7 GB of modulation layers.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from .. import patchpipe
from ..errors import LocalError, RemoteProtocolError
from ..payload import SeamPayload
from . import Adapter, Capture, PatchSupport, SeamCall, SplitPlan, register

DOUBLE, SINGLE = "double_blocks", "single_blocks"


class Mod:
    """Duck-typed stand-in for comfy.ldm.flux.layers.ModulationOut (shift, scale, gate)."""

    __slots__ = ("shift", "scale", "gate")

    def __init__(self, shift: torch.Tensor, scale: torch.Tensor, gate: torch.Tensor):
        self.shift, self.scale, self.gate = shift, scale, gate


def _pack(*mods: Any) -> torch.Tensor:
    return torch.cat([t for m in mods for t in (m.shift, m.scale, m.gate)], dim=-1)


def _unpack(t: torch.Tensor, n: int) -> list[Mod]:
    c = t.chunk(3 * n, dim=-1)
    return [Mod(*c[3 * i : 3 * i + 3]) for i in range(n)]


def detect_keys(keys: set[str]) -> bool:
    return "double_stream_modulation_img.lin.weight" in keys and "img_in.weight" in keys


def detect_model(dm: Any) -> bool:
    p = getattr(dm, "params", None)
    return (
        type(dm).__name__ == "Flux"
        and bool(getattr(p, "global_modulation", False))
        and hasattr(dm, "double_stream_modulation_img")
        and hasattr(dm, "final_layer")
    )


def seam_state(args: dict[str, Any], sc: SeamCall, display: str) -> tuple[dict[str, torch.Tensor], int, int]:
    """The seam state of a ``Flux``-style model (FLUX.1, FLUX.2, Chroma) at its first remote block:
    (coded tensors, text tokens, main image tokens). ``coded`` is ``img`` + ``txt`` when the seam is
    in the double blocks, else ``x`` = cat(txt, img); the image token count leaves out reference-image
    tokens (the model drops them after its head)."""
    topts = args.get("transformer_options") or {}
    if sc.seam == DOUBLE:
        img, txt = args["img"], args["txt"]
        coded = {"img": img, "txt": txt}
        txt_len, img_all = int(txt.shape[1]), int(img.shape[1])
    else:
        x = args["img"]
        coded = {"x": x}
        # ComfyUI >= 0.9 names the text length in transformer_options; older releases do not, and
        # then it is the length of txt_in's output (captured as "txt").
        img_slice = topts.get("img_slice")
        txt = sc.values.get("txt")
        if img_slice is not None:
            txt_len = int(img_slice[0])
        elif isinstance(txt, torch.Tensor):
            txt_len = int(txt.shape[1])
        else:
            raise LocalError(f"{display} split: the text length was not captured (unexpected model code path)")
        img_all = int(x.shape[1]) - txt_len
    img_len = img_all - int(sum(topts.get("reference_image_num_tokens", []) or []))
    return coded, txt_len, img_len


def seam_consts(args: dict[str, Any]) -> dict[str, torch.Tensor]:
    """Per-generation constants of a ``Flux``-style block call: RoPE ``pe`` and the text attention mask."""
    consts = {"pe": args["pe"]}
    if args.get("attn_mask") is not None:
        consts["attn_mask"] = args["attn_mask"]
    return consts


def client_payload(args: dict[str, Any], sc: SeamCall) -> SeamPayload:
    """Split one block-hook call at the seam into (coded, exact, consts, scalars).

    ``sc.values["vec"]`` is the un-modulated vector the model fed its modulation layers
    (captured); ``sc.modules["single_mod"]`` computes the single-stream modulation from it
    (needed when the seam is in the doubles).
    """
    plan, seam = sc.plan, sc.seam
    vec: torch.Tensor | None = sc.values.get("vec")
    single_mod: Any = sc.modules.get("single_mod")
    if vec is None:
        raise LocalError("FLUX.2 split: the time vector was not captured (unexpected model code path)")
    if vec.ndim != 2:
        raise LocalError(
            "FLUX.2 split: reference images in 'index_timestep_zero' mode are not supported across the "
            "split; use the default reference method or run without Icarus"
        )
    exact: dict[str, torch.Tensor] = {"vec": vec}
    if seam == DOUBLE:
        (im1, im2), (tm1, tm2) = args["vec"]
        exact["mod_img"], exact["mod_txt"] = _pack(im1, im2), _pack(tm1, tm2)
        if plan.remote[SINGLE]:
            if single_mod is None:
                raise LocalError("FLUX.2 split: the model has no single_stream_modulation (unexpected model code)")
            exact["mod_single"] = _pack(single_mod(vec)[0])
    else:
        exact["mod_single"] = _pack(args["vec"])
    if exact.get("mod_single") is not None and exact["mod_single"].shape[1] != 1:
        raise LocalError("FLUX.2 split: per-token modulation (index_timestep_zero) is not supported")
    coded, txt_len, img_len = seam_state(args, sc, "FLUX.2")
    scalars = {"seam": seam, "txt_len": txt_len, "img_len": img_len}
    return SeamPayload(coded, exact, seam_consts(args), scalars)


def run_blocks(
    dm: Any,
    plan: SplitPlan,
    t: dict[str, torch.Tensor],
    s: dict[str, Any],
    display: str,
    need: list[str],
    double_vec: Callable[[int], Any],
    single_vec: Callable[[int], Any],
    options: dict[str, Any] | None = None,
) -> tuple[torch.Tensor, int]:
    """Run the slim ``Flux``-style model's blocks as the tail of its ``forward_orig`` does, from the seam
    state in ``t``: (image tokens before the head [B, L_img_all, H], main image token count).

    ``need``: the family's other tensors a request must carry; ``double_vec(i)`` / ``single_vec(i)``:
    the ``vec`` argument of the slim model's double / single block ``i``; ``options``: more of the
    blocks' transformer_options (a patch call's attention override)."""
    try:
        seam, txt_len, img_len = s["seam"], int(s["txt_len"]), int(s["img_len"])
        pe = t["pe"]
    except (KeyError, TypeError, ValueError) as e:
        raise RemoteProtocolError(f"{display} request lacks {e}") from None
    mask = t.get("attn_mask")
    nd, ns = plan.remote[DOUBLE], plan.remote[SINGLE]
    missing = [k for k in (["img", "txt"] if nd else ["x"]) + need if k not in t]
    if missing:
        raise RemoteProtocolError(f"{display} request lacks tensors {missing}")
    expected = DOUBLE if nd else SINGLE
    if seam != expected:
        raise RemoteProtocolError(f"request cuts at {seam} but this server's first block is in {expected}")
    topts: dict[str, Any] = dict(options or {})
    if nd:
        img, txt = t["img"], t["txt"]
        topts.update(total_blocks=plan.counts[DOUBLE], block_type="double")
        first = plan.first_remote(DOUBLE)
        for i, block in enumerate(dm.double_blocks):
            topts["block_index"] = first + i
            img, txt = block(img=img, txt=txt, vec=double_vec(i), pe=pe, attn_mask=mask, transformer_options=topts)
        if img.dtype == torch.float16:
            img = torch.nan_to_num(img, nan=0.0, posinf=65504, neginf=-65504)
        x = torch.cat((txt, img), 1)
    else:
        x = t["x"]
    if not (0 <= txt_len <= x.shape[1] and 0 <= img_len <= x.shape[1] - txt_len):
        raise RemoteProtocolError(f"token counts txt={txt_len} img={img_len} do not fit x {list(x.shape)}")
    if ns:
        topts.update(total_blocks=plan.counts[SINGLE], block_type="single", img_slice=[txt_len, x.shape[1]])
        first = plan.first_remote(SINGLE)
        for i, block in enumerate(dm.single_blocks):
            topts["block_index"] = first + i
            x = block(x, vec=single_vec(i), pe=pe, attn_mask=mask, transformer_options=topts)
    return x[:, txt_len:, ...], img_len


def server_forward(dm: Any, plan: SplitPlan, t: dict[str, torch.Tensor], s: dict[str, Any]) -> dict[str, torch.Tensor]:
    """Run the slim model's blocks and final_layer; mirrors the tail of Flux.forward_orig."""
    nd, ns = plan.remote[DOUBLE], plan.remote[SINGLE]
    need = ["vec"] + (["mod_img", "mod_txt"] if nd else []) + (["mod_single"] if ns else [])
    dvec: Any = None
    smod: Any = None
    if all(k in t for k in need):
        if nd:
            mi, mt = _unpack(t["mod_img"], 2), _unpack(t["mod_txt"], 2)
            dvec = ((mi[0], mi[1]), (mt[0], mt[1]))
        if ns:
            (smod,) = _unpack(t["mod_single"], 1)
    override = patchpipe.serving_override()  # a patch call (PROTOCOL.md §6.3): fresh + stale keys / values
    options = {patchpipe.OVERRIDE_KEY: override} if override is not None else None
    img, img_len = run_blocks(dm, plan, t, s, "FLUX.2", need, lambda i: dvec, lambda i: smod, options)
    out = dm.final_layer(img, t["vec"])
    return {"out": out[:, :img_len]}


ADAPTER = register(
    Adapter(
        family="flux2",
        display="FLUX.2",
        block_groups=(DOUBLE, SINGLE),
        hook_names={DOUBLE: "double_block", SINGLE: "single_block"},
        config_keys={DOUBLE: "depth", SINGLE: "depth_single_blocks"},
        heads=("final_layer",),
        server_drops=(
            "img_in",
            "txt_in",
            "time_in",
            "guidance_in",
            "vector_in",
            "txt_norm",
            "double_stream_modulation_img",
            "double_stream_modulation_txt",
            "single_stream_modulation",
        ),
        detect_keys=detect_keys,
        detect_model=detect_model,
        server_forward=server_forward,
        client_payload=client_payload,
        notes="Dev 8+48 blocks, Klein 9B 8+24, Klein 4B 5+20",
        # the input of double_stream_modulation_img is the un-modulated time vector
        captures={"vec": Capture("double_stream_modulation_img", "in", 0), "txt": Capture("txt_in", "out", 0)},
        payload_modules={"single_mod": "single_stream_modulation"},
        control_keys={DOUBLE: "input", SINGLE: "output"},  # ControlNet residual lists
        hook_returns=("img", "txt"),  # double blocks return both streams, single blocks "img"
        pad_head_tokens=True,  # reference-image tokens: the server returns the main image tokens only
        request_names=r"img|txt|x|vec|mod_img|mod_txt|mod_single|pe|attn_mask",
        request_widths={"img": "hidden_size", "txt": "hidden_size", "x": "hidden_size", "vec": "hidden_size"},
        # FLUX.2 latents are already patchified (patch_size 1): a token is a latent cell
        patch=PatchSupport(latent_arg=0, rope_shift="rope_options", token_cell=1, exact_if_set=("ref_latents",)),
    )
)
