"""What the encrypted link costs per model call (issue #14 item 5: <= 2 % of a 1 GbE step, ~5 ms).

    python bench/crypto_bench.py [--out-mb 8.66] [--back-mb 1.05] [--reps 30]

A Klein-9B-sized seam by default: a FORWARD of 8.66 MB out, a RESULT of 1.05 MB back (the per-step
frames of a FLUX.2 Klein 9B split at 1024x1024 with the quant codec). Each direction is sealed into
records (``securelink.Sealer``) and opened again (``securelink.Opener``) into one frame-sized buffer,
as ``netio`` does: AES-256-GCM and the copies around it, no socket. Prints a Markdown table of the
best and median time per call on each side (the client seals the request and opens the reply; the
server the other way round) and their share of a step on 1 GbE (--step-s, default 0.27 s: Klein 9B
with the quant codec on gigabit). Run it on an idle machine: the median moves with the load.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

from comfyui_mesh import protocol
from comfyui_mesh.constants import DEFAULT_LINK_BPS
from comfyui_mesh.securelink import Opener, Sealer


def frame(n: int) -> list:
    payload = os.urandom(n)
    msg = protocol.Forward(seq=1, arch="flux2", tensors=(protocol.WireTensor("x", "uint8", (n,), 0, payload),))
    return protocol.encode(msg)


def transfer_ms(sealer: Sealer, bufs: list, opener: Opener, into: bytearray) -> tuple[float, float]:
    """Seal ``bufs`` into records and open each one into one frame buffer as it comes, as a socket
    between ``netio`` on both ends would (a big record is a view of the sealer's reused buffer, valid
    until the next). Returns (seal ms, open ms); the copy a socket receive makes into the record
    buffer (the same with or without encryption) is not counted."""
    seal_s = open_s = 0.0
    view = memoryview(into)
    k = 0
    records = sealer.seal(bufs)
    while True:
        t0 = time.perf_counter()
        try:
            header, body = next(records)
        except StopIteration:
            break
        seal_s += time.perf_counter() - t0
        n = memoryview(body).nbytes
        opener.feed(header)
        rec = opener.reserve(n)
        rec[:] = body  # stands for sock.recv_into
        rec.release()
        t0 = time.perf_counter()
        opener.commit(n)  # authenticates and decrypts
        part = opener.take(len(into))
        view[k : k + part.nbytes] = part
        open_s += time.perf_counter() - t0
        k += part.nbytes
    view.release()
    return seal_s * 1e3, open_s * 1e3


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out-mb", type=float, default=8.66, help="request frame size, MB (10^6 bytes)")
    p.add_argument("--back-mb", type=float, default=1.05, help="reply frame size, MB")
    p.add_argument("--reps", type=int, default=30)
    p.add_argument("--step-s", type=float, default=0.27, help="one model call on 1 GbE, seconds (the 100 %% mark)")
    a = p.parse_args()
    out_bufs, back_bufs = frame(int(a.out_mb * 1e6)), frame(int(a.back_mb * 1e6))
    n_out = sum(memoryview(b).nbytes for b in out_bufs)
    n_back = sum(memoryview(b).nbytes for b in back_bufs)
    out_into, back_into = bytearray(n_out), bytearray(n_back)
    c2s, s2c = os.urandom(32), os.urandom(32)
    client_seal, client_open = Sealer(c2s), Opener(s2c)
    server_seal, server_open = Sealer(s2c), Opener(c2s)
    client_ms, server_ms = [], []
    for _ in range(a.reps):
        t_seal_c, t_open_s = transfer_ms(client_seal, out_bufs, server_open, out_into)
        t_seal_s, t_open_c = transfer_ms(server_seal, back_bufs, client_open, back_into)
        client_ms.append(t_seal_c + t_open_c)
        server_ms.append(t_seal_s + t_open_s)
    step_ms = a.step_s * 1e3
    wire_ms = (n_out + n_back) / DEFAULT_LINK_BPS * 1e3
    print(f"seam: {n_out / 1e6:.2f} MB out, {n_back / 1e6:.2f} MB back per call ({wire_ms:.0f} ms on 1 GbE wire)")
    print(f"AES-256-GCM, records of <= {client_seal.record_bytes >> 20} MiB, {a.reps} calls, {os.cpu_count()} cores")
    print()
    print(f"| side | best ms / call | median ms / call | best / median, % of a {step_ms:.0f} ms step |")
    print("|---|---:|---:|---:|")
    for side, ms in (
        ("client (seal request, open reply)", client_ms),
        ("server (open request, seal reply)", server_ms),
    ):
        med = statistics.median(ms)
        print(f"| {side} | {min(ms):.2f} | {med:.2f} | {100 * min(ms) / step_ms:.2f} / {100 * med / step_ms:.2f} % |")


if __name__ == "__main__":
    main()
