"""Shapes World's palette as a differentiable loss, for fitting decoders and latents to world clips.

The evaluator reads a clip through the nearest world colour of every pixel. A pixel that lands
a little nearer another world colour changes the object the evaluator sees, however small its
squared error: a blend at the edge of a cyan circle on black can read as green, and a square's
rounded corner drops out of its box. `palette_loss` charges exactly that. The VAE's training
uses it (`[loss] palette`), and so can latent refinement (`refine_latents(..., palette=W)`).
"""

from __future__ import annotations

import torch
from torch import Tensor

from kino.world.captions import BACKGROUNDS, COLORS
from kino.world.evaluator import PALETTE_NAMES

# the evaluator's palette, in its order: the colours its nearest-colour map chooses from
WORLD_PALETTE = torch.tensor([(BACKGROUNDS | COLORS)[n] for n in PALETTE_NAMES], dtype=torch.float32) / 127.5 - 1.0


def palette_loss(rec: Tensor, x: Tensor, temperature: float) -> Tensor:
    """Mean cross-entropy of the decoded pixels' nearest world colour (logits -|rec - c|^2 /
    temperature) against the original's nearest one. rec, x: (B, 3, T, H, W) in [-1, 1]."""
    pal = WORLD_PALETTE.to(device=rec.device, dtype=torch.float32)

    def dist2(v: Tensor) -> Tensor:
        return (v.float().movedim(1, -1)[..., None, :] - pal).pow(2).sum(-1)  # (B, T, H, W, 10)

    with torch.no_grad():
        labels = dist2(x).argmin(-1)  # (B, T, H, W)
    logits = -dist2(rec) / temperature
    return torch.nn.functional.cross_entropy(logits.flatten(0, -2), labels.flatten())
