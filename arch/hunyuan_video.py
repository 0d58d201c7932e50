"""HunyuanVideo 1.5 (and 1.0): ComfyUI's ``HunyuanVideo`` class (comfy/ldm/hunyuan_video/model.py).

ComfyUI builds both releases from the one class: 1.5 is the checkpoint with ``vision_in`` and
``cond_type_embedding`` (detection: ``vision_in_dim`` 1152; 54 double blocks of 16 x 128, no single
blocks, ByT5 glyph text, 65 input channels = noise + I2V image latent + mask); 1.0 has 20 double and
40 single blocks of 24 x 128. Execution order is double_blocks then single_blocks, then
final_layer. The blocks compute their own modulation from the time vector ``vec``, so the server
needs no embedder at all: the client runs img_in / txt_in (token refiner) / ByT5 / vision_in / the
time embedders, the server the last N blocks and final_layer, and returns final_layer's output for
the image tokens, [B, L_img, C_out].

Per call the client sends:
  coded  the seam state: ``img`` + ``txt`` (seam in the doubles) or ``x`` (the joint sequence)
  exact  ``vec`` ([B, H], or [B, 2, H] with 1.0 I2V's guiding frame)
  consts ``pe`` (RoPE) and ``attn_mask`` (text padding): once per generation
  scalars token counts, where the image tokens sit, the guiding-frame modulation spans and the
         text/image order of this ComfyUI release (checked against the server's)

I2V (1.5: concat image latent + CLIP vision tokens; 1.0: concat, guiding frame, reference latent)
is all input-side, before the blocks: it crosses as part of ``img`` / ``txt`` / ``vec``.
"""

from __future__ import annotations

import inspect
import sys
from typing import Any

import torch

from ..errors import LocalError, RemoteProtocolError
from ..payload import SeamPayload
from . import Adapter, Capture, SeamCall, SplitPlan, register

DOUBLE, SINGLE = "double_blocks", "single_blocks"
MIN_RELEASE = "ComfyUI 0.3.75 or newer (the oldest release verified)"


def detect_keys(keys: set[str]) -> bool:
    return "txt_in.individual_token_refiner.blocks.0.norm1.weight" in keys and "img_in.proj.weight" in keys


def detect_model(dm: Any) -> bool:
    return (
        type(dm).__name__ == "HunyuanVideo"
        and all(hasattr(dm, a) for a in (DOUBLE, SINGLE, "final_layer", "txt_in"))
        and hasattr(dm, "params")
    )


def img_first(obj: Any) -> bool:
    """This release's token order: ComfyUI <= 0.8 runs HunyuanVideo image-then-text (double blocks
    built with ``flipped_img_txt``); later releases text-then-image. Read off the block class that
    the model module of ``obj`` (the model, or its ``txt_in``) uses, so a server holding no double
    block knows it too."""
    cls = getattr(sys.modules.get(type(obj).__module__), "DoubleStreamBlock", None)
    if cls is None:
        raise LocalError(
            f"HunyuanVideo split: this ComfyUI's model module has no DoubleStreamBlock; needs {MIN_RELEASE}"
        )
    return "flipped_img_txt" in inspect.signature(cls.__init__).parameters


def _dims(v: Any, what: str) -> list[list[int | None]] | None:
    """Modulation spans [(start, end|None, row)] as JSON."""
    if v is None:
        return None
    if not isinstance(v, (list, tuple)) or not all(isinstance(d, (list, tuple)) and len(d) == 3 for d in v):
        raise LocalError(f"HunyuanVideo split: unexpected {what} {v!r}")
    return [[None if x is None else int(x) for x in d] for d in v]


def _dims_in(v: Any, what: str) -> list[tuple[int, int | None, int]] | None:
    if v is None:
        return None
    ok = isinstance(v, list) and len(v) <= 16
    out = []
    for d in v if ok else []:
        if not (isinstance(d, list) and len(d) == 3):
            ok = False
            break
        a, b, r = d
        if not (isinstance(a, int) and (b is None or isinstance(b, int)) and isinstance(r, int)) or a < 0 or r < 0:
            ok = False
            break
        out.append((a, b, r))
    if not ok:
        raise RemoteProtocolError(f"HunyuanVideo request: bad {what} {v!r}")
    return out


