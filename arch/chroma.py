"""Chroma: ComfyUI's ``Chroma`` class, FLUX.1-schnell-like blocks without modulation layers.

A distilled-guidance "approximator" (``distilled_guidance_layer``) turns the timestep and guidance
into ``mod_vectors`` [B, 344, H], one row per shift / scale / gate of every block and two for the
final layer (layout in ``Chroma.get_modulations``: singles 3 rows each, then the doubles' image rows,
6 each, then their text rows, 6 each; the final layer's shift and scale are the last 2 rows). The
blocks take their rows as ``ModulationOut``; they have no modulation weights of their own.

The server holds the last N blocks plus final_layer (no approximator: 0.5 GB it never needs) and
returns the model output for the image tokens, [B, L_img, 64]. Per call the client sends:
  coded  the seam state: ``img`` + ``txt`` (seam in the doubles) or ``x`` = cat(txt, img)
  exact  ``mods`` [B, R, H]: only the rows the remote blocks and the final layer read, in the order
         remote singles (3 each), remote doubles' image rows (6 each), their text rows (6 each),
         final (2); R = 3 * singles + 12 * doubles + 2 (at most 344, 2 MB per CFG row in bf16)
  consts ``pe`` (RoPE) and ``attn_mask``: once per generation

Chroma Radiance (pixel space, a NeRF head) is a different model and is not detected as Chroma.
"""

from __future__ import annotations

from typing import Any

import torch

from ..errors import LocalError, RemoteProtocolError
from ..payload import SeamPayload
from . import Adapter, Capture, SeamCall, SplitPlan, register
from .flux2 import DOUBLE, SINGLE, Mod, run_blocks, seam_consts, seam_state

DISPLAY = "Chroma"
APPROX = "distilled_guidance_layer"


def detect_keys(keys: set[str]) -> bool:
    """Chroma keys: the approximator beside FLUX-style blocks and an ``img_in`` projection (Chroma
    Radiance has ``img_in_patch`` and NeRF blocks instead)."""
    return (
        "img_in.weight" in keys
        and "double_blocks.0.img_attn.qkv.weight" in keys
        and any(k.startswith(APPROX + ".") for k in keys)
        and not any(k.startswith("nerf_blocks.") for k in keys)
    )


def detect_model(dm: Any) -> bool:
    return type(dm).__name__ == "Chroma" and hasattr(dm, APPROX) and hasattr(dm, "final_layer")


def config_from_shapes(shapes: dict[str, tuple[int, ...]]) -> dict[str, Any]:
    """The approximator's widths and depth from its tensors (ComfyUI's detection assumes the released
    64 -> 5120 x 5 -> 3072; a released checkpoint gives the same values, a tiny test model its own)."""
    w_in, w_out = shapes.get(APPROX + ".in_proj.weight"), shapes.get(APPROX + ".out_proj.weight")
    if w_in is None or w_out is None:
        return {}
    layers = {k.split(".")[2] for k in shapes if k.startswith(APPROX + ".layers.")}
    return {"in_dim": w_in[1], "hidden_dim": w_in[0], "out_dim": w_out[0], "n_layers": len(layers)}


def mod_rows(plan: SplitPlan, total_rows: int) -> list[int]:
    """Rows of ``mod_vectors`` the server needs, in wire order (see the module docstring)."""
    singles, doubles = plan.counts[SINGLE], plan.counts[DOUBLE]
    rows = [r for i in plan.remote_indices(SINGLE) for r in range(3 * i, 3 * i + 3)]
    for base in (3 * singles, 3 * singles + 6 * doubles):  # image rows, then text rows
        rows += [r for i in plan.remote_indices(DOUBLE) for r in range(base + 6 * i, base + 6 * i + 6)]
    return rows + [total_rows - 2, total_rows - 1]


