"""Displaced patch pipelining (opt-in, approximate): a one-row model call as M patch calls.

A model call of one row (FLUX.2 Klein at CFG 1) has no independent rows to pipeline (``rows.py``), so
its image tokens are cut into M patches, bands of latent rows: patch p's call computes only patch p's
tokens (and the text tokens), and in every attention its queries see fresh keys / values for patch p
and the previous call's ("stale") keys / values for the other patches (the DistriFusion / PipeFusion
idea). The patch calls are independent, so they pipeline like rows: patch p's seam crosses the link
and runs in the back half while patch p+1's front half runs. The result is approximate: the first
``warmup`` calls of a generation run exact (one full call, as without pipelining) and fill the stale
keys / values; the later calls are patched.

Positions stay their own: the stale keys were stored after RoPE, with the positions they had in their
full call, and a patch call places its band's RoPE at the band's rows (the adapter's ``rope_shift``).
Both sides keep their own blocks' keys / values: the client in its ``SplitRun``, Daedalus per client
and generation (``KVRegistry``), told which tokens a call carries by the FORWARD scalar ``patch``
(docs/PROTOCOL.md §6.3, ``PatchSpec``).

This module is the logic, without ComfyUI or the network: the partition (``bands``, ``specs``), the
keys / values store (``KVStore``), the attention override ComfyUI calls (``attention_override``, its
``transformer_options["optimized_attention_override"]`` extension point: each attention of the call in
turn, numbered), and the server's registry of stores (``KVRegistry``).
"""

from __future__ import annotations

import contextlib
import contextvars
import math
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from .constants import PATCH_MAX_COUNT, PATCH_MAX_TOKENS
from .errors import LocalError, OverBudget, RemoteProtocolError

OVERRIDE_KEY = "optimized_attention_override"  # ComfyUI's transformer_options attention hook


@dataclass(frozen=True)
class PatchSpec:
    """Which image tokens one call carries: patch ``index`` of ``count`` (1: an exact full call that
    only records keys / values), ``tokens`` image tokens from token ``start`` of the call's ``total``."""

    index: int
    count: int
    start: int
    tokens: int
    total: int

    @property
    def exact(self) -> bool:
        return self.count == 1

    def wire(self) -> list[int]:
        """The FORWARD scalar ``patch``."""
        return [self.index, self.count, self.start, self.tokens, self.total]

    @classmethod
    def full(cls, total: int) -> PatchSpec:
        return cls(0, 1, 0, total, total)

    @classmethod
    def parse(cls, v: Any) -> PatchSpec:
        """The FORWARD scalar ``patch`` as sent by a peer: RemoteProtocolError when malformed."""
        if not isinstance(v, (list, tuple)) or len(v) != 5:
            raise RemoteProtocolError("scalar 'patch' must be [index, count, start, tokens, total]")
        if not all(isinstance(x, int) and not isinstance(x, bool) for x in v):
            raise RemoteProtocolError("scalar 'patch' must hold 5 integers")
        index, count, start, tokens, total = v
        if not 1 <= count <= PATCH_MAX_COUNT or not 0 <= index < count:
            raise RemoteProtocolError(f"patch {index} of {count}: count must be 1..{PATCH_MAX_COUNT}, index < count")
        if not 1 <= total <= PATCH_MAX_TOKENS or not 0 <= start or not 1 <= tokens or start + tokens > total:
            raise RemoteProtocolError(
                f"patch tokens {start}+{tokens} of {total} do not fit (at most {PATCH_MAX_TOKENS} tokens)"
            )
        if count == 1 and (start, tokens) != (0, total):
            raise RemoteProtocolError("patch count 1 (an exact call) must carry every token")
        if count > 1 and tokens == total:
            raise RemoteProtocolError(f"patch {index} of {count} carries every token")
        return cls(index, count, start, tokens, total)


