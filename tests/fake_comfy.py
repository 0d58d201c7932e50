"""A minimal stand-in for the parts of ComfyUI that Icarus touches, so CI runs the seam.

What it fakes, with ComfyUI's semantics (read from comfy/model_patcher.py and
comfy/patcher_extension.py; written here, not copied):

* ``comfy.patcher_extension``: ``WrappersMP`` / ``CallbacksMP`` names, ``WrapperExecutor``
  (the first registered wrapper is the outermost; ``executor.class_obj`` is the wrapped
  instance; a wrapper continues the chain by calling ``executor(*args, **kwargs)``),
  ``get_all_wrappers`` and ``merge_nested_dicts``;
* ``comfy.model_patcher``: ``ModelPatcher`` (``FakeModelPatcher``): ``clone`` shares the module
  and the weight/object backups and copies patches, object patches, model options, wrappers and
  injections; object patches and weight patches are applied by ``patch_model`` and undone by
  ``unpatch_model`` (weights first, then objects, as ComfyUI does);
* ``folder_paths`` (a user directory) and ``comfyui_version``;
* ``server`` with a ``PromptServer.instance`` that records ``send_sync`` events (the UI banners).

``install(monkeypatch)`` puts these into ``sys.modules`` for one test (undone afterwards), and only
when no real ComfyUI is configured (COMFYUI_PATH): then the real ``comfy`` modules are imported
instead and only the parts ComfyUI lacks outside a running server (``server``) are faked.
The patcher, the sampler loop (``sample``) and the weight-patch math live here either way, so the
same test drives the real ``comfy.patcher_extension`` when it is there.

Nothing here is importable from the ``comfyui_mesh`` package.
"""

from __future__ import annotations

import copy
import sys
import types
import uuid
from collections import namedtuple
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

FAKE_VERSION = "0.28.0-fake"

# ----------------------------------------------------------------------------- patcher_extension


class WrappersMP:
    OUTER_SAMPLE = "outer_sample"
    PREPARE_SAMPLING = "prepare_sampling"
    SAMPLER_SAMPLE = "sampler_sample"
    PREDICT_NOISE = "predict_noise"
    CALC_COND_BATCH = "calc_cond_batch"
    APPLY_MODEL = "apply_model"
    DIFFUSION_MODEL = "diffusion_model"


class CallbacksMP:
    ON_CLONE = "on_clone"
    ON_LOAD = "on_load_after"
    ON_DETACH = "on_detach_after"
    ON_CLEANUP = "on_cleanup"
    ON_PRE_RUN = "on_pre_run"


class WrapperExecutor:
    """Runs ``wrappers[idx]`` (or ``original`` once they are used up); each wrapper gets the executor
    for the rest of the chain as its first argument."""

    def __init__(self, original: Callable[..., Any], class_obj: Any, wrappers: list[Callable[..., Any]], idx: int):
        self.original = original
        self.class_obj = class_obj
        self.wrappers = list(wrappers)
        self.idx = idx

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return WrapperExecutor(self.original, self.class_obj, self.wrappers, self.idx + 1).execute(*args, **kwargs)

    def execute(self, *args: Any, **kwargs: Any) -> Any:
        if self.idx >= len(self.wrappers):
            return self.original(*args, **kwargs)
        return self.wrappers[self.idx](self, *args, **kwargs)

    @classmethod
    def new_executor(cls, original: Callable[..., Any], wrappers: list[Callable[..., Any]], idx: int = 0) -> Any:
        return cls(original, None, wrappers, idx)

    @classmethod
    def new_class_executor(
        cls, original: Callable[..., Any], class_obj: Any, wrappers: list[Callable[..., Any]], idx: int = 0
    ) -> Any:
        return cls(original, class_obj, wrappers, idx)


class PatcherInjection:
    def __init__(self, inject: Callable[..., Any], eject: Callable[..., Any]):
        self.inject = inject
        self.eject = eject


def get_all_wrappers(wrapper_type: str, transformer_options: dict, is_model_options: bool = False) -> list:
    if is_model_options:
        transformer_options = transformer_options.get("transformer_options", {})
    out: list = []
    for ws in transformer_options.get("wrappers", {}).get(wrapper_type, {}).values():
        out.extend(ws)
    return out


