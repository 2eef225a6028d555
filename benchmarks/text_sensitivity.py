"""Does a DiT use a caption's words? Its flow-matching loss on cached training clips with the
true caption against the same caption with one word group changed, at fixed noise levels.

    python benchmarks/text_sensitivity.py [--model DIR] [--checkpoint CKPT_DIR] [--cache runs/cache/world]
                                          [--n 32] [--buckets 17x64x64 33x64x64] [--times 0.6 0.8 0.9 0.97]

For one-object clips captioned "moving left/right" (axis x) and "moving up/down" (axis y), each
axis on its own rows, it prints the mean squared velocity error with: the true caption; the
direction swapped (left <-> right, up <-> down); "standing still" instead; the empty prompt. Same clips, same noise for all four. A model that binds the
direction word loses more with the swapped caption than with the true one wherever the noisy
clip does not already show the motion (high t); equal losses mean the word is ignored. The
axes are kept apart because a model can learn one and not the other (stages 5-7 learnt up and
down, not left and right).
`--checkpoint` takes a training checkpoint's EMA weights into the model's DiT.
"""

from __future__ import annotations

import argparse
import re

import torch

from kino.data.latent_cache import LatentCache, parse_bucket
from kino.diffusion.flow import interpolate, velocity_target
from kino.pipeline import Pipeline

SWAP = {"left": "right", "right": "left", "up": "down", "down": "up"}
DIRECTION = re.compile(r"moving (left|right|up|down)")
AXES = {"x": re.compile(r"moving (left|right)"), "y": re.compile(r"moving (up|down)")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None, help="pipeline folder (default: the shipped model)")
    ap.add_argument("--checkpoint", default=None, help="a training checkpoint folder: use its EMA weights")
    ap.add_argument("--cache", default="runs/cache/world", help="latent cache of the model's VAE and text encoder")
    ap.add_argument("--n", type=int, default=32, help="clips per bucket")
    ap.add_argument("--buckets", nargs="+", default=["17x64x64", "33x64x64"])
    ap.add_argument("--times", type=float, nargs="+", default=[0.6, 0.8, 0.9, 0.97])
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    pipe = Pipeline.from_pretrained(args.model)
    dit = pipe.dit.eval()
    if args.checkpoint:
        from safetensors.torch import load_file

        dit.load_state_dict(load_file(f"{args.checkpoint}/ema.safetensors"))
    cache = LatentCache(args.cache)
    print("| bucket | axis | t | true | direction swapped | standing still | empty prompt |")
    print("|---|---|---|---|---|---|---|")
    for name, axis in [(b, a) for b in args.buckets for a in AXES]:
        bucket = parse_bucket(name)
        captions = cache.captions(bucket)
        idx = [i for i, c in enumerate(captions) if " and " not in c and AXES[axis].search(c)][: args.n]
        data = cache.get(bucket, idx)
        variants = [(data["text"], data["mask"])]
        for replace in (lambda m: "moving " + SWAP[m.group(1)], lambda m: "standing still"):
            variants.append(pipe.text_encoder.encode([DIRECTION.sub(replace, captions[i]) for i in idx]))
        variants.append((cache.empty_text.expand(len(idx), -1, -1), cache.empty_mask.expand(len(idx), -1)))
        x0 = data["latents"]
        noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(args.seed))
        for t in args.times:
            times = torch.full((x0.shape[0], x0.shape[2]), t)
            xt, target = interpolate(x0, noise, times), velocity_target(x0, noise)
            with torch.no_grad():
                losses = [(dit(xt, 1000.0 * times, text.float(), mask) - target).pow(2).mean().item()
                          for text, mask in variants]
            print(f"| {name} | {axis} | {t} | " + " | ".join(f"{v:.4f}" for v in losses) + " |", flush=True)


if __name__ == "__main__":
    main()