def client_payload(args: dict[str, Any], sc: SeamCall) -> SeamPayload:
    plan, seam = sc.plan, sc.seam
    main = sc.values.get("main")  # img_in's first output: the noisy latent's tokens (no reference latent)
    if not isinstance(main, torch.Tensor):
        raise LocalError("HunyuanVideo split: the image tokens were not captured (unexpected model code path)")
    main_len = int(main.shape[1])
    txt_in = sc.modules.get("txt_in")
    if txt_in is None:
        raise LocalError("HunyuanVideo split: the model has no txt_in (unexpected model code)")
    flipped = img_first(txt_in)
    vec = args["vec"]
    topts = args.get("transformer_options") or {}
    coded: dict[str, torch.Tensor] = {}
    scalars: dict[str, Any] = {"seam": seam, "main_len": main_len, "img_first": flipped}
    if seam == DOUBLE:
        img, txt = args["img"], args["txt"]
        coded["img"], coded["txt"] = img, txt
        txt_len, img_len = int(txt.shape[1]), int(img.shape[1])
        scalars["mod_img"] = _dims(args.get("modulation_dims_img"), "image modulation spans")
        scalars["mod_txt"] = _dims(args.get("modulation_dims_txt"), "text modulation spans")
    else:
        x = args["img"]
        coded["x"] = x
        scalars["mod_img"] = _dims(args.get("modulation_dims"), "modulation spans")
        img_slice = topts.get("img_slice")
        if img_slice is not None:
            txt_len = int(img_slice[0])
        elif sc.values.get("ref_latent"):
            raise LocalError(
                "HunyuanVideo split: a reference latent (HunyuanImageToVideo 'v2 (custom)') with only single "
                f"blocks remote needs a newer ComfyUI (one whose single blocks get img_slice): raise n_blocks_remote "
                f"into the double blocks ({plan.counts[SINGLE] + 1} or more)"
            )
        else:
            txt_len = int(x.shape[1]) - main_len if flipped else 0  # no reference latent: img == main tokens
        img_len = int(x.shape[1]) - txt_len
    if not 0 <= main_len <= img_len:
        raise LocalError(f"HunyuanVideo split: {main_len} image tokens of {img_len} (unexpected model code path)")
    ref_len = img_len - main_len  # reference-latent tokens lead the image tokens and are dropped before the head
    scalars.update(txt_len=txt_len, start=(0 if flipped else txt_len) + ref_len)
    consts = {"pe": args["pe"]}
    if args.get("attention_mask") is not None:
        consts["attn_mask"] = args["attention_mask"]
    return SeamPayload(coded, {"vec": vec}, consts, scalars)


def call_info(args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, Any]:
    """Whether the call carries a reference latent (``HunyuanVideo._forward``'s 10th argument)."""
    ref = args[9] if len(args) > 9 else kwargs.get("ref_latent")
    return {"ref_latent": ref is not None}