def merge_nested_dicts(a: dict, b: dict, copy_dict1: bool = True) -> dict:
    merged = copy_nested(a) if copy_dict1 else a
    for k, v in b.items():
        if isinstance(v, dict):
            merged[k] = merge_nested_dicts(merged.setdefault(k, {}), v)
        elif isinstance(v, list):
            merged.setdefault(k, []).extend(v)
        else:
            merged[k] = v
    return merged


def copy_nested(d: dict) -> dict:
    """Copies of nested dicts and lists; the leaves (hooks, tensors) are shared, as in ComfyUI."""
    out = dict(d)
    for k, v in d.items():
        if isinstance(v, dict):
            out[k] = copy_nested(v)
        elif isinstance(v, list):
            out[k] = list(v)
    return out


# ----------------------------------------------------------------------------- weight patches


class LoRAAdapter:
    """A LoRA weight adapter (``name`` + ``weights`` = (up, down, alpha, mid, dora_scale, reshape))."""

    name = "lora"

    def __init__(self, loaded_keys: set[str], weights: tuple[Any, ...]):
        self.loaded_keys = loaded_keys
        self.weights = weights

    def delta(self, weight: torch.Tensor) -> torch.Tensor:
        up, down, alpha = self.weights[0], self.weights[1], self.weights[2]
        scale = (float(alpha) / down.shape[0]) if alpha is not None else 1.0
        return (up.float() @ down.float()).reshape(weight.shape) * scale


ADAPTERS = {LoRAAdapter.name: LoRAAdapter}


def merge_patches(entries: list[tuple[Any, ...]], weight: torch.Tensor) -> torch.Tensor:
    """``weight`` with ComfyUI-style patch entries (strength_patch, patch, strength_model, offset,
    function) applied: ``("diff", (tensor,))`` and LoRA adapters. The client's patcher and the test
    server use this one function, so a split run can be compared bit for bit."""
    w = weight.float()
    for strength_patch, patch, strength_model, offset, function in entries:
        if offset is not None or function is not None:
            raise NotImplementedError("fake_comfy: offsets and functions are not modelled")
        if strength_model != 1.0:
            w = w * strength_model
        if isinstance(patch, tuple) and patch[0] == "diff":
            w = w + strength_patch * patch[1][0].float()
        elif isinstance(patch, LoRAAdapter):
            w = w + strength_patch * patch.delta(w)
        else:
            raise NotImplementedError(f"fake_comfy: patch type {type(patch).__name__}")
    return w.to(weight.dtype)


def get_attr(obj: Any, name: str) -> Any:
    for part in name.split("."):
        obj = getattr(obj, part)
    return obj


def set_attr(obj: Any, name: str, value: Any) -> Any:
    *path, last = name.split(".")
    for part in path:
        obj = getattr(obj, part)
    prev = getattr(obj, last)
    setattr(obj, last, value)
    return prev


# ----------------------------------------------------------------------------- model_patcher

Backup = namedtuple("Backup", ["weight", "inplace_update"])


