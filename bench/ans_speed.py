"""nvCOMP ANS on one FLUX.2 Klein 9B seam: where the encode/decode milliseconds go (GPU only).

    python bench/ans_speed.py [--tokens 4608] [--channels 4096] [--reps 20]

Times several ways of driving nvCOMP on the same bf16 tensor (device-resident in and out,
CUDA synchronized, median of --reps) next to our lossless codec as shipped, plus pinned and
pageable host copies of the compressed bytes. Prints one line per variant.
"""

from __future__ import annotations

import argparse
import statistics
import time
import traceback
from typing import Any

import torch


def timed(fn: Any, reps: int) -> tuple[float, Any]:
    out = fn()
    torch.cuda.synchronize()
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        out = fn()
        torch.cuda.synchronize()
        ts.append((time.perf_counter() - t) * 1e3)
    return statistics.median(ts), out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=4608)
    ap.add_argument("--channels", type=int, default=4096)
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--profile", action="store_true", help="also profile quant encode + decode (torch.profiler)")
    a = ap.parse_args()
    from comfyui_mesh import codec
    from comfyui_mesh.codec_entropy import _import_nvcomp

    nv, why = _import_nvcomp()
    if nv is None:
        raise SystemExit(why)
    dev = torch.device("cuda:0")
    g = torch.Generator(device=dev).manual_seed(0)
    x = (torch.randn(1, a.tokens, a.channels, generator=g, device=dev) * 0.7).to(torch.bfloat16)
    n = x.numel() * 2
    print(f"[ans] {torch.cuda.get_device_name(0)}, torch {torch.__version__}, nvcomp {nv.__version__}; "
          f"tensor {tuple(x.shape)} bf16 = {n / 1e6:.1f} MB", flush=True)  # fmt: skip
    stream = torch.cuda.current_stream(dev).cuda_stream
    u8 = x.reshape(-1).view(torch.uint8)

    def report(name: str, enc_ms: float, dec_ms: float, nbytes: int, ok: bool) -> None:
        print(f"[ans] {name:34s} enc {enc_ms:7.2f} ms  dec {dec_ms:7.2f} ms  sum {enc_ms + dec_ms:7.2f}  "
              f"{nbytes / 1e6:6.2f} MB  {'exact' if ok else 'MISMATCH'}", flush=True)  # fmt: skip

    # 0) the shipped codec: planes, one batched encode, one pinned host copy; decode from host bytes
    try:
        c = codec.by_name("lossless")
        e_ms, wt = timed(lambda: c.encode(x, "x", {"backend": "ans"}), a.reps)
        d_ms, y = timed(lambda: c.decode(wt, dev), a.reps)
        report("shipped lossless (host bytes)", e_ms, d_ms, len(wt.data), torch.equal(y.view(-1), x.view(-1)))
        q = codec.by_name("quant")
        e_ms, wt = timed(lambda: q.encode(x, "x", {"backend": "ans", "cosine": 0.999}), a.reps)
        d_ms, y = timed(lambda: q.decode(wt, dev), a.reps)
        cos = torch.nn.functional.cosine_similarity(y.float().reshape(1, -1), x.float().reshape(1, -1)).item()
        print(f"[ans] shipped quant cos 0.999 (host)    enc {e_ms:7.2f} ms  dec {d_ms:7.2f} ms  sum {e_ms + d_ms:7.2f}  "
              f"{len(wt.data) / 1e6:6.2f} MB  cosine {cos:.5f}", flush=True)  # fmt: skip
    except Exception:
        traceback.print_exc()

    if a.profile:
        from torch.profiler import ProfilerActivity, profile

        q = codec.by_name("quant")
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(5):
                q.decode(q.encode(x, "x", {"backend": "ans", "cosine": 0.999}), dev)
            torch.cuda.synchronize()
        print(prof.key_averages().table(sort_by="cpu_time_total", row_limit=25), flush=True)

    def planes_dev() -> torch.Tensor:  # [2, n/2]: low bytes then high bytes, one buffer
        return u8.view(-1, 2).t().contiguous()

    pm, _ = timed(planes_dev, a.reps)
    print(f"[ans] plane split (u8 transpose) {pm:.3f} ms", flush=True)
    v16 = x.reshape(-1).view(torch.int16)
    pm2, _ = timed(lambda: torch.stack([(v16 & 0xFF).to(torch.uint8), (v16 >> 8).to(torch.uint8)]), a.reps)
    print(f"[ans] plane split (shifts)       {pm2:.3f} ms", flush=True)

    def variant(name: str, opts: dict[str, Any], mode: str) -> None:
        try:
            cod = nv.Codec(algorithm="ANS", device_id=0, cuda_stream=stream, **opts)
            if mode == "batch":
                buf = planes_dev()
                h = n // 2

                def enc() -> Any:
                    src = nv.as_arrays(buf.reshape(-1), [0, h], [h, h], stream)
                    out = cod.encode(src)
                    return out, list(out.buffer_sizes)

                e_ms, (out, sizes) = timed(enc, a.reps)

                def dec() -> Any:
                    return cod.decode(out, data_type="|u1")

                d_ms, back = timed(dec, a.reps)
                rows = [torch.as_tensor(back[i], device=dev).reshape(-1).view(torch.uint8) for i in range(2)]
                y = torch.stack(rows).t().contiguous().reshape(-1)
                report(name, e_ms, d_ms, sum(sizes), torch.equal(y, u8))
            elif mode == "hi-only":
                buf = planes_dev()
                hi = buf[1]

                def enc() -> Any:
                    out = cod.encode(nv.as_array(hi, stream))
                    return out, int(out.buffer_size)

                e_ms, (out, size) = timed(enc, a.reps)
                d_ms, back = timed(lambda: cod.decode(out, data_type="|u1"), a.reps)
                ok = torch.equal(torch.as_tensor(back, device=dev).reshape(-1).view(torch.uint8), hi)
                report(name, e_ms + pm, d_ms, size + n // 2, ok)
            else:  # whole buffer in one array
                src_t = u8 if mode == "u8" else x.reshape(-1).view(torch.float16)

                def enc() -> Any:
                    out = cod.encode(nv.as_array(src_t, stream))
                    return out, int(out.buffer_size)

                e_ms, (out, size) = timed(enc, a.reps)
                dt = "|u1" if mode == "u8" else "<f2"
                d_ms, back = timed(lambda: cod.decode(out, data_type=dt), a.reps)
                y = torch.as_tensor(back, device=dev).reshape(-1)
                ok = torch.equal(y.view(torch.uint8) if y.dtype != torch.uint8 else y, u8)
                report(name, e_ms, d_ms, size, ok)
        except Exception as e:
            print(f"[ans] {name:34s} FAILED: {type(e).__name__}: {str(e)[:200]}", flush=True)

    lat = {"execution_policy": nv.ExecutionPolicy.LATENCY}
    variant("u1 whole buffer (no split)", {"data_type": "|u1"}, "u8")
    variant("u1 2 planes, 1 batch call", {"data_type": "|u1"}, "batch")
    variant("u1 2 planes, batch, LATENCY", {"data_type": "|u1", **lat}, "batch")
    variant("u1 2 planes, batch, 256K chunks", {"data_type": "|u1", "uncomp_chunk_size": 262144}, "batch")
    variant("u1 2 planes, batch, hist/8", {"data_type": "|u1", "histogram_reduction_log2": 3}, "batch")
    variant("u1 high plane only, low stored", {"data_type": "|u1"}, "hi-only")
    variant("f2 whole buffer", {"data_type": "<f2"}, "f2")
    variant("f2 whole buffer, LATENCY", {"data_type": "<f2", **lat}, "f2")
    variant("f2 whole buffer, 256K chunks", {"data_type": "<f2", "uncomp_chunk_size": 262144}, "f2")
    variant("f2 whole buffer, hist/8", {"data_type": "<f2", "histogram_reduction_log2": 3}, "f2")

    # host copies of ~25 MB of compressed bytes
    m = 25_000_000
    d = torch.zeros(m, dtype=torch.uint8, device=dev)
    pinned = torch.empty(m, dtype=torch.uint8, pin_memory=True)
    t1, _ = timed(lambda: pinned.copy_(d, non_blocking=True), a.reps)
    t2, _ = timed(lambda: d.cpu(), a.reps)
    t3, _ = timed(lambda: d.copy_(pinned, non_blocking=True), a.reps)
    t4, _ = timed(lambda: torch.frombuffer(bytearray(m), dtype=torch.uint8).to(dev), a.reps)
    print(f"[ans] 25 MB D2H pinned {t1:.2f} ms, pageable {t2:.2f} ms; H2D pinned {t3:.2f} ms, "
          f"from bytes {t4:.2f} ms", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
