"""Probe (not a pipeline feature): composable or contrastive guidance for two-object prompts.

    OMP_NUM_THREADS=1 python benchmarks/probe_compose.py --weight W [--alone | --contrast motion|shape|both]
                                                          [--n 120 --held-out 24 --seed 5353] [--model DIR] [--out DIR]

The two-object prompts among eval_t2v.py's (same seed, sizes, frame counts and per-prompt
seeds) are generated with each object's own one-object caption ("a {object} on a {background}
background") adding a guidance term on the guided steps (Liu et al. 2022, "Compositional
Visual Generation with Composable Diffusion Models"):
v = v_u + g (v_full - v_u) + W * sum_i (v_i - v_u); with `--alone` the parts replace the full
caption: v = v_u + g * sum_i (v_i - v_u). With `--contrast`, the one extra term is the caption
with the objects' motions, shapes or both (that is, their colours and sizes) swapped, pushed
away from: v = v_u + g (v_full - v_u) + W (v_full - v_swapped), a guidance along the binding
alone. Scored as eval_t2v.py scores, binding diagnostic included. One more DiT pass per object
(one with `--contrast`) on each guided step.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch

from eval_t2v import prompt_rows, score
from text_sensitivity import swap_attribute
from kino.pipeline import Pipeline
from kino.world.captions import Caption, parse_caption
from kino.world.dataset import clip_filename, write_clip, write_rows


class Composed(torch.nn.Module):
    """A DiT whose guided calls (the conditional and unconditional halves of one batch) come back
    with the parts' guidance folded into the conditional half, so that the sampler's
    v_u + g (v_c - v_u) becomes the composed velocity."""

    def __init__(self, dit, parts: tuple[torch.Tensor, torch.Tensor], guidance: float, weight: float,
                 alone: bool = False, contrast: bool = False):
        super().__init__()
        self.inner, self.parts, self.g, self.w = dit, parts, guidance, weight
        self.alone, self.contrast = alone, contrast
        self.config, self.patch_embedding = dit.config, dit.patch_embedding

    def forward(self, x, t, text, mask, **kw):
        v = self.inner(x, t, text, mask, **kw)
        if x.shape[0] != 2:  # an unguided step
            return v
        v_c, v_u = v.chunk(2)
        n = self.parts[0].shape[0]
        v_parts = self.inner(x[:1].repeat(n, 1, 1, 1, 1), t[:1].repeat(n, 1), *self.parts, **kw)
        delta = (v_c - v_parts) if self.contrast else (v_parts - v_u).sum(0, keepdim=True)
        v_c = v_u + delta if self.alone else v_c + (self.w / self.g) * delta
        return torch.cat([v_c, v_u])


def pair_rows(n: int, held_out: int, seed: int) -> list[dict]:
    """The two-object prompts among eval_t2v.py's."""
    return [r for r in prompt_rows(n, held_out, seed) if len(parse_caption(r["caption"]).objects) == 2]


def composed_videos(pipe, rows: list[dict], weight: float, alone: bool = False,
                    contrast: str | None = None) -> list[torch.Tensor]:
    """Each row's clip with its objects' own captions composed into the guidance, or with
    `contrast` the swapped caption guided away from (the pipeline's DiT is put back
    afterwards)."""
    dit, videos = pipe.dit, []
    try:
        for r in rows:
            caption = parse_caption(r["caption"])
            if contrast:
                for field in ("motion", "shape") if contrast == "both" else (contrast,):
                    caption = swap_attribute(caption, field)
                parts = [str(caption)]
            else:
                parts = [str(Caption(objects=(o,), background=caption.background)) for o in caption.objects]
            pipe.dit = Composed(dit, pipe.text_encoder.encode(parts), pipe.defaults.guidance, weight, alone,
                                contrast=bool(contrast))
            videos.append(pipe.generate(r["caption"], frames=r["frames"], height=r["height"], width=r["width"],
                                        seed=r["seed"]).video)
    finally:
        pipe.dit = dit
    return videos


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None)
    ap.add_argument("--weight", type=float, required=True, help="W: the parts' guidance weight")
    mode = ap.add_mutually_exclusive_group()
    mode.add_argument("--alone", action="store_true", help="the parts replace the full caption")
    mode.add_argument("--contrast", choices=("motion", "shape", "both"), default=None,
                      help="guide away from the caption with these attributes swapped between the objects")
    ap.add_argument("--n", type=int, default=120)
    ap.add_argument("--held-out", type=int, default=24)
    ap.add_argument("--seed", type=int, default=5353)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    pipe = Pipeline.from_pretrained(args.model)
    out = Path(args.out or tempfile.mkdtemp(prefix="kino-compose-"))
    out.mkdir(parents=True, exist_ok=True)
    rows = pair_rows(args.n, args.held_out, args.seed)
    videos = composed_videos(pipe, rows, args.weight, args.alone, args.contrast)
    write_rows(out, [write_clip(out, clip_filename(i, r["frames"]), video, r["caption"])
                     for i, (r, video) in enumerate(zip(rows, videos))])
    report = score(out)
    report.pop("failures", None)
    print(json.dumps({"weight": args.weight, "alone": args.alone, "contrast": args.contrast, **report}))


if __name__ == "__main__":
    main()
