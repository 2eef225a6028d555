"""Generation speed of a pipeline on this machine, and its DiT against diffusers' Wan DiT.

    python benchmarks/bench_generate.py [--model DIR] [--repeats 5] [--threads N] [--guidance-interval LO HI]
                                        [--cache-threshold T]

clip: the model time of one default clip (text encoding, every sampling step with
      classifier-free guidance, VAE decode; file writing excluded) for each world clip
      shape, median of --repeats runs, with the share spent in the DiT, the text encoder
      and the VAE.
peer: one guided DiT call (batch 2) of kino's DiT and, in the same run with the same
      weights, diffusers' WanTransformer3DModel built with the same size (the peer), as a
      time ratio.
"""

from __future__ import annotations

import argparse
import platform

import torch
from timing import median_time, wan_peer


@torch.no_grad()
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None, help="pipeline folder (default: the shipped model)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    ap.add_argument("--guidance-interval", type=float, nargs=2, default=None, metavar=("LO", "HI"),
                    help="guide only solver times LO..HI (default: the model's; 0 1 = every step)")
    ap.add_argument("--cache-threshold", type=float, default=None,
                    help="first-block cache threshold (default: the model's, 0 = off)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from dataclasses import replace

    from kino.models.dit.cache import FirstBlockCache
    from kino.pipeline import Pipeline, sample_latents

    pipe = Pipeline.from_pretrained(args.model)
    if args.guidance_interval:
        pipe.defaults = replace(pipe.defaults, guidance_interval=tuple(args.guidance_interval))
    if args.cache_threshold is not None:
        pipe.defaults = replace(pipe.defaults, cache_threshold=args.cache_threshold)
    d = pipe.defaults

    def sample(*a, **kw):
        """sample_latents with a fresh first-block cache when one is asked for, as generate runs it."""
        pipe.dit.step_cache = FirstBlockCache(d.cache_threshold) if d.cache_threshold > 0 else None
        try:
            return sample_latents(*a, **kw)
        finally:
            pipe.dit.step_cache = None

    print(f"# {platform.machine()} CPU, torch {torch.__version__}, {torch.get_num_threads()} threads; "
          f"{d.steps} {d.sampler} steps, guidance {d.guidance} (interval {d.guidance_interval or 'all steps'}), "
          f"first-block cache {d.cache_threshold or 'off'}, "
          f"medians of {args.repeats}")
    print("| clip | model time s | DiT sampling s | text s | VAE decode s | clip lasts s |")
    print("|---|---|---|---|---|---|")
    prompt = "a large red circle moving left and a small blue square growing on a black background"
    for frames, h, w in [(1, 64, 64), (17, 64, 64), (17, 64, 96), (33, 64, 96)]:
        total = median_time(lambda: pipe.generate(prompt, frames=frames, height=h, width=w, seed=1), args.repeats)
        text_s = median_time(lambda: pipe.text_encoder.encode([prompt, d.negative]), args.repeats)
        text, mask = pipe.text_encoder.encode([prompt, d.negative])
        latents = pipe.generate(prompt, frames=frames, height=h, width=w, seed=1).latents
        noise = torch.randn(latents.shape)
        dit_s = median_time(lambda: sample(pipe.dit, text[:1], mask[:1], text[1:], mask[1:], noise,
                                               steps=d.steps, guidance=d.guidance, sampler=d.sampler,
                                               guidance_interval=d.guidance_interval), args.repeats)
        vae_s = median_time(lambda: pipe.decode(latents, frames), args.repeats)
        print(f"| {frames}x{h}x{w} | {total:.2f} | {dit_s:.2f} | {text_s:.3f} | {vae_s:.2f} | "
              f"{frames / d.fps:.2f} |")

    dit = pipe.dit
    peer = wan_peer(dit)
    print("\n| DiT call (batch 2, as with guidance) | tokens | kino s | diffusers s | kino/diffusers time |")
    print("|---|---|---|---|---|")
    s = pipe.vae.config.space_stride
    for frames, h, w in [(17, 64, 64), (33, 64, 96)]:
        T = pipe.vae.config.latent_frames(frames)
        x = torch.randn(2, dit.config.in_channels, T, h // s, w // s)
        t = torch.full((2,), 500.0)
        text, mask = pipe.text_encoder.encode([prompt, ""])
        ours = median_time(lambda: dit(x, t, text, mask), args.repeats)
        # diffusers' Wan takes unpadded text features (no mask): give it the same tokens
        theirs = median_time(lambda: peer(x, t, text, return_dict=False), args.repeats)
        p = dit.config.patch_size
        tokens = T // p[0] * (h // s // p[1]) * (w // s // p[2])
        print(f"| {frames}x{h}x{w} | {tokens} | {ours * 1000:.1f} ms | {theirs * 1000:.1f} ms | "
              f"{ours / theirs:.2f} |")


if __name__ == "__main__":
    main()
