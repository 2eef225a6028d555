"""Quality of a VAE on fresh Shapes World `eval` clips: PSNR and world-evaluator pass rates.

    python benchmarks/eval_vae.py [--model DIR] [--n 200] [--start 0] [--seed 2026] [--refine-latents N]
                                  [--refine-palette W] [--refine-method M] [--workers W] [--out DIR]

Samples n eval clips (every size; frame counts 1, 9, 17, 33 in turn) with a seed never used
in training or tuning, stores them losslessly, reconstructs them through the VAE with the same
code as `kino vae reconstruct` (with `--refine-latents N`: N loss evaluations of latent
refinement per window, as `kino vae reconstruct --refine-latents N [--refine-palette W]
[--refine-method M]`), and scores originals
and reconstructions with the evaluator. Flicker: over the video clips, the temporal error of
each frame-to-frame step (mean absolute difference between the reconstruction's step and the
clip's, in grey levels), averaged separately over the steps that cross a latent chunk boundary
(frame 4j to 4j + 1: the causal decoder renders frame 0 alone, then 4 frames per latent frame)
and over the steps inside a chunk; a decoder without flicker has the two alike.
`--workers W` reconstructs in W one-thread processes, the clips dealt out longest first (the
same clips as one process). Prints Markdown tables for BENCHMARKS.md and writes the clips and
report.json under --out.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import torch

from kino.data.video_io import read_video
from kino.models.vae.pretrained import load_vae
from kino.models.vae.refine import DEFAULT_METHOD, METHODS, Refinement
from kino.tasks.reconstruct import reconstruct_inputs
from kino.world.captions import SIZES
from kino.world.dataset import clip_filename, evaluate_folder, write_clip, write_rows
from kino.world.generator import render, scene_at

FRAMES = (1, 9, 17, 33)


def sample_eval(out: Path, n: int, seed: int, start: int = 0) -> list[dict]:
    """Clips start..n-1 of the seed's sequence (clip i is the same whatever start and n are)."""
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(start, n):
        frames, size = FRAMES[i % len(FRAMES)], SIZES[(i // len(FRAMES)) % len(SIZES)]
        scene = scene_at("eval", seed, i, frames=frames, size=size)
        rows.append(write_clip(out, clip_filename(i, frames), render(scene), scene.text))
    write_rows(out, rows)
    return rows


def _reconstruct_files(model, files: list[Path], rec: Path, refine: Refinement) -> list[tuple[str, float]]:
    torch.set_num_threads(1)
    with torch.no_grad():
        return reconstruct_inputs(load_vae(model), files, rec, refine=refine)


def reconstruct_parallel(model, src: Path, rows: list[dict], rec: Path, refine: Refinement, workers: int) -> dict:
    """`reconstruct_inputs` over `workers` one-thread processes, the clips dealt out longest first
    (frames x pixels) so the shards take about equal time; the outputs keep the clips' names, and
    rec/captions.jsonl lists them as src's does. `refine`: the latent refinement of each clip."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    order = sorted(rows, key=lambda r: r["frames"] * r["height"] * r["width"], reverse=True)
    shards = [[src / r["file"] for r in order[k::workers]] for k in range(workers)]
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        results = [job.result() for job in [pool.submit(_reconstruct_files, model, files, rec, refine)
                                            for files in shards]]
    write_rows(rec, rows)
    return {name: psnr for shard in results for name, psnr in shard}


def step_errors(original, reconstruction) -> tuple[list[float], list[float]]:
    """Temporal errors of a clip's steps (uint8 (F, H, W, 3) each): those crossing a chunk
    boundary (frame 4j -> 4j + 1) and those inside a chunk."""
    a, b = (torch.as_tensor(v).double() for v in (original, reconstruction))
    err = (b.diff(dim=0) - a.diff(dim=0)).abs().mean(dim=(1, 2, 3)).tolist()
    return [e for k, e in enumerate(err) if k % 4 == 0], [e for k, e in enumerate(err) if k % 4]


def flicker(src: Path, rec: Path, rows: list[dict]) -> dict:
    """Mean temporal error at chunk boundaries and inside chunks over the video clips."""
    across, inside = [], []
    for row in rows:
        if row["frames"] > 1:
            a, b = step_errors(read_video(src / row["file"])[0], read_video(rec / row["file"])[0])
            across += a
            inside += b
    if not across:
        return {}
    out = {"boundary": statistics.mean(across), "inside": statistics.mean(inside)}
    return {**out, "ratio": out["boundary"] / out["inside"]}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None)
    ap.add_argument("--n", type=int, default=200)
    ap.add_argument("--start", type=int, default=0, help="score clips start..n-1 only (e.g. a second half)")
    ap.add_argument("--seed", type=int, default=2026)
    ap.add_argument("--refine-latents", type=int, default=0, metavar="N")
    ap.add_argument("--refine-palette", type=float, default=0.0, metavar="W")
    ap.add_argument("--refine-method", choices=sorted(METHODS), default=DEFAULT_METHOD)
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    out = args.out or Path(tempfile.mkdtemp(prefix="kino-eval-vae-"))
    src, rec = out / "clips", out / "recon"
    rows = sample_eval(src, args.n, args.seed, args.start)
    refine = Refinement(args.refine_latents, args.refine_palette, args.refine_method)
    start = time.perf_counter()
    if args.workers > 1:
        psnrs = reconstruct_parallel(args.model, src, rows, rec, refine, args.workers)
    else:
        with torch.no_grad():
            psnrs = dict(reconstruct_inputs(load_vae(args.model), [src], rec, refine=refine))
    seconds = time.perf_counter() - start
    original = evaluate_folder(src)
    report = evaluate_folder(rec)
    by_key = defaultdict(list)
    for row in rows:
        by_key[(row["frames"], f"{row['height']}x{row['width']}")].append(psnrs[row["file"]])
    print(f"clips: {len(rows)} eval clips ({args.start}..{args.n - 1}), seed {args.seed}; folder {out}; "
          f"reconstruction {seconds:.1f} s wall ({seconds / len(rows):.2f} s/clip, {args.workers} worker(s), "
          f"refine-latents {args.refine_latents}, refine-palette {args.refine_palette}, "
          f"refine-method {args.refine_method})")
    print("| frames | size | clips | mean PSNR dB | min PSNR dB |")
    print("|---|---|---|---|---|")
    for (f, s), v in sorted(by_key.items()):
        print(f"| {f} | {s} | {len(v)} | {statistics.mean(v):.2f} | {min(v):.2f} |")
    allp = list(psnrs.values())
    print(f"| all | all | {len(allp)} | {statistics.mean(allp):.2f} | {min(allp):.2f} |")
    print()
    print(f"world evaluator: originals {original['passed']}/{original['clips']}, "
          f"reconstructions {report['passed']}/{report['clips']} ({100 * report['pass_rate']:.1f}%)")
    print("| check | reconstructions pass |")
    print("|---|---|")
    for name, r in report["checks"].items():
        print(f"| {name} | {r['passed']}/{r['clips']} |")
    for name, r in report["kinds"].items():
        print(f"| kind {name} | {r['passed']}/{r['clips']} |")
    steps = flicker(src, rec, rows)
    if steps:
        print(f"\nflicker (temporal error, grey levels): across chunk boundaries {steps['boundary']:.3f}, inside "
              f"chunks {steps['inside']:.3f}, ratio {steps['ratio']:.2f}")
    (out / "summary.json").write_text(json.dumps({"psnr": psnrs, "report": report, "flicker": steps}, indent=1))


if __name__ == "__main__":
    main()
