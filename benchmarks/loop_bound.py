"""How often would a perfect loop pass the loop check? An upper bound for `kino generate --loop`.

    python benchmarks/loop_bound.py [--n 40] [--seed 6161] [--frames 16]

For n fresh Shapes World `eval` scenes, renders each as a perfect loop of `frames` (4k)
frames (period = frames, so frame `frames` would be frame 0 again), going there and back
along the caption's motion with a triangle progress (constant speed) or a cosine one
(slowing at both turns: the loop cache's), and applies the loop check of
`benchmarks/eval_tasks.py` (`kino.tasks.checks.loop_steps`: the wrap step no larger than
the mean step) to frames 1..4k of it:
  raw           the rendered frames;
  VAE, cycle    encoded (frames 0..4k+4: latent k+1 shows what latent 1 shows), the last
                latent tied to latent 1 as sampling a loop does, and decoded as kino decodes
                a loop (`loop_cycle`, `loop_frames`; kino/tasks/conditioning.py);
  VAE, straight the same latents decoded once, as they are (frames 1..4k of the decoding).
What fails here fails for any DiT.
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

from kino.models.vae.pretrained import load_vae
from kino.tasks.checks import loop_steps
from kino.tasks.conditioning import LOOP_TIE, loop_cycle, loop_frames
from kino.world.generator import LOOP_WAVES, loop_progress, render, scene_at

WAYS = ("raw", "VAE, cycle", "VAE, straight")


def to_uint8(pixels: torch.Tensor) -> np.ndarray:
    """(3, F, H, W) in [-1, 1] -> uint8 (F, H, W, 3)."""
    return pixels.clamp(-1, 1).add(1).mul(127.5).round().to(torch.uint8).permute(1, 2, 3, 0).numpy()


@torch.no_grad()
def decoded(vae, video: np.ndarray, frames: int) -> dict[str, np.ndarray]:
    x = torch.from_numpy(video).permute(3, 0, 1, 2)[None].float() / 127.5 - 1  # (1, 3, F + 5, H, W)
    z = vae.normalize(vae.encode(x)[0])  # (1, C, k + 2, h, w)
    z[:, :, -1] = z[:, :, LOOP_TIE]
    cycle = vae.decode(vae.denormalize(loop_cycle(z)))[0]  # (3, 1 + cycles 4k, H, W)
    straight = vae.decode(vae.denormalize(z))[0]  # (3, 4k + 5, H, W)
    return {"VAE, cycle": to_uint8(loop_frames(cycle, frames)), "VAE, straight": to_uint8(straight[:, 1:frames + 1])}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None, help="folder with the VAE (default: the shipped model)")
    ap.add_argument("--n", type=int, default=40)
    ap.add_argument("--seed", type=int, default=6161)
    ap.add_argument("--frames", type=int, default=16, help="loop length 4k")
    args = ap.parse_args()
    vae = load_vae(args.model)
    P, stride = args.frames, vae.config.time_stride
    if P < stride or P % stride:
        ap.error(f"--frames must be a multiple of {stride}")
    passed = {(w, how): [] for w in LOOP_WAVES for how in WAYS}
    still = {key: [] for key in passed}
    for i in range(args.n):
        scene = scene_at("eval", args.seed, i, frames=P + stride + 1)
        nothing_moves = all(o.motion == "standing still" for o in scene.caption.objects)
        for wave in LOOP_WAVES:
            video = render(scene, loop_progress(P + stride + 1, P, wave))  # frames 0..4k+4
            clips = {"raw": video[1:P + 1], **decoded(vae, video, P)}
            for how, clip in clips.items():
                wrap, mean = loop_steps(clip)
                passed[(wave, how)].append(wrap <= mean)
                if nothing_moves:
                    still[(wave, how)].append(wrap <= mean)
    print(f"{args.n} eval scenes (seed {args.seed}), {P}-frame perfect loops\n")
    print("| progress | clip | loop ok | loop ok, nothing moves |")
    print("|---|---|---|---|")
    for (wave, how), ok in passed.items():
        s = still[(wave, how)]
        print(f"| {wave} | {how} | {sum(ok)}/{len(ok)} | {sum(s)}/{len(s)} |")


if __name__ == "__main__":
    main()
