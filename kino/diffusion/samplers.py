"""Samplers: pure functions that integrate a velocity field from t = 1 (noise) to t = 0.

A sampler takes `velocity(x, t) -> v` (t a Python float; any guidance, per-frame timesteps
or conditioning live inside that closure), the starting noise and a decreasing list of
timesteps, and returns the final x. No scheduler objects, no hidden state.
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

from torch import Tensor

Velocity = Callable[[Tensor, float], Tensor]


def _times(timesteps) -> list[float]:
    ts = [float(t) for t in timesteps]
    if len(ts) < 2 or any(b >= a for a, b in zip(ts, ts[1:])):
        raise ValueError("timesteps must be at least two strictly decreasing values")
    return ts


def euler(velocity: Velocity, x: Tensor, timesteps: Sequence[float],
          callback: Callable[[int], None] | None = None) -> Tensor:
    """First order: x <- x + (t_next - t) v(x, t)."""
    ts = _times(timesteps)
    for i, (t, t_next) in enumerate(zip(ts, ts[1:])):
        x = x + (t_next - t) * velocity(x, t)
        if callback:
            callback(i)
    return x


def _log_snr(t: float) -> float:
    """lambda(t) = log(alpha / sigma) with alpha = 1 - t, sigma = t (+-inf at the ends)."""
    if t <= 0.0:
        return math.inf
    if t >= 1.0:
        return -math.inf
    return math.log(1.0 - t) - math.log(t)


def dpm_solver_2m(velocity: Velocity, x: Tensor, timesteps: Sequence[float],
                  callback: Callable[[int], None] | None = None) -> Tensor:
    """DPM-Solver++(2M) in flow form (multistep, second order, data prediction).

    With alpha = 1 - t and sigma = t, one step from t to t' with data estimate D is
        x' = (t' / t) x + (1 - t') (1 - e^{-h}) D,   h = lambda(t') - lambda(t),
    and the second order uses D + (D - D_prev) / (2 r), r = h_prev / h. The first step
    (from t = 1, where lambda = -inf) and the last (to t = 0) are first order, as usual.
    """
    ts = _times(timesteps)
    prev_d = prev_h = None
    for i, (t, t_next) in enumerate(zip(ts, ts[1:])):
        v = velocity(x, t)
        d = x - t * v  # (B, C, T, H, W) data estimate
        if t_next <= 0.0:
            x = d
        else:
            # e^{-h} = (t' (1 - t)) / ((1 - t') t), finite even when t = 1 (it is then 0)
            exp_neg_h = (t_next * (1.0 - t)) / ((1.0 - t_next) * t)
            h = _log_snr(t_next) - _log_snr(t)
            d_eff = d
            if prev_d is not None and math.isfinite(h) and math.isfinite(prev_h):
                r = prev_h / h
                d_eff = d + (d - prev_d) / (2.0 * r)
            x = (t_next / t) * x + (1.0 - t_next) * (1.0 - exp_neg_h) * d_eff
            prev_d, prev_h = d, h
        if callback:
            callback(i)
    return x


SAMPLERS = {"euler": euler, "dpm++2m": dpm_solver_2m}


def guided(velocity_cond: Callable[[Tensor, float], Tensor], velocity_uncond: Callable[[Tensor, float], Tensor],
           scale: float) -> Velocity:
    """Classifier-free guidance: v = v_u + s (v_c - v_u). Scale 1 is the conditional model
    alone (the unconditional branch is then skipped)."""
    if scale == 1.0:
        return velocity_cond

    def velocity(x: Tensor, t: float) -> Tensor:
        vu = velocity_uncond(x, t)
        return vu + scale * (velocity_cond(x, t) - vu)

    return velocity
