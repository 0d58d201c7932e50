"""Slim-load the back half through ComfyUI's own model code (the only server module that
imports ``comfy``).

Detection runs on the checkpoint's full key set as meta tensors (shapes only), so ComfyUI
picks the same model class, dtype and quantization handling it would for the whole
model; then the block counts are cut to the back half and only the kept tensors are read
from disk. Non-block modules the back half never uses are replaced by empty stubs before
anything reaches the GPU.
"""

from __future__ import annotations

import functools
import gc
import inspect
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch

from .. import arch
from ..config import ServerConfig
from ..errors import LocalError, OverBudget, RemoteProtocolError
from ..fingerprint import fingerprint
from .budget import Budget, SizedLRU

log = logging.getLogger("daedalus")

_REPO = Path(__file__).resolve().parent.parent
TESTED_COMFYUI = "0.28.0"
_ST_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


def find_comfyui(explicit: str = "") -> Path:
    candidates = [explicit, os.environ.get("COMFYUI_PATH", "")]
    # The usual installs: this pack inside ComfyUI/custom_nodes, or ComfyUI beside it.
    candidates += [str(_REPO.parent.parent), str(_REPO.parent / "ComfyUI"), str(_REPO / "ComfyUI")]
    for c in candidates:
        if c and (Path(c) / "comfy" / "sd.py").is_file():
            return Path(c).resolve()
    raise LocalError(
        "cannot find ComfyUI: pass --comfyui /path/to/ComfyUI or set COMFYUI_PATH "
        f"(looked in: {', '.join(c for c in candidates if c)})"
    )


class Empty(torch.nn.Module):
    """Parameterless placeholder for a module the back half never calls."""

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("ComfyUI-Mesh: a stubbed module was called on the server")


_COMFY: dict[str, Any] = {}


def import_comfy(path: Path, device: str) -> dict[str, Any]:
    """Import ComfyUI's model code once, configured for ``device``."""
    if _COMFY:
        return _COMFY
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))
    import comfy.cli_args

    if device == "cpu":
        comfy.cli_args.args.cpu = True
    elif device.startswith("cuda"):
        idx = int(device.split(":")[1]) if ":" in device else 0
        if torch.cuda.is_available():
            torch.cuda.set_device(idx)
    import comfy.model_detection
    import comfy.model_management
    import comfy.model_patcher
    import comfy.sd
    import comfy.utils

    try:
        import comfyui_version

        version = str(comfyui_version.__version__)
    except ImportError:
        version = "unknown"
    needed = {
        comfy.model_detection: ("model_config_from_unet",),
        comfy.utils: ("calculate_parameters", "weight_dtype"),
        comfy.model_management: ("unet_dtype", "unet_manual_cast", "unet_offload_device", "load_models_gpu"),
        comfy.model_patcher: ("ModelPatcher",),
    }
    missing = [f"{m.__name__}.{a}" for m, names in needed.items() for a in names if not hasattr(m, a)]
    if missing:
        raise LocalError(
            f"ComfyUI {version} at {path} lacks {', '.join(missing)}, which Daedalus's loader needs "
            f"(tested with ComfyUI {TESTED_COMFYUI}): use that release or report the version"
        )
    _COMFY.update(
        detection=comfy.model_detection,
        mm=comfy.model_management,
        patcher=comfy.model_patcher,
        utils=comfy.utils,
        version=version,
    )
    return _COMFY


def read_header(path: str) -> tuple[dict[str, tuple[list[int], torch.dtype]], dict[str, str]]:
    from safetensors import safe_open

    if not Path(path).is_file():
        raise LocalError(f"model file not found: {path}")
    out: dict[str, tuple[list[int], torch.dtype]] = {}
    with safe_open(path, framework="pt") as f:
        meta = f.metadata() or {}
        for k in f.keys():
            sl = f.get_slice(k)
            dt = _ST_DTYPES.get(sl.get_dtype())
            if dt is None:
                raise LocalError(f"{path}: tensor {k} has unsupported dtype {sl.get_dtype()}")
            out[k] = (list(sl.get_shape()), dt)
    return out, meta


