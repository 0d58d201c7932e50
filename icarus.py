"""Icarus's ComfyUI glue: turn a MODEL into one whose back half runs on Daedalus.

Done the way ComfyUI patches models, on a clone (the input MODEL is never touched):

* object patches swap every remote block, and the head modules, for parameterless stubs,
  so their weights never reach this GPU; the original modules go back into the tree the clone
  shares with the input MODEL at the end of every sampling run (``restore_module_tree``);
* ``patches_replace["dit"]`` hooks: the first remote block sends the seam state to the
  server, the other remote blocks pass through;
* a keyed ``DIFFUSION_MODEL`` wrapper scopes the per-call state (the adapter's captures,
  the server's answer) to one model call and checks what cannot cross the split;
* a model call of several independent rows (CFG cond / uncond, batch > 1) runs, where it helps, as
  one-row calls in a pipeline (``rows.py``): the front half of row r+1 runs while row r is on the wire
  and on the server, each row in flight on a connection of its own ("lane"); decided once per
  generation (``SplitRun.row_lanes``) and logged;
* opt-in and approximate, a one-row model call runs as M patch calls in the same pipeline
  (``patchpipe.py``): after ``patch_warmup`` exact calls, each patch's attentions see the other
  patches' keys / values of the previous call (``SplitRun._patch_plan``);
* a keyed ``OUTER_SAMPLE`` wrapper (as ComfyUI's EasyCache does) scopes a generation: the
  call counter, a generation id that names the temporal codec stream (cond and uncond
  calls keep separate references), the adapter's scratch and the constants memo are fresh
  for every sampling run, and the connection's temporal codec state is dropped at its end,
  on the server too; at its end the stubs leave the shared module tree.
* every remote call is timed (``balance.CallTiming``: the front half between two CUDA events, or
  ``perf_counter`` on the CPU, read after the sync the transport does anyway; the server's forward from
  its reply); at the generation's end ``balance.suggest`` names the n_blocks_remote that would make a
  step fastest (``SplitRun.suggestion``, logged, ``SplitSettings.on_suggest``). Nothing changes by itself.

The stubbed head returns the server's output, so the rest of ComfyUI sees a normal model.
"""

from __future__ import annotations

import inspect
import logging
import os
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from . import arch, balance, codec, lora_io, patchpipe, rows
from .config import ClientConfig
from .constants import (
    BALANCE_MAX_CALLS,
    PATCH_WARMUP_CALLS,
    ROW_AUTO_FAST_LINK_BPS,
    ROW_LANES,
    ROW_MEMO_KEEP_MAX,
    ROW_MODES,
    SEAM_DUMP_ENV,
    SEAM_DUMP_MAX_CALLS,
)
from .errors import LocalError, MeshError
from .fingerprint import fingerprint
from .host import check_comfy_contract, comfyui_version
from .payload import ConstMemo
from .transport import MeshClient, StepStats, pooled_client

log = logging.getLogger("comfyui_mesh")

WRAPPER_KEY = "comfyui_mesh"


class RemoteStub(torch.nn.Module):
    """Stands in for a block that runs on the server; holds no weights."""

    def __init__(self, name: str):
        super().__init__()
        self.stub_name = name

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        raise LocalError(
            f"ComfyUI-Mesh: {self.stub_name} runs on Daedalus but was called locally — another node replaced "
            "Icarus's block hook; put Icarus last before the sampler"
        )


class HookStub(torch.nn.Module):
    """Stands in for a remote block of a family whose blocks ComfyUI calls without a
    ``patches_replace`` hook (``Adapter.object_hooks``): it is the hook. Its call's arguments are
    named by the original block's ``forward`` signature; it returns the hook result's
    ``hook_returns[0]`` (the block's one output)."""

    def __init__(
        self, name: str, params: list[str], fn: Callable[[dict[str, Any], dict[str, Any]], dict[str, Any]], key: str
    ):
        super().__init__()
        self.stub_name = name
        self.params = params
        self.fn = fn
        self.key = key

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if len(args) > len(self.params):
            raise LocalError(
                f"ComfyUI-Mesh: {self.stub_name} was called with {len(args)} arguments (unexpected model code)"
            )
        named = dict(zip(self.params, args, strict=False))
        named.update(kwargs)
        return self.fn(named, {})[self.key]


def forward_params(module: torch.nn.Module) -> list[str]:
    """Names of ``module.forward``'s positional parameters, in order."""
    import inspect

    kinds = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    return [n for n, p in inspect.signature(module.forward).parameters.items() if p.kind in kinds]


