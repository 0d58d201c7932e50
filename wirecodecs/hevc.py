"""HEVC video coding of activations: the original project's ``nvenc`` codec, rebuilt.

Wire ids of this family (stable; never reused or renumbered):

    ==  ==========  =================================================================
    id  name        what
    ==  ==========  =================================================================
    16  nvenc       per-channel 8-bit quantization (rounded; ``quant="minmax"`` or the
                    ``"shared"`` step, standardized per channel) -> channel tiles in 8-bit
                    YUV 4:4:4 frames -> HEVC. Every live channel keeps a per-channel SNR
                    floor: the encoder decodes its own stream and sends the channels below
                    the floor exactly (fix-up section, layout version 2).
                    Encoded by NVENC (PyNvVideoCodec) where the GPU has it, else by
                    libx265 (PyAV, CPU); decoded by NVDEC (PyNvVideoCodec) into CUDA
                    tensors, else by libavcodec (PyAV, CPU). One bitstream format
                    whichever encoder made it: standard HEVC Main 4:4:4, IPPP, one IDR
                    per tensor. ``meta["enc"]`` records the encoder ("nvenc"/"x265").
    17  hevc-orig   the original project's scheme as a benchmark baseline: per-channel
                    min/max TRUNCATED to uint8, its token layout (largest divisor of N
                    <= sqrt(N): a prime N gives a 1 x N strip), missing channels repeat
                    the last one, frames zero-padded; tile 8 / QP 18 by default. No
                    floor: payload layout version 1 (no fix-ups), same decoder as id 16.
    18-23       reserved for this family
    ==  ==========  =================================================================

The payload layout and packing are in ``hevc_layout``; the encoders and decoders (libx265 /
PyAV, NVENC, NVDEC) in ``hevc_engines``.
"""

from __future__ import annotations

import zlib
from typing import Any, ClassVar

import torch

from ..errors import CodecError, LocalError
from ..protocol import WireTensor
from . import hevc_engines as engines
from .base import (
    LOSSY_DTYPES,
    Codec,
    byte_view,
    check_shape,
    dtype_name,
    itemsize,
    numel,
    to_bytes,
    torch_dtype,
)
from .channels import channel_major, output
from .hevc_layout import (
    FLAG_LOSSLESS,
    FLAG_ORIGINAL,
    LAYOUT_V1,
    LAYOUT_VERSION,
    Geometry,
    Header,
    Settings,
    below_floor,
    dequantize,
    fixup_section,
    floor_ref,
    original_layout,
    pack,
    parse_header,
    quantize,
    settings,
    token_layout,
    unpack,
)


