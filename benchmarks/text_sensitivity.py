"""Does a DiT use a caption's words? Its flow-matching loss on cached training clips with the
true caption against the same caption with one word group changed, at fixed noise levels.

    python benchmarks/text_sensitivity.py [--model DIR] [--checkpoint CKPT_DIR] [--cache runs/cache/world]
                                          [--n 32] [--buckets 17x64x64 33x64x64] [--times 0.6 0.8 0.9 0.97]
                                          [--pairs]

For one-object clips captioned "moving left/right" (axis x) and "moving up/down" (axis y), each
axis on its own rows, it prints the mean squared velocity error with: the true caption; the
direction swapped (left <-> right, up <-> down); "standing still" instead; the empty prompt.
Same clips, same noise for all four. A model that binds the direction word loses more with
the swapped caption than with the true one wherever the noisy clip does not already show the
motion (high t); equal losses mean the word is ignored. The axes are kept apart because a
model can learn one and not the other (stages 5-7 learnt up and down, not left and right).
`--pairs` asks the binding question on two-object clips instead. Variants: the two object
phrases in the other order (the same scene: a model that reads the caption as a set of objects
pays nothing); the objects' motions swapped between them (clips whose two motions differ), and
their shapes swapped (clips whose two shapes differ), which keep every word and change only
which object it belongs to; the empty prompt. A model that binds each word to its object
loses more with a swap than with the reordered caption; one that reads a bag of words loses
the same.
`--checkpoint` takes a training checkpoint's EMA weights into the model's DiT.
"""

from __future__ import annotations

import argparse
import dataclasses
import re

import torch

from kino.data.latent_cache import LatentCache, parse_bucket
from kino.diffusion.flow import interpolate, velocity_target
from kino.pipeline import Pipeline
from kino.world.captions import Caption, parse_caption

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
    ap.add_argument("--pairs", action="store_true", help="the binding question on two-object clips")
    args = ap.parse_args()

    pipe = Pipeline.from_pretrained(args.model)
    dit = pipe.dit.eval()
    if args.checkpoint:
        from safetensors.torch import load_file

        dit.load_state_dict(load_file(f"{args.checkpoint}/ema.safetensors"))
    cache = LatentCache(args.cache)
    if args.pairs:
        return binding(pipe, dit, cache, args)
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
        for t, losses in _losses(dit, data["latents"], variants, args):
            print(f"| {name} | {axis} | {t} | " + " | ".join(f"{v:.4f}" for v in losses) + " |", flush=True)


def _losses(dit, x0, variants, args):
    """(t, [mean squared velocity error of each (text, mask) variant]) for each of args.times;
    the same noise for every variant."""
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(args.seed))
    for t in args.times:
        times = torch.full((x0.shape[0], x0.shape[2]), t)
        xt, target = interpolate(x0, noise, times), velocity_target(x0, noise)
        with torch.no_grad():
            yield t, [(dit(xt, 1000.0 * times, text.float(), mask) - target).pow(2).mean().item()
                      for text, mask in variants]


def swap_attribute(caption: Caption, field: str) -> Caption:
    """The two-object caption with `field` exchanged between its objects."""
    a, b = caption.objects
    va, vb = getattr(a, field), getattr(b, field)
    return dataclasses.replace(caption, objects=(dataclasses.replace(a, **{field: vb}),
                                                 dataclasses.replace(b, **{field: va})))


def binding(pipe, dit, cache, args) -> None:
    """Per bucket and swapped attribute: the loss with the true caption, the phrases reordered,
    the attribute swapped between the two objects, and the empty prompt."""
    print("| bucket | swapped | clips | t | true | phrases reordered | attribute swapped | empty prompt |")
    print("|---|---|---|---|---|---|---|---|")
    for name in args.buckets:
        bucket = parse_bucket(name)
        captions = [parse_caption(c) for c in cache.captions(bucket)]
        for field in ("motion", "shape"):
            if field == "motion" and bucket[0] == 1:
                continue
            idx = [i for i, c in enumerate(captions)
                   if len(c.objects) == 2 and getattr(c.objects[0], field) != getattr(c.objects[1], field)]
            idx = idx[: args.n]
            data = cache.get(bucket, idx)
            reordered = [dataclasses.replace(captions[i], objects=captions[i].objects[::-1]) for i in idx]
            swapped = [swap_attribute(captions[i], field) for i in idx]
            variants = [(data["text"], data["mask"])]
            variants += [pipe.text_encoder.encode([str(c) for c in group]) for group in (reordered, swapped)]
            variants.append((cache.empty_text.expand(len(idx), -1, -1), cache.empty_mask.expand(len(idx), -1)))
            for t, losses in _losses(dit, data["latents"], variants, args):
                print(f"| {name} | {field} | {len(idx)} | {t} | " + " | ".join(f"{v:.4f}" for v in losses) + " |",
                      flush=True)


if __name__ == "__main__":
    main()
