"""The HEVC engines: libx265 / libavcodec through PyAV (CPU), NVENC and NVDEC through
PyNvVideoCodec (GPU). One bitstream format whichever engine made it (``hevc_layout``).

Unverified here (no NVENC on our GPUs, no GPU in CI): the NVENC encode path and the NVDEC
decode path; ``bench/hevc_gpu_check.py`` exercises NVDEC on a GPU. Both GPU paths fall
back to the CPU path (with one log line) when they fail at run time (``mark_nvenc_broken``,
``mark_nvdec_broken``).
"""

from __future__ import annotations

import atexit
import collections
import fractions
import logging
import threading
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from ..constants import CODECS_EXTRA_HINT
from ..errors import CodecError, LocalError
from .base import optional_import
from .hevc_layout import NVENC_PRESET, Geometry, Settings

log = logging.getLogger("comfyui_mesh")

NVENC_SESSIONS = 3  # cached NVENC sessions (consumer cards allow few concurrent sessions)
NVENC_GOP = 1 << 16  # no periodic I-frames: each tensor starts with a forced IDR

AV_HINT = f"pip install av (or: {CODECS_EXTRA_HINT})"
NVC_HINT = (
    "pip install pynvvideocodec, on a machine whose NVIDIA driver exposes the video libraries "
    "(libnvidia-encode, libnvcuvid; in containers NVIDIA_DRIVER_CAPABILITIES must include 'video')"
)


# ---------------------------------------------------------------------------- optional imports

_ONCE: set[str] = set()
_LOCK = threading.RLock()


def log_once(key: str, msg: str, level: int = logging.WARNING) -> None:
    with _LOCK:
        if key in _ONCE:
            return
        _ONCE.add(key)
    log.log(level, msg)


def pyav() -> tuple[Any, str | None]:
    return optional_import("av", AV_HINT)


def _pyav_status(codec: str, use: str, part: str) -> str | None:
    """None when PyAV has ``codec`` here, else why not (``use`` needs it; the build lacks ``part``)."""
    av, why = pyav()
    if why:
        return f"{use} needs PyAV: {why}"
    if codec not in av.codecs_available:
        return f"this PyAV build has no {part}; install the PyPI wheel of av"
    return None


def x265_status() -> str | None:
    """None when PyAV with libx265 can encode here, else why not."""
    return _pyav_status("libx265", "the libx265 encoder", "libx265 encoder")


def pyav_decode_status() -> str | None:
    return _pyav_status("hevc", "HEVC decoding on the CPU", "HEVC decoder")


def nvc_module() -> tuple[Any, str | None]:
    return optional_import("PyNvVideoCodec", NVC_HINT)


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
                    log_once("nvenc-reuse", f"NVENC: a reused session failed ({e}); opening one per tensor from now")
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
        log_once("nvdec-reuse", f"NVDEC: a reused decoder failed ({reused_failed}); creating one per tensor from now")
    elif _NVDEC_STATE["reuse"]:
        with _LOCK:
            _DECODERS.setdefault(key, dec)
    return out


def mark_nvenc_broken(why: str) -> None:
    """NVENC failed at run time: close its sessions, say so once, use libx265 from now on."""
    _NVENC_STATE["broken"] = why
    close_sessions()
    log_once("nvenc-broken", f"ComfyUI-Mesh: {why}; using libx265 from now on")


def mark_nvdec_broken(why: str) -> None:
    """NVDEC failed at run time on a payload the CPU decoder read: decode on the CPU from now on."""
    _NVDEC_STATE["broken"] = why
    log_once("nvdec-broken", f"ComfyUI-Mesh: {why}; decoding HEVC on the CPU from now on")
