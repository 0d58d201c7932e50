"""HEVC video coding of activations: the original project's ``nvenc`` codec, rebuilt.

Wire ids of this family (stable; never reused or renumbered):

    ==  ==========  =================================================================
    id  name        what
    ==  ==========  =================================================================
    16  nvenc       per-channel 8-bit quantization (rounded; ``quant="minmax"`` or the
                    ``"shared"`` step) -> channel tiles in 8-bit YUV 4:4:4 frames -> HEVC.
                    Encoded by NVENC (PyNvVideoCodec) where the GPU has it, else by
                    libx265 (PyAV, CPU); decoded by NVDEC (PyNvVideoCodec) into CUDA
                    tensors, else by libavcodec (PyAV, CPU). One bitstream format
                    whichever encoder made it: standard HEVC Main 4:4:4, IPPP, one IDR
                    per tensor. ``meta["enc"]`` records the encoder ("nvenc"/"x265").
    17  hevc-orig   the original project's scheme as a benchmark baseline: per-channel
                    min/max TRUNCATED to uint8, its token layout (largest divisor of N
                    <= sqrt(N): a prime N gives a 1 x N strip), missing channels repeat
                    the last one, frames zero-padded; tile 8 / QP 18 by default. Same
                    payload layout and decoder as id 16.
    18-23       reserved for this family
    ==  ==========  =================================================================

Packing (id 16). A tensor ``[..., C]`` is viewed as ``[N, C]`` (N tokens).
  1. Token layout: ``w`` tokens per row, ``h = ceil(N / w)`` rows; ``w`` is a power of two
     dividing N, else a divisor of N, within a factor 2 of sqrt(N) (closest to sqrt(N)),
     else ``ceil(sqrt(N))`` with the last row padded by repeating the last token: never a
     1 x N strip. ``params["row"]`` forces ``w`` (e.g. the image's token-grid width).
  2. Per channel: ``step = (max - min) / 255``, ``center = (min + max) / 2``,
     ``q = round((x - center) / step + 127.5)`` in 0..255; decode ``(q - 127.5) * step +
     center``. ``quant="shared"``: one step for all channels, ``step_c = max(S, range_c / 255)``
     with ``S`` the ``share_q`` quantile (default 0.9) of ``range_c / 255``: quiet channels
     use fewer levels (cheaper to code, same absolute error as the others), centred on 128.
     Measured on the benchmark's synthetic set (libx265): 4-9 % fewer bytes than minmax at
     equal cosine; ``share_q=1`` lets massive channels set the step for all (bad).
     Constant channels: step 0, exact.
  3. ``tile_dim`` t: t x t channels per plane, 3 planes (Y, U, V) per frame, so
     ``F = ceil(C / (3 t^2))`` frames of ``t*h x t*w`` pixels, padded (edge-replicated) up
     to a multiple of ``HEVC_ALIGN`` and at least ``HEVC_MIN_DIM``; must fit
     ``HEVC_MAX_DIM`` (else ``LocalError``: lower tile_dim).

Error budget (quantization alone, before HEVC): |x - x'| <= step_c / 2 (+ output dtype
rounding); ``lossless=True`` codes the 8-bit planes exactly, so that is the whole error.
Lossy QP adds the codec's error (QP 18: cosine >= 0.995 on smooth data, measured).

Payload (little-endian, layout version 1)::

    0   4s  magic b"MHVC"
    4   u8  layout version (1)
    5   u8  quantizer: 0 minmax (rounded), 1 shared step, 2 minmax truncated (original)
    6   u8  tile_dim (1, 2, 4, 8)
    7   u8  flags: bit 0 lossless, bit 1 original packing (zero/repeat padding)
    8   u32 N tokens      12 u32 C channels
    16  u32 h rows        20 u32 w tokens per row
    24  u32 frame width   28 u32 frame height    32 u32 frames F
    36  u32 bitstream bytes B                    40 u32 CRC-32 of the bitstream
    44  C x f32 center, C x f32 step
    44 + 8C   B bytes: HEVC Annex-B elementary stream, F frames

Every field is checked against the shape and the others before anything is decoded; the
CRC keeps corrupted bytes away from the native decoders. Empty and 0-d tensors travel raw
(``meta {"raw": true}``). Non-finite values: NaN -> 0, +-Inf -> +-the channel's largest
finite magnitude (as ``codec.py`` says for lossy codecs).

Unverified here (no NVENC on our GPUs, no GPU in CI): the NVENC encode path and the NVDEC
decode path; ``bench/hevc_gpu_check.py`` exercises NVDEC on a GPU. Both GPU paths fall
back to the CPU path (with one log line) when they fail at run time.
"""

from __future__ import annotations

import atexit
import collections
import dataclasses
import fractions
import importlib
import logging
import math
import struct
import threading
import zlib
from collections.abc import Callable
from typing import Any, ClassVar

import numpy as np
import torch

from .codec import Codec, RawCodec, dtype_name, numel, register, torch_dtype
from .constants import MAX_BODY_BYTES
from .errors import CodecError, LocalError
from .protocol import WireTensor

log = logging.getLogger("comfyui_mesh")

# ---------------------------------------------------------------------------- constants

# Frame-size rules, kept here only. HEVC_ALIGN and HEVC_MIN_DIM are the original project's.
HEVC_ALIGN = 16  # frame dims are multiples of this
# NVDEC's smallest HEVC picture is 144 x 144 (NVDEC Video Decoder API programming guide, table 1
# "Hardware video decoder capabilities", https://docs.nvidia.com/video-technologies/video-codec-sdk/).
HEVC_MIN_DIM = 144
# NVENC encodes HEVC up to 8192 x 8192 (NVENC application note, "NVENC capabilities": HEVC
# 8192 x 8192 from 2nd-gen Maxwell on; NVENC_CAPS_WIDTH_MAX/HEIGHT_MAX report 8192 on Turing and
# later), and NVDEC decodes HEVC up to 8192 x 8192 with 4:4:4 from Turing / GA100 / Hopper on
# (https://docs.nvidia.com/video-technologies/video-codec-sdk/13.0/nvdec-application-note/).
# libx265 would go further, but every stream must also decode on NVDEC.
HEVC_MAX_DIM = 8192
TILE_DIMS = (1, 2, 4, 8)
LOSSY_DTYPES = ("float32", "float16", "bfloat16")
LAYOUT_VERSION = 1
MAGIC = b"MHVC"
HEADER = struct.Struct("<4sBBBBIIIIIIIII")
QUANT_MINMAX, QUANT_SHARED, QUANT_TRUNC = 0, 1, 2
QUANT_NAMES = {"minmax": QUANT_MINMAX, "shared": QUANT_SHARED}
FLAG_LOSSLESS, FLAG_ORIGINAL = 1, 2
# Decoded planes may not exceed this (guards against a shape that would make the decoder
# allocate far more than the tensor: tiny token counts at tile 1 pad every channel to 144^2).
PLANE_BYTES_SLACK = 64 << 20
NVENC_SESSIONS = 3  # cached NVENC sessions (consumer cards allow few concurrent sessions)
NVENC_GOP = 1 << 16  # no periodic I-frames: each tensor starts with a forced IDR
X265_PRESET = "ultrafast"
NVENC_PRESET = "P4"