def bands(height: int, m: int, multiple: int = 1) -> list[tuple[int, int]]:
    """``height`` latent rows as at most ``m`` bands (row ranges) of near-equal height, each starting on
    a multiple of ``multiple`` (the model's patch size); fewer when there are fewer such rows."""
    if height < 1 or m < 1 or multiple < 1:
        raise LocalError(f"cannot cut {height} latent rows into {m} patches of multiples of {multiple}")
    units = -(-height // multiple)
    m = min(m, units)
    base, extra = divmod(units, m)
    out, u = [], 0
    for i in range(m):
        n = base + (i < extra)
        out.append((u * multiple, min((u + n) * multiple, height)))
        u += n
    return out


def specs(rows: list[tuple[int, int]], height: int, width: int, multiple: int = 1) -> list[PatchSpec]:
    """The ``PatchSpec`` of each band of a latent ``height`` x ``width`` whose tokens are its
    ``multiple`` x ``multiple`` cells, row-major (FLUX's ``process_img``)."""
    wt = -(-width // multiple)
    total = -(-height // multiple) * wt
    out = []
    for i, (h0, h1) in enumerate(rows):
        start = (h0 // multiple) * wt
        tokens = -(-(h1 - h0) // multiple) * wt
        out.append(PatchSpec(i, len(rows), start, tokens, total) if len(rows) > 1 else PatchSpec.full(total))
    return out


class KVStore:
    """The last call's keys / values of every image token, per attention of a model call (``slot``:
    its position among the call's attentions), stored after RoPE ([B, heads, tokens, dim]).

    An exact call records them; a patch call writes its fresh ones over its tokens and attends to all.
    ``charge(delta)`` is told of every change of the bytes held (and may refuse a growth by raising);
    ``err``: the error a patch call that does not match what was recorded raises (LocalError on the
    client, RemoteProtocolError on the server: the peer's call)."""

    def __init__(self, charge: Callable[[int], None] | None = None, err: type[Exception] = LocalError, where: str = ""):
        self._kv: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self._charge = charge or (lambda d: None)
        self._err = err
        self.where = where
        self.nbytes = 0
        self.lock = threading.Lock()
        self.closed = False  # dropped by its registry: records nothing more (a late lane charges nothing)

    def __len__(self) -> int:
        return len(self._kv)

    def clear(self, close: bool = False) -> int:
        """Drop everything (``close``: and record nothing from now on); the bytes released."""
        with self.lock:
            freed, self.nbytes = self.nbytes, 0
            self._kv.clear()
            self.closed = self.closed or close
        if freed:
            self._charge(-freed)
        return freed

    def attend(self, slot: int, k: torch.Tensor, v: torch.Tensor, spec: PatchSpec) -> tuple[torch.Tensor, torch.Tensor]:
        """The keys / values attention ``slot`` of a call carrying ``spec`` attends to. ``k``, ``v``:
        [B, heads, L, dim], their last ``spec.tokens`` tokens the call's image tokens (FLUX puts the
        text first). An exact call gets them back unchanged (and they are recorded)."""
        n = spec.tokens
        if k.dim() != 4 or k.shape != v.shape or k.shape[2] < n:
            raise LocalError(f"patch pipelining: attention keys {list(k.shape)} do not hold {n} image tokens")
        k_img, v_img = k[:, :, k.shape[2] - n :], v[:, :, v.shape[2] - n :]
        with self.lock:
            if self.closed:  # its generation ended (or its connections closed) while this call ran
                raise self._err(f"patch pipelining{self.where}: the generation ended while this call ran")
            old = self._kv.get(slot)
            if spec.exact:
                if old is not None and old[0].shape == k_img.shape and old[0].dtype == k_img.dtype:
                    old[0].copy_(k_img)
                    old[1].copy_(v_img)
                else:
                    size = 2 * k_img.numel() * k_img.element_size()
                    delta = size - (2 * old[0].numel() * old[0].element_size() if old is not None else 0)
                    self._charge(delta)  # may refuse: nothing changed yet
                    self._kv[slot] = (k_img.clone(), v_img.clone())
                    self.nbytes += delta
                return k, v
            want = (k.shape[0], k.shape[1], spec.total, k.shape[3])
            if old is None or tuple(old[0].shape) != want or old[0].dtype != k.dtype:
                have = "nothing" if old is None else f"{list(old[0].shape)} {old[0].dtype}"
                raise self._err(
                    f"patch {spec.index} of {spec.count}{self.where}: attention {slot} has {have} recorded for "
                    f"{list(want)} {k.dtype}: a patch call must follow an exact call of the same generation and "
                    "size (patch_warmup >= 1)"
                )
            ks, vs = old
            ks[:, :, spec.start : spec.start + n] = k_img
            vs[:, :, spec.start : spec.start + n] = v_img
            text = k.shape[2] - n
            return torch.cat((k[:, :, :text], ks), dim=2), torch.cat((v[:, :, :text], vs), dim=2)


def attention_override(store: KVStore, spec: PatchSpec) -> Callable[..., Any]:
    """ComfyUI's ``optimized_attention_override`` for one call carrying ``spec``: each attention of the
    call (numbered in call order) runs with the keys / values ``store.attend`` gives. An attention mask
    cannot be widened to the stale tokens: a patch call with one is refused (exact calls take it)."""
    calls = [0]

    def override(func: Callable[..., Any], q: Any, k: Any, v: Any, heads: Any, *args: Any, **kwargs: Any) -> Any:
        slot = calls[0]
        calls[0] += 1
        if not kwargs.get("skip_reshape", False):
            raise LocalError("patch pipelining: this model's attention is not in [B, heads, tokens, dim] layout")
        if not spec.exact and kwargs.get("mask") is not None:
            raise LocalError("patch pipelining: a call with an attention mask cannot be patched; set it off")
        k, v = store.attend(slot, k, v, spec)
        return func(q, k, v, heads, *args, **kwargs)

    return override


# ---------------------------------------------------------------------------- the server side

_SERVING: contextvars.ContextVar[Callable[..., Any] | None] = contextvars.ContextVar("patch_override", default=None)


@contextlib.contextmanager
def serving(override: Callable[..., Any] | None) -> Iterator[None]:
    """The back half's forward in this block runs its attentions through ``override`` (None: plain)."""
    token = _SERVING.set(override)
    try:
        yield
    finally:
        _SERVING.reset(token)


def serving_override() -> Callable[..., Any] | None:
    """The attention override of the request being served (an adapter's ``server_forward`` puts it in
    the block's transformer_options); None for a request without ``patch``."""
    return _SERVING.get()


@dataclass
class _Held:
    store: KVStore
    sessions: set[int] = field(default_factory=set)


class KVRegistry:
    """Daedalus's stale keys / values: one ``KVStore`` per (client, generation), the client being the
    token it proved (a pipelined generation comes over several connections, one per lane). A store is
    dropped at its generation's END_STREAM and when the last connection that used it closes; all of
    them together hold at most ``limit`` bytes (``--max-patch-kv-mb``): a growth beyond is refused."""

    def __init__(self, limit: int, flag: str = "--max-patch-kv-mb"):
        self.limit = limit
        self.flag = flag
        self.nbytes = 0
        self._held: dict[tuple[str, str], _Held] = {}
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._held)

    def _charge(self, delta: int) -> None:
        with self._lock:
            if delta > 0 and self.nbytes + delta > self.limit:
                raise OverBudget(
                    f"patch pipelining: the stale keys / values would take {(self.nbytes + delta) / 1e6:.0f} MB, "
                    f"over this server's {self.limit / 1e6:.0f} MB ({self.flag}): raise it on Daedalus, or use "
                    "fewer remote blocks, a smaller image or patch_pipelining off",
                    transient=delta <= self.limit,
                )
            self.nbytes += delta

    def store(self, owner: str, gen: str, session: int, create: bool = True) -> KVStore | None:
        """The store of ``owner``'s generation ``gen``, used by connection ``session``: made on first use
        when ``create`` (an exact call records into it), else None while there is none."""
        with self._lock:
            h = self._held.get((owner, gen))
            if h is None:
                if not create:
                    return None
                h = self._held[(owner, gen)] = _Held(KVStore(self._charge, RemoteProtocolError, " (Daedalus)"))
            h.sessions.add(session)
            return h.store

    def end(self, owner: str, gen: str) -> int:
        """The generation ended: drop its store; the bytes released."""
        with self._lock:
            h = self._held.pop((owner, gen), None)
        return h.store.clear(close=True) if h is not None else 0

    def leave(self, session: int) -> int:
        """Connection ``session`` closed: drop the stores no other open connection used; bytes released."""
        with self._lock:
            gone = []
            for key, h in list(self._held.items()):
                h.sessions.discard(session)
                if not h.sessions:
                    gone.append(self._held.pop(key))
        return sum(h.store.clear(close=True) for h in gone)

    def drop_all(self) -> int:
        """Every store dropped (the server reconfigured: its attentions are numbered anew); bytes released."""
        with self._lock:
            gone, self._held = list(self._held.values()), {}
        return sum(h.store.clear(close=True) for h in gone)


def psnr(out: torch.Tensor, ref: torch.Tensor) -> float:
    """Fidelity of ``out`` against ``ref`` in dB: the peak is ``ref``'s range (inf when equal)."""
    ref = ref.detach().double()
    mse = float((out.detach().double() - ref).pow(2).mean())
    if mse == 0:
        return float("inf")
    peak = float(ref.max() - ref.min()) or 1.0
    return 10 * math.log10(peak * peak / mse)
