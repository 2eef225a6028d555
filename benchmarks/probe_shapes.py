"""Where a pipeline loses the shapes: real clips, their VAE reconstructions, the DiT's edits of
them from flow time s, and clips generated from their captions alone.

    python benchmarks/probe_shapes.py [--model DIR] [--n 48] [--seed 9191] [--frames 17]
                                      [--size 64x64] [--strengths 0.3 0.5 0.7 1.0] [--out DIR]

Draws n one-object Shapes World `eval` clips (one frame count and size), then scores with the
evaluator, per shape: the clips; their plain VAE reconstructions; an SDEdit of each clip with
its own caption at each strength s (the clip's latents noised to flow time s and denoised by
the DiT with the same code as `kino edit --batch`, so s = 0.3 asks the DiT only for the last
30% of the path, from a real clip's layout); and `kino generate --batch` of the captions
(from noise, the model's defaults). For each: clips passing every check, the shape check per
shape, and the median fill (object area over its bounding box; the evaluator wants a circle in
[0.65, 0.89), a square >= 0.89 and a triangle in [0.30, 0.65)). A DiT that keeps a clip's
corners from s = 0.3 but not from 0.7 loses them while it draws; one that loses them at 0.3
cannot draw them at all.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np
import torch

from kino.data.video_io import read_video
from kino.pipeline import Pipeline
from kino.tasks.batch import generate_batch
from kino.training.vae import to_model_range
from kino.world.captions import parse_caption
from kino.world.dataset import evaluate_rows, read_rows, write_clip, write_rows, write_samples


def shape_report(folder: Path) -> dict:
    """Clips passing, and per shape: shape check passed / objects, median fill."""
    results = evaluate_rows(folder, read_rows(folder))
    per: dict[str, list] = {}
    for row, result in results:
        for obj, info in zip(parse_caption(row["caption"]).objects, result.details["objects"]):
            per.setdefault(obj.shape, []).append((info.get("fill"), "shape" not in info["failed"]))
    shapes = {}
    for shape, objs in sorted(per.items()):
        fills = [f for f, _ in objs if f is not None]
        shapes[shape] = {"shape_ok": sum(ok for _, ok in objs), "objects": len(objs),
                         "median_fill": round(float(np.median(fills)), 3) if fills else None}
    return {"passed": sum(r.passed for _, r in results), "clips": len(results), "shapes": shapes}


def reconstruct(pipe: Pipeline, src: Path, out: Path) -> None:
    """Plain VAE reconstructions of the clips in `src` (as `kino vae reconstruct` writes them)."""
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for row in read_rows(src):
        video = to_model_range(read_video(src / row["file"])[0])[None]  # (1, 3, F, H, W)
        with torch.no_grad():
            rec = pipe.vae.reconstruct(video)[0].clamp(-1, 1).add(1).mul(127.5).round().to(torch.uint8)
        rows.append(write_clip(out, row["file"], rec.permute(1, 2, 3, 0).numpy(), row["caption"]))
    write_rows(out, rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="model folder (default: the shipped model)")
    ap.add_argument("--n", type=int, default=48)
    ap.add_argument("--seed", type=int, default=9191)
    ap.add_argument("--frames", type=int, default=17)
    ap.add_argument("--size", default="64x64")
    ap.add_argument("--strengths", type=float, nargs="+", default=[0.3, 0.5, 0.7, 1.0])
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    height, width = map(int, args.size.split("x"))
    out = Path(args.out or tempfile.mkdtemp(prefix="kino-probe-shapes-"))
    pipe = Pipeline.from_pretrained(args.model)
    src = out / "clips"
    rows = write_samples(src, args.n, "eval", args.seed, frames=args.frames, size=(height, width), objects=1)
    report = {"args": vars(args), "clips": shape_report(src)}
    reconstruct(pipe, src, out / "vae")
    report["vae"] = shape_report(out / "vae")
    for s in args.strengths:
        batch = out / f"edit_{s}.jsonl"
        batch.write_text("".join(json.dumps({"caption": r["caption"], "video": str((src / r["file"]).resolve()),
                                             "seed": i}) + "\n" for i, r in enumerate(rows)))
        generate_batch(pipe, batch, out / f"edit_{s}", defaults={"strength": s}, task="edit")
        report[f"edit {s}"] = shape_report(out / f"edit_{s}")
    batch = out / "generate.jsonl"
    batch.write_text("".join(json.dumps({"caption": r["caption"], "frames": args.frames, "height": height,
                                         "width": width, "seed": i}) + "\n" for i, r in enumerate(rows)))
    generate_batch(pipe, batch, out / "generate", defaults={})
    report["generate"] = shape_report(out / "generate")
    (out / "report.json").write_text(json.dumps(report, indent=2))
    shapes = sorted(report["clips"]["shapes"])
    print("| clips | pass | " + " | ".join(f"{s}: shape ok, median fill" for s in shapes) + " |")
    print("|---|---|" + "---|" * len(shapes))
    for name, r in report.items():
        if name == "args":
            continue
        cells = [f"{r['shapes'][s]['shape_ok']}/{r['shapes'][s]['objects']}, {r['shapes'][s]['median_fill']}"
                 if s in r["shapes"] else "-" for s in shapes]
        print(f"| {name} | {r['passed']}/{r['clips']} | " + " | ".join(cells) + " |")
    print(f"\nclips and report.json in {out}")


if __name__ == "__main__":
    main()