class FakeModelPatcher:
    """ComfyUI's ModelPatcher, as far as Icarus and a sampler use it."""

    def __init__(self, model: torch.nn.Module, load_device: Any = "cpu", offload_device: Any = "cpu", size: int = 0):
        self.model = model
        self.load_device = torch.device(load_device)
        self.offload_device = torch.device(offload_device)
        self.size = size
        self.patches: dict[str, list[tuple[Any, ...]]] = {}
        self.backup: dict[str, Backup] = {}
        self.object_patches: dict[str, Any] = {}
        self.object_patches_backup: dict[str, Any] = {}
        self.model_options: dict[str, Any] = {"transformer_options": {}}
        self.patches_uuid = uuid.uuid4()
        self.wrappers: dict[str, dict[Any, list[Callable[..., Any]]]] = {}
        self.callbacks: dict[str, dict[Any, list[Callable[..., Any]]]] = {}
        self.injections: dict[str, list[Any]] = {}
        self.parent: FakeModelPatcher | None = None

    # -- the calls Icarus makes
    def clone(self) -> FakeModelPatcher:
        n = type(self)(self.model, self.load_device, self.offload_device, self.model_size())
        n.patches = {k: list(v) for k, v in self.patches.items()}
        n.patches_uuid = self.patches_uuid
        n.object_patches = dict(self.object_patches)
        n.model_options = copy_nested(self.model_options)
        n.backup, n.object_patches_backup = self.backup, self.object_patches_backup  # shared, as in ComfyUI
        n.wrappers = {t: {k: list(w) for k, w in ws.items()} for t, ws in self.wrappers.items()}
        n.callbacks = {t: {k: list(c) for k, c in cs.items()} for t, cs in self.callbacks.items()}
        n.injections = {k: list(v) for k, v in self.injections.items()}
        n.parent = self
        return n

    def model_size(self) -> int:
        if self.size > 0:
            return self.size
        self.size = sum(t.numel() * t.element_size() for t in self.model.state_dict().values())
        return self.size

    def get_model_object(self, name: str) -> Any:
        if name in self.object_patches:
            return self.object_patches[name]
        if name in self.object_patches_backup:
            return self.object_patches_backup[name]
        return get_attr(self.model, name)

    def add_object_patch(self, name: str, obj: Any) -> None:
        self.object_patches[name] = obj

    def set_model_patch_replace(
        self, patch: Any, name: str, block_name: str, number: int, transformer_index: int | None = None
    ) -> None:
        to = dict(self.model_options["transformer_options"])
        to["patches_replace"] = dict(to.get("patches_replace", {}))
        to["patches_replace"][name] = dict(to["patches_replace"].get(name, {}))
        key = (block_name, number) if transformer_index is None else (block_name, number, transformer_index)
        to["patches_replace"][name][key] = patch
        self.model_options = {**self.model_options, "transformer_options": to}

    def set_model_patch(self, patch: Any, name: str) -> None:
        to = self.model_options["transformer_options"]
        to.setdefault("patches", {})
        to["patches"][name] = to["patches"].get(name, []) + [patch]

    def add_wrapper_with_key(self, wrapper_type: str, key: Any, wrapper: Callable[..., Any]) -> None:
        self.wrappers.setdefault(wrapper_type, {}).setdefault(key, []).append(wrapper)

    def add_wrapper(self, wrapper_type: str, wrapper: Callable[..., Any]) -> None:
        self.add_wrapper_with_key(wrapper_type, None, wrapper)

    def get_all_wrappers(self, wrapper_type: str) -> list[Callable[..., Any]]:
        return [w for ws in self.wrappers.get(wrapper_type, {}).values() for w in ws]

    def add_callback_with_key(self, call_type: str, key: Any, callback: Callable[..., Any]) -> None:
        self.callbacks.setdefault(call_type, {}).setdefault(key, []).append(callback)

    def set_injections(self, key: str, injections: list[Any]) -> None:
        self.injections[key] = injections

    def add_patches(self, patches: dict[str, Any], strength_patch: float = 1.0, strength_model: float = 1.0) -> list:
        sd = self.model.state_dict()
        added = []
        for key, patch in patches.items():
            if key in sd:
                self.patches.setdefault(key, []).append((strength_patch, patch, strength_model, None, None))
                added.append(key)
        self.patches_uuid = uuid.uuid4()
        return added

    # -- what loading and unloading the model does
    def patch_model(self) -> None:
        for key, entries in self.patches.items():
            param = get_attr(self.model, key)
            if key not in self.backup:
                self.backup[key] = Backup(param.data, False)
            set_attr(self.model, key, torch.nn.Parameter(merge_patches(entries, param.data), requires_grad=False))
        for name, obj in self.object_patches.items():
            old = set_attr(self.model, name, obj)
            self.object_patches_backup.setdefault(name, old)

    def unpatch_model(self) -> None:
        for key, b in list(self.backup.items()):  # weights first, as ComfyUI does
            set_attr(self.model, key, torch.nn.Parameter(b.weight, requires_grad=False))
        self.backup.clear()
        for name, old in list(self.object_patches_backup.items()):
            set_attr(self.model, name, old)
        self.object_patches_backup.clear()

    def cleanup(self) -> None:
        for cb in [c for cs in self.callbacks.get(CallbacksMP.ON_CLEANUP, {}).values() for c in cs]:
            cb(self)


def set_model_options_patch_replace(
    model_options: dict, patch: Any, name: str, block_name: str, number: int, transformer_index: int | None = None
) -> dict:
    p = FakeModelPatcher(torch.nn.Module())
    p.model_options = model_options
    p.set_model_patch_replace(patch, name, block_name, number, transformer_index)
    return p.model_options


# ----------------------------------------------------------------------------- the sampler


