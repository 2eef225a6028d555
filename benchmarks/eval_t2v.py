"""Text-to-video quality of a pipeline on fresh Shapes World `eval` captions.

    python benchmarks/eval_t2v.py [--model DIR] [--n 300] [--held-out 60] [--seed 4242]
                                  [--steps 20] [--guidance G] [--shift S] [--guidance-interval LO HI]
                                  [--skip-guidance S --skip-blocks I...] [--skip-interval LO HI]
                                  [--workers N] [--out DIR]

Draws n eval scenes (frame counts 1, 9, 17, 25, 33 and the three sizes in turn, one or two
objects as the eval split draws them) plus `--held-out` more scenes that contain a held-out
composition (yellow triangle, cyan circle, purple square, orange moving up), with a seed
never used in training or tuning. Their captions, frame counts and sizes become a batch file
that runs through the same code as `kino generate --batch`, and the clips are scored with
the same code as `kino world eval`. `--steps` may list several step counts (a table of pass
rate against steps on the same prompts). `--workers N` generates in N one-thread processes,
each over every N-th prompt, and merges their clips before scoring: the same clips as one
process (every prompt carries its own seed), each core busy with its own clip.

Reports the pass rate per kind: image (1 frame), single (one object, video), pair (two
objects, video), held_out (any clip with a held-out composition), and per check; prints
Markdown for BENCHMARKS.md and writes report.json and the clips under --out. A diagnostic,
"direction", looks past the motion check's thresholds: of the objects captioned as moving
left/right/up/down that are present in at least 90% of their clip's frames, the share whose
displacement (first quarter to last quarter of the frames) points mostly the named way
(chance is 25%), also split into objects alone in their clip and objects beside another (and
of those, how many moved the other object's way), and "placement": how many such objects start
on the side of the frame their motion needs, and how often those and the others then moved
their own way. Another, "drawn twice": of the objects seen in the median frame, the share
seen there as two or more separate blobs of their color, each big enough to count as the
object (the evaluator's `blobs`). And "binding", for two-object videos: of the objects whose
direction word differs from the other object's (both moving left/right/up/down, present in at
least 90% of the frames, displaced by at least 0.05), how many moved mostly their own way and
how many the other object's way; of the objects whose shape differs from the other's, how many
have the fill of their own shape and how many that of the other's (the evaluator's fill ranges).
A model that reads the words but not which object they belong to scores as often "other" as
"own".
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

from kino.cli import add_guidance_options, guidance_options
from kino.pipeline import Pipeline
from kino.tasks.batch import generate_batch
from kino.world.captions import FRAME_COUNTS, SIZES, is_held_out, parse_caption
from kino.world.dataset import clip_filename, evaluate_rows, read_rows, write_rows
from kino.world.evaluator import SHAPE_FILL, summarize
from kino.world.generator import scene_at

HELD_OUT_SCAN = 200_000  # eval scenes scanned for held-out compositions (about 1 in 6 has one)


def prompt_rows(n: int, held_out: int, seed: int) -> list[dict]:
    """n eval scenes cycling over every frame count and size, then `held_out` scenes (from a
    disjoint index range of the same stream) that contain a held-out composition."""
    rows = []
    for i in range(n):
        frames, size = FRAME_COUNTS[i % len(FRAME_COUNTS)], SIZES[(i // len(FRAME_COUNTS)) % len(SIZES)]
        rows.append(_row(scene_at("eval", seed, i, frames=frames, size=size), seed, i))
    index = n
    while sum(r["held_out"] for r in rows[n:]) < held_out and index < n + HELD_OUT_SCAN:
        k = len(rows) - n
        frames, size = FRAME_COUNTS[k % len(FRAME_COUNTS)], SIZES[(k // len(FRAME_COUNTS)) % len(SIZES)]
        scene = scene_at("eval", seed, index, frames=frames, size=size)
        if any(is_held_out(o) for o in scene.caption.objects):
            rows.append(_row(scene, seed, index))
        index += 1
    return rows


def _row(scene, seed: int, index: int) -> dict:
    return {"caption": scene.text, "frames": scene.frames, "height": scene.height, "width": scene.width,
            "seed": seed * 100_000 + index,
            "held_out": any(is_held_out(o) for o in scene.caption.objects)}


def _generate_shard(model, batch: Path, folder: Path, defaults: dict, dit=None, setup=None) -> None:
    import torch

    torch.set_num_threads(1)
    pipe = Pipeline.from_pretrained(model, dit_file=dit)
    if setup is not None:
        setup(pipe)
    generate_batch(pipe, batch, folder, defaults=defaults)


def generate_parallel(model, batch: Path, folder: Path, defaults: dict, workers: int, dit=None,
                      setup=None) -> None:
    """`generate_batch` over `workers` one-thread processes (row i in shard i % workers), the
    clips then renamed and listed in one captions.jsonl in the batch's order. `setup(pipe)`, a
    module-level function (probes: it changes the pipeline), runs in each process first."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    lines = batch.read_text().splitlines(keepends=True)
    workers = max(1, min(workers, len(lines)))  # no empty shard
    shards = []
    for k in range(workers):
        shard = folder / f"shard-{k}"
        shard.mkdir(parents=True, exist_ok=True)
        (shard / "prompts.jsonl").write_text("".join(lines[k::workers]))
        shards.append(shard)
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        for job in [pool.submit(_generate_shard, model, shard / "prompts.jsonl", shard / "clips", defaults, dit,
                                   setup)
                    for shard in shards]:
            job.result()
    merged = [None] * len(lines)
    for k, shard in enumerate(shards):
        for j, row in enumerate(read_rows(shard / "clips")):
            i = k + j * workers
            name = clip_filename(i, row["frames"])
            (shard / "clips" / row["file"]).rename(folder / name)
            merged[i] = {**row, "file": name}
        shutil.rmtree(shard)
    write_rows(folder, merged)


