"""ComfyUI-Mesh: split a diffusion transformer between ComfyUI (Icarus) and Daedalus.

This folder is both the ComfyUI custom-node pack (ComfyUI imports it under whatever name
it was cloned as) and the installable package ``comfyui_mesh`` used by the server and the
tests. Nodes are registered only when ComfyUI itself is importable; everything else works
without it.
"""

import importlib.util
import sys

from .constants import PACKAGE_VERSION as __version__

NODE_CLASS_MAPPINGS: dict = {}
NODE_DISPLAY_NAME_MAPPINGS: dict = {}
WEB_DIRECTORY = "./web"


def _comfy_present() -> bool:
    try:
        return importlib.util.find_spec("comfy") is not None and importlib.util.find_spec("folder_paths") is not None
    except (ImportError, ValueError):
        return False


if _comfy_present():
    from .mesh_node import NODE_CLASS_MAPPINGS as _flux_nodes
    from .mesh_node import NODE_DISPLAY_NAME_MAPPINGS as _flux_names

    NODE_CLASS_MAPPINGS.update(_flux_nodes)
    NODE_DISPLAY_NAME_MAPPINGS.update(_flux_names)
    from .mesh_node_ltx import NODE_CLASS_MAPPINGS as _ltx_nodes
    from .mesh_node_ltx import NODE_DISPLAY_NAME_MAPPINGS as _ltx_names

    NODE_CLASS_MAPPINGS.update(_ltx_nodes)
    NODE_DISPLAY_NAME_MAPPINGS.update(_ltx_names)


def _prompt_server():
    """ComfyUI's running PromptServer, looked up without importing anything (None outside ComfyUI)."""
    return getattr(getattr(sys.modules.get("server"), "PromptServer", None), "instance", None)


if _comfy_present() and _prompt_server() is not None:
    from . import routes as _routes

    _routes.register(_prompt_server())

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "WEB_DIRECTORY", "__version__"]
