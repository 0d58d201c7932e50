"""Temporal coding across sampler steps (ids 6 and 7) and the per-connection stream state.

Diffusion calls the same seam once per step with a state that changes little: these
codecs send step t as a residual against step t-1 *as the decoder reconstructed it*. Both
sides keep that reconstruction (closed loop), so quantization error never accumulates.

State: ``stream_state(conn, stream)`` returns the dict for one stream of one connection
(``conn`` is the connection's dict: ``MeshClient`` keeps one per socket, the server one per
``Session``). Keys of ``Forward.stream``: ``gen`` (generation id: a new value drops the
connection's whole state; ``end_stream`` drops it when the generation ends, on the server
through an END_STREAM message), every other key (e.g. ``cond_or_uncond``,
``seam``) selects a sub-stream with its own references. Inside it each codec keeps, per
tensor name, ``{g: GOP id, i: frame index, ref: tensor}`` under ("enc"|"dec", id, name).

Frames: ``meta["f"]`` "i" (keyframe, self-contained) or "p" (needs the reference);
``meta["g"]`` random 31-bit GOP id, ``meta["i"]`` index in the GOP. Keyframe at the first
call, on shape or dtype change, on a new sub-stream (CFG rows changed), every ``keyint``
frames (param, default 16; 0 = never), and after state loss. A P-frame whose reference the
decoder lacks (reconnect, eviction, restart) raises ``StreamStateError``: the server answers
``stream_reset`` and the client drops its state and resends keyframes, never a wrong result.
"""

from __future__ import annotations

import json
import secrets
from collections import OrderedDict
from collections.abc import Generator, Mapping
from typing import Any

import torch

from ..errors import CodecError, LocalError, StreamStateError
from ..protocol import WireTensor
from .backends import pick_backend
from .base import LOSSY_DTYPES, Staged, check_shape, dtype_name, torch_dtype
from .channels import channel_major, lossy_geometry, meta_int, meta_str, output, param_int
from .quant import shared_decode, staged_shared_encode
from .sections import EntropyCodec, SectionReader, SectionWriter, get_planes, planes, put_planes, unplanes

MAX_STREAMS = 8  # sub-streams kept per connection (least recently used dropped)
MAX_KEY_CHARS = 512
DEFAULT_KEYINT = 16

Coded = Generator[None, None, tuple[torch.Tensor, dict]]  # a staged frame: (reconstruction, meta)
MaybeCoded = Generator[None, None, tuple[torch.Tensor | None, dict]]  # None: a keyframe is cheaper


def stream_state(conn: dict[str, Any], stream: Mapping[str, Any] | None, exc: type[Exception] = LocalError) -> dict:
    """The codec state dict of one stream on one connection (see the module docstring)."""
    s = dict(stream or {})
    gen = s.pop("gen", None)
    if "_gen" in conn and conn["_gen"] != gen:
        conn.clear()  # a new generation: every reference of the old one is useless
    conn["_gen"] = gen
    try:
        key = json.dumps(s, sort_keys=True, separators=(",", ":"), allow_nan=False)
    except (TypeError, ValueError, RecursionError) as e:
        raise exc(f"stream keys must be JSON: {e}") from None
    if len(key) > MAX_KEY_CHARS:
        raise exc(f"stream keys take {len(key)} characters; the limit is {MAX_KEY_CHARS}")
    streams: OrderedDict[str, dict] = conn.setdefault("_streams", OrderedDict())
    sub = streams.pop(key) if key in streams else {}
    streams[key] = sub
    while len(streams) > MAX_STREAMS:
        streams.popitem(last=False)
    return sub


def end_stream(conn: dict[str, Any], gen: str | None = None, exc: type[Exception] = LocalError) -> bool:
    """Generation end: clear ``conn`` if its state belongs to generation ``gen`` (the ``gen``
    its streams were opened with), or whatever it holds when ``gen`` is None. The state of
    another generation stays (it is still in use). True when something was dropped."""
    if gen is not None and (not isinstance(gen, str) or len(gen) > MAX_KEY_CHARS):
        raise exc(f"a generation id must be a string of at most {MAX_KEY_CHARS} characters")
    if not conn or (gen is not None and conn.get("_gen") != gen):
        return False
    conn.clear()
    return True


