"""GGUF speed on this machine: kino's dequantizers (every type kino reads) and K-quant writers.

    python benchmarks/bench_quantize.py [--shape 4096x4096] [--repeats 5] [--threads 2]

For each type, on a matrix of --shape: seconds to dequantize it to float32 (random blocks:
the bytes' values do not change the work), and for the K-quants kino writes, seconds to
quantize a Gaussian matrix (kino/models/gguf_quant.py); medians of --repeats after a
warm-up, and values per second.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from timing import median_time  # noqa: E402

from kino.models.gguf import QUANT_TYPES, dequantize  # noqa: E402
from kino.models.gguf_quant import K_WRITERS, quantize_k  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="4096x4096", help="rows x columns (columns a multiple of 256)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    rows, cols = (int(v) for v in args.shape.split("x"))
    torch.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(rows, cols, generator=gen)
    print(f"{rows}x{cols}, {args.threads} threads, medians of {args.repeats}")
    print("| type | dequantize s | dequantize M values/s | quantize s | quantize M values/s |")
    print("|---|---|---|---|---|")
    for qtype, q in QUANT_TYPES.items():
        raw = torch.randint(0, 256, (rows * cols // q.block, q.nbytes), dtype=torch.uint8, generator=gen)
        de = median_time(lambda: dequantize(raw, qtype, (rows, cols)), args.repeats)
        row = f"| {q.name} | {de:.3f} | {x.numel() / de / 1e6:.0f} |"
        if q.name in K_WRITERS:
            qu = median_time(lambda: quantize_k(x, q.name), args.repeats)
            row += f" {qu:.3f} | {x.numel() / qu / 1e6:.1f} |"
        else:
            row += " - | - |"
        print(row)


if __name__ == "__main__":
    main()