def write_batch(rows: list[dict], path: Path) -> None:
    """A `kino generate --batch` file of prompt_rows' rows."""
    path.write_text("".join(json.dumps({k: v for k, v in r.items() if k != "held_out"}) + "\n" for r in rows))


def run_probe(rows: list[dict], out: Path, defaults: dict, workers: int, model=None, setup=None,
              args: dict | None = None) -> dict:
    """A probe's run: `rows` generated into out/clips by `workers` processes with `setup`,
    scored, the report (with `args`) written to out/report.json, its summary printed."""
    out.mkdir(parents=True, exist_ok=True)
    write_batch(rows, out / "prompts.jsonl")
    start = time.perf_counter()
    generate_parallel(model, out / "prompts.jsonl", out / "clips", defaults, workers, setup=setup)
    report = score(out / "clips")
    report.pop("failures", None)
    report["seconds"] = round(time.perf_counter() - start)
    (out / "report.json").write_text(json.dumps({"args": args, "report": report}, indent=2))
    kinds = {k: f"{v['passed']}/{v['clips']}" for k, v in report["kinds"].items()}
    checks = {k: v["passed"] for k, v in report["checks"].items()}
    print(f"pass {report['passed']}/{report['clips']}  kinds {kinds}  checks {checks}  ({report['seconds']} s)")
    return report


def score(folder: Path) -> dict:
    """`kino world eval`'s report (overall, per check, per kind: image/single/pair) with a
    held_out kind added: every clip whose caption holds a held-out composition."""
    results = evaluate_rows(folder, read_rows(folder))
    report = summarize(results)
    held = [r.passed for row, r in results
            if any(is_held_out(o) for o in parse_caption(row["caption"]).objects)]
    report["kinds"]["held_out"] = {"clips": len(held), "passed": sum(held),
                                   "pass_rate": round(sum(held) / len(held), 4) if held else None}
    report["direction"] = direction_rate(results)
    report["drawn_twice"] = drawn_twice_rate(results)
    report["binding"] = binding_rates(results)
    report["placement"] = placement_rates(results)
    return report


def drawn_twice_rate(results) -> dict:
    """Of the objects with at least one blob in the median frame, how many had two or more."""
    blobs = [info["blobs"] for _, result in results for info in result.details["objects"] if info["blobs"]]
    twice = sum(b > 1 for b in blobs)
    return {"objects": len(blobs), "twice": twice, "rate": round(twice / len(blobs), 4) if blobs else None}


DIRECTIONS = {"moving left": (-1, 0), "moving right": (1, 0), "moving up": (0, -1), "moving down": (0, 1)}


