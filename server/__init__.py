"""Daedalus, the back-half server. ``python -m comfyui_mesh.server --help``."""

from .core import Backend, DaedalusServer, ServerState, Session

__all__ = ["Backend", "DaedalusServer", "ServerState", "Session"]