def _remap_quant_metadata(
    meta: dict[str, str], prefix: str, adapter: arch.Adapter, plan: arch.SplitPlan
) -> dict[str, str]:
    if "_quantization_metadata" not in meta:
        return meta
    q = json.loads(meta["_quantization_metadata"])
    layers = {}
    for name, conf in q.get("layers", {}).items():
        bare = name[len(prefix) :] if prefix and name.startswith(prefix) else name
        new = adapter.remote_key(bare + ".weight", plan)
        if new is not None:
            layers[(prefix if name.startswith(prefix) else "") + new[: -len(".weight")]] = conf
    return {**meta, "_quantization_metadata": json.dumps({**q, "layers": layers})}


# ---------------------------------------------------------------------------- release differences
# Each helper mirrors what comfy.sd.load_diffusion_model_state_dict does in the installed release,
# chosen by what that release offers (attributes, signatures), never by its version string.


def convert_old_quants(utils: Any, sd: dict[str, torch.Tensor], metadata: dict[str, Any]) -> tuple[dict, dict]:
    """``comfy.utils.convert_old_quants`` (ComfyUI >= 0.8: scaled-fp8 / per-layer quant keys to
    its quant format); earlier releases read those keys during detection instead."""
    fn = getattr(utils, "convert_old_quants", None)
    if fn is None:
        return sd, metadata
    return fn(sd, "", metadata=metadata)


def config_attr(model_config: Any, *names: str) -> Any:
    """The first of ``names`` that this release's model config class defines (a config object
    logs a warning for unknown attributes, so look at its class first)."""
    for name in names:
        if hasattr(type(model_config), name):
            return getattr(model_config, name)
    return None


def accepts_keyword(fn: Any, name: str) -> bool:
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False
    return name in params or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())