class HeadStub(torch.nn.Module):
    """Stands in for an output head: returns the server's output ``key`` for this call."""

    def __init__(self, run: SplitRun, key: str = "out"):
        super().__init__()
        self.run = run
        self.key = key

    def forward(self, img: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        call = self.run.current()
        out = (call.get("out") or {}).get(self.key)
        if out is None:
            raise LocalError(
                "ComfyUI-Mesh: the model finished without calling the remote half (was the seam hook replaced?)"
            )
        if self.run.adapter.pad_head_tokens and out.shape[1] < img.shape[1]:  # tokens the model discards
            pad = out.new_zeros((out.shape[0], img.shape[1] - out.shape[1], *out.shape[2:]))
            out = torch.cat([out, pad], dim=1)
        return out


@dataclass
class SplitSettings:
    n_remote: int
    client: ClientConfig
    codec_name: str = "raw"
    codec_params: dict[str, Any] = field(default_factory=dict)
    reply_codec: str = "raw"
    forward_loras: bool = True
    node_id: str = ""
    on_step: Callable[[int, StepStats], None] | None = None  # (call number, stats) after each remote step
    on_status: Callable[[str, str], None] | None = None  # (level, text): reconnecting / reconnected / gave up
    on_suggest: Callable[[balance.Suggestion], None] | None = None  # at a generation's end (balance.py)
    # Row pipelining (rows.py) of calls of 2+ rows: "auto" = on over a network link (off on this host's
    # loopback / same-host fast path and on a very fast link: nothing to hide; SplitRun._decide_rows),
    # "on", "off".
    rows: str = "auto"
    row_lanes: int = ROW_LANES  # rows in flight at once, one connection (server session) each
    # Displaced patch pipelining (patchpipe.py) of one-row calls: patches per call (0 / 1: off) and the
    # exact model calls of each generation before the first patched one (they fill the stale K/V).
    patches: int = 0
    patch_warmup: int = PATCH_WARMUP_CALLS

    def __post_init__(self) -> None:
        if self.rows not in ROW_MODES:
            raise LocalError(f"row pipelining is {self.rows!r}; choose one of {', '.join(ROW_MODES)}")
        if self.row_lanes < 1:
            raise LocalError(f"row_lanes is {self.row_lanes}: at least 1 row must be able to be in flight")
        if self.patches < 0 or self.patch_warmup < 1:
            raise LocalError(
                f"patch pipelining {self.patches} patches after {self.patch_warmup} exact calls: patches must be "
                ">= 0 and patch_warmup >= 1 (the stale keys / values come from an exact call)"
            )


class SplitRun:
    """State for one configured clone: plan, client, per-call scratch, per-generation scope, last stats."""

    def __init__(self, adapter: arch.Adapter, plan: arch.SplitPlan, settings: SplitSettings, fp: str):
        self.adapter = adapter
        self.plan = plan
        self.settings = settings
        self.fingerprint = fp
        self.seam = plan.seam(adapter.block_groups)
        self._tls = threading.local()
        self.last_stats: StepStats | None = None
        self.lora: tuple[str, torch.Tensor] | None = None  # (patch-set hash, safetensors blob)
        self.modules: dict[str, Any] = {}  # adapter.payload_modules resolved on the client's model
        # Per generation (reset by ``begin_generation``; without OUTER_SAMPLE they span every run):
        self.calls = 0  # remote calls in this generation
        self.generation: str | None = None  # names the temporal codec stream (Forward.stream["gen"])
        self.generations = 0  # generations begun
        self.adapter_state: dict[str, Any] = {}  # the adapter's own scratch (SeamCall.state)
        self.memo = ConstMemo()  # per-generation constants, kept the same objects while unchanged
        self.lanes: int | None = None  # row pipelining this generation: lanes (0: off; None: not decided)
        self._depth = 0
        self._used: list[MeshClient] = []  # clients this generation sent to (their streams end with it)
        self._issued = 0  # remote calls sent this generation (the seam dump's numbering)
        self._lock = threading.Lock()  # the per-generation state above, for rows sent from their threads
        self._streams = rows.Streams()
        # The n_blocks_remote suggestion (balance.py): this generation's remote calls timed, its model calls
        # counted; the range n_blocks_remote may take (1..the model's blocks, capped by the server's model,
        # read from the connection a call used); the last generation's suggestion.
        self.timings: deque[balance.CallTiming] = deque(maxlen=BALANCE_MAX_CALLS)
        self.model_calls = 0
        self.n_range: tuple[int, int] | None = None
        self.suggestion: balance.Suggestion | None = None
        # Patch pipelining, per generation: model calls seen, the front blocks' stale K/V, what was
        # decided (None: not yet; "" on; else why exact), the connections patches go on.
        self.patch_calls = 0
        self.patch_kv = patchpipe.KVStore(where=f" ({settings.client.address})")
        self.patch_off: str | None = None
        self.patch_lanes = 0

    def expect(self) -> dict[str, Any]:
        return {"arch": self.adapter.family, "n_blocks": self.plan.n_remote, "fingerprint": self.fingerprint}

    def client(self, lane: int = 0) -> MeshClient:
        return pooled_client(self.settings.client, self.expect(), comfyui_version(), lane)

    def current(self) -> dict[str, Any]:
        call = getattr(self._tls, "call", None)
        if call is None:
            raise LocalError("ComfyUI-Mesh: model called outside its wrapper (unsupported sampler path)")
        return call

    # ------------------------------------------------------------------ generation scope
    def begin_generation(self) -> None:
        """A sampling run starts (nested runs share the outermost one's scope)."""
        self._depth += 1
        if self._depth > 1:
            return
        self.generation = uuid.uuid4().hex[:16]
        self.generations += 1
        self.calls = 0
        self._issued = 0
        self._used = []
        self.timings.clear()
        self.model_calls = 0
        self._clear_scratch()

    def end_generation(self) -> None:
        """The run ended (or failed): drop its temporal references and per-run caches."""
        self._depth = max(self._depth - 1, 0)
        if self._depth:
            return
        self.suggest()
        used, self._used = self._used, []
        for client in used:
            # Both sides drop this generation's references now (END_STREAM); a server that cannot
            # be told (gone, link down) is logged, never fails the run.
            client.end_stream(self.generation)
        self.generation = None
        self._clear_scratch()

    def _clear_scratch(self) -> None:
        """A generation's per-run state, fresh at its start and dropped at its end."""
        self.lanes = None
        self.adapter_state.clear()
        self.memo.clear()
        self.patch_calls, self.patch_off, self.patch_lanes = 0, None, 0
        self.patch_kv.clear()

    def outer_sample_wrapper(self, executor: Any, *args: Any, **kwargs: Any) -> Any:
        self.begin_generation()
        try:
            return executor(*args, **kwargs)
        finally:
            self.end_generation()
            if not self._depth:  # the outermost run: its clone's stubs leave the shared module tree
                restore_module_tree(getattr(getattr(executor, "class_obj", None), "model_patcher", None))

    def suggest(self) -> balance.Suggestion | None:
        """This generation's n_blocks_remote suggestion (None: too few calls timed); logged and handed to
        ``on_suggest``. Never fails a run: it is advice."""
        try:
            with self._lock:
                timings, model_calls, lanes = list(self.timings), self.model_calls, self.lanes
                patched = self.patch_off == ""  # M partial calls per model call: not what balance models
            if self.n_range is None or not timings or patched:
                return None
            lo, hi = self.n_range
            setup = balance.Setup(
                n=self.plan.n_remote,
                total=sum(self.plan.counts.values()),
                lo=lo,
                hi=hi,
                mode="rows" if lanes else "serial",
                rows=max(1, round(len(timings) / max(model_calls, 1))) if lanes else 1,
                lanes=max(lanes or 1, 1),
            )
            s = balance.suggest(timings, setup)
        except Exception:
            log.warning("ComfyUI-Mesh: no n_blocks_remote suggestion (a bug, please report it)", exc_info=True)
            return None
        if s is None:
            return None
        self.suggestion = s
        log.info("ComfyUI-Mesh %s: %s", self.settings.client.address, s.line())
        if self.settings.on_suggest is not None:
            try:
                self.settings.on_suggest(s)
            except Exception:  # for the UI: never fail a run over it
                log.debug("ComfyUI-Mesh: on_suggest callback failed", exc_info=True)
        return s

    # ------------------------------------------------------------------ wrapper
    def diffusion_model_wrapper(self, executor: Any, *args: Any, **kwargs: Any) -> Any:
        dm = executor.class_obj
        with self._lock:
            self.model_calls += 1
        if self.adapter.control_keys:
            self._check_control(call_argument(executor.original, "control", args, kwargs))
        parts = rows.split_call(args, kwargs, self.adapter.row_constants) if self.settings.rows != "off" else []
        lanes = self.row_lanes(len(parts)) if parts else 0
        patched = self._patch_plan(executor, args, kwargs) if self.settings.patches > 1 else None
        handles = self._hook_captures(dm)
        try:
            if patched is not None:
                return self._run_patches(executor, args, kwargs, patched)
            if not lanes:
                return self._call(executor, args, kwargs)

            def one(row: rows.Row, lane: int, sent: threading.Event) -> Any:
                return self._call(executor, row.args, row.kwargs, lane, row, sent)

            return rows.join_rows(rows.run_rows(parts, one, lanes, _device(args, kwargs), self._streams))
        finally:
            for handle in handles:
                handle.remove()

    def _hook_captures(self, dm: Any) -> list[Any]:
        """Capture hooks for this model call: the first value a module receives (in) or returns (out),
        stored in the calling thread's call (rows run on threads of their own)."""
        handles = []
        for name, cap in self.adapter.captures.items():
            module = getattr(dm, cap.module, None)
            if not isinstance(module, torch.nn.Module):
                continue

            def grab(_module: Any, inputs: Any, output: Any = None, _n: str = name, _c: arch.Capture = cap) -> None:
                call = getattr(self._tls, "call", None)
                if call is not None and call["values"].get(_n) is None:
                    value = inputs if _c.where == "in" else output
                    call["values"][_n] = value[_c.index] if isinstance(value, (tuple, list)) else value

            if cap.where == "in":
                handles.append(module.register_forward_pre_hook(grab))
            else:
                handles.append(module.register_forward_hook(grab))
        return handles

    def _call(
        self,
        executor: Any,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        lane: int = 0,
        row: rows.Row | None = None,
        sent: threading.Event | None = None,
        patch: patchpipe.PatchSpec | None = None,
    ) -> Any:
        """One model call (the whole batch, or one row of it on ``lane``, or one patch) with its
        per-call scratch."""
        values: dict[str, Any] = self.adapter.call_info(args, kwargs)
        for name in self.adapter.captures:
            values[name] = None
        start = _mark(_device(args, kwargs))  # the front half's start (balance.py)
        self._tls.call = {
            "out": None,
            "values": values,
            "lane": lane,
            "row": row,
            "sent": sent,
            "start": start,
            "patch": patch,
        }
        try:
            return executor(*args, **kwargs)
        finally:
            self._tls.call = None

    # ------------------------------------------------------------------ patch pipelining
    def _patch_plan(
        self, executor: Any, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> list[tuple[patchpipe.PatchSpec, tuple[int, int]]] | None:
        """How this model call runs with patch pipelining on: None as without it (the reason is logged
        once per generation), one exact full call recording the stale K/V (a warm-up call), or the
        patch calls ((spec, latent row band) each)."""
        support = self.adapter.patch
        why = ""
        options = next((v for v in (*args, *kwargs.values()) if rows.is_options(v)), None)
        if support is None:
            why = f"{self.adapter.display} has no patch pipelining"
        elif not _comfy_attention_override():
            why = "this ComfyUI has no optimized_attention_override (an attention hook): upgrade ComfyUI"
        elif self.generation is None:
            why = "this ComfyUI has no OUTER_SAMPLE wrapper to scope a generation's stale keys / values"
        elif rows.batch_size(args, kwargs) != 1:
            why = f"the calls carry {rows.batch_size(args, kwargs)} rows (CFG > 1 or batch > 1): rows pipeline"
        elif options is None or patchpipe.OVERRIDE_KEY in options or support.rope_shift in options:
            why = "another node set the attention override or the RoPE options this needs"
        elif kwargs.get("attention_mask") is not None:
            why = "the calls carry an attention mask"
        elif any(call_argument(executor.original, a, args, kwargs) is not None for a in support.exact_if_set):
            why = f"the calls carry {'/'.join(support.exact_if_set)}"
        if why:
            if self.patch_off != why:
                self.patch_off = why
                log.info("ComfyUI-Mesh %s: patch pipelining off, exact: %s", self.settings.client.address, why)
            return None
        assert support is not None
        x = args[support.latent_arg] if len(args) > support.latent_arg else None
        if not isinstance(x, torch.Tensor) or x.dim() < 2:
            return None
        height, width = int(x.shape[-2]), int(x.shape[-1])
        cut = patchpipe.bands(height, self.settings.patches, support.token_cell)
        specs = patchpipe.specs(cut, height, width, support.token_cell)
        with self._lock:
            n = self.patch_calls
            self.patch_calls += 1
        if n < self.settings.patch_warmup or len(cut) < 2:
            return [(patchpipe.PatchSpec.full(specs[0].total), (0, height))]
        if self.patch_off is None:
            self.patch_off = ""
            self.patch_lanes = self._open_lanes()
            self.memo.keep = max(self.memo.keep, min(len(cut) + 1, ROW_MEMO_KEEP_MAX))  # constants per patch
            log.info(
                "ComfyUI-Mesh %s: patch pipelining on (approximate) from call %d: %d patches of %s latent rows, "
                "%d in flight",
                self.settings.client.address,
                n + 1,
                len(cut),
                "/".join(str(b - a) for a, b in cut),
                self.patch_lanes,
            )
        return list(zip(specs, cut, strict=True))

    def _run_patches(
        self,
        executor: Any,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        patched: list[tuple[patchpipe.PatchSpec, tuple[int, int]]],
    ) -> Any:
        """The patch calls of one model call (or its exact warm-up call), their outputs joined by rows."""
        support = self.adapter.patch
        assert support is not None
        parts = []
        for spec, (h0, h1) in patched:

            def place(v: Any, _spec: patchpipe.PatchSpec = spec, _h0: int = h0) -> Any:
                if not rows.is_options(v):
                    return v
                o = dict(v)  # the model writes block indices into it: one per patch (they run at once)
                o[patchpipe.OVERRIDE_KEY] = patchpipe.attention_override(self.patch_kv, _spec)
                if not _spec.exact:
                    o[support.rope_shift] = {"shift_y": float(_h0 // support.token_cell)}
                return o

            pa = [place(v) for v in args]
            if not spec.exact:
                pa[support.latent_arg] = args[support.latent_arg][..., h0:h1, :]
            pk = {k: place(v) for k, v in kwargs.items()}
            parts.append((spec, rows.Row(spec.index, tuple(pa), pk, None, spec.index)))
        if len(parts) == 1:
            spec, row = parts[0]
            return self._call(executor, row.args, row.kwargs, patch=spec)
        specs = {row.index: spec for spec, row in parts}

        def one(row: rows.Row, lane: int, sent: threading.Event) -> Any:
            return self._call(executor, row.args, row.kwargs, lane, row, sent, specs[row.index])

        outs = rows.run_rows([r for _, r in parts], one, max(self.patch_lanes, 1), _device(args, kwargs), self._streams)
        return torch.cat(outs, dim=-2)

    def _open_lanes(self) -> int:
        """Connections patches go on (up to ``row_lanes``; one the server refuses leaves fewer)."""
        lanes = 1
        self.client(0).connect_retrying(self.settings.on_status)
        for lane in range(1, self.settings.row_lanes):
            try:
                self.client(lane).connect()
            except MeshError as e:
                log.info("ComfyUI-Mesh: connection %d for patch pipelining refused (%s)", lane + 1, e)
                break
            lanes += 1
        return lanes

    def row_lanes(self, n: int) -> int:
        """Rows in flight for this generation's calls of ``n`` >= 2 rows (0: the batch goes as one call).
        Decided at the generation's first such call and logged once."""
        if self.lanes is not None:
            return self.lanes
        lanes, why = self._decide_rows()
        self.lanes = lanes
        if lanes:
            self.memo.keep = max(self.memo.keep, min(n, ROW_MEMO_KEEP_MAX))  # each row has its own constants
        log.info(
            "ComfyUI-Mesh %s: row pipelining %s for this generation (%d rows per call): %s",
            self.settings.client.address,
            f"on, {lanes} row(s) in flight" if lanes else "off",
            n,
            why,
        )
        return lanes

    def _decide_rows(self) -> tuple[int, str]:
        """(lanes, why): ``rows="auto"`` pipelines over a network link, not over this host's loopback or
        same-host fast path (the link is a memory copy there: nothing to hide) nor over a link measured
        faster than ``ROW_AUTO_FAST_LINK_BPS``. Each lane past the first is a connection of its own;
        one the server refuses (its client or session limit) leaves fewer rows in flight."""
        s = self.settings
        main = self.client(0)
        main.connect_retrying(s.on_status)
        if s.rows == "auto":
            if main.via_samehost:
                return 0, "the server is on this host (the same-host fast path carries the seam: no link time to hide)"
            if main.via_loopback:
                return 0, "the server is on this host's loopback (no link time to hide; rows=on forces it)"
            link = main.link_info()
            if link.up_bps >= ROW_AUTO_FAST_LINK_BPS:
                return 0, f"the link is fast ({link.up_bps / 1e6:.0f} MB/s up): its time is negligible"
            why = f"a network link ({link.up_bps / 1e6:.0f} MB/s up, {link.rtt_ms:.1f} ms RTT, {link.how})"
        else:
            why = "rows=on"
        lanes = 1
        for lane in range(1, s.row_lanes):
            try:
                self.client(lane).connect()
            except MeshError as e:
                why += f"; connection {lane + 1} refused ({e}): {lanes} in flight"
                break
            lanes += 1
        return lanes, why

    def _check_control(self, control: Any) -> None:
        if not control:
            return
        for group, key in self.adapter.control_keys.items():
            residuals = control.get(key) or []
            for i in self.plan.remote_indices(group):
                if i < len(residuals) and residuals[i] is not None:
                    raise LocalError(
                        f"a ControlNet adds residuals to {group}.{i}, which runs on Daedalus; ControlNet across "
                        "the split is not supported: lower n_blocks_remote so the controlled blocks run locally, "
                        "or run this ControlNet without Icarus"
                    )

    # ------------------------------------------------------------------ hooks
    def stream(self, args: dict[str, Any], row: rows.Row | None = None) -> dict[str, Any]:
        """``Forward.stream`` of this call: the generation, and which CFG rows it carries, so cond and
        uncond sent as separate calls keep separate temporal references (codec_temporal); a row of a
        pipelined call also names its index among its label's rows (batch > 1)."""
        cond = (args.get("transformer_options") or {}).get("cond_or_uncond")
        st: dict[str, Any] = {"gen": self.generation, "cond": [int(r) for r in cond] if cond is not None else None}
        if row is not None:
            st["row"] = row.sub
        return st

    def seam_hook(self, args: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
        call = self.current()
        s = self.settings
        with self._lock:  # rows of one call reach here from their threads: one at a time
            sc = arch.SeamCall(self.plan, self.seam[0], call["values"], self.modules, self.adapter_state, self.memo)
            coded, exact, consts, scalars = self.adapter.client_payload(args, sc)
            consts = self.memo.tensors(consts)  # unchanged constants: the same objects (no copy, no hash)
            dump = os.environ.get(SEAM_DUMP_ENV)
            if dump and self._issued < SEAM_DUMP_MAX_CALLS:
                dump_seam(dump, self._issued, coded)
            self._issued += 1
            client = self.client(call.get("lane", 0))
            if self.generation is not None and client not in self._used:
                self._used.append(client)
        if self.lora is not None:
            scalars["lora"], consts["lora"] = self.lora
        if call.get("patch") is not None:  # the server's blocks use its own stale K/V (PROTOCOL.md §6.3)
            scalars["patch"] = call["patch"].wire()
        device = next(iter(coded.values())).device
        seam_at = _mark(device)  # the front half's end: queued after its work (no sync here)
        if call.get("sent") is not None:
            call["sent"].set()  # the next row's front half may start: this one is ready to go
        out, stats = client.forward(
            arch=self.adapter.family,
            n_blocks=self.plan.n_remote,
            coded=coded,
            exact=exact,
            consts=consts,
            scalars=scalars,
            codec_name=s.codec_name,
            codec_params=s.codec_params,
            reply_codec=s.reply_codec,
            stream=self.stream(args, call.get("row")),
            device=device,
            on_status=s.on_status,
        )
        call["out"] = out
        timing = _timing(call.get("start"), seam_at, stats)  # read after forward's sync: no wait here
        server = client.server
        if server is not None:  # the range a suggestion may take: this model's blocks, the server's model's
            total = sum(self.plan.counts.values())
            self.n_range = (1, min(total, server.n_blocks_max or total))
        with self._lock:
            self.last_stats = stats
            self.calls += 1
            n = self.calls
            if timing is not None:
                self.timings.append(timing)
        log.info("ComfyUI-Mesh %s call %d: %s", s.client.address, n, stats.line())
        if s.on_step is not None:
            try:
                s.on_step(n, stats)
            except Exception:  # stats are for the UI: never fail a step over them
                log.debug("ComfyUI-Mesh: on_step callback failed", exc_info=True)
        return self.adapter.passthrough(args)


def call_argument(fn: Any, name: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """The argument ``name`` of a call ``fn(*args, **kwargs)``, by ``fn``'s signature (models differ in
    where they take it: FLUX's ``_forward`` has ``control`` 7th, Chroma's 5th); None when absent."""
    if name in kwargs:
        return kwargs[name]
    try:
        params = list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):
        return None
    for i, p in enumerate(params[: len(args)]):
        if p.kind is inspect.Parameter.VAR_POSITIONAL:
            return None
        if p.name == name:
            return args[i]
    return None


def _comfy_attention_override() -> bool:
    """This ComfyUI's attention functions call ``transformer_options["optimized_attention_override"]``
    (a feature check: ``wrap_attn`` came with it)."""
    try:
        import comfy.ldm.modules.attention as attention
    except ImportError:
        return False
    return hasattr(attention, "wrap_attn")


def _device(args: tuple[Any, ...], kwargs: dict[str, Any]) -> torch.device | None:
    t = rows.first_tensor(args[0] if args else kwargs.get("x"))
    return t.device if t is not None else None


def _mark(device: torch.device | None) -> Any:
    """A point in this thread's work: on CUDA an event recorded on the current stream (no host sync),
    elsewhere ``perf_counter`` (the CPU runs the work as it is issued)."""
    if device is not None and device.type == "cuda":
        event = torch.cuda.Event(enable_timing=True)
        event.record(torch.cuda.current_stream(device))
        return event
    return time.perf_counter()


def _elapsed_ms(start: Any, end: Any) -> float | None:
    """ms between two ``_mark``s; None when they cannot be read without waiting (an event not reached)."""
    if isinstance(start, float) and isinstance(end, float):
        return (end - start) * 1e3
    if isinstance(start, torch.cuda.Event) and isinstance(end, torch.cuda.Event) and end.query():
        return float(start.elapsed_time(end))
    return None


def _timing(start: Any, seam_at: Any, stats: StepStats) -> balance.CallTiming | None:
    """One remote call's ``balance.CallTiming``: the front half from the call's start to its seam (on CUDA
    read after the transport's sync before coding), the coding here less the wait for the front half, the
    server's own figures, and the link as the round trip less the server's work."""
    front = _elapsed_ms(start, seam_at)
    if front is None:
        return None
    srv = stats.server
    server_coding = float(srv.get("decode", 0.0)) + float(srv.get("encode", 0.0))
    forward = float(srv.get("forward", 0.0))
    return balance.CallTiming(
        front_ms=front,
        coding_ms=max(stats.encode_ms - stats.settle_ms, 0.0) + stats.decode_ms,
        server_ms=forward,
        server_coding_ms=server_coding,
        link_ms=max(stats.wait_ms - forward - server_coding, 0.0),
    )


def dump_seam(prefix: str, call: int, coded: dict[str, torch.Tensor]) -> None:
    """Debug option (``COMFYUI_MESH_SEAM_DUMP``): one safetensors file per tensor and call."""
    from safetensors.torch import save_file

    Path(prefix).parent.mkdir(parents=True, exist_ok=True)
    for name, t in coded.items():
        path = f"{prefix}-{name}-{call:04d}.safetensors"
        save_file({"x": t.detach().to("cpu", copy=True).contiguous()}, path)
        if call == 0:
            log.warning(
                "ComfyUI-Mesh: %s is set: writing the seam tensor %r of every call to %s", SEAM_DUMP_ENV, name, path
            )


def restore_module_tree(patcher: Any) -> None:
    """Put the original modules back into the diffusion model tree a split clone shares with its input
    MODEL, at the end of the clone's sampling run.

    ComfyUI undoes a clone's object patches only when a clone of the model is loaded next; until then
    the stubs stay in the tree every clone shares, so a LoraLoader on the unsplit MODEL (whose key map
    reads that tree) would miss the remote blocks' weights (issue #17). ComfyUI's own
    ``unpatch_model(unpatch_weights=False)`` (what its ``partially_load`` does before every load) puts
    the modules back and keeps the loaded weights and LoRA merges; the next run's load installs the
    stubs again. A feature check, not a version check: a ComfyUI without it keeps its old behaviour."""
    unpatch = getattr(patcher, "unpatch_model", None)
    if unpatch is None:
        return
    try:
        params = set(inspect.signature(unpatch).parameters)
    except (TypeError, ValueError):
        params = set()
    if "unpatch_weights" not in params:
        log.warning(
            "ComfyUI-Mesh: this ComfyUI's ModelPatcher.unpatch_model takes no unpatch_weights: the split's stubs "
            "stay in the shared model until its next load (load LoRAs on the unsplit MODEL in another "
            "workflow run, or update ComfyUI)"
        )
        return
    unpatch(unpatch_weights=False)


def bypass_patches(m: Any, remote_prefixes: list[str]) -> dict[str, list[tuple[Any, ...]]]:
    """Bypass-mode LoRAs (``injections["bypass_lora"]``) on remote modules, as weight patches.

    Their hooks sit on modules that never run here once stubbed, so they are handed to the
    server, which applies them as weight patches (the same math, computed on the weights)."""
    injections = getattr(m, "injections", {}) or {}
    found: dict[str, list[tuple[Any, ...]]] = {}
    if not injections.get("bypass_lora"):
        return found
    names = {id(mod): name for name, mod in m.model.named_modules()}
    for inj in injections["bypass_lora"]:
        managers = [
            c.cell_contents
            for c in (getattr(inj.inject, "__closure__", None) or ())
            if hasattr(c.cell_contents, "hooks")
        ]
        if not managers:
            raise LocalError(
                "a bypass-mode LoRA is loaded before Icarus, and this ComfyUI's bypass injections cannot be read: "
                "load it with a regular LoraLoader, or place it after Icarus"
            )
        for hook in managers[0].hooks:
            name = names.get(id(hook.module))
            if name and (name + ".").startswith(tuple(remote_prefixes)):
                found.setdefault(name + ".weight", []).append((float(hook.multiplier), hook.adapter, 1.0, None, None))
    return found


def _original_state(model: Any, adapter: arch.Adapter, plan: arch.SplitPlan) -> list[tuple[str, torch.Tensor]]:
    """(full-model key, original weight) for every tensor the server should hold."""
    items = []
    backups = getattr(model, "backup", {}) or {}
    names = [f"{g}.{i}" for g in adapter.block_groups for i in plan.remote_indices(g)] + list(adapter.heads)
    for name in names:
        module = model.get_model_object(f"diffusion_model.{name}")
        if isinstance(module, torch.Tensor):  # a bare parameter the server uses (LTX scale_shift_table)
            b = backups.get(f"diffusion_model.{name}")
            items.append((name, b.weight if b is not None else module))
            continue
        for k, v in module.state_dict().items():
            full = f"{name}.{k}"
            b = backups.get(f"diffusion_model.{full}")
            items.append((full, b.weight if b is not None else v))
    return items


def split_model(model: Any, settings: SplitSettings) -> tuple[Any, SplitRun]:
    """Clone ``model`` and patch it so its last ``settings.n_remote`` blocks run on Daedalus."""
    import comfy.patcher_extension as pe

    check_comfy_contract()
    dm = model.get_model_object("diffusion_model")
    adapter = arch.for_model(dm)
    counts = {g: len(getattr(dm, g)) for g in adapter.block_groups}
    plan = adapter.plan(counts, settings.n_remote)
    codec.by_name(settings.codec_name)  # fail now on an unknown codec name
    fp = fingerprint(_original_state(model, adapter, plan))
    run = SplitRun(adapter, plan, settings, fp)

    m = model.clone()
    remote_prefixes = []
    freed = 0
    seam_group, seam_index = run.seam
    run.modules = {role: getattr(dm, attr, None) for role, attr in adapter.payload_modules.items()}
    for g in adapter.block_groups:
        hook = adapter.hook_names.get(g, "")
        for i in plan.remote_indices(g):
            name = f"diffusion_model.{g}.{i}"
            block = model.get_model_object(name)
            freed += sum(p.numel() * p.element_size() for p in block.parameters())
            remote_prefixes.append(name + ".")
            if (g, i) == (seam_group, seam_index):

                def fn(args: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
                    return run.seam_hook(args, extra)

            else:

                def fn(args: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
                    return adapter.passthrough(args)

            if g in adapter.object_hooks:  # no patches_replace hook: the stub is the hook
                m.add_object_patch(name, HookStub(f"{g}.{i}", forward_params(block), fn, adapter.hook_returns[0]))
            else:
                m.add_object_patch(name, RemoteStub(f"{g}.{i}"))
                m.set_model_patch_replace(fn, "dit", hook, i)
    for head, key in adapter.client_heads().items():
        name = f"diffusion_model.{head}"
        freed += sum(p.numel() * p.element_size() for p in model.get_model_object(name).parameters())
        m.add_object_patch(name, HeadStub(run, key))
        remote_prefixes.append(name + ".")
    remote_patches = {k: m.patches.pop(k) for k in list(m.patches) if str(k).startswith(tuple(remote_prefixes))}
    remote_patches.update(bypass_patches(m, remote_prefixes))
    if remote_patches and settings.forward_loras:
        # LoRAs loaded before Icarus cover the whole model: their remote part travels once per
        # change (content-hashed), and the server applies it to this client's steps only.
        blob, digest = lora_io.pack(remote_patches)
        run.lora = (digest, torch.frombuffer(bytearray(blob), dtype=torch.uint8))
        log.info(
            "ComfyUI-Mesh: forwarding %d patched weights (%.1f MB) to Daedalus", len(remote_patches), len(blob) / 1e6
        )
    elif remote_patches:
        log.warning(
            "ComfyUI-Mesh: %d patched weights of remote blocks are not forwarded (forward_client_loras off)",
            len(remote_patches),
        )
    m.add_wrapper_with_key(pe.WrappersMP.DIFFUSION_MODEL, WRAPPER_KEY, run.diffusion_model_wrapper)
    outer = getattr(pe.WrappersMP, "OUTER_SAMPLE", None)  # a feature check, not a version check
    if outer is not None:
        m.add_wrapper_with_key(outer, WRAPPER_KEY, run.outer_sample_wrapper)
    else:
        log.warning(
            "ComfyUI-Mesh: this ComfyUI has no WrappersMP.OUTER_SAMPLE: nothing is scoped to one generation "
            "(the call counter runs on, temporal codecs continue their stream across runs; results stay correct)"
        )
    m.patches_uuid = uuid.uuid4()
    m.size = max(int(model.model_size()) - freed, 1)
    return m, run


def row_by_row(model: Any) -> Any:
    """A clone of the unsplit ``model`` that runs each model call of several rows as one-row calls, one
    after another: the reference a pipelined split is bit-identical to (the same per-row kernels);
    for the exactness tests and bench/split_pipeline.py."""
    import comfy.patcher_extension as pe

    adapter = arch.for_model(model.get_model_object("diffusion_model"))

    def wrapper(executor: Any, *args: Any, **kwargs: Any) -> Any:
        parts = rows.split_call(args, kwargs, adapter.row_constants)
        if not parts:
            return executor(*args, **kwargs)
        return rows.join_rows([executor(*r.args, **r.kwargs) for r in parts])

    m = model.clone()
    m.add_wrapper_with_key(pe.WrappersMP.DIFFUSION_MODEL, WRAPPER_KEY + "-rows", wrapper)
    return m
