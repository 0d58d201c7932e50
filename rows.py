"""Exact row pipelining: one model call of B independent rows run as B one-row calls, overlapped.

A model call carries independent rows (CFG cond / uncond, batch > 1): the transformer never mixes
rows, so row r of a one-row call is row r of the batched call, computed the same way. Split across
Daedalus, a call waits twice: the client idles while the server runs the back half (and the link
carries the seam both ways), the server idles while the client runs the front half. Run as one-row
calls, the front half of row r+1 runs while row r is on the wire and in the back half; the replies
are joined in row order, so the model call returns what the batched call returns.

This module is the mechanics, without ComfyUI or the network: cutting a diffusion model's call
arguments into rows (``split_call``), joining the per-row outputs (``join_rows``), and running
row callables on threads in a bounded pipeline (``run_rows``) with the thread-local state a model
call relies on (grad / inference mode, the CUDA device, the context variables) carried over. The
glue (``icarus``) decides when, and what each row's seam hook sends on which connection.

**Which arguments are rows.** Every tensor (in a tuple / list / dict, recursively) whose first
dimension is B is cut, as ComfyUI batches ``CONDRegular`` inputs; a tensor of one row broadcasts and
is passed whole, and so is everything not a tensor. ``keep`` names keyword arguments that are never
cut (an adapter's ``row_constants``: ``CONDConstant`` inputs, whose first dimension may equal B by
chance). The ``transformer_options`` dict (the one holding ComfyUI's ``wrappers``) is copied per row
with its ``cond_or_uncond`` label and ``sigmas`` row; the rest of it is shared.
"""

from __future__ import annotations

import contextlib
import contextvars
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch


@dataclass(frozen=True)
class Row:
    """One row of a model call: its arguments, its CFG label (None: the call named none) and its
    index among the rows of that label (so each (label, index) names one temporal codec sub-stream)."""

    index: int
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    label: int | None
    sub: int


def first_tensor(v: Any) -> torch.Tensor | None:
    if isinstance(v, torch.Tensor):
        return v
    if isinstance(v, (list, tuple)):
        for x in v:
            t = first_tensor(x)
            if t is not None:
                return t
    return None


def batch_size(args: Sequence[Any], kwargs: dict[str, Any]) -> int:
    """Rows of a diffusion model call: the first dimension of its input (``x``, or the first tensor of
    a list of them: LTX-AV's [video, audio]); 0 when the call has no tensor input."""
    x = args[0] if args else kwargs.get("x")
    t = first_tensor(x)
    return int(t.shape[0]) if t is not None and t.dim() > 0 else 0


def is_options(v: Any) -> bool:
    """``transformer_options``: the dict that holds ComfyUI's wrappers (the ones that called us)."""
    return isinstance(v, dict) and "wrappers" in v


def _cut(v: Any, b: int, r: int) -> Any:
    if isinstance(v, torch.Tensor):
        return v[r : r + 1] if v.dim() > 0 and v.shape[0] == b else v
    if isinstance(v, tuple) and type(v) is tuple:
        return tuple(_cut(x, b, r) for x in v)
    if isinstance(v, list) and type(v) is list:
        return [_cut(x, b, r) for x in v]
    if isinstance(v, dict) and type(v) is dict:
        return {k: _cut(x, b, r) for k, x in v.items()}
    return v


