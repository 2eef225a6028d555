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


def _uni_update(x: Tensor, t_s: float, t: float, d_s: Tensor, older: list[tuple[float, Tensor]],
                d_t: Tensor | None) -> Tensor:
    """One UniPC update of x (at t_s, data estimate d_s) to time t, in flow form.

    With alpha = 1 - t, sigma = t, lambda = log(alpha / sigma), h = lambda(t) - lambda(t_s):
        x' = (t / t_s) x - (1 - t) (e^{-h} - 1) d_s - (1 - t) B(h) sum_k rho_k D_k,
    B(h) = e^{-h} - 1 (UniPC's "bh2"). The D_k are scaled differences of data estimates:
    (d_older - d_s) / r with r = (lambda_older - lambda_s) / h for a second-order predictor
    (rho = 1/2), and d_t - d_s as well for the corrector UniC (`d_t` given; first order:
    rho = 1/2; second order: rho from the 2x2 system of UniPC's order conditions).
    """
    exp_neg_h = (t * (1.0 - t_s)) / ((1.0 - t) * t_s)  # finite at t_s = 1 (0) and t = 0 (0)
    h = _log_snr(t) - _log_snr(t_s)
    phi1 = math.expm1(-h) if math.isfinite(h) else exp_neg_h - 1.0
    x_next = (t / t_s) * x - (1.0 - t) * phi1 * d_s
    older = [(lam, d) for lam, d in older if math.isfinite(lam) and math.isfinite(h)]  # no slope from t = 1
    if not older and d_t is None:
        return x_next
    b_h = phi1
    if older:
        lam_old, d_old = older[0]
        r = (lam_old - _log_snr(t_s)) / h
        d1 = (d_old - d_s) / r
    if d_t is None:  # second-order predictor
        return x_next - (1.0 - t) * b_h * 0.5 * d1
    if not older:  # first-order corrector
        return x_next - (1.0 - t) * b_h * 0.5 * (d_t - d_s)
    hh = -h
    g1 = phi1 / hh - 1.0
    b1 = g1 / b_h
    b2 = (g1 / hh - 0.5) * 2.0 / b_h
    rho0 = (b1 - b2) / (1.0 - r)  # [[1, 1], [r, 1]] (rho0, rho1) = (b1, b2)
    rho1 = b1 - rho0
    return x_next - (1.0 - t) * b_h * (rho0 * d1 + rho1 * (d_t - d_s))


def unipc(velocity: Velocity, x: Tensor, timesteps: Sequence[float],
          callback: Callable[[int], None] | None = None) -> Tensor:
    """UniPC (Zhao et al., 2023) in flow form: a multistep predictor of order up to 2 (UniP)
    and the corrector UniC, on data estimates, with B(h) = e^{-h} - 1 ("bh2").

    This is Wan2.1's default solver and diffusers' `UniPCMultistepScheduler` as WanPipeline
    uses it (solver_order 2, flow prediction, lower_order_final): order 1 on the first step
    (no history) and on the last; the corrector refines each x_i with the model output at the
    uncorrected x_i, so it costs no extra model call.
    """
    ts = _times(timesteps)
    n = len(ts) - 1
    estimates: list[tuple[float, Tensor]] = []  # (lambda, data estimate) of the last two steps
    x_before, order_before = x, 0
    for i in range(n):
        t = ts[i]
        d = x - t * velocity(x, t)  # (B, C, T, H, W) data estimate at the uncorrected x
        if i > 0:  # UniC: redo the last step with the new estimate
            older = estimates[-2:-1] if order_before == 2 else []
            x = _uni_update(x_before, ts[i - 1], t, estimates[-1][1], older, d)
        estimates = (estimates + [(_log_snr(t), d)])[-2:]
        order = min(2, n - i, i + 1)
        x_before, order_before = x, order
        x = _uni_update(x, t, ts[i + 1], d, estimates[-2:-1] if order == 2 else [], None)
        if callback:
            callback(i)
    return x


def ddim_eta(velocity: Velocity, x: Tensor, timesteps: Sequence[float],
             callback: Callable[[int], None] | None = None, *, noise: Callable[[int], Tensor] | None = None,
             eta: float = 1.0) -> Tensor:
    """DDIM with stochasticity eta (Song et al. 2021), in flow form: eta 0 is Euler, eta 1
    DDPM's ancestral sampler.

    Each step from t to s splits the model's velocity into its data and noise estimates,
    d = x - t v and e = x + (1 - t) v, and lands on
        x' = (1 - s) d + s (sqrt(1 - f^2) e + f z),   f^2 = eta^2 (1 - SNR(t) / SNR(s)),
    with fresh noise z = noise(i) and SNR(t) = ((1 - t) / t)^2: DDIM's share of fresh noise,
    which depends on the SNRs only, so it is the same in the flow's scaling as in the
    variance-preserving one. Fresh noise lets later steps correct an earlier step's error
    rather than carry it to t = 0. The last step (to s = 0) is d.
    """
    if noise is None:
        raise ValueError("ddim_eta draws fresh noise at each step: give noise(i)")
    if not 0.0 <= eta <= 1.0:
        raise ValueError(f"eta must be in [0, 1], got {eta}")
    ts = _times(timesteps)
    for i, (t, s) in enumerate(zip(ts, ts[1:])):
        v = velocity(x, t)
        d, e = x - t * v, x + (1.0 - t) * v
        if s <= 0.0:
            x = d
        else:
            snr_ratio = 0.0 if t >= 1.0 else ((1.0 - t) * s / (t * (1.0 - s))) ** 2
            f2 = eta * eta * max(0.0, 1.0 - snr_ratio)
            x = (1.0 - s) * d + s * (math.sqrt(1.0 - f2) * e + math.sqrt(f2) * noise(i))
        if callback:
            callback(i)
    return x


SAMPLERS = {"euler": euler, "dpm++2m": dpm_solver_2m, "unipc": unipc, "ddim-eta": ddim_eta}
STOCHASTIC = {"ddim-eta"}  # samplers that take noise(i) and eta

# velocities(z_src, z_tar, t) -> (v_src, v_tar): the field under the source and the target prompt
PairVelocity = Callable[[Tensor, Tensor, float], tuple[Tensor, Tensor]]


def flow_edit(velocities: PairVelocity, x_src: Tensor, timesteps: Sequence[float], noise: Callable[[int], Tensor],
              callback: Callable[[int], None] | None = None) -> Tensor:
    """FlowEdit (Kulikov et al. 2024): edit x_src from a source prompt to a target prompt
    without inverting it, by integrating the difference of the two prompts' velocities along
    a path that starts at x_src.

    Each step from t to t' draws fresh noise eps = noise(i), noises the source the forward
    way, z_src = (1 - t) x_src + t eps, moves the edit the same way, z_tar = z + z_src - x_src,
    and takes an Euler step with the difference v_tar(z_tar) - v_src(z_src): what the target
    prompt changes, while the noise, and so whatever both prompts agree on, cancels. z starts
    at x_src at timesteps[0] (a share of the schedule, as SDEdit's strength) and the result is
    z at timesteps[-1]. When each prompt's field is that of a single point (x_src for the
    source, b for the target) every step lands on the straight line from x_src to b, and t = 0
    on b exactly, whatever the noise.
    """
    ts = _times(timesteps)
    z = x_src
    for i, (t, t_next) in enumerate(zip(ts, ts[1:])):
        z_src = (1.0 - t) * x_src + t * noise(i)
        v_src, v_tar = velocities(z_src, z + z_src - x_src, t)
        z = z + (t_next - t) * (v_tar - v_src)
        if callback:
            callback(i)
    return z


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
