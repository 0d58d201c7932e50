"""HEVC codecs' payload layout, pure: parameters (``Settings``), token layout and frame
``Geometry``, 8-bit quantization, packing into YUV 4:4:4 frames, and the payload ``Header``.
The encoders and decoders are in ``hevc_engines``; the codecs in ``hevc``.

Packing (id 16). A tensor ``[..., C]`` is viewed as ``[N, C]`` (N tokens).
  1. Token layout: ``w`` tokens per row, ``h = ceil(N / w)`` rows; ``w`` is a power of two
     dividing N, else a divisor of N, within a factor 2 of sqrt(N) (closest to sqrt(N)),
     else ``ceil(sqrt(N))`` with the last row padded by repeating the last token: never a
     1 x N strip. ``params["row"]`` forces ``w`` (e.g. the image's token-grid width).
  2. Per channel: ``step = (max - min) / 255``, ``center = (min + max) / 2``,
     ``q = round((x - center) / step + 127.5)`` in 0..255; decode ``(q - 127.5) * step +
     center``. ``quant="shared"``: one step in the standardized domain, ``step_c =
     max(range_c / 255, S * std_c)`` with ``std_c`` the channel's standard deviation over the
     tokens and ``S`` the ``share_q`` quantile (default 0.9) of ``range_c / (255 std_c)`` over
     the live channels (std >= MIN_CHANNEL_STD): most channels get the same step in units of
     their own spread, so the same SNR (a quiet channel as many levels as a loud one); only
     channels whose range / std is extreme (heavy tails) use their full 8 bits. Channels on
     the shared step are centred on level 128. Constant channels: step 0, exact.
  3. ``tile_dim`` t: t x t channels per plane, 3 planes (Y, U, V) per frame, so
     ``F = ceil(C / (3 t^2))`` frames of ``t*h x t*w`` pixels, padded (edge-replicated) up
     to a multiple of ``HEVC_ALIGN`` and at least ``HEVC_MIN_DIM``; must fit
     ``HEVC_MAX_DIM`` (else ``LocalError``: lower tile_dim).

Error budget (quantization alone, before HEVC): |x - x'| <= step_c / 2 (+ output dtype
rounding); ``lossless=True`` codes the 8-bit planes exactly, so that is the whole error.
Lossy QP adds the codec's error (QP 18: cosine >= 0.995 on smooth data, measured).

The floor (id 16, ``verify`` true, the default): every live channel (std >= MIN_CHANNEL_STD)
keeps ``SNR_c >= floor_db`` (``fidelity``; default ``constants.HEVC_SNR_DB``; not the ``cosine``
parameter) in the tensor the peer gets. The encoder reconstructs what the peer will (lossy:
it decodes its own bitstream with the decoder the peer uses, libavcodec or NVDEC; HEVC
decoding is bit-exact, so any conforming decoder gives the same planes; lossless: the planes
are the quantized values), rounds it to the output dtype as the peer does, and sends every
channel below the floor (+ CHECK_MARGIN_DB) exactly in the fix-up section (lossless: those
channels are known before encoding and blanked in the video, constant planes cost almost
nothing). Should the payload then be no smaller than the raw tensor, the raw bytes travel
instead (``meta {"raw": true}``, exact). ``verify=false`` skips the check: then no floor is
promised and K = 0.

Payload (little-endian, layout version 2; version 1 = the same without the fix-up section,
still read, and still written by id 17)::

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
    E = 44 + 8C + B   u32 K fix-up channels, 0 <= K <= C                   (version 2)
    E + 4     K x u32 channel indices, strictly ascending, each < C        (version 2)
    E + 4 + 4K  K x N values in the descriptor's dtype, channel-major: the
              channels' exact values; they replace the decoded channels     (version 2)

Every field is checked against the shape and the others before anything is allocated or
decoded (K is bounded by C before the length is computed, the byte length must match exactly,
fix-up values must be finite); the CRC keeps corrupted bytes away from the native decoders. Empty and 0-d tensors travel raw
(``meta {"raw": true}``). Non-finite values: NaN -> 0, +-Inf -> +-the channel's largest
finite magnitude (the lossy policy, ``channels``).
"""

from __future__ import annotations

import dataclasses
import math
import struct
import zlib
from typing import Any

import torch

