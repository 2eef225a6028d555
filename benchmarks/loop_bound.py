"""How often would a perfect loop pass the loop check? An upper bound for `kino generate --loop`.

    python benchmarks/loop_bound.py [--n 40] [--seed 6161] [--frames 17]

For n fresh Shapes World `eval` scenes, renders each as a perfect loop of `frames` frames
(period = frames, so frame `frames` would be frame 0 again), going there and back along the
caption's motion with a triangle progress (constant speed) or a cosine one (slowing at both
turns), and applies the loop check of `benchmarks/eval_tasks.py` (`kino.tasks.checks.
loop_steps`: the wrap step no larger than the mean step) to the raw clip and to the clip
encoded and decoded by a VAE (default: the shipped one). What fails here fails for any DiT.
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

from kino.models.vae.pretrained import load_vae
from kino.tasks.checks import loop_steps
from kino.tasks.reconstruct import reconstruct_video
from kino.world.generator import loop_progress, render, scene_at

PROGRESS = {
    "triangle": lambda n: loop_progress(n, n),  # the loop cache's motion (period: the whole clip)
    "cosine": lambda n: (1.0 - np.cos(2.0 * np.pi * np.arange(n) / n)) / 2.0,
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None, help="folder with the VAE (default: the shipped model)")
    ap.add_argument("--n", type=int, default=40)
    ap.add_argument("--seed", type=int, default=6161)
    ap.add_argument("--frames", type=int, default=17)
    args = ap.parse_args()
    vae = load_vae(args.model)
    passed = {(p, how): [] for p in PROGRESS for how in ("raw", "vae")}
    still = {key: [] for key in passed}
    for i in range(args.n):
        scene = scene_at("eval", args.seed, i, frames=args.frames)
        nothing_moves = all(o.motion == "standing still" for o in scene.caption.objects)
        for name, progress in PROGRESS.items():
            video = render(scene, progress(args.frames))
            with torch.no_grad():
                decoded = reconstruct_video(vae, video)
            for how, clip in (("raw", video), ("vae", decoded)):
                wrap, mean = loop_steps(clip)
                passed[(name, how)].append(wrap <= mean)
                if nothing_moves:
                    still[(name, how)].append(wrap <= mean)
    print(f"{args.n} eval scenes (seed {args.seed}), {args.frames}-frame perfect loops\n")
    print("| progress | clip | loop ok | loop ok, nothing moves |")
    print("|---|---|---|---|")
    for (name, how), ok in passed.items():
        s = still[(name, how)]
        print(f"| {name} | {how if how == 'raw' else 'through the VAE'} | {sum(ok)}/{len(ok)} | {sum(s)}/{len(s)} |")


if __name__ == "__main__":
    main()
