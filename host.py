"""Facts about the ComfyUI this pack runs in: its version, the user folder's token store, and
whether it has the model-patching API the split relies on. Node glue; imports ComfyUI lazily
(every function works, or degrades, outside ComfyUI)."""

from __future__ import annotations

from pathlib import Path

from .auth import TokenStore
from .config import ClientConfig
from .errors import LocalError


def comfyui_version() -> str:
    try:
        import comfyui_version as v

        return str(v.__version__)
    except ImportError:
        return ""


def token_store() -> TokenStore:
    try:
        import folder_paths

        return TokenStore(Path(folder_paths.get_user_directory()) / "comfyui-mesh" / "tokens.json")
    except (ImportError, AttributeError):
        return TokenStore(None)


def client_config(host: str, port: int, **kw) -> ClientConfig:
    """The node's settings for host:port: the token saved for it, its pinned server id (the same file)."""
    store = token_store()
    return ClientConfig(host=host, port=port, token=store.get(host, port), trust_file=str(store.path or ""), **kw)


def check_comfy_contract() -> None:
    """Fail at node execution, with the version named, if ComfyUI lacks what we rely on."""
    import comfy.model_patcher as mp
    import comfy.patcher_extension as pe

    missing = [
        name
        for name, ok in (
            ("ModelPatcher.clone", hasattr(mp.ModelPatcher, "clone")),
            ("ModelPatcher.add_object_patch", hasattr(mp.ModelPatcher, "add_object_patch")),
            ("ModelPatcher.set_model_patch_replace", hasattr(mp.ModelPatcher, "set_model_patch_replace")),
            ("ModelPatcher.add_wrapper_with_key", hasattr(mp.ModelPatcher, "add_wrapper_with_key")),
            ("WrappersMP.DIFFUSION_MODEL", hasattr(pe.WrappersMP, "DIFFUSION_MODEL")),
        )
        if not ok
    ]
    if missing:
        raise LocalError(
            f"ComfyUI {comfyui_version() or '(unknown version)'} lacks {', '.join(missing)}, which ComfyUI-Mesh "
            "needs: update ComfyUI (tested with 0.28)"
        )