class FakeGuider:
    """CFGGuider's shape (``model_patcher``, ``model_options``, ``conds``, ``cfg``): ``outer_sample``
    takes ComfyUI's arguments, loads the model, runs the steps (Euler), unloads it."""

    def __init__(self, patcher: FakeModelPatcher, model_options: dict, cfg: float, conds: list[dict], extra: dict):
        self.model_patcher = patcher
        self.model_options = model_options
        self.cfg = cfg
        self.conds = conds
        self.extra = extra
        self.model_calls = 0

    def outer_sample(
        self,
        noise: Any,
        latent_image: Any,
        sampler: Any,
        sigmas: torch.Tensor,
        denoise_mask: Any = None,
        callback: Any = None,
        disable_pbar: bool = False,
        seed: int | None = None,
        latent_shapes: Any = None,
    ) -> Any:
        p = self.model_patcher
        p.patch_model()
        try:
            x = noise
            for i in range(len(sigmas) - 1):
                v = self.predict(x, sigmas[i], sigmas, self.conds, self.extra)
                dt = sigmas[i + 1] - sigmas[i]
                x = _map2(lambda a, b: a + dt * b, x, v)  # noqa: B023 (used at once)
                if callback is not None:
                    callback(i, v, x, len(sigmas) - 1)
            return x
        finally:
            p.cleanup()
            p.unpatch_model()

    def predict(self, x: Any, sigma: torch.Tensor, sigmas: torch.Tensor, conds: list[dict], extra: dict) -> Any:
        """One batched model call for all conds (cond, uncond: CFG batch), then CFG."""
        n = len(conds)
        to = copy_nested(self.model_options["transformer_options"])
        to["cond_or_uncond"] = list(range(n))
        to["uuids"] = [uuid.uuid4() for _ in range(n)]
        to["sample_sigmas"] = sigmas
        b = _batch(x)
        to["sigmas"] = sigma.repeat(n * b)
        x_in = _map(lambda a: torch.cat([a] * n), x)
        c = {k: torch.cat([cd[k] for cd in conds]) for k in conds[0]}
        model: Any = self.model_patcher.model
        out = model.apply_model(x_in, to["sigmas"], transformer_options=to, **c, **extra)
        self.model_calls += 1
        parts = [_map(lambda a: a[i * b : (i + 1) * b], out) for i in range(n)]  # noqa: B023 (used at once)
        if n == 1:
            return parts[0]
        return _map2(lambda pos, neg: neg + self.cfg * (pos - neg), parts[0], parts[1])


def _batch(x: Any) -> int:
    return (x[0] if isinstance(x, (list, tuple)) else x).shape[0]


def _map(fn: Callable[[torch.Tensor], torch.Tensor], x: Any) -> Any:
    return [fn(a) for a in x] if isinstance(x, (list, tuple)) else fn(x)


def _map2(fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], x: Any, y: Any) -> Any:
    return [fn(a, b) for a, b in zip(x, y, strict=True)] if isinstance(x, (list, tuple)) else fn(x, y)


def sample(
    patcher: FakeModelPatcher,
    noise: Any,
    sigmas: torch.Tensor,
    positive: dict[str, torch.Tensor],
    negative: dict[str, torch.Tensor] | None = None,
    cfg: float = 2.0,
    **extra: Any,
) -> tuple[Any, FakeGuider]:
    """Sample like ComfyUI's CFGGuider: the patcher's wrappers are merged into the run's model
    options, ``OUTER_SAMPLE`` wrappers surround the whole run (executor.class_obj = the guider),
    and every model call (one per step, cond and uncond batched) goes through the
    ``DIFFUSION_MODEL`` wrappers inside the model's forward. ``extra``: more model-call keyword
    arguments (``control``, ``ref_latents``, ...). Runs under ``torch.inference_mode`` like
    ComfyUI's node execution. Returns (latent, guider)."""
    pe = sys.modules.get("comfy.patcher_extension")
    if pe is None:
        raise RuntimeError("fake_comfy.sample needs comfy.patcher_extension installed (use the fixture)")
    options = copy_nested(patcher.model_options)
    pe.merge_nested_dicts(options["transformer_options"].setdefault("wrappers", {}), patcher.wrappers, copy_dict1=False)
    conds = [positive] + ([negative] if negative is not None else [])
    guider = FakeGuider(patcher, options, cfg, conds, extra)
    options["transformer_options"]["sample_sigmas"] = sigmas
    executor = pe.WrapperExecutor.new_class_executor(
        guider.outer_sample,
        guider,
        pe.get_all_wrappers(pe.WrappersMP.OUTER_SAMPLE, options, is_model_options=True),
    )
    latent = _map(torch.zeros_like, noise)
    with torch.inference_mode():
        out = executor.execute(noise, latent, "euler", sigmas, None, None, True, 0, latent_shapes=None)
    return out, guider


