"""Per-architecture split adapters, declared as data and registered once.

An adapter says, for one model family: which block lists exist and in what order they
run, where the model may be cut (the last N blocks in execution order go remote), which
head modules the server runs after the blocks, which config keys hold the block counts,
how to recognise the family from a checkpoint's keys and from a built model, the two
functions that move one model call across the seam (client payload, server forward), and
what the client's glue (``icarus``) needs to feed the client payload: values captured from
model modules during the call (``Capture``), facts from the model call's own arguments
(``call_info``), modules the payload calls, ControlNet residual keys, what a remote block's
hook returns, and how the stubbed output head fixes up the server's output.

Adding Wan / FLUX.1 / Qwen-Image means one new module here that calls ``register``.
No module in this package imports ComfyUI.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Literal

from ..errors import LocalError
from ..payload import ConstMemo, SeamPayload


@dataclass(frozen=True)
class SplitPlan:
    """Which blocks run remotely for one model and one ``n_blocks_remote``."""

    family: str
    counts: dict[str, int]  # block group -> total blocks in the full model
    remote: dict[str, int]  # block group -> blocks of that group the server holds (a tail)
    n_remote: int

    def first_remote(self, group: str) -> int:
        """Index (in the full model) of the first remote block of ``group``."""
        return self.counts[group] - self.remote[group]

    def remote_indices(self, group: str) -> range:
        return range(self.first_remote(group), self.counts[group])

    def seam(self, order: tuple[str, ...]) -> tuple[str, int]:
        """(group, index) of the first block that runs remotely, in execution order."""
        for g in order:
            if self.remote.get(g, 0):
                return g, self.first_remote(g)
        raise LocalError("n_blocks_remote is 0: nothing runs remotely")


@dataclass(frozen=True)
class Capture:
    """The first value a diffusion-model module receives (``where="in"``: its positional argument
    ``index``) or returns (``"out"``: element ``index`` of its output, or the output itself when
    it is not a tuple) in one model call."""

    module: str  # attribute of the diffusion model, e.g. "double_stream_modulation_img"
    where: Literal["in", "out"]
    index: int = 0


@dataclass
class SeamCall:
    """What ``Adapter.client_payload`` gets besides the block hook's ``args``."""

    plan: SplitPlan
    seam: str  # block group of the first remote block
    values: dict[str, Any]  # this model call's captures and call_info, by name
    modules: dict[str, Any]  # ``Adapter.payload_modules`` resolved on the client's model (None: absent)
    state: dict[str, Any]  # the adapter's own scratch, emptied at every generation start
    memo: ConstMemo  # per-generation constants memo (see payload.ConstMemo)


@dataclass(frozen=True)
class PatchSupport:
    """How a family's one-row model call is cut into patch calls (``patchpipe.py``, opt-in, approximate):
    bands of rows of the latent argument ``latent_arg`` (dimension -2), each placed at its rows by
    ``transformer_options[rope_shift] = {"shift_y": first token row}`` (ComfyUI's RoPE options); its
    tokens are the latent's ``token_cell`` x ``token_cell`` cells, row-major. A call whose arguments
    named in ``exact_if_set`` are set (reference latents: their tokens are no patch's) runs exact."""

    latent_arg: int = 0
    rope_shift: str = "rope_options"
    token_cell: int = 1
    exact_if_set: tuple[str, ...] = ()


def no_call_info(args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, Any]:
    return {}


def no_config_fix(shapes: dict[str, tuple[int, ...]]) -> dict[str, Any]:
    return {}


