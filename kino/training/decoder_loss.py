"""Decoder-space loss: the DiT's clean-latent estimate judged in pixels.

The stage-15 DiT rounded the corners of Shapes World squares and blunted triangles even when it
started from a real clip's latents: denoised from flow time 0.3, squares drawn by the VAE at a
fill of ~0.96 came back at ~0.91 (BENCHMARKS.md, "Shapes"; stage 16, trained with this loss,
keeps more of them). Flow matching charges for that in latent space, where a square's corners
are a few small values among many; the evaluator (and a viewer) reads pixels. This loss judges the model's estimate of the clean latents at low noise
through the frozen VAE decoder:

    x0_hat = x_t - t v(x_t, t)          (flow matching: x_t = (1 - t) x0 + t eps, v = eps - x0)
    loss   = mean (D(x0_hat) - target)^2   over pixels, for rows with t <= max_t

`target` is the clip itself (a Shapes World cache renders it from the scene index it records)
or, for any cache, the decoder's drawing of the cached latents. Only a few rows per step go
through the decoder (its backward costs about half a DiT step for a 17-frame clip on a CPU),
chosen in the batch from those whose frames are all generated, at low noise and not loops.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from kino.errors import KinoUserError

TARGETS = ("frames", "decoded")


@dataclass
class DecoderLossConfig:
    """`[decoder_loss]`: its weight beside the flow-matching loss (0: off), the highest flow
    time a row may have to take part, at most how many rows a step, and the target: "frames"
    (the clip, rendered from its Shapes World scene) or "decoded" (the VAE's decoding of the
    cached latents: any cache)."""

    weight: float = 0.0
    max_t: float = 0.5
    rows: int = 2
    target: str = "frames"

    def __post_init__(self):
        if not (self.weight >= 0 and math.isfinite(self.weight)):
            raise KinoUserError(f"decoder_loss.weight must be a finite number >= 0, got {self.weight}")
        if not 0.0 < self.max_t <= 1.0:
            raise KinoUserError(f"decoder_loss.max_t must be a flow time in (0, 1], got {self.max_t}")
        if self.rows < 1:
            raise KinoUserError(f"decoder_loss.rows must be >= 1, got {self.rows}")
        if self.target not in TARGETS:
            raise KinoUserError(f"decoder_loss.target must be one of {', '.join(TARGETS)}, got {self.target!r}")


def pick_rows(t: Tensor, eligible: Tensor, max_t: float, rows: int) -> Tensor:
    """Indices (at most `rows`, in batch order) of the eligible rows whose largest frame time is
    at most `max_t`. `t` (B, T), `eligible` (B,) bool."""
    ok = eligible & (t.amax(dim=1) <= max_t)
    return torch.nonzero(ok).flatten()[:rows]


def clean_estimate(x: Tensor, v: Tensor, t: Tensor) -> Tensor:
    """x0_hat = x_t - t v for noisy latents `x` (B, C, T, h, w), velocity `v` and times `t` (B, T)."""
    return x - t[:, None, :, None, None].to(v.dtype) * v


def decoder_loss(vae, x0_hat: Tensor, target: Tensor) -> Tensor:
    """Mean squared pixel error of the decoded estimate (normalized latents (B, C, T, h, w))
    against `target` (B, 3, F, H, W) in [-1, 1]; decoded unclamped, so every pixel keeps a gradient."""
    video = vae.decode(vae.denormalize(x0_hat.float()), clamp=False)  # (B, 3, 1 + 4(T-1), H, W)
    f, h, w = target.shape[2:]
    return (video[:, :, :f, :h, :w] - target.float()).pow(2).mean()


@torch.no_grad()
def decoded_target(vae, x0: Tensor) -> Tensor:
    """The decoder's drawing of clean latents (B, C, T, h, w): the target when no clip is at hand."""
    return vae.decode(vae.denormalize(x0.float()))
