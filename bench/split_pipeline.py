"""Row pipelining (rows.py) over emulated links: batched vs pipelined split against unsplit on one GPU.

    python bench/split_pipeline.py --comfyui PATH --model tiny|klein9b|dev|ltx-tiny|ltx23 [--cfg 2] [--batch 1] \\
        [--links 1gbe] [--codecs raw,lossless] [--modes batched,rows] [--n-blocks N] [--steps 4] \\
        [--device cuda:0] [--server-device cuda:1] [--out results.json]
    python bench/split_pipeline.py ... --patches 2,4 [--patch-warmup 2]   # displaced patch pipelining

A front end of bench/split_link.py (the same model setup, Daedalus process, link emulator and table)
with the defaults of this question: the modes ``batched`` (row pipelining off: one call per step)
and ``rows`` (on: one call per row, the next row's front half overlapping this row's link time and
back half, ``--row-lanes`` rows in flight), over a 1 GbE link, raw and lossless. Any split_link
option may be given and wins over these defaults.

Read the table's ``unsplit / split`` column: the split's speed against the unsplit model on the
client's device. With both processes on one GPU (the default without a second one) the GPU work is
the unsplit model's, so ~1.0x means the link is hidden behind the other row's compute; with Daedalus
on a second GPU (``--server-device cuda:1``, the default when there are two) the two halves
overlap and it can exceed 1. Fidelity of the ``rows`` mode is against the unsplit model run row by
row (``icarus.row_by_row``; bit-identical with raw and lossless), of ``batched`` against the unsplit
batched run. Rows only pipeline when a call carries several: CFG > 1 (cond + uncond) or
``--batch`` > 1; FLUX.2 models default to ``--cfg 2`` here.

``--patches 2,4`` measures displaced patch pipelining (``patchpipe.py``, approximate) instead: one-row
calls (FLUX.2 defaults to ``--cfg 1`` then), the modes ``batched`` (the exact split, one call per
step) and ``patchM`` for each M (M patch calls per step after ``--patch-warmup`` exact calls, default
2), ``--row-lanes`` patches in flight; fidelity is against the unsplit model (the PSNR of the final
latent: issue 16's target is >= 35 dB at >= 1.5x the one-GPU speed, Daedalus on a second GPU).

On the CPU with ``--model tiny`` (or ``ltx-tiny``) it is a smoke run; tests/test_split_pipeline.py
runs it so.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # split_link, run as a script or imported by path
import split_link  # noqa: E402
from comfyui_mesh.constants import PATCH_WARMUP_CALLS  # noqa: E402

DEFAULTS = ["--modes", "batched,rows", "--links", "1gbe", "--codecs", "raw,lossless"]


OWN = ("--row-lanes", "--patches", "--patch-warmup")  # this bench's options (not split_link's)


def arguments(argv: list[str]) -> list[str]:
    """split_link's argument list: this bench's defaults, then ``argv`` (argparse keeps the last value);
    FLUX.2 models get ``--cfg 2`` unless ``argv`` names one (LTX-AV models default to 3 already), or
    ``--cfg 1`` with ``--patches`` (patch pipelining cuts one-row calls)."""

    def own(flag: str) -> str | None:
        return next((argv[i + 1] for i, a in enumerate(argv[:-1]) if a == flag), None)

    extra = list(DEFAULTS)
    model = own("--model") or "tiny"
    patches = [int(m) for m in (own("--patches") or "").split(",") if m]
    if any(m < 2 for m in patches):
        raise SystemExit(f"--patches {own('--patches')}: each count must be >= 2")
    if "--cfg" not in argv and split_link.MODELS[model].family == "flux2":
        extra += ["--cfg", "1" if patches else "2"]
    lanes = own("--row-lanes")
    rest = [a for i, a in enumerate(argv) if a not in OWN and (i == 0 or argv[i - 1] not in OWN)]
    if lanes is not None:  # the "rows" mode with another number of rows in flight
        extra += ["--mode-def", f"rows:samehost=false,rows=on,row_lanes={int(lanes)}"]
    if patches:
        warmup = int(own("--patch-warmup") or PATCH_WARMUP_CALLS)
        in_flight = f",row_lanes={int(lanes)}" if lanes is not None else ""
        for m in patches:
            extra += ["--mode-def", f"patch{m}:samehost=false,rows=off,patches={m},patch_warmup={warmup}{in_flight}"]
        extra += ["--modes", ",".join(["batched", *(f"patch{m}" for m in patches)])]
    return extra + rest


def main(argv: list[str] | None = None) -> int:
    return split_link.main(arguments(list(sys.argv[1:] if argv is None else argv)))


if __name__ == "__main__":
    sys.exit(main())
