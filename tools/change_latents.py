"""Move a trained pipeline's DiT onto another VAE's latents: fit the two linear maps between the
latent spaces on paired latents of Shapes World `train` clips, build the moved DiT
(`kino.models.dit.grow.change_latents`) and write a pipeline folder with the new VAE, the
moved DiT and the old text encoder and generation defaults. The folder is a start for
`kino train dit` (`init_from`), not a finished model.

    python tools/change_latents.py --vae runs/vae_s4/model --size small-abspos-s4 \\
        --out runs/dit_s4_start [--model default] [--clips 240]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from kino.models.dit import DIT_SIZES
from kino.models.dit.grow import change_latents, fit_latent_map, latent_tokens
from kino.models.vae.pretrained import load_vae
from kino.pipeline import Pipeline
from kino.tasks.conditioning import to_model_range
from kino.world.captions import SIZES
from kino.world.generator import render, scene_at

FRAMES = (1, 9, 17, 33)
RIDGES = (1e-4, 1e-3, 2e-3, 5e-3, 1e-2, 2e-2, 5e-2, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0)


@torch.no_grad()
def paired_tokens(old_vae, new_vae, old_patch, new_patch, clips: int, seed: int):
    """Latent tokens (normalised latents, kernel order) of the same train clips under both VAEs."""
    olds, news = [], []
    for i in range(clips):
        frames, size = FRAMES[i % len(FRAMES)], SIZES[(i // len(FRAMES)) % len(SIZES)]
        video = to_model_range(render(scene_at("train", seed, i, frames=frames, size=size)))[None]
        olds.append(latent_tokens(old_vae.normalize(old_vae.encode(video)[0]), old_patch))
        news.append(latent_tokens(new_vae.normalize(new_vae.encode(video)[0]), new_patch))
    return torch.cat(olds), torch.cat(news)


def noise_gain(weight: torch.Tensor) -> float:
    """Mean variance a map gives each output from unit-variance white noise at its input."""
    return round((weight @ weight.T).diagonal().mean().item(), 4)


def fit_quiet(source: torch.Tensor, target: torch.Tensor, ridge: float | None):
    """The least-squares map at `ridge`, or at the smallest of RIDGES whose noise gain is <= 1.

    A plain fit from redundant latents leans on their low-variance directions with large
    weights, so the flow's noise, white in the new space, would reach the old blocks several
    times as strong as any noise they were trained on (a gain of 7 at ridge 1e-3 between the
    x4 and x8 VAEs, and a first training loss of 2.3); a ridge that keeps the gain at 1 costs
    the fit a few percent of explained variance."""
    if ridge is not None:
        return fit_latent_map(source, target, ridge), ridge
    for r in RIDGES:
        fitted = fit_latent_map(source, target, r)
        if noise_gain(fitted[0]) <= 1.0:
            break
    return fitted, r  # none quiet enough: the largest ridge


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="default", help="the trained pipeline folder (default: the shipped one)")
    ap.add_argument("--vae", required=True, help="the new VAE (a model folder or a bare vae folder)")
    ap.add_argument("--size", required=True, choices=sorted(DIT_SIZES), help="the moved DiT's size")
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--clips", type=int, default=240, help="train clips the maps are fitted on")
    ap.add_argument("--seed", type=int, default=97, help="seed of those clips' stream")
    ap.add_argument("--ridge", type=float, default=None,
                    help="ridge of both fits (default: per map, the smallest of RIDGES whose map passes "
                         "unit-variance noise on with at most unit variance)")
    args = ap.parse_args()
    torch.set_grad_enabled(False)
    pipe = Pipeline.from_pretrained(None if args.model == "default" else args.model)
    new_vae = load_vae(args.vae)
    wanted = DIT_SIZES[args.size]
    old_tok, new_tok = paired_tokens(pipe.vae, new_vae, pipe.dit.config.patch_size, wanted.patch_size,
                                     args.clips, args.seed)
    to_old, ridge_old = fit_quiet(new_tok, old_tok, args.ridge)
    to_new, ridge_new = fit_quiet(old_tok, new_tok, args.ridge)
    report = {"ridge": {"to_old": ridge_old, "to_new": ridge_new},
              "noise_gain": {"to_old": noise_gain(to_old[0]), "to_new": noise_gain(to_new[0])}}
    report["unexplained_variance"] = {}  # the share of each target's variance its map leaves
    for name, (src, dst, (w, b)) in {"to_old": (new_tok, old_tok, to_old),
                                     "to_new": (old_tok, new_tok, to_new)}.items():
        resid = dst - (src @ w.T + b)
        report["unexplained_variance"][name] = round((resid.pow(2).mean() / dst.var(0).mean()).item(), 4)
    moved = change_latents(pipe.dit, wanted, to_old, to_new)
    out = Pipeline(new_vae, moved, pipe.text_encoder, pipe.defaults, name=args.out.name).save_pretrained(args.out)
    print(json.dumps({"tokens": old_tok.shape[0], **report, "folder": str(out)}))


if __name__ == "__main__":
    main()
