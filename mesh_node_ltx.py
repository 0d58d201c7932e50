"""Icarus for LTX-AV: the "ComfyUI Mesh : Icarus LTX" node (id MeshSplitLTX).

The generic Icarus node (``mesh_node.MeshSplitFlux``: clone, stubs, seam hook, one Daedalus
connection, banners and per-step stats in the UI, its own name in errors) with another spec:
the original LTX node's inputs (model, n_blocks_remote (default 8 of 48), remote_host,
remote_port, codec_mode, forward_client_loras (default off: LTX LoRAs are often hundreds of
MB; load big ones on the server instead)), the optional fidelity_db and row_pipelining, and only LTX-AV (LTX-2 / LTX-2.3 audio+video)
models accepted.
"""

from __future__ import annotations

from .mesh_node import MeshSplitFlux, NodeSpec


class MeshSplitLTX(MeshSplitFlux):
    """Split an LTX-AV model (LTX-2 / LTX-2.3 audio+video): its last n_blocks_remote blocks and both output
    heads run on Daedalus."""

    SPEC = NodeSpec(
        display="ComfyUI Mesh : Icarus LTX",
        description=__doc__ or "",
        inputs=(
            "n_blocks_remote",
            "remote_host",
            "remote_port",
            "codec_mode",
            "forward_client_loras",
            "fidelity_db",
            "row_pipelining",
        ),
        families=("ltxav",),
        defaults={"n_blocks_remote": 8, "forward_client_loras": False},
        tooltips={
            "n_blocks_remote": "LTX-AV blocks run on Daedalus, counted from the END of the model's 48 blocks "
            "(the server also runs both output heads). Must match the server's --n-blocks. 0 = run everything "
            "locally.",
            "forward_client_loras": "Send LoRAs loaded BEFORE this node to the server so the whole model gets "
            "them (resent when they change). Off by default: LTX LoRAs are often hundreds of MB; for big or "
            "always-on LoRAs load them on the server and put a LoraLoader for the same file AFTER this node.",
        },
    )


NODE_CLASS_MAPPINGS = {"MeshSplitLTX": MeshSplitLTX}
NODE_DISPLAY_NAME_MAPPINGS = {"MeshSplitLTX": MeshSplitLTX.DISPLAY}
