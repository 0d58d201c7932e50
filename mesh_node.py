"""Icarus: the "ComfyUI Mesh : Icarus" node (id MeshSplitFlux, kept for saved workflows) and the
``NodeSpec`` its per-family variants override.

The node splits any model a registered ``arch`` adapter recognises (FLUX.2, LTX-AV, ...).
Inputs keep the original project's names and order so its saved workflows still load;
newer inputs are optional and come last. A variant (``mesh_node_ltx.MeshSplitLTX``) is a
subclass with another ``SPEC``: which families it accepts, which inputs it shows (a subset,
in the original order of that node) and their defaults, its display name.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

from . import arch, codec, ui_events
from .constants import DEFAULT_HOST, DEFAULT_PORT, DEFAULT_SNR_DB, PATCH_CHOICES, PATCH_WARMUP_CALLS, ROW_MODES
from .errors import LocalError, MeshError
from .host import client_config
from .icarus import SplitSettings, split_model

log = logging.getLogger("comfyui_mesh")

# "nvenc" stays listed: it was the original project's default, so its saved workflows still load.
CODEC_MODES = ["raw", "auto", "lossless", "quant", "quant-t", "int8", "q4", "clip-sparse", "lossless-t", "nvenc"]

TOOLTIPS = {
    "model": "The diffusion model from the loader; its last n_blocks_remote blocks run on Daedalus.",
    "n_blocks_remote": "Blocks run on Daedalus, counted from the END of the model in execution order (for "
    "FLUX.2: single blocks first, then double blocks); the server also runs the output head. Must match the "
    "server's --n-blocks. 0 = run everything locally.",
    "remote_host": "Address of the Daedalus machine (127.0.0.1 for a second GPU in this PC).",
    "remote_port": "Daedalus port (default 7777).",
    "codec_mode": "How the seam state crosses the wire. raw: exact bytes (bit-identical, best on fast links). "
    "auto: picks from the measured link speed and the GPUs. lossless: exact, entropy-coded (~1.4x smaller). "
    "quant: one quantizer step shared by all channels in units of each channel's spread, entropy-coded: every "
    "channel keeps fidelity_db (~4x smaller at 27 dB). quant-t: quant on the change since the previous step "
    "(fewer bytes as sampling converges). int8 / q4: per-channel 8-bit / 4-bit (int8 has no per-channel floor). clip-sparse: percentile clip + exact outliers (the original's "
    "LTX mode). lossless-t: exact, temporal. nvenc: HEVC video coding (NVENC where the card has it, else x265).",
    "codec_qp": "HEVC quantizer for codec_mode=nvenc (lower = better quality, more bytes).",
    "codec_lossless": "nvenc: HEVC lossless. auto: consider exact codecs only.",
    "codec_tile_dim": "Channels per HEVC plane side for codec_mode=nvenc.",
    "forward_client_loras": "Send LoRAs loaded BEFORE this node to the server so the whole model gets them. "
    "LoRAs loaded AFTER this node stay local (front half only).",
    "row_pipelining": "Several rows in one model call (CFG cond + uncond, batch > 1) are sent one row at a time, "
    "the next row's first half computing while this one is on the network and on Daedalus. auto: over a network "
    "link (not for a server on this machine). Exact: the same result as the unsplit model run row by row.",
    "fidelity_db": "Per-channel fidelity floor of quant, quant-t and auto, in dB: every channel of the seam keeps "
    "at least this signal-to-noise ratio against its own spread over the tokens, the few huge ('massive') "
    "channels of trained models and the quiet ones alike. 27 dB (the default) = the old cosine 0.999; each "
    "+6 dB costs about 1 bit per value more.",
    "patch_pipelining": "APPROXIMATE, for one-row calls (FLUX.2 at CFG 1): each model call after the warm-up "
    "runs as 2 / 4 / 8 patches (bands of latent rows), the next patch's first half computing while this one is "
    "on the network and on Daedalus; each patch sees the other patches as they were one step earlier. off: "
    "exact. Families without support, and calls with CFG rows, run exact (logged).",
    "patch_warmup": "Model calls (steps at CFG 1) of each generation that run exact before patch pipelining "
    "starts; they also record what the patches see of one another.",
}

# Marks an Icarus node in /object_info (an option of its model input): the node UI (web/mesh.js)
# decorates every node type that carries it, so a new node needs no change there.
ICARUS_FLAG = "comfyui_mesh_icarus"

# Every input after ``model``: (type, options without the tooltip). A node shows a subset, in its order.
INPUTS: dict[str, tuple[Any, dict[str, Any]]] = {
    "n_blocks_remote": ("INT", {"default": 4, "min": 0, "max": 256}),
    "remote_host": ("STRING", {"default": DEFAULT_HOST}),
    "remote_port": ("INT", {"default": DEFAULT_PORT, "min": 1, "max": 65535}),
    "codec_mode": (CODEC_MODES, {"default": "raw"}),
    "codec_qp": ("INT", {"default": 18, "min": 0, "max": 51}),
    "codec_lossless": ("BOOLEAN", {"default": False}),
    "codec_tile_dim": ([1, 2, 4, 8], {"default": 8}),
    "forward_client_loras": ("BOOLEAN", {"default": True}),
    "fidelity_db": ("FLOAT", {"default": DEFAULT_SNR_DB, "min": 6.0, "max": 60.0, "step": 0.5}),
    "row_pipelining": (list(ROW_MODES), {"default": "auto"}),
    "patch_pipelining": (list(PATCH_CHOICES), {"default": "off"}),
    "patch_warmup": ("INT", {"default": PATCH_WARMUP_CALLS, "min": 1, "max": 10000}),
}
# Inputs added after the original project's: optional, so saved workflows and API prompts
# without them still validate (they get the default).
OPTIONAL_INPUTS = ("fidelity_db", "row_pipelining", "patch_pipelining", "patch_warmup")


@dataclass(frozen=True)
class NodeSpec:
    """What tells one Icarus node from another: data only, the behaviour is shared."""

    display: str  # the node's name in the UI, its banners and its errors
    description: str
    inputs: tuple[str, ...] = tuple(INPUTS)  # shown after "model", in this order (saved workflows: by order)
    # (an input in OPTIONAL_INPUTS is listed under "optional", after the required ones)
    families: tuple[str, ...] = ()  # arch families this node splits; empty: every registered family
    defaults: dict[str, Any] = field(default_factory=dict)  # input -> default, over INPUTS'
    tooltips: dict[str, str] = field(default_factory=dict)  # input -> tooltip, over TOOLTIPS

    def input_types(self) -> dict[str, Any]:
        required: dict[str, Any] = {
            "model": ("MODEL", {ICARUS_FLAG: True, "tooltip": self.tooltips.get("model", TOOLTIPS["model"])})
        }
        optional: dict[str, Any] = {}
        for name in self.inputs:
            kind, opts = INPUTS[name]
            default = self.defaults.get(name, opts["default"])
            where = optional if name in OPTIONAL_INPUTS else required
            where[name] = (kind, {**opts, "default": default, "tooltip": self.tooltips.get(name, TOOLTIPS[name])})
        types: dict[str, Any] = {"required": required}
        if optional:
            types["optional"] = optional
        types["hidden"] = {"unique_id": "UNIQUE_ID"}
        return types

    def bind(self, values: tuple[Any, ...], named: dict[str, Any]) -> dict[str, Any]:
        """The node's input values (positional in ``inputs`` order, or by name) over the defaults."""
        if len(values) > len(self.inputs):
            raise TypeError(f"{self.display} takes {len(self.inputs)} inputs after model, got {len(values)}")
        unknown = set(named) - set(self.inputs)
        clash = set(named) & set(self.inputs[: len(values)])
        if unknown or clash:
            raise TypeError(f"{self.display}: unknown inputs {sorted(unknown)} or given twice {sorted(clash)}")
        bound = {name: self.defaults.get(name, opts["default"]) for name, (_, opts) in INPUTS.items()}
        bound.update(zip(self.inputs, values, strict=False))
        bound.update(named)
        return bound


