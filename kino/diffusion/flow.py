"""Flow matching: the forward process, the training target, timestep sampling and shifting.

Convention (rectified flow, as in SD3/Flux/Wan): t in [0, 1], t = 0 is data, t = 1 is noise,

    x_t = (1 - t) x_0 + t eps,        velocity target v = eps - x_0,

so dx_t/dt = v and sampling integrates from t = 1 down to t = 0. Timesteps may be
per-frame, shape (B, T) for latents (B, C, T, H, W): clean conditioning frames simply have
t = 0, which is how one model serves every task.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def _expand(t: Tensor, x: Tensor) -> Tensor:
    """(B,) or per-frame (B, T) timesteps -> broadcastable against x (B, C, T, H, W)."""
    if t.dim() == 0:
        return t
    if t.dim() == 1:
        return t.view(-1, *([1] * (x.dim() - 1)))
    if t.dim() == 2:
        return t.view(t.shape[0], 1, t.shape[1], *([1] * (x.dim() - 3)))
    raise ValueError(f"timesteps must have shape (), (B,) or (B, T); got {tuple(t.shape)}")


def interpolate(x0: Tensor, eps: Tensor, t: Tensor) -> Tensor:
    """x_t = (1 - t) x_0 + t eps."""
    t = _expand(t, x0).to(x0.dtype)
    return (1 - t) * x0 + t * eps


def velocity_target(x0: Tensor, eps: Tensor) -> Tensor:
    return eps - x0


def predict_x0(x: Tensor, t: Tensor, v: Tensor) -> Tensor:
    """The data estimate implied by a velocity: x_0 = x_t - t v."""
    return x - _expand(t, x).to(x.dtype) * v


def logit_normal(shape, mean: float = 0.0, std: float = 1.0, generator: torch.Generator | None = None,
                 device=None) -> Tensor:
    """t = sigmoid(N(mean, std)): training focuses on the middle of the path (SD3)."""
    return torch.sigmoid(mean + std * torch.randn(shape, generator=generator, device=device))


def shift_timesteps(t: Tensor, shift: float) -> Tensor:
    """Warp t towards noise by `shift` (> 1): t' = s t / (1 + (s - 1) t). Larger images and
    longer clips carry more redundant signal, so they need more time at high noise."""
    return shift * t / (1 + (shift - 1) * t)


def shift_for_tokens(tokens: int, base_tokens: int = 64, max_tokens: int = 4096,
                     base_shift: float = 1.0, max_shift: float = 3.0) -> float:
    """A shift that grows with sequence length: log-linear in the token count between
    (base_tokens, base_shift) and (max_tokens, max_shift), clamped at both ends."""
    tokens = min(max(tokens, base_tokens), max_tokens)
    a = (math.log(tokens) - math.log(base_tokens)) / (math.log(max_tokens) - math.log(base_tokens))
    return math.exp((1 - a) * math.log(base_shift) + a * math.log(max_shift))


def sampling_timesteps(steps: int, shift: float = 1.0, t_max: float = 1.0, t_min: float = 0.0) -> Tensor:
    """steps + 1 decreasing times: steps evenly spaced from t_max to t_min, shifted, then 0.

    kino's own models use (1, 0). Wan2.1's sampler starts at t_max = 0.999 (the last of its
    1000 training times) with t_min = 0; diffusers' UniPC with flow sigmas, as WanPipeline
    sets it up, uses t_max = 1 and t_min = 0.001 instead (the same grid shifted by one
    training step), a small difference between the two releases of the same model."""
    if steps < 1:
        raise ValueError(f"steps must be at least 1, got {steps}")
    if not 0.0 <= t_min < t_max <= 1.0:
        raise ValueError(f"need 0 <= t_min < t_max <= 1, got t_min {t_min}, t_max {t_max}")
    ts = shift_timesteps(torch.linspace(t_max, t_min, steps + 1, dtype=torch.float64), shift)
    ts[-1] = 0.0
    return ts
