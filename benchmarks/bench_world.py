"""Shapes World throughput: generator (render) and evaluator, clips/s and frames/s.

    python benchmarks/bench_world.py [--n 200] [--repeats 5]

Prints one Markdown table row per measurement (median over repeats) for BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch

from kino.world.evaluator import evaluate_clip
from kino.world.generator import render, scene_at


def timed(fn, repeats: int) -> list[float]:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return times


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--n", type=int, default=200)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    torch.set_num_threads(1)
    print(f"# {platform.processor() or platform.machine()}, {torch.get_num_threads()} thread, "
          f"python {platform.python_version()}")
    print("| what | frames | size | clips/s (median) | frames/s | runs |")
    print("|---|---|---|---|---|---|")
    for frames, size in [(1, (64, 64)), (17, (64, 64)), (33, (64, 96)), (None, None)]:
        opts = {"frames": frames, "size": size}
        scenes = [scene_at("eval", 0, i, **opts) for i in range(args.n)]
        n_frames = sum(s.frames for s in scenes)
        gen = timed(lambda: [render(s) for s in scenes], args.repeats)
        videos = [render(s) for s in scenes]
        ev = timed(lambda: [evaluate_clip(v, s.caption) for s, v in zip(scenes, videos)], args.repeats)
        label_f = "mixed" if frames is None else frames
        label_s = "mixed" if size is None else f"{size[0]}x{size[1]}"
        for what, times in (("generate", gen), ("evaluate", ev)):
            med = statistics.median(times)
            print(f"| {what} | {label_f} | {label_s} | {args.n / med:.0f} | {n_frames / med:.0f} | "
                  f"{args.repeats} |")


if __name__ == "__main__":
    main()