AV_HINT = "pip install av (or: pip install 'comfyui-mesh[codecs]')"
NVC_HINT = (
    "pip install pynvvideocodec, on a machine whose NVIDIA driver exposes the video libraries "
    "(libnvidia-encode, libnvcuvid; in containers NVIDIA_DRIVER_CAPABILITIES must include 'video')"
)

# ---------------------------------------------------------------------------- optional imports

_IMPORTS: dict[str, tuple[Any, str | None]] = {}
_ONCE: set[str] = set()
_LOCK = threading.RLock()


def _log_once(key: str, msg: str, level: int = logging.WARNING) -> None:
    with _LOCK:
        if key in _ONCE:
            return
        _ONCE.add(key)
    log.log(level, msg)


def _import(name: str, hint: str) -> tuple[Any, str | None]:
    """(module, None) or (None, why), cached. Any import failure (a missing driver library
    raises OSError/RuntimeError inside PyNvVideoCodec's import) counts as 'not installed'."""
    with _LOCK:
        if name not in _IMPORTS:
            try:
                _IMPORTS[name] = (importlib.import_module(name), None)
            except Exception as e:  # noqa: BLE001 - native import failures come in many types
                _IMPORTS[name] = (None, f"{name} is not importable ({type(e).__name__}: {e}); {hint}")
        return _IMPORTS[name]


def pyav() -> tuple[Any, str | None]:
    return _import("av", AV_HINT)


def x265_status() -> str | None:
    """None when PyAV with libx265 can encode here, else why not."""
    av, why = pyav()
    if why:
        return f"the libx265 encoder needs PyAV: {why}"
    if "libx265" not in av.codecs_available:
        return "this PyAV build has no libx265 encoder; install the PyPI wheel of av"
    return None


def pyav_decode_status() -> str | None:
    av, why = pyav()
    if why:
        return f"HEVC decoding on the CPU needs PyAV: {why}"
    if "hevc" not in av.codecs_available:
        return "this PyAV build has no HEVC decoder; install the PyPI wheel of av"
    return None


def nvc_module() -> tuple[Any, str | None]:
    return _import("PyNvVideoCodec", NVC_HINT)


# ---------------------------------------------------------------------------- parameters


def _param_int(params: dict[str, Any], key: str, default: int, lo: int, hi: int) -> int:
    v = params.get(key, default)
    if not isinstance(v, int) or isinstance(v, bool) or not lo <= v <= hi:
        raise LocalError(f"codec parameter {key}={v!r} must be an integer in {lo}..{hi}")
    return v


def _param_choice(params: dict[str, Any], key: str, default: str, allowed: tuple[str, ...]) -> str:
    v = params.get(key, default)
    if v not in allowed:
        raise LocalError(f"codec parameter {key}={v!r} must be one of {list(allowed)}")
    return str(v)


@dataclasses.dataclass(frozen=True)
class Settings:
    qp: int = 18
    lossless: bool = False
    tile: int = 8
    quant: int = QUANT_MINMAX
    share_q: float = 0.9
    row: int = 0  # tokens per row; 0 = automatic
    encoder: str = "auto"  # auto | nvenc | x265
    x265_preset: str = X265_PRESET
    nvenc_preset: str = NVENC_PRESET
    original: bool = False  # the original project's layout, truncation and padding


def settings(params: dict[str, Any], original: bool = False) -> Settings:
    """Codec parameters (our side: misuse is a LocalError); unknown keys belong to other codecs."""
    lossless = params.get("lossless", False)
    if not isinstance(lossless, bool):
        raise LocalError(f"codec parameter lossless={lossless!r} must be true or false")
    tile = params.get("tile_dim", 8)
    if isinstance(tile, str) and tile.isdigit():
        tile = int(tile)
    if tile not in TILE_DIMS or isinstance(tile, bool):
        raise LocalError(f"codec parameter tile_dim={tile!r} must be one of {list(TILE_DIMS)}")
    share_q = params.get("share_q", 0.9)
    if not isinstance(share_q, (int, float)) or isinstance(share_q, bool) or not 0.0 <= share_q <= 1.0:
        raise LocalError(f"codec parameter share_q={share_q!r} must be a number in [0, 1]")
    quant = QUANT_TRUNC if original else QUANT_NAMES[_param_choice(params, "quant", "minmax", tuple(QUANT_NAMES))]
    return Settings(
        qp=_param_int(params, "qp", 18, 0, 51),
        lossless=lossless,
        tile=int(tile),
        quant=quant,
        share_q=float(share_q),
        row=0 if original else _param_int(params, "row", 0, 0, 1 << 30),
        encoder=_param_choice(params, "encoder", "auto", ("auto", "nvenc", "x265")),
        x265_preset=_param_choice(
            params,
            "x265_preset",
            X265_PRESET,
            ("ultrafast", "superfast", "veryfast", "faster", "fast", "medium", "slow", "slower", "veryslow"),
        ),
        nvenc_preset=_param_choice(params, "nvenc_preset", NVENC_PRESET, ("P1", "P2", "P3", "P4", "P5", "P6", "P7")),
        original=original,
    )


# ---------------------------------------------------------------------------- geometry


