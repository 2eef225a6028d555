"""Binding contrast: a clip should be explained worse by its caption with the objects'
attributes exchanged (an experiment).

The shipped DiT reads which motions and shapes a two-object caption names but hardly which
object has which: exchanging the two objects' motion words costs ~1% of its flow-matching loss
where the empty prompt costs 30% (BENCHMARKS.md, "Two objects: attribute binding"). A loss on its
cross-attention (kino/training/grounding.py) bound the attention without changing the videos.
This loss acts on the output instead. For a few two-object rows a step, the same noisy latents
go through the DiT a second time under the caption with one attribute exchanged between the
objects (motion, shape, colour or size, drawn among those that differ), and the swapped caption
must explain the clip worse by a margin, relative to the true caption's error:

    e_c = |v(x_t, c) - u|^2,  e_s = |v(x_t, c_swapped) - u|^2   (per row, over generated frames)
    loss = mean over rows of relu(margin * sg(e_c) - (e_s - e_c))

(sg: no gradient through the scale.) The words are the same in both captions, only their
owners differ, so the model can meet the margin only by reading which object each word belongs
to. Like contrastive flow matching (Stoica et al. 2025), which pushes a prediction away from
other samples' targets, it charges for being as right under a wrong condition; unlike it, the
wrong condition is the hard negative that binding needs.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

from kino.errors import CaptionError, KinoUserError
from kino.world.captions import parse_caption

FIELDS = ("motion", "shape", "color", "size")


@dataclass
class BindingConfig:
    """`[binding]`: the loss's weight beside flow matching (0: off), its margin (the swapped
    caption's error must exceed the true one's by this fraction of it), at most how many rows a
    step take part, the flow times they may have, and which attributes may be exchanged."""

    weight: float = 0.0
    margin: float = 0.05
    rows: int = 2
    min_t: float = 0.0
    max_t: float = 1.0
    fields: list[str] = field(default_factory=lambda: list(FIELDS))

    def __post_init__(self):
        if not (self.weight >= 0 and math.isfinite(self.weight)):
            raise KinoUserError(f"binding.weight must be a finite number >= 0, got {self.weight}")
        if not (self.margin >= 0 and math.isfinite(self.margin)):
            raise KinoUserError(f"binding.margin must be a finite number >= 0, got {self.margin}")
        if self.rows < 1:
            raise KinoUserError(f"binding.rows must be >= 1, got {self.rows}")
        if not 0.0 <= self.min_t < self.max_t <= 1.0:
            raise KinoUserError(f"binding needs flow times 0 <= min_t < max_t <= 1, got {self.min_t}, {self.max_t}")
        bad = [f for f in self.fields if f not in FIELDS]
        if bad or not self.fields or len(set(self.fields)) != len(self.fields):
            raise KinoUserError(f"binding.fields must be distinct names among {', '.join(FIELDS)}, got {self.fields}")


def swapped_caption(caption: str, fields, rng: np.random.Generator) -> str | None:
    """`caption` with one attribute exchanged between its two objects, drawn by `rng` among
    `fields` where the objects differ; None for a one-object caption, one outside Shapes World,
    or two objects alike in every field."""
    try:
        parsed = parse_caption(caption)
    except CaptionError:
        return None
    if len(parsed.objects) != 2:
        return None
    a, b = parsed.objects
    differ = [f for f in fields if getattr(a, f) != getattr(b, f)]
    if not differ:
        return None
    f = differ[int(rng.integers(len(differ)))]
    objects = (dataclasses.replace(a, **{f: getattr(b, f)}), dataclasses.replace(b, **{f: getattr(a, f)}))
    return str(dataclasses.replace(parsed, objects=objects))


def pick_swaps(captions: list[str], t: Tensor, eligible: Tensor, config: BindingConfig,
               rng: np.random.Generator) -> tuple[Tensor, list[str]]:
    """The rows (at most config.rows, in batch order) that take part, and their swapped
    captions: eligible rows (B,) whose frame times (B, T) lie in [min_t, max_t] and whose
    caption has an attribute to exchange."""
    rows, swapped = [], []
    for i, caption in enumerate(captions):
        if len(rows) == config.rows:
            break
        if not eligible[i] or t[i].min() < config.min_t or t[i].max() > config.max_t:
            continue
        s = swapped_caption(caption, config.fields, rng)
        if s is not None:
            rows.append(i)
            swapped.append(s)
    return torch.tensor(rows, dtype=torch.long), swapped


def binding_loss(err_true: Tensor, err_swapped: Tensor, margin: float) -> Tensor:
    """Mean over rows of relu(margin * err_true - (err_swapped - err_true)), the scale
    `margin * err_true` without gradient; 0 for no rows."""
    if err_true.numel() == 0:
        return err_true.new_zeros(())
    return torch.relu(margin * err_true.detach() - (err_swapped - err_true)).mean()