from ..constants import HEVC_SNR_DB, MIN_CHANNEL_STD
from ..errors import CodecError, LocalError
from . import fidelity
from .channels import as_output, param_choice, param_int

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
LAYOUT_VERSION = 2  # written by id 16; id 17 (the baseline) still writes version 1
LAYOUT_V1 = 1  # no fix-up section; still read
MAGIC = b"MHVC"
HEADER = struct.Struct("<4sBBBBIIIIIIIII")
FIXUP_COUNT = struct.Struct("<I")
# The local check's margin (dB) over the floor: it computes the SNR in float32 (power-of-two
# scaled), a reader in float64; a channel within this margin of the floor is sent exactly too.
CHECK_MARGIN_DB = 0.01
QUANT_MINMAX, QUANT_SHARED, QUANT_TRUNC = 0, 1, 2
QUANT_NAMES = {"minmax": QUANT_MINMAX, "shared": QUANT_SHARED}
FLAG_LOSSLESS, FLAG_ORIGINAL = 1, 2
# Decoded planes may not exceed this (guards against a shape that would make the decoder
# allocate far more than the tensor: tiny token counts at tile 1 pad every channel to 144^2).
PLANE_BYTES_SLACK = 64 << 20
X265_PRESET = "ultrafast"
NVENC_PRESET = "P4"