def token_layout(n: int, row: int = 0) -> tuple[int, int]:
    """(h rows, w tokens per row) with h * w >= n and h * w - n < w; never a 1 x n strip
    unless n is tiny. ``row`` > 0 forces w (clipped to n)."""
    if n <= 0:
        raise LocalError("token layout of an empty tensor")
    if row:
        w = min(row, n)
        return -(-n // w), w
    root = math.sqrt(n)
    lo, hi = root / 2, root * 2

    def best(cands: list[int]) -> int | None:
        cands = [d for d in cands if lo <= d <= hi and n % d == 0]
        return min(cands, key=lambda d: (abs(math.log(d / root)), -d)) if cands else None

    pow2 = [1 << k for k in range(0, n.bit_length())]
    pick = best(pow2)
    if pick is None:
        divs = [d for d in range(1, math.isqrt(n) + 1) if n % d == 0]
        pick = best(divs + [n // d for d in divs])
    w = pick if pick is not None else math.isqrt(n - 1) + 1  # else ceil(sqrt(n)), last row padded
    return -(-n // w), w


def original_layout(n: int) -> tuple[int, int]:
    """The original's ``_pick_2d_layout``: h = the largest divisor of n <= sqrt(n), w = n / h."""
    h = max(d for d in range(1, math.isqrt(n) + 1) if n % d == 0)
    return h, n // h


def frame_dim(pixels: int) -> int:
    return max(HEVC_MIN_DIM, -(-pixels // HEVC_ALIGN) * HEVC_ALIGN)


@dataclasses.dataclass(frozen=True)
class Geometry:
    n: int
    c: int
    h: int
    w: int
    tile: int

    @property
    def per_frame(self) -> int:
        return 3 * self.tile * self.tile

    @property
    def frames(self) -> int:
        return -(-self.c // self.per_frame)

    @property
    def width(self) -> int:
        return frame_dim(self.tile * self.w)

    @property
    def height(self) -> int:
        return frame_dim(self.tile * self.h)

    @property
    def plane_bytes(self) -> int:
        return self.frames * 3 * self.width * self.height

    def problem(self) -> str | None:
        """Why these frames cannot be coded, or None."""
        if self.tile * self.w > HEVC_MAX_DIM or self.tile * self.h > HEVC_MAX_DIM:
            return (
                f"{self.n} tokens as {self.h} x {self.w} at tile_dim {self.tile} make "
                f"{self.tile * self.h} x {self.tile * self.w} frames, over HEVC's {HEVC_MAX_DIM} x {HEVC_MAX_DIM}"
            )
        if self.plane_bytes > PLANE_BYTES_SLACK + 8 * self.n * self.c:
            return (
                f"{self.c} channels of {self.n} tokens at tile_dim {self.tile} would need "
                f"{self.plane_bytes} bytes of video frames"
            )
        return None


# ---------------------------------------------------------------------------- quantization


def channel_major(t: torch.Tensor) -> torch.Tensor:
    """A fresh float32 [C, N] copy of ``t`` viewed as [N, C], with the non-finite policy."""
    x = t.detach().reshape(-1, t.shape[-1])
    if x.dtype in (torch.float16, torch.bfloat16):  # transposing 16-bit words is much faster
        xt = x.view(torch.int16).t().contiguous().view(x.dtype).float()
    else:
        xt = torch.empty((x.shape[1], x.shape[0]), dtype=torch.float32, device=x.device).copy_(x.t())
    if bool(torch.isfinite(xt.sum(1)).all()):  # one cheap reduction; an overflow only costs the slow path
        return xt
    finite = torch.nan_to_num(xt, nan=0.0, posinf=0.0, neginf=0.0)
    absmax = finite.abs().amax(dim=1, keepdim=True).expand_as(xt)
    out = torch.where(torch.isposinf(xt), absmax, finite)
    return torch.where(torch.isneginf(xt), -absmax, out)


def quantize(xt: torch.Tensor, quant: int, share_q: float = 0.9) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """float32 [C, N] (consumed) -> (uint8 q [C, N], float32 center [C], float32 step [C]).

    Reconstruction: ``(q - 127.5) * step + center``. ``quant``: QUANT_MINMAX (rounded),
    QUANT_SHARED (one step S, channels wider than 255 S get their own), QUANT_TRUNC (the
    original: truncated, so the error is up to a whole step, biased low)."""
    lo, hi = torch.aminmax(xt, dim=1)
    lo64, hi64 = lo.double(), hi.double()
    rng = hi64 - lo64
    step64 = rng / 255.0
    center64 = lo64 + rng / 2
    if quant == QUANT_SHARED:
        live = step64[step64 > 0]
        base = float(torch.quantile(live.float(), share_q)) if live.numel() else 0.0
        quiet = (step64 < base) & (step64 > 0)
        step64 = torch.where(quiet, torch.full_like(step64, base), step64)
        center64 = torch.where(quiet, center64 - step64 / 2, center64)  # level 128 <-> the channel's midpoint
    const = rng == 0
    step64 = torch.where(const, torch.zeros_like(step64), step64)
    center64 = torch.where(const, hi64, center64)
    step = step64.float()
    center = center64.float()
    safe = torch.where(step > 0, step, torch.ones_like(step))
    y = xt.sub_(center[:, None]).div_(safe[:, None]).add_(127.5)
    y = y.floor_() if quant == QUANT_TRUNC else y.round_()
    q = y.clamp_(0, 255).to(torch.uint8)
    if bool(const.any()):
        q[const.to(q.device)] = 128
    return q, center, step


def dequantize(q: torch.Tensor, center: torch.Tensor, step: torch.Tensor) -> torch.Tensor:
    """uint8 [C, N] -> float32 [C, N]."""
    return q.float().sub_(127.5).mul_(step[:, None]).add_(center[:, None])


def output(yt: torch.Tensor, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
    """float32 [C, N] -> ``dtype`` in ``shape`` (clamped to the dtype's finite range)."""
    fmax = torch.finfo(dtype).max
    yt = yt.clamp_(-fmax, fmax)
    if dtype in (torch.float16, torch.bfloat16):
        return yt.to(dtype).view(torch.int16).t().contiguous().view(dtype).reshape(shape)
    return yt.t().contiguous().reshape(shape)


# ---------------------------------------------------------------------------- packing


def pack(q: torch.Tensor, g: Geometry, original: bool = False) -> torch.Tensor:
    """uint8 [C, N] -> uint8 frames [F, 3, H, W] (planar YUV 4:4:4), on q's device."""
    c, n = q.shape
    t, h, w = g.tile, g.h, g.w
    slots = h * w
    if slots > n:  # ours only: last row padded with the last token
        q = torch.cat([q, q[:, -1:].expand(c, slots - n)], dim=1)
    cpad = g.frames * g.per_frame - c
    if cpad:
        fill = q[-1:].expand(cpad, slots) if original else q.new_full((cpad, slots), 128)
        q = torch.cat([q, fill], dim=0)
    th, tw = t * h, t * w
    out = torch.empty((g.frames, 3, g.height, g.width), dtype=torch.uint8, device=q.device)
    out[:, :, :th, :tw] = q.view(g.frames, 3, t, t, h, w).permute(0, 1, 2, 4, 3, 5).reshape(g.frames, 3, th, tw)
    if original:  # zero padding, as the original
        out[:, :, th:, :] = 0
        out[:, :, :th, tw:] = 0
    else:  # edge replication costs the encoder almost nothing
        if g.height > th:
            out[:, :, th:, :tw] = out[:, :, th - 1 : th, :tw]
        if g.width > tw:
            out[:, :, :, tw:] = out[:, :, :, tw - 1 : tw]
    return out


def unpack(planes: torch.Tensor, g: Geometry) -> torch.Tensor:
    """uint8 frames [F, 3, H, W] -> uint8 [C, N]."""
    t, h, w = g.tile, g.h, g.w
    x = planes[:, :, : t * h, : t * w].reshape(g.frames, 3, t, h, t, w).permute(0, 1, 2, 4, 3, 5)
    return x.reshape(g.frames * g.per_frame, h * w)[: g.c, : g.n]


# ---------------------------------------------------------------------------- payload


@dataclasses.dataclass(frozen=True)
class Header:
    quant: int
    flags: int
    geom: Geometry
    nbytes: int
    crc: int

    def pack(self) -> bytes:
        g = self.geom
        return HEADER.pack(
            MAGIC,
            LAYOUT_VERSION,
            self.quant,
            g.tile,
            self.flags,
            g.n,
            g.c,
            g.h,
            g.w,
            g.width,
            g.height,
            g.frames,
            self.nbytes,
            self.crc,
        )


def parse_header(data: memoryview, name: str, n: int, c: int) -> tuple[Header, memoryview, memoryview]:
    """Check everything in the payload of ``name`` against the descriptor (n tokens, c channels):
    -> (header, side info bytes, bitstream bytes)."""
    if data.nbytes < HEADER.size:
        raise CodecError(f"HEVC payload of {name!r} has {data.nbytes} bytes, less than its {HEADER.size}-byte header")
    magic, ver, quant, tile, flags, hn, hc, h, w, width, height, frames, nbytes, crc = HEADER.unpack_from(data)
    if magic != MAGIC:
        raise CodecError(f"HEVC payload of {name!r} does not start with {MAGIC!r}")
    if ver != LAYOUT_VERSION:
        raise CodecError(f"HEVC payload of {name!r} has layout version {ver}; this side reads {LAYOUT_VERSION}")
    if quant not in (QUANT_MINMAX, QUANT_SHARED, QUANT_TRUNC) or tile not in TILE_DIMS or flags > 3:
        raise CodecError(f"HEVC payload of {name!r} has quantizer {quant}, tile {tile}, flags {flags}")
    if (hn, hc) != (n, c):
        raise CodecError(f"HEVC payload of {name!r} codes {hn} x {hc} values, the descriptor says {n} x {c}")
    if not (1 <= w <= n and 1 <= h and (h - 1) * w < n <= h * w):
        raise CodecError(f"HEVC payload of {name!r}: token layout {h} x {w} does not fit {n} tokens")
    g = Geometry(n, c, h, w, tile)
    if g.problem() or (width, height, frames) != (g.width, g.height, g.frames):
        raise CodecError(
            f"HEVC payload of {name!r}: {frames} frames of {width} x {height} do not match the layout "
            f"({g.problem() or f'{g.frames} frames of {g.width} x {g.height}'})"
        )
    side = 8 * c
    if data.nbytes != HEADER.size + side + nbytes:
        raise CodecError(
            f"HEVC payload of {name!r} has {data.nbytes} bytes, its header says {HEADER.size + side + nbytes}"
        )
    bits = data[HEADER.size + side :]
    if zlib.crc32(bits) != crc:
        raise CodecError(f"HEVC bitstream of {name!r} fails its CRC-32 (corrupted)")
    return Header(quant, flags, g, nbytes, crc), data[HEADER.size : HEADER.size + side], bits


# ---------------------------------------------------------------------------- libx265 / libavcodec (PyAV, CPU)


def _x265_params(s: Settings, frames: int) -> str:
    """One QP for I and P frames (NVENC's constqp semantics), no B-frames, no psycho-visual or
    adaptive quantization (they trade MSE for looks), no chroma QP offsets (the U and V planes
    are channels like Y), a decoded-picture MD5 SEI per frame (~40 bytes: the CPU decoder
    verifies it), no encoder-info SEI."""
    rc = "lossless=1" if s.lossless else f"qp={s.qp}:ipratio=1:pbratio=1"  # one QP for I and P, like NVENC constqp
    return (
        f"{rc}:bframes=0:keyint={max(frames, 1) + 1}:min-keyint=1:scenecut=0:open-gop=0"
        ":aq-mode=0:psy-rd=0:psy-rdoq=0:cbqpoffs=0:crqpoffs=0:info=0:hash=1:log-level=error"
    )


def encode_x265(frames: torch.Tensor, s: Settings) -> bytes:
    """uint8 [F, 3, H, W] -> one HEVC elementary stream (IDR then P-frames)."""
    packets = x265_packets(frames, s)
    if len(packets) != frames.shape[0]:
        raise LocalError(f"libx265 returned {len(packets)} packets for {frames.shape[0]} frames")
    return b"".join(packets)


def x265_packets(frames: torch.Tensor, s: Settings) -> list[bytes]:
    """uint8 [F, 3, H, W] -> libx265's packets (one per frame, Annex B, headers in the first)."""
    av, why = pyav()
    if why or x265_status():
        raise LocalError(x265_status() or str(why))
    arr = frames.detach().cpu().contiguous().numpy()
    nf, _, height, width = arr.shape
    ctx = av.CodecContext.create("libx265", "w")
    ctx.width, ctx.height, ctx.pix_fmt = width, height, "yuv444p"
    ctx.time_base = fractions.Fraction(1, 30)
    ctx.options = {"preset": s.x265_preset, "tune": "psnr", "x265-params": _x265_params(s, nf)}
    packets: list[Any] = []
    for i in range(nf):
        vf = av.VideoFrame(width, height, "yuv444p")
        for k, plane in enumerate(vf.planes):
            src = arr[i, k]
            if plane.line_size != width:
                padded = np.zeros((height, plane.line_size), dtype=np.uint8)
                padded[:, :width] = src
                src = padded
            plane.update(np.ascontiguousarray(src))
        vf.pts = i
        packets.extend(ctx.encode(vf))
    packets.extend(ctx.encode(None))
    return [bytes(p) for p in packets]


def decode_pyav(bits: memoryview, g: Geometry) -> torch.Tensor:
    """HEVC elementary stream -> uint8 [F, 3, H, W] on the CPU; anything unexpected is a CodecError."""
    av, why = pyav()
    why = why or pyav_decode_status()
    if why:
        raise CodecError(f"cannot decode an HEVC payload here: {why}")
    out = np.empty((g.frames, 3, g.height, g.width), dtype=np.uint8)
    got = 0

    def take(frame: Any) -> None:
        nonlocal got
        if got >= g.frames:
            raise CodecError(f"HEVC bitstream holds more than the {g.frames} frames its header declares")
        if (frame.width, frame.height) != (g.width, g.height) or frame.format.name != "yuv444p":
            raise CodecError(
                f"HEVC frame is {frame.width} x {frame.height} {frame.format.name}, "
                f"expected {g.width} x {g.height} yuv444p"
            )
        planes = frame.planes
        if len(planes) != 3:
            raise CodecError(f"HEVC frame has {len(planes)} planes, expected 3")
        for k, p in enumerate(planes):
            ls = p.line_size
            buf = np.frombuffer(p, dtype=np.uint8)
            if buf.size < ls * (g.height - 1) + g.width:
                raise CodecError("HEVC frame plane is smaller than its size says")
            out[got, k] = np.lib.stride_tricks.as_strided(buf, (g.height, g.width), (ls, 1))
        got += 1

    try:
        ctx = av.CodecContext.create("hevc", "r")
        ctx.thread_type = "AUTO"
        # raise instead of concealing; verify x265's MD5 picture-hash SEI (libavcodec checks MD5 only)
        ctx.options = {"err_detect": "crccheck+explode"}
        packets = list(ctx.parse(bytes(bits)))
        try:
            packets += ctx.parse(None)  # flush the parser: the last frame's packet (PyAV >= 14)
        except TypeError:
            packets += ctx.parse(b"")
        if len(packets) > g.frames + 8:
            raise CodecError(f"HEVC bitstream splits into {len(packets)} packets for {g.frames} frames")
        for pkt in packets:
            for fr in ctx.decode(pkt):
                take(fr)
        for fr in ctx.decode(None):
            take(fr)
    except CodecError:
        raise
    except Exception as e:  # noqa: BLE001 - libavcodec errors (av.error.*) and anything else from native code
        raise CodecError(f"HEVC bitstream does not decode: {type(e).__name__}: {e}") from None
    if got != g.frames:
        raise CodecError(f"HEVC bitstream decoded to {got} frames, its header declares {g.frames}")
    return torch.from_numpy(out)


# ---------------------------------------------------------------------------- NVENC (PyNvVideoCodec)


class _CAI:
    """One plane as a ``__cuda_array_interface__`` (version 3), what PyNvVideoCodec reads."""

    def __init__(self, ptr: int, height: int, width: int):
        self.__cuda_array_interface__ = {
            "shape": (height, width, 1),
            "strides": (width, 1, 1),
            "data": (ptr, False),
            "typestr": "|u1",
            "version": 3,
        }


class _Yuv444Frame:
    """A [3, H, W] uint8 CUDA tensor as the encoder's YUV444 input (``.cuda()`` -> 3 planes)."""

    def __init__(self, planes: torch.Tensor):
        self.tensor = planes  # keeps the memory alive
        _, height, width = planes.shape
        base = planes.data_ptr()
        self._planes = [_CAI(base + k * height * width, height, width) for k in range(3)]

    def cuda(self) -> list[_CAI]:
        return self._planes


class NvencMisbehaved(RuntimeError):
    """NVENC ran but did not return one packet per frame (the session is dropped)."""


class NvencSession:
    """One NVENC HEVC 4:4:4 session for a frame size and QP/lossless; ``close()`` releases it."""

    def __init__(self, nvc: Any, gpu: int, width: int, height: int, qp: int, lossless: bool, preset: str):
        self.key = (gpu, width, height, qp, lossless, preset)
        self.width, self.height = width, height
        self.nvc = nvc
        opts = {
            "codec": "hevc",
            "preset": preset,
            "tuning_info": "lossless" if lossless else "high_quality",
            "rc": "constqp",
            "constqp": "0" if lossless else str(qp),
            "gop": str(NVENC_GOP),
            "idrperiod": str(NVENC_GOP),
            "bf": "0",
            "repeatspspps": "1",
            "gpu_id": str(gpu),
        }
        self.enc: Any = nvc.CreateEncoder(width, height, "YUV444", False, **opts)
        self.used = 0

    def _idr_flag(self) -> Any:
        flags = getattr(self.nvc, "NV_ENC_PIC_FLAGS", None)
        return getattr(flags, "FORCEIDR", 2) if flags is not None else 2

    def encode(self, frames: torch.Tensor) -> bytes:
        """uint8 CUDA [F, 3, H, W] -> bitstream. Frame 0 is a forced IDR; the session is
        flushed (EndEncode) after the last frame so every packet of this tensor is out."""
        if self.enc is None:
            raise NvencMisbehaved("session is closed")
        if frames.device.type == "cuda":
            torch.cuda.current_stream(frames.device).synchronize()  # the encoder copies with its own stream
        packets: list[Any] = []
        for i in range(frames.shape[0]):
            frame = _Yuv444Frame(frames[i])
            if i == 0:
                flag = self._idr_flag()
                try:
                    packets.extend(self.enc.Encode(frame, flag))
                except TypeError:
                    packets.extend(self.enc.Encode(frame, int(flag)))
            else:
                packets.extend(self.enc.Encode(frame))
        packets.extend(self.enc.EndEncode())
        self.used += 1
        data = [bytes(p["data"]) if isinstance(p, dict) else bytes(p) for p in packets]
        data = [d for d in data if d]
        if len(data) != frames.shape[0]:
            raise NvencMisbehaved(f"NVENC returned {len(data)} packets for {frames.shape[0]} frames")
        return b"".join(data)

    def close(self) -> None:
        enc, self.enc = self.enc, None
        del enc  # PyNvEncoder's destructor destroys the NVENC session


class SessionCache:
    """LRU of encoder sessions keyed by frame size and rate control: at most ``cap`` open;
    the least recently used is closed when a new one is needed, all on ``close_all``."""

    def __init__(self, cap: int = NVENC_SESSIONS):
        self.cap = cap
        self._d: collections.OrderedDict[Any, Any] = collections.OrderedDict()
        self.lock = threading.RLock()

    def get(self, key: Any, factory: Callable[[], Any]) -> Any:
        with self.lock:
            s = self._d.pop(key, None)
            if s is None:
                while len(self._d) >= self.cap:
                    _, old = self._d.popitem(last=False)
                    old.close()
                s = factory()
            self._d[key] = s
            return s

    def discard(self, key: Any) -> None:
        with self.lock:
            s = self._d.pop(key, None)
            if s is not None:
                s.close()

    def close_all(self) -> None:
        with self.lock:
            while self._d:
                _, s = self._d.popitem(last=False)
                s.close()

    def __len__(self) -> int:
        return len(self._d)

    def keys(self) -> list[Any]:
        with self.lock:
            return list(self._d)


SESSIONS = SessionCache()
_NVENC: dict[int, tuple[str | None, dict[str, Any]]] = {}  # gpu -> (why not, caps)
_NVENC_STATE: dict[str, Any] = {"reuse": True, "broken": ""}


def _gpu_index(device: torch.device | None) -> int:
    if device is not None and device.type == "cuda" and device.index is not None:
        return device.index
    return torch.cuda.current_device() if torch.cuda.is_available() else 0


def nvenc_status(device: torch.device | None = None) -> str | None:
    """None when NVENC can open an HEVC 4:4:4 session on this GPU, else why not. Probed once
    per GPU: ``GetEncoderCaps`` where it answers, then one session opened and closed."""
    if _NVENC_STATE["broken"]:
        return _NVENC_STATE["broken"]
    if not torch.cuda.is_available():
        return "NVENC needs an NVIDIA GPU and torch with CUDA (none here)"
    gpu = _gpu_index(device)
    with _LOCK:
        if gpu in _NVENC:
            return _NVENC[gpu][0]
        nvc, why = nvc_module()
        caps: dict[str, Any] = {}
        if why is None:
            try:
                try:
                    got = nvc.GetEncoderCaps(gpuid=gpu, codec="hevc")
                except TypeError:
                    got = nvc.GetEncoderCaps(codec="hevc")
                caps = dict(got) if got else {}
            except Exception as e:  # noqa: BLE001 - no NVENC often surfaces here
                caps = {"error": f"{type(e).__name__}: {e}"}
            if caps.get("support_yuv444_encode") in (0, False):
                why = f"GPU {gpu}'s NVENC cannot encode HEVC 4:4:4 (GetEncoderCaps)"
        if why is None:
            try:
                torch.zeros(1, device=f"cuda:{gpu}")  # torch's primary context first
                NvencSession(nvc, gpu, 256, 256, 18, False, NVENC_PRESET).close()
            except Exception as e:  # noqa: BLE001 - e.g. "nvEncOpenEncodeSessionEx ... returned error 2"
                why = f"NVENC cannot open an HEVC 4:4:4 session on GPU {gpu} ({type(e).__name__}: {e})"
        _NVENC[gpu] = (why, caps)
        return why


def nvenc_caps(device: torch.device | None = None) -> dict[str, Any]:
    nvenc_status(device)
    return _NVENC.get(_gpu_index(device) if torch.cuda.is_available() else -1, (None, {}))[1]


def encode_nvenc(frames: torch.Tensor, s: Settings) -> bytes:
    """uint8 [F, 3, H, W] (moved to the GPU if needed) -> bitstream, with a cached session.
    A session that misbehaves after a flush is dropped; sessions are then opened per tensor."""
    nvc, why = nvc_module()
    if why:
        raise LocalError(why)
    dev = frames.device
    if dev.type != "cuda" and torch.cuda.is_available():
        dev = torch.device("cuda", torch.cuda.current_device())
    frames = frames.to(dev).contiguous()
    gpu = _gpu_index(dev)
    _, _, height, width = frames.shape
    key = (gpu, width, height, s.qp, s.lossless, s.nvenc_preset)

    def fresh() -> NvencSession:
        return NvencSession(nvc, gpu, width, height, s.qp, s.lossless, s.nvenc_preset)

    with SESSIONS.lock:
        if _NVENC_STATE["reuse"]:
            sess = SESSIONS.get(key, fresh)
            try:
                return sess.encode(frames)
            except Exception as e:  # noqa: BLE001 - any failure: drop the session, try a fresh one below
                SESSIONS.discard(key)
                if sess.used > 0 or isinstance(e, NvencMisbehaved):
                    _NVENC_STATE["reuse"] = False
                    _log_once("nvenc-reuse", f"NVENC: a reused session failed ({e}); opening one per tensor from now")
                else:
                    raise
        sess = fresh()
        try:
            return sess.encode(frames)
        finally:
            sess.close()


def close_sessions() -> None:
    """Release every cached NVENC session and idle NVDEC decoder (also done at exit)."""
    SESSIONS.close_all()
    with _LOCK:
        _DECODERS.clear()


# ---------------------------------------------------------------------------- NVDEC (PyNvVideoCodec)


class NvdecFailed(RuntimeError):
    """The GPU decode path did not work here (not a verdict on the payload)."""


_NVDEC_STATE: dict[str, Any] = {"broken": "", "reuse": True}


def nvdec_status(device: torch.device) -> str | None:
    if device.type != "cuda":
        return "the output device is not CUDA"
    if _NVDEC_STATE["broken"]:
        return _NVDEC_STATE["broken"]
    return nvc_module()[1]


def _as_plane(p: Any, device: torch.device) -> torch.Tensor:
    """A decoded plane (a CAI object on the GPU; a tensor in tests) as a 2-D uint8 tensor view."""
    t = torch.as_tensor(p, device=device)
    if t.dtype != torch.uint8:
        raise NvdecFailed(f"NVDEC plane has dtype {t.dtype}")
    while t.dim() > 2 and t.shape[-1] == 1:
        t = t.squeeze(-1)
    if t.dim() != 2:
        raise NvdecFailed(f"NVDEC plane has shape {tuple(t.shape)}")
    return t


def _new_decoder(nvc: Any, gpu: int, stream: int) -> Any:
    kw: dict[str, Any] = {"gpuid": gpu, "codec": nvc.cudaVideoCodec.HEVC, "cudacontext": 0, "cudastream": stream}
    kw["usedevicememory"] = True
    latency = getattr(getattr(nvc, "DisplayDecodeLatencyType", None), "LOW", None)
    if latency is not None:  # IPPP without B-frames: frames come out as each access unit goes in
        kw["latency"] = latency
    return nvc.CreateDecoder(**kw)


def _nvdec_run(nvc: Any, dec: Any, src: memoryview, g: Geometry, device: torch.device) -> torch.Tensor:
    """Feed one stream through a decoder; NvdecFailed unless exactly ``g.frames`` frames of the
    declared size come out."""
    out = torch.empty((g.frames, 3, g.height, g.width), dtype=torch.uint8, device=device)
    pos = 0
    got = 0

    def feed(dst: Any) -> int:  # the demuxer's read callback: fill dst, return the byte count
        nonlocal pos
        k = min(len(dst), src.nbytes - pos)
        if k <= 0:
            return 0
        chunk = src[pos : pos + k]
        try:
            dst[:k] = chunk
        except (TypeError, ValueError):
            dst[:k] = np.frombuffer(chunk, dtype=np.uint8)
        pos += k
        return k

    def fits(views: list[torch.Tensor]) -> bool:
        return all(v.shape[1] == g.width for v in views) and sum(v.shape[0] for v in views) == 3 * g.height

    def take(frame: Any) -> None:
        nonlocal got
        if got >= g.frames:
            raise NvdecFailed(f"NVDEC returned more than the {g.frames} frames the header declares")
        views = [_as_plane(p, device) for p in frame.cuda()]  # the frame's CAI views, one per plane
        if not fits(views) and hasattr(frame, "__dlpack__"):  # else the frame as one DLPack tensor
            t = torch.from_dlpack(frame)
            if t.dtype == torch.uint8 and t.numel() == 3 * g.height * g.width and t.is_contiguous():
                views = [t.reshape(3 * g.height, g.width)]
        if not fits(views):
            shapes = [tuple(v.shape) for v in views]
            raise NvdecFailed(f"NVDEC frame planes {shapes} do not make 3 x {g.height} x {g.width}")
        row = 0
        for v in views:  # three CAIs of H rows (or one of 3H rows)
            out[got].view(3 * g.height, g.width)[row : row + v.shape[0]].copy_(v)
            row += v.shape[0]
        if device.type == "cuda":
            torch.cuda.current_stream(device).synchronize()  # before the decoder reuses the surface
        got += 1

    try:
        dmx = nvc.CreateDemuxer(feed)
        eop = getattr(getattr(nvc, "VideoPacketFlag", None), "ENDOFPICTURE", None)
        for pkt in dmx:
            if eop is not None and getattr(pkt, "bsl", True):
                pkt.decode_flag = eop
            for fr in dec.Decode(pkt):
                take(fr)
        if got < g.frames and getattr(nvc, "PacketData", None) is not None:  # flush, in case no EOS came
            for fr in dec.Decode(nvc.PacketData()):
                take(fr)
    except NvdecFailed:
        raise
    except Exception as e:  # noqa: BLE001 - PyNvVideoCodec raises its own exception types
        raise NvdecFailed(f"{type(e).__name__}: {e}") from e
    if got != g.frames:
        raise NvdecFailed(f"NVDEC returned {got} of {g.frames} frames")
    return out


_DECODERS: dict[tuple[int, int], Any] = {}  # (gpu, CUDA stream) -> an idle PyNvDecoder
atexit.register(close_sessions)


def decode_nvdec(bits: memoryview, g: Geometry, device: torch.device, nvc: Any = None) -> torch.Tensor:
    """HEVC elementary stream -> uint8 [F, 3, H, W] on ``device`` (CUDA) through NVDEC.

    A callback demuxer hands the bytes to PyNvVideoCodec's demuxer (raw HEVC probe); each
    access unit is decoded with low latency (IPPP, no B-frames) on the caller's CUDA stream,
    and each frame's planes are copied out at once (the decoder reuses its surfaces). One idle
    decoder per (GPU, stream) is kept for the next call; if a reused decoder fails where a
    fresh one works, decoders are created per call from then on. Raises ``NvdecFailed`` for
    anything that goes wrong: the caller then lets the CPU decoder judge the payload."""
    if nvc is None:
        nvc, why = nvc_module()
        if why:
            raise NvdecFailed(why)
    gpu = device.index if device.index is not None else (torch.cuda.current_device() if device.type == "cuda" else 0)
    stream = torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else 0
    src = memoryview(bytes(bits))
    key = (gpu, stream)
    with _LOCK:
        dec = _DECODERS.pop(key, None) if _NVDEC_STATE["reuse"] else None
    reused_failed = ""
    if dec is not None:
        try:
            out = _nvdec_run(nvc, dec, src, g, device)
            with _LOCK:
                _DECODERS.setdefault(key, dec)
            return out
        except NvdecFailed as e:
            reused_failed = str(e)
            del dec
    try:
        dec = _new_decoder(nvc, gpu, stream)
    except Exception as e:  # noqa: BLE001
        raise NvdecFailed(f"CreateDecoder: {type(e).__name__}: {e}") from e
    out = _nvdec_run(nvc, dec, src, g, device)
    if reused_failed:
        _NVDEC_STATE["reuse"] = False
        _log_once("nvdec-reuse", f"NVDEC: a reused decoder failed ({reused_failed}); creating one per tensor from now")
    elif _NVDEC_STATE["reuse"]:
        with _LOCK:
            _DECODERS.setdefault(key, dec)
    return out


# ---------------------------------------------------------------------------- codecs


class HevcCodec(Codec):
    """Params: ``qp`` (0..51, default 18), ``lossless`` (default false: HEVC-lossless 8-bit
    planes, the quantization remains), ``tile_dim`` (1/2/4/8, default 8), ``quant``
    (``"minmax"`` default, ``"shared"``), ``share_q``, ``row`` (tokens per row, 0 = auto),
    ``encoder`` (``"auto"``: NVENC where it works, else libx265; ``"nvenc"``; ``"x265"``),
    ``x265_preset`` (default ultrafast), ``nvenc_preset`` (P1..P7, default P4). Other keys
    are ignored (they belong to other codecs)."""

    wire_id: ClassVar[int] = 16
    name: ClassVar[str] = "nvenc"
    lossless: ClassVar[bool] = False
    original: ClassVar[bool] = False

    def available(self) -> str | None:
        x265 = x265_status()
        if x265 is None:
            return None
        nv = nvenc_status() if torch.cuda.is_available() else "no CUDA GPU here"
        if nv is None:
            return None
        return f"no HEVC encoder here: {x265}; NVENC: {nv}"

    def _settings(self, params: dict[str, Any]) -> Settings:
        return settings(params, original=self.original)

    def _pick_encoder(self, s: Settings, device: torch.device) -> str:
        if s.encoder == "x265":
            why = x265_status()
            if why:
                raise LocalError(f"codec {self.name}: encoder=x265 is not usable here: {why}")
            return "x265"
        nv = nvenc_status(device if device.type == "cuda" else None)
        if nv is None and s.lossless and nvenc_caps(device).get("support_lossless_encode") in (0, False):
            nv = "this GPU's NVENC has no lossless mode"
        if nv is None:
            return "nvenc"
        if s.encoder == "nvenc":
            raise LocalError(f"codec {self.name}: encoder=nvenc is not usable here: {nv}")
        why = x265_status()
        if why:
            raise LocalError(f"codec {self.name}: no HEVC encoder here: NVENC: {nv}; {why}")
        _log_once(
            "x265-fallback",
            f"ComfyUI-Mesh codec {self.name!r}: NVENC is not usable here ({nv}); "
            "encoding HEVC with libx265 on the CPU instead (slower, same bitstream format)",
        )
        return "x265"

    def encode(self, t: torch.Tensor, name: str, params: dict[str, Any], **kwargs: Any) -> WireTensor:
        dname = dtype_name(t.dtype)
        if dname not in LOSSY_DTYPES:
            raise LocalError(
                f"{self.name} codec needs a float16/bfloat16/float32 tensor; {name!r} is {dname}: send it raw"
            )
        s = self._settings(params)
        if t.ndim == 0 or t.numel() == 0:
            raw = RawCodec().encode(t, name, params)
            return dataclasses.replace(raw, codec=self.wire_id, meta={"raw": True})
        c = t.shape[-1]
        n = t.numel() // c
        h, w = original_layout(n) if s.original else token_layout(n, s.row)
        g = Geometry(n, c, h, w, s.tile)
        why = g.problem()
        if why:
            hint = " (the original's 1 x N strip for this token count)" if s.original and h == 1 else ""
            raise LocalError(
                f"codec {self.name} cannot code {name!r}: {why}{hint}; use a smaller tile_dim or send it raw"
            )
        enc = self._pick_encoder(s, t.device)
        xt = channel_major(t)  # quantized and packed on the tensor's device, whichever encoder runs
        q, center, step = quantize(xt, s.quant, s.share_q)
        del xt
        frames = pack(q, g, original=s.original)
        if enc == "nvenc":
            try:
                bits = encode_nvenc(frames, s)
            except Exception as e:  # noqa: BLE001 - NVENC failed at run time: say so once, use libx265
                if s.encoder == "nvenc" or x265_status():
                    raise LocalError(f"codec {self.name}: NVENC encode failed: {e}") from e
                _NVENC_STATE["broken"] = f"NVENC failed at run time ({type(e).__name__}: {e})"
                close_sessions()
                _log_once("nvenc-broken", f"ComfyUI-Mesh: {_NVENC_STATE['broken']}; using libx265 from now on")
                enc = "x265"
        if enc == "x265":
            bits = encode_x265(frames, s)
        flags = (FLAG_LOSSLESS if s.lossless else 0) | (FLAG_ORIGINAL if s.original else 0)
        head = Header(s.quant, flags, g, len(bits), zlib.crc32(bits)).pack()
        side = torch.cat([center.contiguous().view(torch.uint8), step.contiguous().view(torch.uint8)]).cpu()
        payload = b"".join([head, side.numpy().tobytes(), bits])
        meta: dict[str, Any] = {"enc": enc, "lossless": True} if s.lossless else {"enc": enc, "qp": s.qp}
        return WireTensor(name, dname, tuple(t.shape), self.wire_id, payload, meta)

    def decode(self, wt: WireTensor, device: torch.device | str, **kwargs: Any) -> torch.Tensor:
        if wt.meta.get("raw") is True:
            return RawCodec().decode(wt, device)
        if wt.dtype not in LOSSY_DTYPES or len(wt.shape) == 0 or numel(wt.shape) == 0:
            raise CodecError(f"{self.name} payload for {wt.name!r} has dtype {wt.dtype} / shape {list(wt.shape)}")
        dtype = torch_dtype(wt.dtype)
        total = numel(wt.shape)
        if total * torch.empty((), dtype=dtype).element_size() > MAX_BODY_BYTES:
            raise CodecError(f"{wt.name!r}: shape {list(wt.shape)} exceeds {MAX_BODY_BYTES} bytes")
        c = wt.shape[-1]
        dev = torch.device(device)
        try:
            mv = memoryview(wt.data).cast("B") if memoryview(wt.data).nbytes else memoryview(b"")
            head, side, bits = parse_header(mv, wt.name, total // c, c)
            g = head.geom
            sidet = torch.frombuffer(bytearray(side), dtype=torch.uint8).view(torch.float32)
            center, step = sidet[:c], sidet[c:]
            if not (
                bool(torch.isfinite(center).all()) and bool(torch.isfinite(step).all()) and bool((step >= 0).all())
            ):
                raise CodecError(f"HEVC payload of {wt.name!r} has non-finite or negative scales")
            planes = self._planes(bits, g, dev)
            q = unpack(planes, g)
            y = dequantize(q, center.to(q.device), step.to(q.device))
            return output(y, dtype, tuple(wt.shape)).to(dev)
        except CodecError:
            raise
        except (RuntimeError, ValueError, TypeError, IndexError, OverflowError, struct.error) as e:
            raise CodecError(f"cannot decode {wt.name!r} with codec {self.name}: {type(e).__name__}: {e}") from e

    @staticmethod
    def _use_nvdec(dev: torch.device) -> bool:
        return dev.type == "cuda" and nvdec_status(dev) is None

    def _planes(self, bits: memoryview, g: Geometry, dev: torch.device) -> torch.Tensor:
        if self._use_nvdec(dev):
            try:
                return decode_nvdec(bits, g, dev)
            except NvdecFailed as e:
                planes = decode_pyav(bits, g)  # a CodecError here: the payload was bad, not NVDEC
                _NVDEC_STATE["broken"] = f"NVDEC decode failed ({e})"
                _log_once(
                    "nvdec-broken", f"ComfyUI-Mesh: {_NVDEC_STATE['broken']}; decoding HEVC on the CPU from now on"
                )
                return planes.to(dev)
        planes = decode_pyav(bits, g)
        return planes.to(dev) if dev.type != "cpu" else planes

    def close(self) -> None:
        close_sessions()


class HevcOriginalCodec(HevcCodec):
    """The original project's nvenc scheme, reproduced as a baseline (see the module doc):
    truncating per-channel min/max uint8, its token layout, tile 8 / QP 18 by default.
    Params: ``qp``, ``lossless``, ``tile_dim``, ``encoder``, presets (``quant``/``row`` ignored)."""

    wire_id: ClassVar[int] = 17
    name: ClassVar[str] = "hevc-orig"
    original: ClassVar[bool] = True


register(HevcCodec())
register(HevcOriginalCodec())
