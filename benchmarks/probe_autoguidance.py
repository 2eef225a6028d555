"""Probe (not a pipeline feature): autoguidance, guiding the DiT with a weaker DiT.

    OMP_NUM_THREADS=1 python benchmarks/probe_autoguidance.py --weak DIT_DIR --weight W
                                 [--interval LO HI] [--n 60 --held-out 0 --seed 4848] [--workers 2] [--out DIR]

Karras et al. 2024 ("Guiding a diffusion model with a bad version of itself"): a less trained
or smaller model of the same data makes the same kind of errors as the good one, only more,
so stepping away from its prediction removes them. Here the weak model's conditional velocity
takes the place of skip-layer guidance's weakened pass: on the steps at solver times in
[LO, HI], v = v_u + g (v_c - v_u) + W (v_c - v_weak), the shipped CFG kept as it is (W = g - 1
without CFG is the paper's form). `--weak` is a bare DiT folder (config.json and
model.safetensors), e.g. an earlier shipped DiT taken from git:

    git show REV:kino/weights/default/dit/model.safetensors > weak/model.safetensors   (and config.json)

Any DiT on the same latents and text encoder will do, patch size included. Prompts, seeds and
scores as eval_t2v.py's; one more (weak) DiT pass per guided step.
"""

from __future__ import annotations

import argparse
import functools
import tempfile
from pathlib import Path

import torch

from eval_t2v import prompt_rows, run_probe
from kino.models.dit.pretrained import load_dit


class WeakGuided(torch.nn.Module):
    """The DiT, except that its skip-layer pass (a call with `skip_blocks`) runs the weak DiT."""

    def __init__(self, dit, weak):
        super().__init__()
        self.inner, self.weak = dit, weak
        self.config, self.patch_embedding = dit.config, dit.patch_embedding

    def forward(self, *args, skip_blocks=(), **kw):
        return (self.weak if skip_blocks else self.inner)(*args, **kw)


def use_weak(pipe, weak_dir: str) -> None:
    """eval_t2v's per-process setup: the pipeline's DiT wrapped with the weak one."""
    pipe.dit = WeakGuided(pipe.dit, load_dit(weak_dir))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--weak", required=True, help="the weak DiT's folder")
    ap.add_argument("--weight", type=float, required=True, help="W, the autoguidance weight")
    ap.add_argument("--interval", type=float, nargs=2, default=(0.0, 1.0), metavar=("LO", "HI"))
    ap.add_argument("--model", default=None, help="pipeline folder (default: the shipped model)")
    ap.add_argument("--n", type=int, default=60)
    ap.add_argument("--held-out", type=int, default=0)
    ap.add_argument("--seed", type=int, default=4848)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    out = Path(args.out or tempfile.mkdtemp(prefix="kino-autoguidance-"))
    defaults = {"skip_guidance": args.weight, "skip_blocks": (0,), "skip_interval": tuple(args.interval)}
    run_probe(prompt_rows(args.n, args.held_out, args.seed), out, defaults, args.workers, args.model,
              functools.partial(use_weak, weak_dir=args.weak), vars(args))


if __name__ == "__main__":
    main()