class ComfyBackend:
    """The back half of a real checkpoint, loaded with ComfyUI's classes."""

    def __init__(self, cfg: ServerConfig, n_blocks: int, lora_pool: Budget | None = None):
        """``lora_pool``: the server-wide budget of forwarded LoRA sets, shared by every checkpoint this
        server serves (None: this one's own --max-lora-mb)."""
        c = import_comfy(find_comfyui(cfg.comfyui_path), cfg.device)
        self.comfyui_version = c["version"]
        self.model_name = Path(cfg.weights).name
        header, meta = read_header(cfg.weights)
        prefix, self.adapter, counts = arch.for_checkpoint(header)
        bare = {k[len(prefix) :]: v for k, v in header.items() if k.startswith(prefix)}
        self.arch = self.adapter.family
        self.n_blocks_max = sum(counts.values())
        if not 0 < n_blocks <= self.n_blocks_max:
            raise LocalError(
                f"--n-blocks {n_blocks}: {self.model_name} ({self.adapter.display}) has {self.n_blocks_max} blocks "
                f"({', '.join(f'{v} {g}' for g, v in counts.items())}): choose 1..{self.n_blocks_max}"
            )
        n = n_blocks
        self.plan = self.adapter.plan(counts, n)
        self.n_blocks = n
        self.device = torch.device(cfg.device)
        utils, mm = c["utils"], c["mm"]

        # 1) detection on the whole model, shapes only
        meta_sd: dict[str, torch.Tensor] = {k: torch.empty(s, dtype=d, device="meta") for k, (s, d) in bare.items()}
        from safetensors import safe_open

        with safe_open(cfg.weights, framework="pt") as f:
            for k in bare:
                if k.endswith("comfy_quant") or k.endswith("scaled_fp8"):
                    meta_sd[k] = f.get_tensor(prefix + k)  # tiny tensors detection reads by value
            meta_sd, meta_full = convert_old_quants(utils, meta_sd, dict(meta))
            model_config = c["detection"].model_config_from_unet(meta_sd, "", metadata=meta_full)
            if model_config is None:
                raise LocalError(f"ComfyUI {self.comfyui_version} does not recognise {self.model_name}")
            model_config.unet_config.update(
                self.adapter.config_from_shapes({k: tuple(shape) for k, (shape, _) in bare.items()})
            )
            parameters = utils.calculate_parameters(meta_sd)
            weight_dtype = utils.weight_dtype(meta_sd)
            # LoRA key map of the WHOLE model (original block indices), for the server's LoRA slots
            full_key_map = self._full_key_map(model_config, meta_sd) if cfg.loras else {}
            # 2) cut the block counts to the back half
            for g, key in self.adapter.config_keys.items():
                model_config.unet_config[key] = self.plan.remote[g]
            # 3) read only the kept tensors, renamed to the slim model's indices
            sd: dict[str, torch.Tensor] = {}
            for k in bare:
                new = self.adapter.remote_key(k, self.plan)
                if new is not None:
                    sd[new] = f.get_tensor(prefix + k)
        slim_meta = _remap_quant_metadata(dict(meta), "", self.adapter, self.plan) if not prefix else meta
        if prefix and "_quantization_metadata" in meta:
            slim_meta = _remap_quant_metadata(dict(meta), prefix, self.adapter, self.plan)
            slim_meta = {
                **slim_meta,
                "_quantization_metadata": slim_meta["_quantization_metadata"].replace(f'"{prefix}', '"'),
            }
        sd, _ = convert_old_quants(utils, sd, slim_meta)

        # 4) dtype exactly as ComfyUI's loader would choose it for the whole model
        load_device = self.device
        offload_device = mm.unet_offload_device()
        supported = list(model_config.supported_inference_dtypes)
        layer_quant = config_attr(model_config, "quant_config", "layer_quant_config")
        if layer_quant is not None or config_attr(model_config, "scaled_fp8") is not None:
            weight_dtype = None
        if cfg.dtype == "auto":
            unet_dtype = mm.unet_dtype(model_params=parameters, supported_dtypes=supported, weight_dtype=weight_dtype)
        else:
            unet_dtype = getattr(torch, cfg.dtype)
        if layer_quant is not None:
            manual_cast = mm.unet_manual_cast(None, load_device, supported)
        else:
            manual_cast = mm.unet_manual_cast(unet_dtype, load_device, supported)
        if accepts_keyword(model_config.set_inference_dtype, "device"):  # ComfyUI >= 0.20-ish
            model_config.set_inference_dtype(unet_dtype, manual_cast, device=load_device)
        else:
            model_config.set_inference_dtype(unet_dtype, manual_cast)

        # 5) build, drop what the back half never runs, load the kept weights
        model = model_config.get_model(sd, "")
        dm = model.diffusion_model
        # The keys said which family; the class ComfyUI built must be one the adapter splits too (a
        # variant told apart only by metadata, e.g. Wan's causal AR, raises its own refusal here).
        if not self.adapter.detect_model(dm):
            raise LocalError(
                f"ComfyUI {self.comfyui_version} builds a {type(dm).__name__} from {self.model_name}, which the "
                f"{self.adapter.display} split does not support: serve another checkpoint"
            )
        for name in self.adapter.server_drops:
            if getattr(dm, name, None) is not None and isinstance(getattr(dm, name), torch.nn.Module):
                setattr(dm, name, Empty())
        gc.collect()
        patcher = c["patcher"].ModelPatcher(model, load_device=load_device, offload_device=offload_device)
        model.load_model_weights(sd, "")
        del sd
        for path, strength in cfg.loras:
            self._add_slot_lora(patcher, full_key_map, str(path), float(strength))
        mm.load_models_gpu([patcher], force_full_load=True)
        self.patcher = patcher
        self.dm = patcher.model.diffusion_model
        # Fingerprint of the checkpoint's weights as loaded (the client does the same on its
        # side); a server LoRA slot is merged into the weights, so read its backups.
        backups = getattr(patcher, "backup", {}) or {}

        def original(k: str, v: torch.Tensor) -> torch.Tensor:
            b = backups.get("diffusion_model." + k)
            return b.weight if b is not None else v

        self.fingerprint = fingerprint(
            (self.adapter.original_key(k, self.plan), original(k, v))
            for k, v in self.dm.state_dict().items()
            if self.adapter.remote_key(self.adapter.original_key(k, self.plan), self.plan) is not None
        )
        self._check = self.adapter.request_check(self.dm)
        # Forwarded LoRA sets, unpacked on the device, by hash: bounded in bytes (all clients share them).
        self._lora_cache: SizedLRU[tuple[int, list[tuple[torch.nn.Module, str, str, list]]]] = SizedLRU(
            cfg.max_lora_bytes, lambda entry: entry[0], lora_pool
        )
        log.info(
            "loaded %s: %s, %s, %.2f GB on %s (dtype %s)",
            self.model_name,
            self.adapter.display,
            ", ".join(f"{v}/{counts[g]} {g}" for g, v in self.plan.remote.items()),
            sum(p.numel() * p.element_size() for p in self.dm.parameters()) / 1e9,
            self.device,
            unet_dtype,
        )

    # ------------------------------------------------------------------ LoRA
    def _slim(self, full_key: str) -> str | None:
        """'diffusion_model.single_blocks.20.linear1.weight' -> slim-model key, or None if not held here."""
        bare = full_key[len("diffusion_model.") :] if full_key.startswith("diffusion_model.") else full_key
        return self.adapter.remote_key(bare, self.plan)

    def _full_key_map(self, model_config: Any, meta_sd: dict[str, torch.Tensor]) -> dict[str, Any]:
        """LoRA key spellings (Kohya, diffusers, PEFT, ...) -> slim-model keys, by ORIGINAL block index."""
        import comfy.lora

        full = model_config.get_model(meta_sd, "", device="meta")  # shapes only, no memory
        out: dict[str, Any] = {}
        for lora_key, target in comfy.lora.model_lora_keys_unet(full, {}).items():
            key, rest = (target[0], target[1:]) if isinstance(target, tuple) else (target, ())
            slim = self._slim(key)
            if slim is not None:
                out[lora_key] = ("diffusion_model." + slim, *rest) if rest else "diffusion_model." + slim
        del full
        return out

    def _add_slot_lora(self, patcher: Any, key_map: dict[str, Any], path: str, strength: float) -> None:
        import comfy.lora
        import comfy.lora_convert
        import comfy.utils

        if not Path(path).is_file():
            raise LocalError(f"server LoRA not found: {path}")
        lora = comfy.lora_convert.convert_lora(comfy.utils.load_torch_file(path, safe_load=True))
        loaded = comfy.lora.load_lora(lora, key_map, log_missing=False)
        applied = patcher.add_patches(loaded, strength)
        log.info("server LoRA %s (strength %.2f): %d layers of the back half", Path(path).name, strength, len(applied))

    def _client_lora(self, h: str, blob: torch.Tensor) -> list[tuple[torch.nn.Module, str, str, list]]:
        """Unpack (once per hash) a forwarded patch set into (module, param, full key, patches)."""
        hit = self._lora_cache.get(h)
        if hit is not None:
            return hit[1]
        size = blob.numel() * blob.element_size()  # unpacked, the patches take about the blob's bytes
        if size > self._lora_cache.max_bytes:
            raise OverBudget(
                f"the forwarded LoRA set is {size / 1e6:.0f} MB, over this server's limit of "
                f"{self._lora_cache.max_bytes / 1e6:.0f} MB for LoRA sets (--max-lora-mb)",
                transient=False,
            )
        import comfy.weight_adapter

        from .. import lora_io

        adapters = {cls.name: cls for cls in comfy.weight_adapter.adapters}
        t0 = time.perf_counter()
        patches, digest = lora_io.unpack(blob.cpu().numpy().tobytes(), adapters, self.device)
        if digest != h:
            raise RemoteProtocolError("forwarded LoRA set does not match its hash")
        plan = []
        for full_key, entries in patches.items():
            slim = self._slim(full_key)
            if slim is None:
                raise RemoteProtocolError(f"forwarded LoRA patches {full_key}, which this server does not hold")
            module_path, param = slim.rsplit(".", 1)
            if param not in ("weight", "bias"):
                raise RemoteProtocolError(f"forwarded LoRA patches {full_key}: only weights and biases can be patched")
            plan.append((self.dm.get_submodule(module_path), param, full_key, entries))
        self._lora_cache.put(h, (size, plan))
        log.info(
            "client LoRA set %s: %d weights, %.1f MB, unpacked in %.1f ms",
            h[:12],
            len(plan),
            blob.numel() / 1e6,
            (time.perf_counter() - t0) * 1e3,
        )
        return plan

    @staticmethod
    def _merge(patches: list, key: str, weight: torch.Tensor) -> torch.Tensor:
        """Exactly what ComfyUI does when it merges a LoRA into a weight at load
        (ModelPatcher.patch_weight_to_device): its LoRA compute dtype, then stochastic
        rounding seeded by the full-model key, so the result matches an unsplit run."""
        import comfy.float
        import comfy.lora
        import comfy.model_management as mm
        import comfy.model_patcher
        import comfy.utils

        # Releases differ: the compute dtype is float32 before lora_compute_dtype existed (0.3.x), and
        # string_to_seed lived in model_patcher before it moved to utils.
        compute = mm.lora_compute_dtype(weight.device) if hasattr(mm, "lora_compute_dtype") else torch.float32
        seed_of = getattr(comfy.utils, "string_to_seed", None) or comfy.model_patcher.string_to_seed
        temp = mm.cast_to_device(weight, weight.device, compute, copy=True)
        out = comfy.lora.calculate_weight(patches, temp, key)
        return comfy.float.stochastic_rounding(out, weight.dtype, seed=seed_of(key))

    def check_request(
        self, shapes: dict[str, tuple[int, ...] | None], dtypes: dict[str, str] | None = None
    ) -> str | None:
        """What is wrong with a request's tensors (name -> shape, dtype) before they are decoded, or None."""
        return self._check({k: v for k, v in shapes.items() if k != "lora"}, dtypes)  # "lora": a forwarded LoRA set

    def forward(self, tensors: dict[str, torch.Tensor], scalars: dict[str, Any]) -> dict[str, torch.Tensor]:
        h = scalars.get("lora") or ""
        blob = tensors.pop("lora", None)
        if not h:
            return self.adapter.server_forward(self.dm, self.plan, tensors, scalars)
        if blob is None:
            raise RemoteProtocolError("request names a LoRA set but carries none")
        plan = self._client_lora(str(h), blob)
        # Per request: this client's patches are applied while its step runs (weights are
        # merged on the fly by ComfyUI's cast path), then removed, so clients never leak into
        # each other. The GPU lock serializes requests.
        fn_attr = {"weight": "weight_function", "bias": "bias_function"}
        touched = []
        try:
            for module, param, key, entries in plan:
                attr = fn_attr[param]
                setattr(module, attr, [functools.partial(self._merge, entries, key)])
                touched.append((module, attr))
            return self.adapter.server_forward(self.dm, self.plan, tensors, scalars)
        finally:
            for module, attr in touched:
                if attr in module.__dict__:
                    delattr(module, attr)  # back to the class default (no functions)

    def close(self) -> None:
        c = _COMFY
        try:
            c["mm"].unload_all_models()
        except Exception:  # unloading must not block a reconfigure
            log.exception("unload failed")
        self._lora_cache.clear()  # its bytes go back to the shared LoRA budget
        self.patcher = None
        self.dm = None
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
