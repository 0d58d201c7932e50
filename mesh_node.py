"""Icarus for FLUX.2: the "ComfyUI Mesh : Icarus" node (id MeshSplitFlux).

Inputs keep the original project's names and order so its saved workflows still load;
newer inputs are optional and come last.
"""

from __future__ import annotations

import logging
from typing import Any

from . import codec
from . import routes as ui
from .config import ClientConfig
from .constants import DEFAULT_HOST, DEFAULT_PORT
from .errors import LocalError, MeshError
from .icarus import SplitSettings, split_model, token_store

log = logging.getLogger("comfyui_mesh")

# "nvenc" stays listed: it was the original project's default, so its saved workflows still load.
CODEC_MODES = ["raw", "auto", "lossless", "quant", "quant-t", "int8", "q4", "clip-sparse", "lossless-t", "nvenc"]

TOOLTIPS = {
    "n_blocks_remote": "Blocks run on Daedalus, counted from the END of the model (single blocks first, then "
    "double blocks). Must match the server's --n-blocks. 0 = run everything locally.",
    "remote_host": "Address of the Daedalus machine (127.0.0.1 for a second GPU in this PC).",
    "remote_port": "Daedalus port (default 7777).",
    "codec_mode": "How the seam state crosses the wire. raw: exact bytes (bit-identical, best on fast links). "
    "auto: picks from the measured link speed and the GPUs. lossless: exact, entropy-coded (~1.4x smaller). "
    "quant: one shared quantizer step for cosine 0.999 + entropy coding (~4x smaller, near the rate-distortion "
    "bound). quant-t: quant on the change since the previous step (fewer bytes as sampling converges). "
    "int8 / q4: per-channel 8-bit / 4-bit. clip-sparse: percentile clip + exact outliers (the original's "
    "LTX mode). lossless-t: exact, temporal. nvenc: HEVC video coding (NVENC where the card has it, else x265).",
    "codec_qp": "HEVC quantizer for codec_mode=nvenc (lower = better quality, more bytes).",
    "codec_lossless": "nvenc: HEVC lossless. auto: consider exact codecs only.",
    "codec_tile_dim": "Channels per HEVC plane side for codec_mode=nvenc.",
    "forward_client_loras": "Send LoRAs loaded BEFORE this node to the server so the whole model gets them. "
    "LoRAs loaded AFTER this node stay local (front half only).",
}


class MeshSplitFlux:
    """Split a FLUX.2 model: the last n_blocks_remote blocks and the final layer run on Daedalus."""

    DISPLAY = "ComfyUI Mesh : Icarus"  # the node's name in the UI, its banners and its errors
    CATEGORY = "ComfyUI-Mesh"
    RETURN_TYPES = ("MODEL",)
    FUNCTION = "configure"
    DESCRIPTION = __doc__

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        t = TOOLTIPS
        return {
            "required": {
                "model": ("MODEL",),
                "n_blocks_remote": ("INT", {"default": 4, "min": 0, "max": 256, "tooltip": t["n_blocks_remote"]}),
                "remote_host": ("STRING", {"default": DEFAULT_HOST, "tooltip": t["remote_host"]}),
                "remote_port": ("INT", {"default": DEFAULT_PORT, "min": 1, "max": 65535, "tooltip": t["remote_port"]}),
                "codec_mode": (CODEC_MODES, {"default": "raw", "tooltip": t["codec_mode"]}),
                "codec_qp": ("INT", {"default": 18, "min": 0, "max": 51, "tooltip": t["codec_qp"]}),
                "codec_lossless": ("BOOLEAN", {"default": False, "tooltip": t["codec_lossless"]}),
                "codec_tile_dim": ([1, 2, 4, 8], {"default": 8, "tooltip": t["codec_tile_dim"]}),
                "forward_client_loras": ("BOOLEAN", {"default": True, "tooltip": t["forward_client_loras"]}),
            },
            "hidden": {"unique_id": "UNIQUE_ID"},
        }

    def configure(
        self,
        model: Any,
        n_blocks_remote: int,
        remote_host: str,
        remote_port: int,
        codec_mode: str = "raw",
        codec_qp: int = 18,
        codec_lossless: bool = False,
        codec_tile_dim: int = 8,
        forward_client_loras: bool = True,
        unique_id: str = "",
    ) -> tuple[Any]:
        try:
            self.check_model(model)
            if n_blocks_remote == 0:
                log.info("ComfyUI-Mesh: n_blocks_remote=0, the whole model runs locally")
                ui.send_banner(unique_id, "info", "n_blocks_remote is 0: the whole model runs locally")
                return (model,)
            try:
                why = codec.by_name(codec_mode).available()
            except LocalError:
                why = "it is not part of this ComfyUI-Mesh release"
            if why:
                raise LocalError(f"codec_mode {codec_mode!r} cannot be used here: {why}; choose raw, lossless or quant")
            host = remote_host.strip()
            cfg = ClientConfig(host=host, port=int(remote_port), token=token_store().get(host, int(remote_port)))
            settings = SplitSettings(
                n_remote=int(n_blocks_remote),
                client=cfg,
                codec_name=codec_mode,
                codec_params={
                    "qp": codec_qp,
                    "lossless": codec_lossless,
                    "tile_dim": int(codec_tile_dim),
                    "cosine": 0.999,  # fidelity target of the quant family and auto
                },
                forward_loras=bool(forward_client_loras),
                node_id=str(unique_id),
                on_step=ui.step_reporter(unique_id, codec_mode),
            )
            m, run = split_model(model, settings)
        except MeshError as e:
            ui.send_banner(unique_id, "error", str(e))
            raise
        try:
            server = run.client().connect()  # fail at queue time with a clear message, not mid-sampling
        except MeshError as e:
            ui.send_banner(unique_id, "error", str(e))
            raise LocalError(f"{self.DISPLAY} (node {unique_id}): {e}") from e
        ui.send_banner(
            unique_id, "ok", f"{cfg.address}: {server.model}, last {server.n_blocks} blocks on {server.device}"
        )
        return (m,)

    def check_model(self, model: Any) -> None:
        """Raise a LocalError, naming the fix, for a model this node does not split (subclasses narrow it)."""


NODE_CLASS_MAPPINGS = {"MeshSplitFlux": MeshSplitFlux}
NODE_DISPLAY_NAME_MAPPINGS = {"MeshSplitFlux": MeshSplitFlux.DISPLAY}