def direction_rate(results) -> dict:
    """Of the objects captioned as moving in a direction and present in >= 90% of the frames,
    how many moved mostly that way (the larger of |dx|, |dy| on the named axis, with its sign);
    the same split into objects alone in their clip ("single") and beside another ("pair"),
    where "other_way" counts the pair objects that moved mostly the other object's way (when
    its word is another direction)."""
    count = {kind: {"objects": 0, "right_way": 0} for kind in ("single", "pair")}
    count["pair"]["other_way"] = 0
    for kind, obj, other, info in _directed(results):
        c = count[kind]
        c["objects"] += 1
        c["right_way"] += _moved(info, obj.motion)
        if other is not None and other.motion in DIRECTIONS and other.motion != obj.motion:
            c["other_way"] += _moved(info, other.motion)
    total = sum(c["objects"] for c in count.values())
    right = sum(c["right_way"] for c in count.values())
    return {"objects": total, "right_way": right, "rate": round(right / total, 4) if total else None, **count}


def placement_rates(results) -> dict:
    """Of the objects captioned as moving in a direction (present in >= 90% of the frames), alone
    or beside another: how many start on the side their motion needs (more than 0.05 of the frame
    from the centre, against the direction: a world clip keeps its object in the frame), and how
    many of those, and of the others, moved mostly their own way."""
    count = {kind: {"objects": 0, "placed": 0, "placed_own_way": 0, "other_own_way": 0}
             for kind in ("single", "pair")}
    for kind, obj, _, info in _directed(results):
        ux, uy = DIRECTIONS[obj.motion]
        placed = -(ux * info["start_x"] + uy * info["start_y"]) > 0.05
        c = count[kind]
        c["objects"] += 1
        c["placed"] += placed
        c["placed_own_way" if placed else "other_own_way"] += _moved(info, obj.motion)
    return count


def _directed(results):
    """(kind, object, the other object or None, evaluator info) for each object captioned as
    moving left/right/up/down that was present in >= 90% of its clip's frames."""
    for row, result in results:
        objects = parse_caption(row["caption"]).objects
        kind = "pair" if len(objects) == 2 else "single"
        for i, (obj, info) in enumerate(zip(objects, result.details["objects"])):
            if obj.motion in DIRECTIONS and "dx" in info and info["present_frames"] >= 0.9 * row["frames"]:
                yield kind, obj, objects[1 - i] if len(objects) == 2 else None, info


def _moved(info: dict, motion: str) -> bool:
    """Whether the displacement points mostly along `motion`'s direction."""
    ux, uy = DIRECTIONS[motion]
    dx, dy = info["dx"], info["dy"]
    along, across = (dx * ux, abs(dy)) if ux else (dy * uy, abs(dx))
    return along > across


def _heading(dx: float, dy: float) -> str:
    return max(DIRECTIONS, key=lambda m: DIRECTIONS[m][0] * dx + DIRECTIONS[m][1] * dy)


def _shape_of(fill: float) -> str | None:
    return next((shape for shape, (lo, hi) in SHAPE_FILL.items() if lo <= fill < hi), None)


def binding_rates(results) -> dict:
    """In two-object clips, for motion (the direction words) and shape: how many objects whose
    attribute differs from the other object's show their own, the other's, or neither."""
    counts = {k: {"objects": 0, "own": 0, "other": 0} for k in ("motion", "shape")}
    for row, result in results:
        objects = parse_caption(row["caption"]).objects
        if len(objects) != 2:
            continue
        for i, info in enumerate(result.details["objects"]):
            me, other = objects[i], objects[1 - i]
            if (row["frames"] > 1 and me.motion in DIRECTIONS and other.motion in DIRECTIONS
                    and me.motion != other.motion and "dx" in info and info["present_frames"] >= 0.9 * row["frames"]
                    and max(abs(info["dx"]), abs(info["dy"])) >= 0.05):
                seen = _heading(info["dx"], info["dy"])
                _tally(counts["motion"], seen, me.motion, other.motion)
            if me.shape != other.shape and "fill" in info:
                _tally(counts["shape"], _shape_of(info["fill"]), me.shape, other.shape)
    return counts