def state_bytes(conn: dict[str, Any]) -> int:
    """Bytes of the tensors (references) held in one connection's codec state."""
    total, todo = 0, [conn]
    while todo:
        for v in todo.pop().values():
            if isinstance(v, torch.Tensor):
                total += v.numel() * v.element_size()
            elif isinstance(v, dict):
                todo.append(v)
    return total


class TemporalCodec(EntropyCodec):
    """Shared GOP logic; subclasses code one intra frame or one residual frame."""

    stateful = True
    float_only = True

    def _encode_staged(
        self, t: torch.Tensor, name: str, params: dict[str, Any], state: dict[Any, Any] | None
    ) -> Staged:
        dname = dtype_name(t.dtype)
        keyint = param_int(params, "keyint", DEFAULT_KEYINT, 0, 1 << 30)
        key = ("enc", self.wire_id, name)
        ref = state.get(key) if state is not None else None
        if ref is not None and (
            ref["shape"] != tuple(t.shape)
            or ref["dtype"] != t.dtype
            or (keyint and ref["i"] + 1 >= keyint)
            or params.get("keyframe") is True
        ):
            ref = None
        w = SectionWriter(pick_backend(params, t.device))
        if ref is not None:
            rec, meta = yield from self.code_p(w, t, ref["ref"].to(t.device), params)
            if rec is None:  # the subclass found intra cheaper: start a new GOP
                w = SectionWriter(w.be)
                ref = None
        if ref is None:
            rec, meta = yield from self.code_i(w, t, params)
            g, i = secrets.randbits(31), 0
        else:
            g, i = ref["g"], ref["i"] + 1
        data, meta = w.finish({**meta, "f": "i" if i == 0 else "p", "g": g, "i": i})
        if state is not None:
            state[key] = {"g": g, "i": i, "ref": rec, "shape": tuple(t.shape), "dtype": t.dtype}
        return WireTensor(name, dname, tuple(t.shape), self.wire_id, data, meta)

    def _decode(self, wt: WireTensor, device: torch.device, state: dict[Any, Any] | None) -> torch.Tensor:
        check_shape(wt)  # before this stream's reference is touched
        if wt.dtype not in LOSSY_DTYPES:
            raise CodecError(f"{self.name} payload for {wt.name!r} has dtype {wt.dtype}")
        frame = meta_str(wt.meta, "f", ("i", "p"))
        g = meta_int(wt.meta, "g", 0, (1 << 31) - 1)
        i = meta_int(wt.meta, "i", 0, 1 << 31)
        key = ("dec", self.wire_id, wt.name)
        ref = state.pop(key, None) if state is not None else None  # re-stored only on success
        if frame == "i" and i != 0:
            raise CodecError(f"keyframe of {wt.name!r} has index {i}")
        if frame == "p":
            if (
                ref is None
                or ref["g"] != g
                or ref["i"] != i - 1
                or ref["shape"] != tuple(wt.shape)
                or ref["dtype"] != torch_dtype(wt.dtype)
            ):
                have = "none" if ref is None else f"GOP {ref['g']} frame {ref['i']}"
                raise StreamStateError(
                    f"{wt.name!r}: P-frame {i} of GOP {g} needs the previous frame as reference, this side has "
                    f"{have}; a keyframe must be sent"
                )
        r = SectionReader(wt, device)
        if frame == "p":
            assert ref is not None
            y = self.decode_p(r, wt, ref["ref"].to(device))
        else:
            y = self.decode_i(r, wt)
        r.done()
        if state is not None:
            state[key] = {"g": g, "i": i, "ref": y, "shape": tuple(wt.shape), "dtype": torch_dtype(wt.dtype)}
            return y.clone()  # the caller may modify its tensor in place; the reference must not change
        return y

    # code_i / code_p are staged (``Codec.staged_encode``): generators that yield before their first
    # host round trip and return (the reconstruction the decoder will hold, meta).
    def code_i(self, w: SectionWriter, t: torch.Tensor, params: dict[str, Any]) -> Coded:
        raise NotImplementedError

    def code_p(self, w: SectionWriter, t: torch.Tensor, ref: torch.Tensor, params: dict[str, Any]) -> MaybeCoded:
        raise NotImplementedError

    def decode_i(self, r: SectionReader, wt: WireTensor) -> torch.Tensor:
        raise NotImplementedError

    def decode_p(self, r: SectionReader, wt: WireTensor, ref: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


# ---------------------------------------------------------------------------- lossless


def _bits(dtype: torch.dtype) -> tuple[int, torch.dtype, torch.dtype]:
    """(value bits, same-size int type, wider int type for wrap-free arithmetic)."""
    if dtype == torch.float32:
        return 32, torch.int32, torch.int64
    return 16, torch.int16, torch.int32


def _mono(x: torch.Tensor) -> torch.Tensor:
    """Float bits -> integers in value order (negative floats: flip the magnitude bits), widened."""
    nb, it, wt = _bits(x.dtype)
    v = x.view(it).to(wt)
    return torch.where(v < 0, v ^ ((1 << (nb - 1)) - 1), v)


def _unmono(m: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    nb, it, _ = _bits(dtype)
    v = torch.where(m < 0, m ^ ((1 << (nb - 1)) - 1), m)
    return v.to(it).view(dtype)


def _wrap(d: torch.Tensor, nb: int) -> torch.Tensor:
    half = 1 << (nb - 1)
    return ((d + half) & ((1 << nb) - 1)) - half


def _entropy_bits(u8: torch.Tensor) -> float:
    """Order-0 entropy of a byte sample, in bits (cheap estimate of a plane's coded size)."""
    if u8.numel() == 0:
        return 0.0
    p = torch.bincount(u8.reshape(-1).long(), minlength=256).double()
    p = p[p > 0] / u8.numel()
    return float(-(p * p.log2()).sum()) * u8.numel()


def _sample_rows(x: torch.Tensor, limit: int = 1 << 14) -> torch.Tensor:
    """Every k-th token row of [N, C], about ``limit`` rows at most (an order-0 sample)."""
    return x[:: max(1, x.shape[0] // limit)]


class LosslessTemporalCodec(TemporalCodec):
    """Exact across steps: a keyframe is ``lossless``'s byte planes (channel-major); a P-frame
    is the difference of the values' order-preserving integer codes to the previous step's
    (wrapping, zigzag), byte planes entropy-coded. A P-frame is sent only when an entropy
    estimate on a sample says it is smaller than a keyframe. float16/bfloat16/float32.
    Error budget: none (bit-exact, NaN payloads included). Params: ``keyint``, ``keyframe``,
    ``adaptive`` (default true), ``backend``."""

    wire_id = 6
    name = "lossless-t"
    lossless = True

    def code_i(self, w: SectionWriter, t: torch.Tensor, params: dict[str, Any]) -> Coded:
        yield  # byte planes: nothing to queue ahead
        it = _bits(t.dtype)[1]
        put_planes(w, t.detach().reshape(-1, t.shape[-1]).view(it).t().contiguous())
        return t.detach().clone(), {}

    def code_p(self, w: SectionWriter, t: torch.Tensor, ref: torch.Tensor, params: dict[str, Any]) -> MaybeCoded:
        yield  # its choice of frame takes host round trips at once
        nb, it, _ = _bits(t.dtype)
        k = nb // 8
        x = t.detach().reshape(-1, t.shape[-1])
        d = _wrap(_mono(x.contiguous()) - _mono(ref.reshape(x.shape).contiguous()), nb)
        zz = ((d << 1) ^ (d >> (nb * 2 - 1))) & ((1 << nb) - 1)
        if params.get("adaptive", True):
            xs = _sample_rows(x).contiguous().view(torch.uint8).reshape(-1, k)
            zs = _sample_rows(zz).contiguous().view(torch.uint8).reshape(-1, zz.element_size())
            intra = sum(_entropy_bits(xs[:, j]) for j in range(k))
            inter = sum(_entropy_bits(zs[:, j]) for j in range(k))
            if inter >= intra:
                return None, {}
        for row in planes(zz.t().contiguous())[:k]:
            w.coded(row)
        return t.detach().clone(), {}

    def decode_i(self, r: SectionReader, wt: WireTensor) -> torch.Tensor:
        dtype, c, n = lossy_geometry(wt)
        it = _bits(dtype)[1]
        words = get_planes(r, it, c * n, "value").reshape(c, n)
        return words.t().contiguous().view(dtype).reshape(wt.shape)

    def decode_p(self, r: SectionReader, wt: WireTensor, ref: torch.Tensor) -> torch.Tensor:
        dtype, c, n = lossy_geometry(wt)
        nb, _, wide = _bits(dtype)
        k = nb // 8
        rows = [r.coded(c * n, f"difference byte {j}") for j in range(k)]
        rows += [torch.zeros(c * n, dtype=torch.uint8, device=r.device)] * (wide.itemsize - k)
        zz = unplanes(rows, wide).reshape(c, n).t()
        d = (zz >> 1) ^ -(zz & 1)
        m = _wrap(_mono(ref.reshape(n, c).contiguous()) + d, nb)
        return _unmono(m, dtype).reshape(wt.shape)


# ---------------------------------------------------------------------------- lossy


class QuantTemporalCodec(TemporalCodec):
    """``quant`` across steps: the residual x_t - a_c * ref_{t-1} is quantized in the
    standardized domain of x_t (per-channel scales ~ the std of x_t's channels, not of the
    residual), so each step keeps the same per-channel floor as intra ``quant`` at about
    log2(1/r) fewer bits per value for a relative step residual r. a_c (float32 per channel)
    is the least-squares scale of the reference, which follows channels whose magnitude
    drifts with the timestep.

    Params: ``snr_db`` (27.0) / ``cosine`` (0.999) or ``step``, ``keyint`` (16), ``keyframe``,
    ``backend``.
    Error budget: every frame keeps every channel at SNR >= the floor against that frame's own
    spread (checked on the encoder, output rounding included) and |x - x'| <= step_c / 2 per
    element before output rounding -- closed loop, so it does not grow with the frame index."""

    wire_id = 7
    name = "quant-t"

    def code_i(self, w: SectionWriter, t: torch.Tensor, params: dict[str, Any]) -> Coded:
        meta, rec = yield from staged_shared_encode(w, channel_major(t), params, t.dtype, want_rec=True)
        assert rec is not None
        return output(rec, t.dtype, tuple(t.shape)), meta

    def code_p(self, w: SectionWriter, t: torch.Tensor, ref: torch.Tensor, params: dict[str, Any]) -> MaybeCoded:
        xt = channel_major(t)
        pt = channel_major(ref)
        pp = torch.linalg.vector_norm(pt, dim=1).double().square_()
        xp = torch.linalg.vecdot(xt, pt, dim=1).double()
        alpha = torch.where(pp > 0, xp / torch.where(pp > 0, pp, torch.ones_like(pp)), torch.zeros_like(pp))
        alpha = alpha.clamp_(-4.0, 4.0).float()
        pred = pt.mul_(alpha[:, None])
        w.raw(alpha)
        meta, rec = yield from staged_shared_encode(w, xt, params, t.dtype, pred=pred, want_rec=True)
        assert rec is not None
        return output(rec, t.dtype, tuple(t.shape)), meta

    def decode_i(self, r: SectionReader, wt: WireTensor) -> torch.Tensor:
        dtype, c, n = lossy_geometry(wt)
        return output(shared_decode(r, wt.meta, c, n), dtype, tuple(wt.shape))

    def decode_p(self, r: SectionReader, wt: WireTensor, ref: torch.Tensor) -> torch.Tensor:
        dtype, c, n = lossy_geometry(wt)
        alpha = r.raw(torch.float32, c, "reference scales")
        pred = channel_major(ref.reshape(n, c)).mul_(alpha[:, None])
        return output(pred.add_(shared_decode(r, wt.meta, c, n)), dtype, tuple(wt.shape))