# ----------------------------------------------------------------------------- modules and install


class PromptServer:
    """``server.PromptServer``: records what nodes send to the browser."""

    instance: PromptServer | None = None

    def __init__(self) -> None:
        self.client_id = "fake-client"
        self.events: list[tuple[str, dict[str, Any]]] = []

    def send_sync(self, event: str, data: dict[str, Any], sid: Any = None) -> None:
        self.events.append((event, copy.deepcopy(data)))

    def banners(self, node_id: str | None = None) -> list[tuple[str, str]]:
        return [
            (d["level"], d["text"])
            for e, d in self.events
            if e == "mesh-banner" and (node_id is None or d["node_id"] == str(node_id))
        ]


def _module(name: str, **attrs: Any) -> types.ModuleType:
    m = types.ModuleType(name)
    m.__dict__.update(attrs)
    m.__file__ = __file__
    return m


def fake_modules(user_dir: Path) -> dict[str, types.ModuleType]:
    """Fresh fake ComfyUI modules (no state shared between tests)."""
    pe = _module(
        "comfy.patcher_extension",
        WrappersMP=WrappersMP,
        CallbacksMP=CallbacksMP,
        WrapperExecutor=WrapperExecutor,
        PatcherInjection=PatcherInjection,
        get_all_wrappers=get_all_wrappers,
        merge_nested_dicts=merge_nested_dicts,
        copy_nested_dicts=copy_nested,
    )
    mp = _module(
        "comfy.model_patcher",
        ModelPatcher=FakeModelPatcher,
        CoreModelPatcher=FakeModelPatcher,
        set_model_options_patch_replace=set_model_options_patch_replace,
    )
    comfy = _module("comfy", patcher_extension=pe, model_patcher=mp)
    comfy.__path__ = []  # a package, so "import comfy.x" resolves through sys.modules
    fp = _module("folder_paths", get_user_directory=lambda: str(user_dir))
    ver = _module("comfyui_version", __version__=FAKE_VERSION)
    return {"comfy": comfy, "comfy.patcher_extension": pe, "comfy.model_patcher": mp, "folder_paths": fp,
            "comfyui_version": ver}  # fmt: skip


class Harness:
    """What ``install`` set up: ``real`` (a real ComfyUI is in use), ``prompt_server``, ``user_dir``."""

    def __init__(self, real: bool, prompt_server: PromptServer, user_dir: Path):
        self.real = real
        self.prompt_server = prompt_server
        self.user_dir = user_dir


def real_comfy_configured() -> bool:
    import os

    path = os.environ.get("COMFYUI_PATH", "")
    return bool(path) and (Path(path) / "comfy" / "sd.py").is_file()


def install(monkeypatch: Any, user_dir: Path) -> Harness:
    """Make ``import comfy.model_patcher`` etc. work for one test; undone by ``monkeypatch``.

    With a real ComfyUI configured (COMFYUI_PATH) the fakes are NOT installed: the real modules
    are imported (once per process, on the CPU) and used; folder_paths' user directory is pointed
    at ``user_dir`` for the test. A ``server`` module with a recording ``PromptServer`` is added
    only where no ``server`` module is loaded."""
    real = real_comfy_configured() or "comfy.model_patcher" in sys.modules  # a real ComfyUI already imported
    if real:
        if real_comfy_configured():
            from comfy_support import import_comfy

            import_comfy()
        import comfy.patcher_extension  # noqa: F401
        import folder_paths

        monkeypatch.setattr(folder_paths, "get_user_directory", lambda: str(user_dir))
    else:
        for name, mod in fake_modules(user_dir).items():
            monkeypatch.setitem(sys.modules, name, mod)
    ps = PromptServer()
    if "server" not in sys.modules:
        server = _module("server", PromptServer=type("PromptServer", (), {"instance": ps}))
        monkeypatch.setitem(sys.modules, "server", server)
    return Harness(real, ps, user_dir)