@dataclass(frozen=True)
class Adapter:
    family: str  # wire name, e.g. "flux2"
    display: str  # for messages, e.g. "FLUX.2"
    block_groups: tuple[str, ...]  # ModuleList attribute names, in execution order
    hook_names: dict[str, str]  # block group -> patches_replace["dit"] block name
    config_keys: dict[str, str]  # block group -> unet_config key holding its depth
    heads: tuple[str, ...]  # modules (or bare parameters) the server runs/uses after the blocks
    # Non-block modules the server never needs (stubbed after loading to free memory).
    server_drops: tuple[str, ...]
    detect_keys: Callable[[set[str]], bool]  # checkpoint keys (prefix stripped) -> is this family
    detect_model: Callable[[Any], bool]  # built diffusion model -> is this family
    server_forward: Callable[..., dict[str, Any]]  # (model, plan, tensors, scalars) -> outputs
    # The seam block hook's args -> what crosses the wire for this model call.
    client_payload: Callable[[dict[str, Any], SeamCall], SeamPayload]
    notes: str = ""
    # Values the client payload needs that the hook's args lack, captured from model modules.
    captures: dict[str, Capture] = field(default_factory=dict)
    # (args, kwargs) of the diffusion model's forward -> more such values (e.g. token counts).
    call_info: Callable[[tuple[Any, ...], dict[str, Any]], dict[str, Any]] = no_call_info
    # Diffusion-model modules the client payload calls (role -> attribute), e.g. a modulation
    # layer it evaluates when the seam is before the blocks that use it.
    payload_modules: dict[str, str] = field(default_factory=dict)
    # Block group -> key of ``control`` whose residual list ControlNets add to that group's
    # blocks (remote blocks must have none). Empty: the family takes no ControlNet residuals.
    control_keys: dict[str, str] = field(default_factory=dict)
    # Keys of a block hook's args that its result holds (a remote block passes them through).
    hook_returns: tuple[str, ...] = ("img",)
    # The server returns only the main tokens; the head stub pads its output with zeros to the
    # head input's token count (tokens the model discards after the head, e.g. FLUX reference images).
    pad_head_tokens: bool = False
    # Head modules the client swaps for stubs returning the server's output of that name.
    # Empty: every head returns the output "out" (one head, one output).
    head_outputs: dict[str, str] = field(default_factory=dict)
    # What a request may carry, checked by the server before it decodes anything (PROTOCOL.md §3.1):
    # every tensor name (constants by their argument name) must fully match ``request_names`` (a
    # regular expression; "" declares nothing and checks no names), and a tensor named in
    # ``request_widths`` must end in the width the server's diffusion model holds in that attribute.
    request_names: str = ""
    request_widths: dict[str, str] = field(default_factory=dict)
    # Checkpoint tensor shapes (keys as in ``detect_keys``) -> unet_config values to set over ComfyUI's
    # detection, where it assumes the released widths of a module instead of reading them (Chroma's
    # approximator). Gives the detected values on released checkpoints; lets tiny test models load.
    config_from_shapes: Callable[[dict[str, tuple[int, ...]]], dict[str, Any]] = no_config_fix
    # Block groups ComfyUI runs without a ``patches_replace["dit"]`` hook (e.g. Lumina 2 / Z-Image):
    # their remote blocks are swapped (object patches) for stubs that are the hook themselves, the
    # block's forward arguments named by the block's own signature; they return ``hook_returns[0]``.
    object_hooks: tuple[str, ...] = ()
    # Keyword arguments of the diffusion model call that are never cut into rows (rows.split_call):
    # ComfyUI's CONDConstant inputs, which are not batched (their first dimension may equal B by chance).
    row_constants: tuple[str, ...] = ()
    # Displaced patch pipelining (patchpipe.py): None where the family does not support it (runs exact).
    patch: PatchSupport | None = None

    def passthrough(self, args: dict[str, Any]) -> dict[str, Any]:
        """A remote block's hook result: its inputs, unchanged (the seam block's hook did the work)."""
        return {k: args[k] for k in self.hook_returns if k in args}

    def request_check(
        self, dm: Any
    ) -> Callable[[dict[str, tuple[int, ...] | None], dict[str, str] | None], str | None]:
        """The server's check of one request's tensor shapes (name -> shape, None for a constant sent
        by hash), before decoding: returns what is wrong, or None. Widths come from ``dm`` (the
        server's diffusion model)."""
        names = re.compile(self.request_names) if self.request_names else None
        widths = {
            k: int(getattr(dm, a)) for k, a in self.request_widths.items() if isinstance(getattr(dm, a, None), int)
        }

        def check(shapes: dict[str, tuple[int, ...] | None], dtypes: dict[str, str] | None = None) -> str | None:
            for name, shape in shapes.items():
                if names is not None and not names.fullmatch(name):
                    return f"a {self.display} back half takes no tensor {name[:64]!r}"
                w = widths.get(name)
                if w is not None and shape is not None and (not shape or shape[-1] != w):
                    return f"tensor {name!r} has shape {list(shape)}; this {self.display} back half takes width {w}"
                dtype = (dtypes or {}).get(name)
                if name in self.request_widths and dtype is not None and dtype not in FLOAT_DTYPES:
                    return (
                        f"tensor {name!r} is {dtype}; this {self.display} back half takes floating-point hidden states"
                    )
            return None

        return check

    def client_heads(self) -> dict[str, str]:
        """Head module -> name of the server output its client stub returns."""
        return dict(self.head_outputs) or {h: "out" for h in self.heads}

    # ------------------------------------------------------------------ cutting
    def plan(self, counts: dict[str, int], n_remote: int) -> SplitPlan:
        total = sum(counts[g] for g in self.block_groups)
        if n_remote < 0 or n_remote > total:
            raise LocalError(
                f"n_blocks_remote={n_remote} but this {self.display} model has {total} blocks "
                f"({', '.join(f'{counts[g]} {g}' for g in self.block_groups)}): choose 1..{total}"
            )
        remote: dict[str, int] = {}
        left = n_remote
        for g in reversed(self.block_groups):  # the last N blocks in execution order
            take = min(left, counts[g])
            remote[g] = take
            left -= take
        return SplitPlan(self.family, dict(counts), remote, n_remote)

    # ------------------------------------------------------------------ keys
    def split_key(self, key: str) -> tuple[str, int, str] | None:
        """'single_blocks.7.linear1.weight' -> ('single_blocks', 7, 'linear1.weight')."""
        m = _BLOCK_RE.match(key)
        if m and m.group(1) in self.block_groups:
            return m.group(1), int(m.group(2)), m.group(3)
        return None

    def remote_key(self, key: str, plan: SplitPlan) -> str | None:
        """Full-model key -> the server's slim-model key, or None if the server doesn't keep it."""
        parts = self.split_key(key)
        if parts is not None:
            g, i, rest = parts
            first = plan.first_remote(g)
            return f"{g}.{i - first}.{rest}" if i >= first else None
        if any(key == h or key.startswith(h + ".") for h in self.heads):
            return key
        return None

    def original_key(self, slim_key: str, plan: SplitPlan) -> str:
        """The server's slim-model key -> the full-model key (inverse of ``remote_key``)."""
        parts = self.split_key(slim_key)
        if parts is None:
            return slim_key
        g, i, rest = parts
        return f"{g}.{i + plan.first_remote(g)}.{rest}"

    def count_blocks(self, keys: Iterable[str]) -> dict[str, int]:
        seen: dict[str, set[int]] = {g: set() for g in self.block_groups}
        for k in keys:
            parts = self.split_key(k)
            if parts:
                seen[parts[0]].add(parts[1])
        counts = {}
        for g, idx in seen.items():
            n = len(idx)
            if idx and max(idx) != n - 1:
                raise LocalError(f"{self.display} checkpoint has gaps in {g} (indices {sorted(idx)[:8]}...)")
            counts[g] = n
        return counts