def client_payload(args: dict[str, Any], sc: SeamCall) -> SeamPayload:
    """One block-hook call at the seam -> (coded, exact, consts, scalars): the seam state and the
    remote blocks' modulation rows of this call."""
    plan = sc.plan
    mods = sc.values.get("mods")
    if not isinstance(mods, torch.Tensor) or mods.ndim != 3:
        raise LocalError(f"{DISPLAY} split: the modulation vectors were not captured (unexpected model code path)")
    for group, attr in ((DOUBLE, "skip_mmdit"), (SINGLE, "skip_dit")):
        skipped = set(sc.modules.get(attr) or ()) & set(plan.remote_indices(group))
        if skipped:
            raise LocalError(
                f"{DISPLAY} split: {group} {sorted(skipped)} are set to be skipped and run on Daedalus; skipping "
                "remote blocks is not supported: lower n_blocks_remote below them, or run without Icarus"
            )
    rows = mod_rows(plan, mods.shape[1])
    if rows[0] < 0 or max(rows) >= mods.shape[1]:
        raise LocalError(f"{DISPLAY} split: {mods.shape[1]} modulation rows do not cover this model's blocks")
    index = sc.state.get("mod_index")
    if index is None or index.device != mods.device:
        index = sc.state["mod_index"] = torch.tensor(rows, device=mods.device)
    coded, txt_len, img_len = seam_state(args, sc, DISPLAY)
    scalars = {"seam": sc.seam, "txt_len": txt_len, "img_len": img_len}
    return SeamPayload(coded, {"mods": mods.index_select(1, index)}, seam_consts(args), scalars)


def server_forward(dm: Any, plan: SplitPlan, t: dict[str, torch.Tensor], s: dict[str, Any]) -> dict[str, torch.Tensor]:
    """Run the slim model's blocks and final_layer; mirrors the tail of Chroma.forward_orig."""
    nd, ns = plan.remote[DOUBLE], plan.remote[SINGLE]
    mods = t.get("mods")
    if mods is None:
        raise RemoteProtocolError(f"{DISPLAY} request lacks tensors ['mods']")
    if mods.ndim != 3 or mods.shape[1] != 3 * ns + 12 * nd + 2:
        raise RemoteProtocolError(
            f"{DISPLAY} request: modulation rows {list(mods.shape)}, this server's {nd} double + {ns} single blocks "
            f"need [B, {3 * ns + 12 * nd + 2}, H]"
        )

    def mod(row: int) -> Mod:
        return Mod(mods[:, row : row + 1], mods[:, row + 1 : row + 2], mods[:, row + 2 : row + 3])

    def double_vec(i: int) -> Any:
        img, txt = 3 * ns + 6 * i, 3 * ns + 6 * nd + 6 * i
        return (mod(img), mod(img + 3)), (mod(txt), mod(txt + 3))

    img, img_len = run_blocks(dm, plan, t, s, DISPLAY, ["mods"], double_vec, lambda i: mod(3 * i))
    out = dm.final_layer(img, vec=(mods[:, -2:-1], mods[:, -1:]))
    return {"out": out[:, :img_len]}


ADAPTER = register(
    Adapter(
        family="chroma",
        display=DISPLAY,
        block_groups=(DOUBLE, SINGLE),
        hook_names={DOUBLE: "double_block", SINGLE: "single_block"},
        config_keys={DOUBLE: "depth", SINGLE: "depth_single_blocks"},
        heads=("final_layer",),
        server_drops=("img_in", "txt_in", APPROX),
        detect_keys=detect_keys,
        detect_model=detect_model,
        server_forward=server_forward,
        client_payload=client_payload,
        notes="Chroma1 (HD / base): 19+38 blocks, 3072 wide",
        captures={"mods": Capture(APPROX, "out", 0), "txt": Capture("txt_in", "out", 0)},
        payload_modules={"skip_mmdit": "skip_mmdit", "skip_dit": "skip_dit"},  # block lists the model skips
        control_keys={DOUBLE: "input", SINGLE: "output"},  # ControlNet residual lists
        hook_returns=("img", "txt"),
        config_from_shapes=config_from_shapes,
        request_names=r"img|txt|x|mods|pe|attn_mask",
        request_widths={"img": "hidden_size", "txt": "hidden_size", "x": "hidden_size", "mods": "hidden_size"},
    )
)