class MeshSplitFlux:
    """Split a diffusion transformer of any supported family (FLUX.2, FLUX.1, Chroma, LTX-AV, Wan 2.1 / 2.2,
    Qwen-Image, HunyuanVideo, Z-Image / Lumina 2; detected from the model): its last n_blocks_remote blocks and
    its output head run on Daedalus."""

    SPEC = NodeSpec(display="ComfyUI Mesh : Icarus", description=__doc__ or "")
    DISPLAY = SPEC.display
    DESCRIPTION = SPEC.description
    CATEGORY = "ComfyUI-Mesh"
    RETURN_TYPES = ("MODEL",)
    FUNCTION = "configure"

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        cls.DISPLAY, cls.DESCRIPTION = cls.SPEC.display, cls.SPEC.description

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        return cls.SPEC.input_types()

    def configure(self, model: Any, *values: Any, unique_id: str = "", **named: Any) -> tuple[Any]:
        """ComfyUI passes the inputs by name; positional values follow ``SPEC.inputs``."""
        v = self.SPEC.bind(values, named)
        codec_mode = str(v["codec_mode"])
        try:
            self.check_model(model)
            if int(v["n_blocks_remote"]) == 0:
                log.info("ComfyUI-Mesh: n_blocks_remote=0, the whole model runs locally")
                ui_events.send_banner(unique_id, "info", "n_blocks_remote is 0: the whole model runs locally")
                return (model,)
            try:
                why = codec.by_name(codec_mode).available()
            except LocalError:
                why = "it is not part of this ComfyUI-Mesh release"
            if why:
                usable = [m for m in CODEC_MODES if m in codec.names() and codec.by_name(m).available() is None]
                raise LocalError(
                    f"codec_mode {codec_mode!r} cannot be used here: {why}; usable here: {', '.join(usable)}"
                )
            host, port = str(v["remote_host"]).strip(), int(v["remote_port"])
            cfg = client_config(host, port)
            settings = SplitSettings(
                n_remote=int(v["n_blocks_remote"]),
                client=cfg,
                codec_name=codec_mode,
                codec_params={
                    "qp": v["codec_qp"],
                    "lossless": v["codec_lossless"],
                    "tile_dim": int(v["codec_tile_dim"]),
                    "snr_db": float(v["fidelity_db"]),  # per-channel floor of the quant family and auto
                },
                forward_loras=bool(v["forward_client_loras"]),
                rows=str(v["row_pipelining"]),
                patches=0 if str(v["patch_pipelining"]) == "off" else int(v["patch_pipelining"]),
                patch_warmup=int(v["patch_warmup"]),
                node_id=str(unique_id),
                on_step=ui_events.step_reporter(unique_id, codec_mode),
                on_status=ui_events.status_reporter(unique_id),
                on_suggest=ui_events.suggestion_reporter(unique_id),
            )
            m, run = split_model(model, settings)
            ui_events.record_split(unique_id, cfg.address, run.adapter.family, run.adapter.display, run.plan.n_remote)
        except MeshError as e:
            ui_events.send_banner(unique_id, "error", str(e))
            raise
        try:
            server = run.client().connect()  # fail at queue time with a clear message, not mid-sampling
        except MeshError as e:
            ui_events.send_banner(unique_id, "error", str(e))
            raise LocalError(f"{self.DISPLAY} (node {unique_id}): {e}") from e
        ui_events.send_banner(
            unique_id, "ok", f"{cfg.address}: {server.model}, last {server.n_blocks} blocks on {server.device}"
        )
        return (m,)

    def check_model(self, model: Any) -> None:
        """Refuse, with the fix named, a model of a family this node does not split (``SPEC.families``)."""
        families = self.SPEC.families
        if not families:
            return  # every registered family: split_model names the supported ones if it is none of them
        try:
            adapter = arch.for_model(model.get_model_object("diffusion_model"))
        except LocalError as e:
            raise LocalError(f"{self.DISPLAY}: {e}") from None
        if adapter.family not in families:
            names = ", ".join(arch.get(f).display for f in families)
            raise LocalError(
                f"{self.DISPLAY} splits {names} models; this model is {adapter.display}: "
                f"use the '{MeshSplitFlux.SPEC.display}' node for it"
            )


NODE_CLASS_MAPPINGS = {"MeshSplitFlux": MeshSplitFlux}
NODE_DISPLAY_NAME_MAPPINGS = {"MeshSplitFlux": MeshSplitFlux.DISPLAY}
