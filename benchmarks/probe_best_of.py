"""Probe: best-of-N text-to-video, ranked by the model's own reading of the caption.

    OMP_NUM_THREADS=1 python benchmarks/probe_best_of.py [--model DIR] --n 60 --held-out 0 --seed 4848
                                                         --candidates 4 --workers 2 --out DIR

For each prompt of `eval_t2v.py`'s set (same rows and seeds), generates N candidates (candidate
0 with the row's seed, so candidate 0 is exactly what eval_t2v scores; candidate k with the
seed + k * 1,000,003) and scores every candidate's latents x0 with the DiT as a diffusion
classifier: for a fixed set of (t, eps) pairs, the same for every candidate of a prompt
(common random numbers), the flow-matching loss of the conditional and the unconditional
(empty caption) velocity, L_c and L_u. Every candidate is scored by the world evaluator too,
and report.json keeps all of it per (prompt, candidate, t), so that rankings (by -L_c, by
L_u - L_c, by (L_u - L_c) / L_u, over any subset of the times) are compared afterwards
against candidate 0 alone (the plain sampler) and against the oracle (any candidate passes).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from eval_t2v import prompt_rows  # noqa: E402

TIMES = (0.3, 0.5, 0.7, 0.9)
DRAWS = 2
SEED_STEP = 1_000_003


def caption_losses(pipe, latents, text, mask, row_seed: int):
    """{t: (L_c, L_u)} averaged over DRAWS noises per t, one batch per t; `text`, `mask`: the
    encoded caption and empty caption (2, ...)."""
    import torch

    from kino.diffusion.flow import interpolate, velocity_target
    from kino.pipeline import T_SCALE

    g = torch.Generator().manual_seed(row_seed)
    x0 = latents.float()
    out = {}
    B, T = DRAWS, x0.shape[2]
    for t in TIMES:
        eps = torch.randn((B, *x0.shape[1:]), generator=g)
        x = interpolate(x0.expand(B, -1, -1, -1, -1), eps, torch.full((B,), t))
        target = velocity_target(x0.expand(B, -1, -1, -1, -1), eps)
        xs = torch.cat([x, x])
        tf = torch.full((2 * B, T), t * T_SCALE)
        txt = torch.cat([text[:1].expand(B, -1, -1), text[1:].expand(B, -1, -1)])
        msk = torch.cat([mask[:1].expand(B, -1), mask[1:].expand(B, -1)])
        with torch.no_grad():
            v = pipe.dit(xs, tf, txt, msk).float()
        err = (v - torch.cat([target, target])).square().mean(dim=(1, 2, 3, 4))
        out[t] = (err[:B].mean().item(), err[B:].mean().item())
    return out


def _work(model, rows, part, parts, candidates, out):
    import torch

    from kino.pipeline import Pipeline
    from kino.tasks import video_tasks
    from kino.world.dataset import clip_filename, write_clip

    torch.set_num_threads(1)
    pipe = Pipeline.from_pretrained(model)
    records = []
    for i, row in enumerate(rows):
        if i % parts != part:
            continue
        text, mask = pipe.text_encoder.encode([row["caption"], ""])  # once for every candidate
        for c in range(candidates):
            seed = row["seed"] + c * SEED_STEP
            gen = video_tasks.generate(pipe, row["caption"], seed=seed, frames=row["frames"],
                                       height=row["height"], width=row["width"])
            losses = caption_losses(pipe, gen.latents, text, mask, row["seed"])
            folder = Path(out) / f"cand-{c}"
            folder.mkdir(parents=True, exist_ok=True)
            result = write_clip(folder, clip_filename(i, row["frames"]), gen.video.numpy(), row["caption"], gen.fps,
                                gen.metadata)
            records.append({"index": i, "candidate": c, "row": result,
                            "losses": {str(t): v for t, v in losses.items()}})
        print(f"[{part}] {i + 1}/{len(rows)}", flush=True)
    return records


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None)
    ap.add_argument("--n", type=int, default=60)
    ap.add_argument("--held-out", type=int, default=0)
    ap.add_argument("--seed", type=int, default=4848)
    ap.add_argument("--candidates", type=int, default=4)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    from kino.world.dataset import evaluate_rows, write_rows

    out = Path(args.out or tempfile.mkdtemp(prefix="kino-best-of-"))
    out.mkdir(parents=True, exist_ok=True)
    rows = prompt_rows(args.n, args.held_out, args.seed)
    with ProcessPoolExecutor(args.workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        jobs = [pool.submit(_work, args.model, rows, k, args.workers, args.candidates, str(out))
                for k in range(args.workers)]
        records = [r for job in jobs for r in job.result()]
    records.sort(key=lambda r: (r["candidate"], r["index"]))
    for c in range(args.candidates):
        mine = [r for r in records if r["candidate"] == c]
        folder = out / f"cand-{c}"
        write_rows(folder, [r["row"] for r in mine])
        for r, (_, result) in zip(mine, evaluate_rows(folder, [r["row"] for r in mine])):
            r["passed"] = bool(result.passed)
            r["checks"] = {k: bool(v) for k, v in result.checks.items()}
    (out / "report.json").write_text(json.dumps({"args": vars(args), "rows": rows, "records": records}, indent=1))
    analyse(out / "report.json")


SCORES = {
    "-L_c": lambda lc, lu: -lc,
    "L_u - L_c": lambda lc, lu: lu - lc,
    "(L_u - L_c) / L_u": lambda lc, lu: (lu - lc) / lu,
}
SUBSETS = [TIMES, (0.5, 0.7, 0.9), (0.7, 0.9), (0.5, 0.7), (0.3, 0.5), (0.9,), (0.7,), (0.5,), (0.3,)]


def analyse(path) -> dict:
    """Passes of candidate 0, of each candidate, of an oracle (any candidate) and of the pick
    of every score over every subset of the times (the highest summed score; ties go to the
    lower candidate), printed and returned."""
    report = json.loads(Path(path).read_text())
    records, n, cands = report["records"], len(report["rows"]), report["args"]["candidates"]
    by = {(r["index"], r["candidate"]): r for r in records}
    result = {"prompts": n, "each": [sum(by[i, c]["passed"] for i in range(n)) for c in range(cands)],
              "any": sum(any(by[i, c]["passed"] for c in range(cands)) for i in range(n)), "picks": {}}
    print(f"prompts {n}, candidates {cands}: candidate 0 {result['each'][0]}, any {result['any']}, "
          f"each: {result['each']}")
    for name, f in SCORES.items():
        for sub in SUBSETS:
            picked = 0
            for i in range(n):
                vals = [sum(f(*by[i, c]["losses"][str(t)]) for t in sub) for c in range(cands)]
                picked += by[i, max(range(cands), key=vals.__getitem__)]["passed"]
            result["picks"][name, sub] = picked
            print(f"{name:>18} over t in {sub}: {picked}/{n}")
    return result


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--analyse":
        analyse(sys.argv[2])
    else:
        main()