# ---------------------------------------------------------------------------- parameters


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
    floor_db: float = HEVC_SNR_DB  # the per-channel floor the local check keeps (dB)
    verify: bool = True  # decode locally and send the channels below the floor exactly


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
    quant = QUANT_TRUNC if original else QUANT_NAMES[param_choice(params, "quant", "minmax", tuple(QUANT_NAMES))]
    verify = params.get("verify", True)
    if not isinstance(verify, bool):
        raise LocalError(f"codec parameter verify={verify!r} must be true or false")
    return Settings(
        qp=param_int(params, "qp", 18, 0, 51),
        lossless=lossless,
        tile=int(tile),
        quant=quant,
        share_q=float(share_q),
        row=0 if original else param_int(params, "row", 0, 0, 1 << 30),
        encoder=param_choice(params, "encoder", "auto", ("auto", "nvenc", "x265")),
        x265_preset=param_choice(
            params,
            "x265_preset",
            X265_PRESET,
            ("ultrafast", "superfast", "veryfast", "faster", "fast", "medium", "slow", "slower", "veryslow"),
        ),
        nvenc_preset=param_choice(params, "nvenc_preset", NVENC_PRESET, ("P1", "P2", "P3", "P4", "P5", "P6", "P7")),
        original=original,
        floor_db=HEVC_SNR_DB if original else fidelity.floor_db(params, HEVC_SNR_DB),
        verify=False if original else verify,
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


def quantize(xt: torch.Tensor, quant: int, share_q: float = 0.9) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """float32 [C, N] (consumed) -> (uint8 q [C, N], float32 center [C], float32 step [C]).

    Reconstruction: ``(q - 127.5) * step + center``. ``quant``: QUANT_MINMAX (rounded),
    QUANT_SHARED (one step S in units of each channel's standard deviation: ``step_c =
    max(range_c / 255, S * std_c)``, so most channels get the same SNR), QUANT_TRUNC (the
    original: truncated, so the error is up to a whole step, biased low)."""
    lo, hi = torch.aminmax(xt, dim=1)
    lo64, hi64 = lo.double(), hi.double()
    rng = hi64 - lo64
    step64 = rng / 255.0
    center64 = lo64 + rng / 2
    if quant == QUANT_SHARED:
        std64 = xt.std(dim=1, correction=0).double() if xt.shape[1] > 1 else torch.zeros_like(rng)
        live = (std64 >= MIN_CHANNEL_STD) & (rng > 0)
        ratio = step64[live] / std64[live]  # range_c / (255 std_c): the channel's own step in its std
        s = float(torch.quantile(ratio.float(), share_q)) if ratio.numel() else 0.0
        shared = std64 * s
        quiet = live & (shared > step64)
        step64 = torch.where(quiet, shared, step64)
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
    version: int = LAYOUT_VERSION

    def pack(self) -> bytes:
        g = self.geom
        return HEADER.pack(
            MAGIC,
            self.version,
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


@dataclasses.dataclass(frozen=True)
class Parsed:
    """A checked payload: its header, side info (C centers, C steps), bitstream, and the fix-up
    channels (ascending int64 indices, all < C) with their values' bytes (K x N, the descriptor's
    dtype, channel-major); no fix-ups in a version-1 payload."""

    head: Header
    side: memoryview
    bits: memoryview
    fix_idx: torch.Tensor
    fix_vals: memoryview


def parse_header(data: memoryview, name: str, n: int, c: int, itemsize: int) -> Parsed:
    """Check everything in the payload of ``name`` against the descriptor (n tokens, c channels
    of ``itemsize`` bytes) before anything is allocated or decoded."""
    if data.nbytes < HEADER.size:
        raise CodecError(f"HEVC payload of {name!r} has {data.nbytes} bytes, less than its {HEADER.size}-byte header")
    magic, ver, quant, tile, flags, hn, hc, h, w, width, height, frames, nbytes, crc = HEADER.unpack_from(data)
    if magic != MAGIC:
        raise CodecError(f"HEVC payload of {name!r} does not start with {MAGIC!r}")
    if ver not in (LAYOUT_V1, LAYOUT_VERSION):
        raise CodecError(
            f"HEVC payload of {name!r} has layout version {ver}; this side reads {LAYOUT_V1} and {LAYOUT_VERSION}"
        )
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
    end = HEADER.size + side + nbytes  # where the bitstream ends
    k = 0
    if ver == LAYOUT_VERSION:
        if data.nbytes < end + FIXUP_COUNT.size:
            raise CodecError(
                f"HEVC payload of {name!r} has {data.nbytes} bytes, its header says at least {end + FIXUP_COUNT.size}"
            )
        (k,) = FIXUP_COUNT.unpack_from(data, end)
        if k > c:
            raise CodecError(f"HEVC payload of {name!r} fixes {k} channels of {c}")
    want = end + (FIXUP_COUNT.size + 4 * k + k * n * itemsize if ver == LAYOUT_VERSION else 0)
    if data.nbytes != want:
        raise CodecError(f"HEVC payload of {name!r} has {data.nbytes} bytes, its header says {want}")
    bits = data[HEADER.size + side : end]
    if zlib.crc32(bits) != crc:
        raise CodecError(f"HEVC bitstream of {name!r} fails its CRC-32 (corrupted)")
    at = end + FIXUP_COUNT.size
    idx = (
        torch.frombuffer(bytearray(data[at : at + 4 * k]), dtype=torch.int32).long()
        if k
        else torch.zeros(0, dtype=torch.long)
    )
    if k and (int(idx[0]) < 0 or int(idx[-1]) >= c or (k > 1 and not bool((idx[1:] > idx[:-1]).all()))):
        raise CodecError(f"HEVC payload of {name!r}: fix-up channel indices are not ascending, unique and < {c}")
    return Parsed(
        Header(quant, flags, g, nbytes, crc, ver), data[HEADER.size : HEADER.size + side], bits, idx, data[at + 4 * k :]
    )


# ---------------------------------------------------------------------------- the floor's check


# Above this magnitude (absolute) the check scales each channel by a power of two (exact) so
# that sums of squares stay finite in float32.
CHECK_SCALE_ABOVE = float(2**40)


@dataclasses.dataclass(frozen=True)
class FloorRef:
    """The input side of the floor's check, computed once per tensor: x float32 [C, N] (scaled
    by ``scale`` [C, 1] when its values are huge), its per-channel variance and liveness."""

    x: torch.Tensor
    scale: torch.Tensor | None
    var: torch.Tensor
    live: torch.Tensor


def floor_ref(x: torch.Tensor) -> FloorRef:
    """``x``: float32 [C, N], the input after the lossy non-finite policy (kept, not modified)."""
    scale = None
    lo, hi = torch.aminmax(x) if x.numel() else (torch.zeros(()), torch.zeros(()))
    if max(-float(lo), float(hi)) > CHECK_SCALE_ABOVE:
        _, e = torch.frexp(x.abs().amax(dim=1))
        scale = torch.ldexp(torch.ones_like(x[:, 0]), -e)[:, None]
        x = x * scale
    var = x.var(dim=1, correction=0) if x.shape[1] > 1 else torch.zeros_like(x[:, 0])
    floor_std = MIN_CHANNEL_STD * (scale[:, 0] if scale is not None else torch.ones_like(var))
    return FloorRef(x, scale, var, var.sqrt() >= floor_std)


def below_floor(ref: FloorRef, y: torch.Tensor, floor_db: float, dtype: torch.dtype) -> torch.Tensor:
    """Ascending int64 indices (on x's device) of the live channels whose SNR falls below
    ``floor_db`` (+ ``CHECK_MARGIN_DB``): y float32 [C, N] (consumed) is what the peer will
    reconstruct before its output rounding to ``dtype``, which is applied here as the peer
    does. Constant channels (std < MIN_CHANNEL_STD) are never listed. Float32."""
    y = as_output(y, dtype)
    if ref.scale is not None:
        y.mul_(ref.scale)
    mse = torch.linalg.vector_norm(y.sub_(ref.x), dim=1).square_().div_(max(1, y.shape[1]))
    return fidelity.misses_floor(mse, ref.var, floor_db + CHECK_MARGIN_DB, ref.live).nonzero().flatten()


def fixup_section(idx: torch.Tensor, rows: torch.Tensor | None) -> bytes:
    """The version-2 trailer: u32 K, K x u32 ascending channel indices, K x N values (rows, in
    the descriptor's dtype, channel-major)."""
    k = int(idx.numel())
    if k == 0 or rows is None:
        return FIXUP_COUNT.pack(0)
    ib = idx.to(torch.int32).cpu().numpy().tobytes()
    vb = rows.contiguous().cpu().view(torch.uint8).numpy().tobytes()
    return FIXUP_COUNT.pack(k) + ib + vb