class HevcCodec(Codec):
    """Params: ``qp`` (0..51, default 18), ``lossless`` (default false: HEVC-lossless 8-bit
    planes, the quantization remains), ``tile_dim`` (1/2/4/8, default 8), ``quant``
    (``"minmax"`` default, ``"shared"``), ``share_q``, ``row`` (tokens per row, 0 = auto),
    ``encoder`` (``"auto"``: NVENC where it works, else libx265; ``"nvenc"``; ``"x265"``),
    ``x265_preset`` (default ultrafast), ``nvenc_preset`` (P1..P7, default P4); the floor:
    ``floor_db`` (per-channel SNR in dB, default ``constants.HEVC_SNR_DB``; ``snr_db`` and
    ``cosine`` set the quant family's rate and are ignored here), and ``verify`` (default true: decode the
    stream locally, which costs a decode on the encoder, and send every live channel below the
    floor exactly; false: no check, no floor promised). Other keys are ignored (they belong
    to other codecs)."""

    wire_id: ClassVar[int] = 16
    name: ClassVar[str] = "nvenc"
    lossless: ClassVar[bool] = False
    original: ClassVar[bool] = False

    float_only: ClassVar[bool] = True

    def available(self) -> str | None:
        x265 = engines.x265_status()
        if x265 is None:
            return None
        nv = engines.nvenc_status() if torch.cuda.is_available() else "no CUDA GPU here"
        if nv is None:
            return None
        return f"no HEVC encoder here: {x265}; NVENC: {nv}"

    def _settings(self, params: dict[str, Any]) -> Settings:
        return settings(params, original=self.original)

    def check_params(self, params: dict[str, Any]) -> None:
        self._settings(params)

    def _pick_encoder(self, s: Settings, device: torch.device) -> str:
        if s.encoder == "x265":
            why = engines.x265_status()
            if why:
                raise LocalError(f"codec {self.name}: encoder=x265 is not usable here: {why}")
            return "x265"
        nv = engines.nvenc_status(device if device.type == "cuda" else None)
        if nv is None and s.lossless and engines.nvenc_caps(device).get("support_lossless_encode") in (0, False):
            nv = "this GPU's NVENC has no lossless mode"
        if nv is None:
            return "nvenc"
        if s.encoder == "nvenc":
            raise LocalError(f"codec {self.name}: encoder=nvenc is not usable here: {nv}")
        why = engines.x265_status()
        if why:
            raise LocalError(f"codec {self.name}: no HEVC encoder here: NVENC: {nv}; {why}")
        engines.log_once(
            "x265-fallback",
            f"ComfyUI-Mesh codec {self.name!r}: NVENC is not usable here ({nv}); "
            "encoding HEVC with libx265 on the CPU instead (slower, same bitstream format)",
        )
        return "x265"

    def _encode(self, t: torch.Tensor, name: str, params: dict[str, Any], state: dict[Any, Any] | None) -> WireTensor:
        s = self._settings(params)
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
        x = xt.clone() if s.verify else None  # the input, float32 [C, N], for the floor's check
        ref = floor_ref(x) if x is not None else None
        q, center, step = quantize(xt, s.quant, s.share_q)
        del xt
        fix = torch.zeros(0, dtype=torch.long, device=t.device)
        if ref is not None and s.lossless:  # the planes arrive exactly: the quantization is the whole error
            fix = below_floor(ref, dequantize(q, center, step), s.floor_db, t.dtype)
            if fix.numel():  # those channels travel exactly: blank (constant) in the video
                q[fix] = 128
                center[fix] = 0.0
                step[fix] = 0.0
        frames = pack(q, g, original=s.original)
        if enc == "nvenc":
            try:
                bits = engines.encode_nvenc(frames, s)
            except Exception as e:  # noqa: BLE001 - NVENC failed at run time: say so once, use libx265
                if s.encoder == "nvenc" or engines.x265_status():
                    raise LocalError(f"codec {self.name}: NVENC encode failed: {e}") from e
                engines.mark_nvenc_broken(f"NVENC failed at run time ({type(e).__name__}: {e})")
                enc = "x265"
        if enc == "x265":
            bits = engines.encode_x265(frames, s)
        del frames
        if ref is not None and not s.lossless:  # the peer's reconstruction, from the decoder it uses
            dev = ref.x.device
            y = dequantize(unpack(self._planes(memoryview(bits), g, dev), g), center.to(dev), step.to(dev))
            fix = below_floor(ref, y, s.floor_db, t.dtype)
            del y
        del ref
        flags = (FLAG_LOSSLESS if s.lossless else 0) | (FLAG_ORIGINAL if s.original else 0)
        version = LAYOUT_V1 if s.original else LAYOUT_VERSION
        head = Header(s.quant, flags, g, len(bits), zlib.crc32(bits), version).pack()
        side = torch.cat([center.contiguous().view(torch.uint8), step.contiguous().view(torch.uint8)]).cpu()
        parts = [head, side.numpy().tobytes(), bits]
        if version == LAYOUT_VERSION:
            rows = x[fix].to(t.dtype) if x is not None and fix.numel() else None
            parts.append(fixup_section(fix, rows))
        payload = b"".join(parts)
        if x is not None and fix.numel() and len(payload) >= t.numel() * t.element_size():
            # so many channels below the floor that the raw tensor is smaller: send it (exact,
            # after the lossy non-finite policy), as the base class sends empty tensors
            raw = output(x, t.dtype, tuple(t.shape)).contiguous()
            return WireTensor(name, dtype_name(t.dtype), tuple(t.shape), self.wire_id, to_bytes(raw), {"raw": True})
        meta: dict[str, Any] = {"enc": enc, "lossless": True} if s.lossless else {"enc": enc, "qp": s.qp}
        return WireTensor(name, dtype_name(t.dtype), tuple(t.shape), self.wire_id, payload, meta)

    def _decode(self, wt: WireTensor, device: torch.device, state: dict[Any, Any] | None) -> torch.Tensor:
        if wt.dtype not in LOSSY_DTYPES or numel(wt.shape) == 0:
            raise CodecError(f"{self.name} payload for {wt.name!r} has dtype {wt.dtype} / shape {list(wt.shape)}")
        dtype = torch_dtype(wt.dtype)
        total = check_shape(wt)
        c = wt.shape[-1]
        p = parse_header(byte_view(wt.data), wt.name, total // c, c, itemsize(dtype))
        g = p.head.geom
        sidet = torch.frombuffer(bytearray(p.side), dtype=torch.uint8).view(torch.float32)
        center, step = sidet[:c], sidet[c:]
        if not (bool(torch.isfinite(center).all()) and bool(torch.isfinite(step).all()) and bool((step >= 0).all())):
            raise CodecError(f"HEVC payload of {wt.name!r} has non-finite or negative scales")
        fix = None
        if p.fix_idx.numel():
            fix = torch.frombuffer(bytearray(p.fix_vals), dtype=torch.uint8).view(dtype).view(-1, g.n).float()
            if not bool(torch.isfinite(fix).all()):
                raise CodecError(f"HEVC payload of {wt.name!r} has non-finite fix-up values")
        planes = self._planes(p.bits, g, device)
        q = unpack(planes, g)
        y = dequantize(q, center.to(q.device), step.to(q.device))
        if fix is not None:
            y[p.fix_idx.to(y.device)] = fix.to(y.device)
        return output(y, dtype, tuple(wt.shape)).to(device)

    @staticmethod
    def _use_nvdec(dev: torch.device) -> bool:
        return dev.type == "cuda" and engines.nvdec_status(dev) is None

    def _planes(self, bits: memoryview, g: Geometry, dev: torch.device) -> torch.Tensor:
        if self._use_nvdec(dev):
            try:
                return engines.decode_nvdec(bits, g, dev)
            except engines.NvdecFailed as e:
                planes = engines.decode_pyav(bits, g)  # a CodecError here: the payload was bad, not NVDEC
                engines.mark_nvdec_broken(f"NVDEC decode failed ({e})")
                return planes.to(dev)
        planes = engines.decode_pyav(bits, g)
        return planes.to(dev) if dev.type != "cpu" else planes

    def close(self) -> None:
        engines.close_sessions()


class HevcOriginalCodec(HevcCodec):
    """The original project's nvenc scheme, reproduced as a baseline (see the module doc):
    truncating per-channel min/max uint8, its token layout, tile 8 / QP 18 by default; no
    floor (layout version 1, no fix-ups). Params: ``qp``, ``lossless``, ``tile_dim``,
    ``encoder``, presets (``quant``/``row``/``floor_db``/``verify`` ignored)."""

    wire_id: ClassVar[int] = 17
    name: ClassVar[str] = "hevc-orig"
    original: ClassVar[bool] = True