# Wire dtype names of the hidden states a back half takes (``request_widths`` tensors).
FLOAT_DTYPES = frozenset({"float16", "bfloat16", "float32", "float64"})

_BLOCK_RE = re.compile(r"^([A-Za-z_]+)\.(\d+)\.(.+)$")

REGISTRY: dict[str, Adapter] = {}


def register(adapter: Adapter) -> Adapter:
    if adapter.family in REGISTRY:
        raise LocalError(f"split adapter {adapter.family!r} registered twice")
    REGISTRY[adapter.family] = adapter
    return adapter


def get(family: str) -> Adapter:
    try:
        return REGISTRY[family]
    except KeyError:
        raise LocalError(f"split not supported for {family!r}; supported: {', '.join(sorted(REGISTRY))}") from None


def for_model(diffusion_model: Any) -> Adapter:
    for a in REGISTRY.values():
        if a.detect_model(diffusion_model):
            return a
    raise LocalError(
        f"split not supported for {type(diffusion_model).__name__}; supported: "
        + ", ".join(a.display for a in REGISTRY.values())
    )


def for_keys(keys: set[str]) -> Adapter:
    for a in REGISTRY.values():
        if a.detect_keys(keys):
            return a
    raise LocalError(
        "this checkpoint is not a model ComfyUI-Mesh can split; supported: "
        + ", ".join(a.display for a in REGISTRY.values())
    )


# Key prefixes a diffusion model's tensors carry in a full checkpoint ("" for a bare diffusion model).
CHECKPOINT_PREFIXES = ("model.diffusion_model.", "diffusion_model.")


def checkpoint_prefix(keys: Iterable[str]) -> str:
    """The prefix of the diffusion model's keys in a checkpoint (more than five keys carry it), or ""."""
    keys = list(keys)
    return next((p for p in CHECKPOINT_PREFIXES if sum(k.startswith(p) for k in keys) > 5), "")


def for_checkpoint(keys: Iterable[str]) -> tuple[str, Adapter, dict[str, int]]:
    """(key prefix, adapter, block counts) of a checkpoint from its tensor names alone: how the server's
    loader and the Daedalus window both recognise a model file."""
    keys = [k for k in keys if k != "__metadata__"]
    prefix = checkpoint_prefix(keys)
    bare = {k[len(prefix) :] for k in keys if k.startswith(prefix)}
    a = for_keys(bare)
    return prefix, a, a.count_blocks(bare)


# Registration happens on import of each family module, exactly once.
from . import chroma, flux1, flux2, hunyuan_video, ltxav, lumina2, qwen_image, wan  # noqa: E402,F401
