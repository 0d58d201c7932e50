"""Icarus for LTX-AV: the "ComfyUI Mesh : Icarus LTX" node (id MeshSplitLTX).

The same node as Icarus for FLUX.2 (``mesh_node.MeshSplitFlux``: clone, stubs, seam hook,
one Daedalus connection, banners and per-step stats in the UI, its own name in errors) with
the original LTX node's inputs: model, n_blocks_remote (default 8 of 48), remote_host,
remote_port, codec_mode, forward_client_loras (default off: LTX LoRAs are often hundreds of
MB; load big ones on the server instead). Only LTX-AV (LTX-2 / LTX-2.3 audio+video) models
are accepted.
"""

from __future__ import annotations

from typing import Any

from . import arch
from .errors import LocalError
from .mesh_node import MeshSplitFlux

DISPLAY = "ComfyUI Mesh : Icarus LTX"

TOOLTIPS = {
    "n_blocks_remote": "LTX-AV blocks run on Daedalus, counted from the END of the model's 48 blocks (the "
    "server also runs both output heads). Must match the server's --n-blocks. 0 = run everything locally.",
    "forward_client_loras": "Send LoRAs loaded BEFORE this node to the server so the whole model gets them "
    "(resent when they change). Off by default: LTX LoRAs are often hundreds of MB; for big or always-on "
    "LoRAs load them on the server and put a LoraLoader for the same file AFTER this node.",
}


def check_ltxav(model: Any) -> None:
    """Refuse, with the fix named, anything but an LTX-AV model."""
    dm = model.get_model_object("diffusion_model")
    try:
        adapter = arch.for_model(dm)
    except LocalError as e:
        raise LocalError(f"{DISPLAY}: {e}") from None
    if adapter.family != "ltxav":
        raise LocalError(
            f"{DISPLAY} splits LTX-AV (LTX-2 / LTX-2.3) models; this model is {adapter.display}: "
            "use the 'ComfyUI Mesh : Icarus' node for it"
        )


class MeshSplitLTX(MeshSplitFlux):
    """Split an LTX-AV model (LTX-2 / LTX-2.3 audio+video): its last n_blocks_remote blocks and both output
    heads run on Daedalus."""

    DISPLAY = DISPLAY
    DESCRIPTION = __doc__

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        base = super().INPUT_TYPES()
        req = base["required"]
        return {
            "required": {
                "model": req["model"],
                "n_blocks_remote": (
                    "INT",
                    {**req["n_blocks_remote"][1], "default": 8, "tooltip": TOOLTIPS["n_blocks_remote"]},
                ),
                "remote_host": req["remote_host"],
                "remote_port": req["remote_port"],
                "codec_mode": req["codec_mode"],
                "forward_client_loras": (
                    "BOOLEAN",
                    {**req["forward_client_loras"][1], "default": False, "tooltip": TOOLTIPS["forward_client_loras"]},
                ),
            },
            **{k: v for k, v in base.items() if k != "required"},
        }

    def configure(  # type: ignore[override]
        self,
        model: Any,
        n_blocks_remote: int,
        remote_host: str,
        remote_port: int,
        codec_mode: str = "raw",
        forward_client_loras: bool = False,
        **hidden: Any,
    ) -> tuple[Any]:
        return super().configure(
            model,
            n_blocks_remote,
            remote_host,
            remote_port,
            codec_mode=codec_mode,
            forward_client_loras=forward_client_loras,
            **hidden,
        )

    def check_model(self, model: Any) -> None:
        check_ltxav(model)  # inside MeshSplitFlux.configure: a refusal shows as a banner under the node too


NODE_CLASS_MAPPINGS = {"MeshSplitLTX": MeshSplitLTX}
NODE_DISPLAY_NAME_MAPPINGS = {"MeshSplitLTX": MeshSplitLTX.DISPLAY}
