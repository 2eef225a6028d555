"""Quality of the conditioned tasks (image-to-video, extend forward/backward, connect, loop,
edit) of a pipeline on fresh Shapes World `eval` scenes.

    python benchmarks/eval_tasks.py [--model DIR] [--n 100] [--tasks i2v extend_fwd ...]
                                    [--strength 0.7] [--given exact] [--seed 5151] [--out DIR]
                                    [--guidance-interval LO HI] [--skip-guidance S --skip-blocks I...]

Every case starts from a world clip rendered exactly as `kino world sample` writes it
(lossless files), cycling over the three world sizes. The inputs and a batch file per task
go under --out, and each task runs through the same code as its `--batch` CLI command:

  i2v         frame 0 of a 17-frame clip + its caption -> 17 frames. Kept: PSNR of output
              frame 0 vs the image; pass: the world evaluator on the caption.
  extend_fwd  frames 0-16 of a 33-frame clip, +16 frames -> 33. Kept: output 0-16 vs input;
              seam 16|17 without a jump; pass: the whole clip on the caption.
  extend_bwd  frames 17-32 of a 33-frame clip, 17 frames before -> 33. Kept: output 17-32;
              seam 16|17; pass as above.
  connect     A = frames 0-8 and B = frames 25-32 of one 33-frame clip, 16 frames between.
              Kept: both ends; seams 8|9 and 24|25; pass as above.
  loop        a 16-frame loop (--loop-frames) of an eval caption. Loop ok: the step from
              the last frame to the first (where the loop's last latent frame leads back
              into its first) is no larger than the mean frame-to-frame step; pass:
              background, presence, shape and no_extras (motion is not scored).
  edit        a 17-frame clip and its caption with one object's colour or shape changed,
              --strength S. Pass: the new caption; trajectory: the edited object's centroid
              within 0.1 of the frame size of the input's in every frame. --flowedit: FlowEdit
              from the input's caption (source_prompt) instead of SDEdit.

A jump is a centroid step larger than the evaluator's smoothness bound (0.15 of max(H, W)).
--given is the tasks' option: with exact (their default) given frames come back as given, so
"kept" holds by construction; decoded measures how the decoding keeps them.
Every task's pass count is also split by the number of objects its captions name (one / two).
Prints a Markdown table for BENCHMARKS.md and writes report.json under --out.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np

from kino.cli import add_guidance_options, guidance_options
from kino.data.video_io import read_video, write_image
from kino.pipeline import Pipeline
from kino.tasks.batch import generate_batch
from kino.tasks.video_tasks import GIVEN_MODES
from kino.tasks.checks import (JUMP_BOUND, KEEP_PSNR, edited_caption, kept_psnr, loop_steps, seam_jumps,
                               trajectory_offset)
from kino.world.captions import SIZES, parse_caption
from kino.world.dataset import read_rows, write_clip
from kino.world.evaluator import evaluate_clip
from kino.world.generator import render, scene_at

TASKS = ("i2v", "extend_fwd", "extend_bwd", "connect", "loop", "edit")
LOOP_CHECKS = ("background", "presence", "shape", "no_extras")
# task -> its CLI command, and the frames of its source clip
COMMAND = {"i2v": "generate", "extend_fwd": "extend", "extend_bwd": "extend", "connect": "connect",
           "loop": "generate", "edit": "edit"}
SOURCE_FRAMES = {"i2v": 17, "extend_fwd": 33, "extend_bwd": 33, "connect": 33, "loop": 17, "edit": 17}


def build_cases(task: str, n: int, seed: int, folder: Path, loop_frames: int = 16,
                flowedit: bool = False) -> list[dict]:
    """Write the inputs of n cases under folder and return the batch rows (with the facts
    the scoring needs under '_' keys, stripped before the batch file is written)."""
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        scene = scene_at("eval", seed + TASKS.index(task), i, frames=SOURCE_FRAMES[task], size=SIZES[i % len(SIZES)])
        video = render(scene)
        row = {"caption": scene.text, "seed": seed * 1000 + i, "_source": f"source-{i:04d}.mp4"}
        write_clip(folder, row["_source"], video, scene.text)
        if task == "i2v":
            row["image"] = f"image-{i:04d}.png"
            write_image(folder / row["image"], video[0])
        elif task == "extend_fwd":
            row.update(video=f"input-{i:04d}.mp4", frames=16)
            write_clip(folder, row["video"], video[:17], scene.text)
        elif task == "extend_bwd":
            row.update(video=f"input-{i:04d}.mp4", frames=17, backward=True)
            write_clip(folder, row["video"], video[17:], scene.text)
        elif task == "connect":
            row.update(first=f"a-{i:04d}.mp4", second=f"b-{i:04d}.mp4", frames=16)
            write_clip(folder, row["first"], video[:9], scene.text)
            write_clip(folder, row["second"], video[25:], scene.text)
        elif task == "loop":
            row.update(loop=True, frames=loop_frames)
        elif task == "edit":
            new, k, what = edited_caption(scene.caption, i)
            row.update(video=row["_source"], caption=str(new), _old_color=scene.caption.objects[k].color,
                       _new_color=new.objects[k].color, _changed=what)
            if flowedit:
                row["source_prompt"] = scene.text
        rows.append(row)
    (folder / "batch.jsonl").write_text("".join(
        json.dumps({k: v for k, v in r.items() if not k.startswith("_")}) + "\n" for r in rows))
    return rows


def score_case(task: str, row: dict, inputs: Path, output: np.ndarray) -> dict:
    source, _ = read_video(inputs / row["_source"])
    result = evaluate_clip(output, row["caption"])
    case: dict = {"passed": result.passed, "failed": result.failed,
                  "objects": len(parse_caption(row["caption"]).objects)}
    if task == "i2v":
        case["kept_psnr"] = kept_psnr(output, source[:1], 0)
    elif task in ("extend_fwd", "extend_bwd"):
        case["kept_psnr"] = kept_psnr(output, source[:17], 0) if task == "extend_fwd" else \
            kept_psnr(output, source[17:], 17)
        case["seam_jump"] = seam_jumps(output, row["caption"], [17])
    elif task == "connect":
        case["kept_psnr"] = min(kept_psnr(output, source[:9], 0), kept_psnr(output, source[25:], 25))
        case["seam_jump"] = seam_jumps(output, row["caption"], [9, 25])
    elif task == "loop":
        wrap, mean = loop_steps(output)
        case.update(wrap_step=wrap, mean_step=mean, loop_ok=wrap <= mean,
                    passed=all(result.checks.get(c, True) for c in LOOP_CHECKS))
    elif task == "edit":
        case["changed"] = row["_changed"]
        case["trajectory_offset"] = trajectory_offset(source, row["_old_color"], output, row["_new_color"])
    return case


def summarize(task: str, cases: list[dict]) -> dict:
    n = len(cases)
    rate = lambda ok: round(sum(ok) / n, 4)  # noqa: E731
    out = {"cases": n, "pass_rate": rate([c["passed"] for c in cases])}
    for k, name in ((1, "one"), (2, "two")):  # by the number of objects the caption names
        sub = [c["passed"] for c in cases if c["objects"] == k]
        out[f"pass_{name}_object{'s' if k > 1 else ''}"] = f"{sum(sub)}/{len(sub)}"
    if "kept_psnr" in cases[0]:
        psnr = np.array([min(c["kept_psnr"], 99.0) for c in cases])
        out.update(kept_psnr_mean=round(float(psnr.mean()), 2), kept_psnr_min=round(float(psnr.min()), 2),
                   kept_rate=rate(psnr >= KEEP_PSNR))
    if "seam_jump" in cases[0]:
        out["no_jump_rate"] = rate([c["seam_jump"] <= JUMP_BOUND for c in cases])
    if task == "loop":
        out["loop_ok_rate"] = rate([c["loop_ok"] for c in cases])
    if task == "edit":
        out["trajectory_rate"] = rate([c["trajectory_offset"] <= 0.1 for c in cases])
        out["pass_and_trajectory_rate"] = rate([c["passed"] and c["trajectory_offset"] <= 0.1 for c in cases])
        for what in ("color", "shape"):
            sub = [c["passed"] for c in cases if c["changed"] == what]
            out[f"pass_rate_{what}"] = round(sum(sub) / len(sub), 4) if sub else None
    failed: dict[str, int] = {}
    for c in cases:
        for k in c["failed"]:
            failed[k] = failed.get(k, 0) + 1
    out["failed_checks"] = failed
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None, help="pipeline folder (default: the shipped model)")
    ap.add_argument("--n", type=int, default=100, help="cases per task")
    ap.add_argument("--tasks", nargs="+", choices=TASKS, default=list(TASKS))
    ap.add_argument("--strength", type=float, default=0.7, help="edit strength")
    ap.add_argument("--flowedit", action="store_true", help="edit with FlowEdit from the input's caption "
                    "(source_prompt) instead of SDEdit")
    ap.add_argument("--given", choices=GIVEN_MODES, default="exact",
                    help="how given frames come back (i2v, extend, connect)")
    ap.add_argument("--steps", type=int, default=None)
    add_guidance_options(ap)
    ap.add_argument("--loop-frames", type=int, default=16, help="loop length (4k)")
    ap.add_argument("--seed", type=int, default=5151)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    pipe = Pipeline.from_pretrained(args.model)
    out = Path(args.out or tempfile.mkdtemp(prefix="kino-eval-tasks-"))
    report = {"args": vars(args), "tasks": {}}
    for task in args.tasks:
        inputs, results = out / task / "inputs", out / task / "outputs"
        rows = build_cases(task, args.n, args.seed, inputs, args.loop_frames, args.flowedit)
        defaults = {"strength": args.strength} if task == "edit" else {}
        if task in ("i2v", "extend_fwd", "extend_bwd", "connect"):
            defaults["given"] = args.given
        if args.steps:
            defaults["steps"] = args.steps
        defaults |= {k: v for k, v in guidance_options(args).items() if v is not None}
        start = time.perf_counter()
        generate_batch(pipe, inputs / "batch.jsonl", results, defaults=defaults, task=COMMAND[task])
        seconds = time.perf_counter() - start
        cases = [score_case(task, row, inputs, read_video(results / written["file"])[0])
                 for row, written in zip(rows, read_rows(results))]
        summary = {**summarize(task, cases), "seconds_per_case": round(seconds / len(rows), 2)}
        report["tasks"][task] = summary
        (out / task / "cases.json").write_text(json.dumps(cases, indent=1))
        print(f"{task}: {json.dumps(summary)}", flush=True)
        (out / "report.json").write_text(json.dumps(report, indent=2))

    print("\n| task | cases | pass | one object / two objects | kept (PSNR >= 28) | mean kept PSNR | no jump | "
          "loop ok | trajectory | s/case |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    fmt = lambda r, k, pct=True: "-" if r.get(k) is None else (f"{r[k]:.1%}" if pct else f"{r[k]}")  # noqa: E731
    for task, r in report["tasks"].items():
        print(f"| {task} | {r['cases']} | {fmt(r, 'pass_rate')} | {r['pass_one_object']} / {r['pass_two_objects']} | "
              f"{fmt(r, 'kept_rate')} | "
              f"{fmt(r, 'kept_psnr_mean', False)} | {fmt(r, 'no_jump_rate')} | {fmt(r, 'loop_ok_rate')} | "
              f"{fmt(r, 'trajectory_rate')} | {r['seconds_per_case']} |")
    print(f"\ninputs, outputs and report.json in {out}")


if __name__ == "__main__":
    main()