def server_forward(dm: Any, plan: SplitPlan, t: dict[str, torch.Tensor], s: dict[str, Any]) -> dict[str, torch.Tensor]:
    """Run the slim model's blocks and final_layer; mirrors the tail of HunyuanVideo.forward_orig."""
    try:
        seam, txt_len, main_len, start = s["seam"], s["txt_len"], s["main_len"], s["start"]
        flipped = s["img_first"]
        pe, vec = t["pe"], t["vec"]
    except KeyError as e:
        raise RemoteProtocolError(f"HunyuanVideo request lacks {e}") from None
    if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in (txt_len, main_len, start)):
        raise RemoteProtocolError(f"HunyuanVideo request: bad token counts {txt_len!r} {main_len!r} {start!r}")
    if flipped is not img_first(dm):
        order = ("image, text", "text, image")
        raise RemoteProtocolError(
            f"HunyuanVideo request orders tokens {order[not flipped]}, this server's ComfyUI {order[flipped]}: "
            "run ComfyUI releases on the same side of 0.9 on both machines"
        )
    mod_img = _dims_in(s.get("mod_img"), "image modulation spans")
    mod_txt = _dims_in(s.get("mod_txt"), "text modulation spans")
    mask = t.get("attn_mask")
    nd, ns = plan.remote[DOUBLE], plan.remote[SINGLE]
    expected = DOUBLE if nd else SINGLE
    if seam != expected:
        raise RemoteProtocolError(f"request cuts at {seam} but this server's first block is in {expected}")
    need = ["img", "txt"] if nd else ["x"]
    missing = [k for k in need if k not in t]
    if missing:
        raise RemoteProtocolError(f"HunyuanVideo request lacks tensors {missing}")
    if vec.ndim not in (2, 3) or vec.shape[-1] != dm.hidden_size:
        raise RemoteProtocolError(f"HunyuanVideo request: vec {list(vec.shape)} for width {dm.hidden_size}")
    topts: dict[str, Any] = {}
    if nd:
        img, txt = t["img"], t["txt"]
        if img.ndim != 3 or txt.ndim != 3 or txt.shape[1] != txt_len:
            raise RemoteProtocolError(f"HunyuanVideo request: img {list(img.shape)} txt {list(txt.shape)}")
        topts.update(total_blocks=plan.counts[DOUBLE], block_type="double")
        first = plan.first_remote(DOUBLE)
        for i, block in enumerate(dm.double_blocks):
            topts["block_index"] = first + i
            img, txt = block(
                img=img,
                txt=txt,
                vec=vec,
                pe=pe,
                attn_mask=mask,
                modulation_dims_img=mod_img,
                modulation_dims_txt=mod_txt,
                transformer_options=topts,
            )
        x = torch.cat((img, txt) if flipped else (txt, img), 1)
    else:
        x = t["x"]
    if x.ndim != 3 or not (txt_len <= x.shape[1] and start + main_len <= x.shape[1]):
        raise RemoteProtocolError(f"HunyuanVideo request: token counts do not fit x {list(x.shape)}")
    if ns:
        topts.update(total_blocks=plan.counts[SINGLE], block_type="single")
        if not flipped:
            topts["img_slice"] = [txt_len, x.shape[1]]
        first = plan.first_remote(SINGLE)
        for i, block in enumerate(dm.single_blocks):
            topts["block_index"] = first + i
            x = block(x, vec=vec, pe=pe, attn_mask=mask, modulation_dims=mod_img, transformer_options=topts)
    img = x[:, start : start + main_len]
    return {"out": dm.final_layer(img, vec, modulation_dims=mod_img)}


ADAPTER = register(
    Adapter(
        family="hunyuan_video",
        display="HunyuanVideo",
        block_groups=(DOUBLE, SINGLE),
        hook_names={DOUBLE: "double_block", SINGLE: "single_block"},
        config_keys={DOUBLE: "depth", SINGLE: "depth_single_blocks"},
        heads=("final_layer",),
        server_drops=(
            "img_in",
            "time_in",
            "time_r_in",
            "vector_in",
            "guidance_in",
            "txt_in",
            "byt5_in",
            "vision_in",
            "cond_type_embedding",
        ),
        detect_keys=detect_keys,
        detect_model=detect_model,
        server_forward=server_forward,
        client_payload=client_payload,
        notes="1.5 (8.3B): 54 double blocks, no single; 1.0 (13B): 20 double + 40 single",
        captures={"main": Capture("img_in", "out", 0)},
        call_info=call_info,
        payload_modules={"txt_in": "txt_in"},  # its module tells this release's token order
        control_keys={DOUBLE: "input", SINGLE: "output"},
        hook_returns=("img", "txt"),
        request_names=r"img|txt|x|vec|pe|attn_mask",
        request_widths={"img": "hidden_size", "txt": "hidden_size", "x": "hidden_size", "vec": "hidden_size"},
    )
)
