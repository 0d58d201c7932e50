"""nvCOMP ANS on one FLUX.2 Klein 9B seam: where the encode/decode milliseconds go (GPU only).

    python bench/ans_speed.py [--tokens 4608] [--channels 4096] [--reps 20]

Times several ways of driving nvCOMP on the same bf16 tensor (device-resident in and out,
CUDA synchronized, median of --reps) next to our lossless codec as shipped, plus pinned and
pageable host copies of the compressed bytes. Prints one line per variant.
"""

from __future__ import annotations

import argparse
import dataclasses
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
    from comfyui_mesh.wirecodecs.backends import nvcomp_module

    nv, why = nvcomp_module()
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

    # 0) the codecs as shipped: GPU tensor in, host bytes out; host bytes in, GPU tensor out.
    # Decoded twice: from the encoder's page-locked output and from a plain (pageable) copy,
    # which is what a socket hands over. quant-t: P-frames of a sequence with step residual 0.3.
    y2 = (x.float() * 0.954 + torch.randn(x.shape, generator=g, device=dev) * 0.3 * 0.7).to(torch.bfloat16)

    def shipped(name: str, params: dict[str, Any], seq: list[torch.Tensor]) -> None:
        try:
            st = name.endswith("-t")
            enc_st: dict[Any, Any] = {}
            dec_pin: dict[Any, Any] = {}
            dec_pag: dict[Any, Any] = {}
            te, tp, tg, nb, ok = [], [], [], 0, True
            for i in range(a.reps + 2):
                t = seq[i % len(seq)]
                torch.cuda.synchronize()
                t0 = time.perf_counter()
                wt = codec.encode(t, "x", name, params, state=enc_st if st else None)
                torch.cuda.synchronize()
                t1 = time.perf_counter()
                y = codec.decode(wt, dev, state=dec_pin if st else None)
                torch.cuda.synchronize()
                t2 = time.perf_counter()
                wt_pageable = dataclasses.replace(wt, data=bytes(wt.data))
                torch.cuda.synchronize()
                t3 = time.perf_counter()
                y_pag = codec.decode(wt_pageable, dev, state=dec_pag if st else None)
                torch.cuda.synchronize()
                t4 = time.perf_counter()
                ok = ok and torch.equal(y, y_pag)
                if i >= 2:  # warm-up (and the keyframe of a temporal stream)
                    te.append((t1 - t0) * 1e3)
                    tp.append((t2 - t1) * 1e3)
                    tg.append((t4 - t3) * 1e3)
                    nb = len(wt.data)
            cos = torch.nn.functional.cosine_similarity(y.float().reshape(1, -1), t.float().reshape(1, -1)).item()
            e, d1, d2 = (statistics.median(v) for v in (te, tp, tg))
            print(f"[ans] shipped {name:10s} enc {e:6.2f} ms  dec {d1:6.2f} ms (pinned bytes) / {d2:6.2f} ms (pageable)"
                  f"  sum {e + d1:6.2f} / {e + d2:6.2f}  {nb / 1e6:6.2f} MB  cosine {cos:.5f}"
                  f"{'' if ok else '  DECODES DIFFER'}", flush=True)  # fmt: skip
        except Exception:
            traceback.print_exc()

    shipped("lossless", {"backend": "ans"}, [x])
    shipped("quant", {"backend": "ans", "cosine": 0.999}, [x])
    shipped("quant-t", {"backend": "ans", "cosine": 0.999, "keyint": 0}, [x, y2])

    # where quant's milliseconds go: its phases one by one, synchronized after each (so each
    # figure is that phase's launch + GPU time without overlap with the next)
    def phases() -> dict[str, float]:
        from comfyui_mesh.protocol import WireTensor
        from comfyui_mesh.wirecodecs import backends as B
        from comfyui_mesh.wirecodecs import channels as CH
        from comfyui_mesh.wirecodecs import quant as Q
        from comfyui_mesh.wirecodecs import sections as S
        from comfyui_mesh.wirecodecs.base import run_stages

        out: dict[str, float] = {}
        t = [time.perf_counter()]

        def mark(name: str) -> None:
            torch.cuda.synchronize()
            t.append(time.perf_counter())
            out[name] = out.get(name, 0.0) + (t[-1] - t[-2]) * 1e3

        w = S.SectionWriter(B.ANS)
        xt = CH.channel_major(x)
        mark("enc channel_major")
        xt = Q.put_outliers(w, xt, Q.outlier_channels(xt, 0.0), x.dtype)
        mu, var = Q.centered_var(xt)
        mark("enc stats")
        st, scales, q, steps = run_stages(Q.staged_standardized_steps(xt, var, 27.0, mu, None, x.dtype))
        mark("enc standardized steps + floor check")
        w.raw(mu.contiguous())
        w.raw(scales.contiguous())
        qi = q.to(torch.int16)
        mark("enc quantize")
        meta = run_stages(Q.staged_put_symbols(w, qi))
        mark("enc put_symbols")
        w._compress_pending()
        mark("enc ANS compress")
        data, meta = w.finish({**meta, "st": st, "sd": 1, "no": 0})
        mark("enc D2H")
        wt = WireTensor("x", "bfloat16", tuple(x.shape), 3, bytes(data), meta)
        t.append(time.perf_counter())
        r = S.SectionReader(wt, dev)
        r.payload()
        mark("dec H2D (pageable)")
        Q.get_outliers(r, 0, x.shape[-1], x.numel() // x.shape[-1], x.dtype)
        y = Q.shared_decode(r, wt.meta, x.shape[-1], x.numel() // x.shape[-1])
        mark("dec shared_decode (ANS + unpack + dequant)")
        CH.output(y, x.dtype, tuple(x.shape))
        mark("dec output")
        return out

    try:
        acc: dict[str, list[float]] = {}
        for i in range(a.reps + 2):
            ph = phases()
            if i >= 2:
                for k, v in ph.items():
                    acc.setdefault(k, []).append(v)
        print("[ans] quant phases (median ms): " + ", ".join(f"{k} {statistics.median(v):.3f}" for k, v in acc.items()))
    except Exception:
        traceback.print_exc()

    if a.profile:
        from torch.profiler import ProfilerActivity, profile

        q = codec.by_name("quant")
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(5):
                q.decode(q.encode(x, "x", {"backend": "ans", "cosine": 0.999}), dev)
            torch.cuda.synchronize()
        ev = {e.key: e for e in prof.key_averages()}
        counts = {
            k: ev[k].count / 5 for k in ("cudaLaunchKernel", "cudaStreamSynchronize", "cudaMemcpyAsync") if k in ev
        }
        gpu_ms = sum(e.self_device_time_total for e in prof.key_averages()) / 5e3
        print(f"[ans] quant round trip, per call: {counts}, GPU busy {gpu_ms:.2f} ms", flush=True)
        print(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=15), flush=True)

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