def _labels(options: dict[str, Any] | None, b: int) -> list[tuple[int | None, int]]:
    """(CFG label, index among that label's rows) of each row: ComfyUI stacks ``cond_or_uncond``'s
    chunks, each of B / len(chunks) rows."""
    chunks = (options or {}).get("cond_or_uncond")
    if not chunks or b % len(chunks):
        return [(None, r) for r in range(b)]
    per = b // len(chunks)
    return [(int(chunks[r // per]), r % per) for r in range(b)]


def _row_options(options: Any, b: int, r: int, label: int | None) -> dict[str, Any]:
    o = dict(options)  # the model writes block indices into it: one per row (rows run at once)
    if label is not None:
        o["cond_or_uncond"] = [label]
    sig = o.get("sigmas")
    if isinstance(sig, torch.Tensor):
        o["sigmas"] = _cut(sig, b, r)
    return o


def split_call(args: Sequence[Any], kwargs: dict[str, Any], keep: Sequence[str] = ()) -> list[Row]:
    """The rows of a diffusion model call (see the module docstring); [] when it has fewer than two."""
    b = batch_size(args, kwargs)
    if b < 2:
        return []
    options = next((v for v in (*args, *kwargs.values()) if is_options(v)), None)
    labels = _labels(options, b)
    rows = []
    for r in range(b):
        label, sub = labels[r]

        def one(v: Any, _r: int = r, _label: int | None = label) -> Any:
            if options is not None and v is options:
                return _row_options(v, b, _r, _label)
            return _cut(v, b, _r)

        ra = tuple(one(v) for v in args)
        rk = {k: (v if k in keep else one(v)) for k, v in kwargs.items()}
        rows.append(Row(r, ra, rk, label, sub))
    return rows


def join_rows(outs: Sequence[Any]) -> Any:
    """The per-row outputs as the batched call's output: tensors concatenated along the first
    dimension, lists / tuples element by element."""
    first = outs[0]
    if isinstance(first, torch.Tensor):
        return torch.cat(list(outs), dim=0)
    if isinstance(first, (list, tuple)):
        joined = [join_rows([o[i] for o in outs]) for i in range(len(first))]
        return joined if isinstance(first, list) else tuple(joined)
    raise TypeError(f"cannot join model outputs of type {type(first).__name__} by rows")


# ---------------------------------------------------------------------------- the pipeline


class Streams:
    """One CUDA stream per lane and device, made once: a row's kernels queue on its lane's stream,
    so row r's device-to-host copy of the seam never waits behind row r+1's front half."""

    def __init__(self) -> None:
        self._s: dict[tuple[torch.device, int], Any] = {}

    def get(self, device: torch.device, lane: int) -> Any:
        key = (device, lane)
        s = self._s.get(key)
        if s is None:
            s = self._s[key] = torch.cuda.Stream(device)
        return s


@contextlib.contextmanager
def _carried(grad: bool, inference: bool, device: torch.device | None, stream: Any) -> Iterator[None]:
    """In a row's thread: the caller's grad / inference mode, CUDA device and the lane's stream."""
    with contextlib.ExitStack() as st:
        st.enter_context(torch.inference_mode(inference))
        st.enter_context(torch.set_grad_enabled(grad))
        if device is not None and device.type == "cuda":
            st.enter_context(torch.cuda.device(device))
            st.enter_context(torch.cuda.stream(stream))
        yield


RowFn = Callable[[Row, int, threading.Event], Any]  # (row, lane, sent: set once the row left) -> output


def run_rows(
    rows: Sequence[Row], fn: RowFn, lanes: int, device: torch.device | None, streams: Streams | None = None
) -> list[Any]:
    """Run ``fn`` for each row on a thread of its own and return the outputs in row order.

    Row r runs on lane r % ``lanes``. Row r+1 starts once row r has set its ``sent`` event (its
    seam went out: the front half of r+1 then overlaps row r's time on the wire and in the back half)
    or ended; at most ``lanes`` + 1 rows are alive (row r also waits for row r - lanes - 1 to end), so
    the activations held stay those of a few rows. Every thread is joined before this returns; the
    first failure, in row order, is raised. On CUDA each lane has its own stream (``streams``),
    ordered after the caller's current stream before the rows start and before the caller goes on."""
    n = len(rows)
    out: list[Any] = [None] * n
    errors: list[BaseException | None] = [None] * n
    sent = [threading.Event() for _ in range(n)]
    threads: list[threading.Thread] = []
    grad, inference = torch.is_grad_enabled(), torch.is_inference_mode_enabled()
    cuda = device is not None and device.type == "cuda"
    lane_streams: list[Any] = []
    if cuda:
        assert device is not None
        streams = streams or Streams()
        caller = torch.cuda.current_stream(device)
        lane_streams = [streams.get(device, k) for k in range(min(lanes, n))]
        for s in lane_streams:
            s.wait_stream(caller)  # the rows' inputs were made on the caller's stream

    def body(r: int) -> None:
        lane = r % lanes
        try:
            with _carried(grad, inference, device, lane_streams[lane] if cuda else None):
                out[r] = fn(rows[r], lane, sent[r])
        except BaseException as e:  # raised in the caller's thread, in row order
            errors[r] = e
        finally:
            sent[r].set()

    try:
        for r in range(n):
            if r:
                sent[r - 1].wait()
            if r > lanes:
                threads[r - lanes - 1].join()
            if any(e is not None for e in errors):
                break  # a row failed: start no more
            ctx = contextvars.copy_context()  # ComfyUI's executing-node context, per thread
            t = threading.Thread(target=ctx.run, args=(body, r), name=f"comfyui-mesh-row{r}", daemon=True)
            t.start()
            threads.append(t)
    finally:
        for t in threads:
            t.join()
        if cuda:
            for s in lane_streams:
                torch.cuda.current_stream(device).wait_stream(s)
    for e in errors:
        if e is not None:
            raise e
    return out