def _tally(count: dict, seen, own, other) -> None:
    count["objects"] += 1
    count["own"] += seen == own
    count["other"] += seen == other


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None, help="pipeline folder (default: the shipped model)")
    ap.add_argument("--dit", default=None, help="the DiT's weights from this file (e.g. a GGUF of the model's DiT)")
    ap.add_argument("--n", type=int, default=300)
    ap.add_argument("--held-out", type=int, default=60)
    ap.add_argument("--seed", type=int, default=4242)
    ap.add_argument("--steps", type=int, nargs="+", default=[None])
    ap.add_argument("--guidance", type=float, default=None)
    ap.add_argument("--shift", type=float, default=None, help="sampling shift (default: the model's)")
    ap.add_argument("--sampler", default=None, help="the solver (default: the model's)")
    ap.add_argument("--eta", type=float, default=None, help="a stochastic sampler's share of fresh noise")
    add_guidance_options(ap)
    ap.add_argument("--workers", type=int, default=1, help="one-thread generation processes (default: 1, "
                    "this process with torch's threads)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    pipe = Pipeline.from_pretrained(args.model, dit_file=args.dit)
    out = Path(args.out or tempfile.mkdtemp(prefix="kino-eval-t2v-"))
    out.mkdir(parents=True, exist_ok=True)
    prompts = prompt_rows(args.n, args.held_out, args.seed)
    batch = out / "prompts.jsonl"
    write_batch(prompts, batch)
    results = {}
    for steps in args.steps:
        options = (("steps", steps), ("guidance", args.guidance), ("shift", args.shift), ("sampler", args.sampler),
                   ("eta", args.eta), *guidance_options(args).items())
        defaults = {k: v for k, v in options if v is not None}
        folder = out / f"steps-{steps or pipe.defaults.steps}"
        start = time.perf_counter()
        if args.workers > 1:
            generate_parallel(args.model, batch, folder, defaults, args.workers, args.dit)
        else:
            generate_batch(pipe, batch, folder, defaults=defaults)
        seconds = time.perf_counter() - start
        result = score(folder)
        result.pop("failures", None)
        result["seconds_per_clip"] = round(seconds / len(prompts), 3)
        results[steps or pipe.defaults.steps] = result
        print(f"steps {steps or pipe.defaults.steps}: {json.dumps(result)}", flush=True)
    (out / "report.json").write_text(json.dumps({"args": vars(args), "results": results}, indent=2))

    kinds = ("image", "single", "pair", "held_out")
    print("\n| steps | overall | " + " | ".join(kinds) + " | s/clip |")
    print("|---|---|" + "---|" * len(kinds) + "---|")
    for steps, r in results.items():
        cells = [f"{r['kinds'][k]['pass_rate']:.1%} ({r['kinds'][k]['passed']}/{r['kinds'][k]['clips']})"
                 if k in r["kinds"] else "-" for k in kinds]
        o = r
        print(f"| {steps} | {o['pass_rate']:.1%} ({o['passed']}/{o['clips']}) | " + " | ".join(cells)
              + f" | {r['seconds_per_clip']} |")
    last = list(results.values())[-1]
    print("\n| check | pass rate |\n|---|---|")
    for name, r in last["checks"].items():
        print(f"| {name} | {r['pass_rate']:.1%} ({r['passed']}/{r['clips']}) |")
    d = last["direction"]
    if d["objects"]:
        print(f"| direction (diagnostic) | {d['rate']:.1%} ({d['right_way']}/{d['objects']}) |")
        single, pair = d["single"], d["pair"]
        print(f"| direction: alone / beside another object (diagnostic) | {single['right_way']}/{single['objects']} "
              f"/ {pair['right_way']}/{pair['objects']} (the other's way: {pair['other_way']}) |")
    d = last["drawn_twice"]
    if d["objects"]:
        print(f"| drawn twice (diagnostic, lower is better) | {d['rate']:.1%} ({d['twice']}/{d['objects']}) |")
    for kind, c in last["placement"].items():
        if c["objects"]:
            rest = c["objects"] - c["placed"]
            print(f"| {kind}: placed for its motion; of those / the rest, moved its own way (diagnostic) | "
                  f"{c['placed']}/{c['objects']}; {c['placed_own_way']}/{c['placed']} / {c['other_own_way']}/{rest} |")
    for name, b in last["binding"].items():
        if b["objects"]:
            print(f"| pairs: {name} of own / other object (diagnostic) | {b['own']} / {b['other']} "
                  f"of {b['objects']} |")
    print(f"\nclips and report.json in {out}")


if __name__ == "__main__":
    main()
