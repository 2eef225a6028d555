"""Flow matching and samplers, checked on a Gaussian whose exact velocity field is known."""


import pytest
import torch

from kino.diffusion import (SAMPLERS, STOCHASTIC, ddim_eta, dpm_solver_2m, euler, flow_edit, guided, interpolate,
                            logit_normal, predict_x0, sampling_timesteps, shift_for_tokens, shift_timesteps,
                            velocity_target)

MU, S = 0.7, 0.3  # data: x0 ~ N(MU, S^2) per element


def exact_velocity(x, t, mu=MU):
    """E[eps - x0 | x_t] for Gaussian data: the flow-matching optimum."""
    if t >= 1.0:
        return x - mu  # x_1 = eps exactly; E[x0] = mu
    var = (1 - t) ** 2 * S ** 2 + t ** 2
    resid = x - (1 - t) * mu
    e_x0 = mu + (1 - t) * S ** 2 / var * resid
    e_eps = t / var * resid
    return e_eps - e_x0


def ode_error(sampler, steps, shift=1.0, n=2000):
    """Max distance to the exact ODE endpoint: for Gaussian data the flow keeps the
    standardised value, so noise eps ends at MU + S * eps."""
    eps = torch.randn(n, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    x = sampler(exact_velocity, eps.clone(), sampling_timesteps(steps, shift))
    return (x - (MU + S * eps)).abs().max().item()


def test_interpolation_and_target():
    x0, eps = torch.randn(2, 4, 3, 8, 8), torch.randn(2, 4, 3, 8, 8)
    t = torch.tensor([0.25, 1.0])
    xt = interpolate(x0, eps, t)
    assert torch.allclose(xt[0], 0.75 * x0[0] + 0.25 * eps[0]) and torch.equal(xt[1], eps[1])
    v = velocity_target(x0, eps)
    assert torch.allclose(predict_x0(xt, t, v), x0, atol=1e-6)


def test_per_frame_timesteps_broadcast_over_frames():
    x0, eps = torch.randn(2, 4, 3, 8, 8), torch.randn(2, 4, 3, 8, 8)
    t = torch.tensor([[0.0, 0.5, 1.0], [1.0, 1.0, 0.0]])  # (B, T)
    xt = interpolate(x0, eps, t)
    assert torch.equal(xt[0, :, 0], x0[0, :, 0]) and torch.equal(xt[0, :, 2], eps[0, :, 2])
    assert torch.allclose(xt[0, :, 1], 0.5 * (x0[0, :, 1] + eps[0, :, 1]))
    assert torch.equal(xt[1, :, 2], x0[1, :, 2])
    with pytest.raises(ValueError, match="timesteps"):
        interpolate(x0, eps, torch.zeros(2, 3, 1))


@pytest.mark.parametrize("name", sorted(set(SAMPLERS) - STOCHASTIC))
@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_samplers_converge_to_the_exact_flow(name, shift):
    coarse, fine = ode_error(SAMPLERS[name], 10, shift), ode_error(SAMPLERS[name], 40, shift)
    assert fine < coarse / 3 and fine < 0.15, (coarse, fine)


def test_ddim_eta_is_euler_at_0_and_samples_the_data_at_any_eta():
    g = torch.Generator().manual_seed(3)
    eps = torch.randn(20000, dtype=torch.float64, generator=g)
    fresh = torch.randn(300, 20000, dtype=torch.float64, generator=g)
    ts = sampling_timesteps(30, 2.0)
    x = ddim_eta(exact_velocity, eps.clone(), ts, noise=lambda i: fresh[i], eta=0.0)
    assert torch.allclose(x, euler(exact_velocity, eps.clone(), ts), atol=1e-12)
    for eta in (0.5, 1.0):
        def std_error(steps):
            x = ddim_eta(exact_velocity, eps.clone(), sampling_timesteps(steps), noise=lambda i: fresh[i], eta=eta)
            assert abs(x.mean().item() - MU) < 0.01  # 20,000 samples: within ~0.006 by chance
            return abs(x.std().item() - S), x

        coarse, _ = std_error(30)
        fine, x = std_error(300)
        # the exact field's samples tend to N(MU, S^2) as the steps shrink (first order, like Euler)
        assert fine < 0.01 and fine < coarse / 3, (eta, coarse, fine)
        # and they are not the ODE's map of the start noise: fresh noise moved them off it
        assert (x - (MU + S * eps)).abs().mean() > 0.05
    with pytest.raises(ValueError, match="noise"):
        ddim_eta(exact_velocity, eps, ts)
    with pytest.raises(ValueError, match="eta"):
        ddim_eta(exact_velocity, eps, ts, noise=lambda i: fresh[i], eta=1.5)


def test_second_order_beats_euler():
    assert ode_error(dpm_solver_2m, 20) < ode_error(euler, 20) / 4


def test_straight_paths_are_exact_in_one_step():
    # a single data point: trajectories are straight lines, so one Euler step is exact
    c = torch.tensor([0.3, -1.2])
    v = lambda x, t: (x - c) / t  # noqa: E731
    x = torch.randn(2, dtype=torch.float64)
    assert torch.allclose(euler(v, x, [1.0, 0.0]), c.double())
    assert torch.allclose(dpm_solver_2m(v, x, sampling_timesteps(5, 3.0)), c.double())


def test_logit_normal_and_shifts():
    t = logit_normal((100_000,), generator=torch.Generator().manual_seed(0))
    assert 0 < t.min() and t.max() < 1 and abs(t.median().item() - 0.5) < 0.01
    ts = torch.linspace(0, 1, 11)
    shifted = shift_timesteps(ts, 3.0)
    assert shifted[0] == 0 and shifted[-1] == 1 and torch.all(shifted[1:-1] > ts[1:-1])
    assert torch.equal(shift_timesteps(ts, 1.0), ts)
    assert shift_for_tokens(16) == pytest.approx(1.0) and shift_for_tokens(10**6) == pytest.approx(3.0)
    assert 1.0 < shift_for_tokens(512) < shift_for_tokens(2048) < 3.0
    st = sampling_timesteps(4, 2.0)
    assert st[0] == 1 and st[-1] == 0 and torch.all(st[1:] < st[:-1])
    with pytest.raises(ValueError):
        sampling_timesteps(0)


def test_guidance_combines_branches():
    vc = lambda x, t: torch.ones_like(x)  # noqa: E731
    vu = lambda x, t: torch.zeros_like(x)  # noqa: E731
    x = torch.zeros(3)
    assert torch.equal(guided(vc, vu, 5.0)(x, 0.5), torch.full((3,), 5.0))
    assert guided(vc, vu, 1.0) is vc


def test_samplers_reject_bad_timesteps():
    with pytest.raises(ValueError, match="decreasing"):
        euler(exact_velocity, torch.zeros(2), [0.0, 1.0])


def test_flow_edit_transports_one_gaussian_onto_another():
    """Source data N(MU, S^2), target N(MU + 0.5, S^2): with the exact fields the noise cancels
    and FlowEdit over the whole schedule is the shift by 0.5 (the optimal transport), for any
    noise and any step count; at strength 0 nothing moves."""
    gen = torch.Generator().manual_seed(1)
    x_src = MU + S * torch.randn(500, dtype=torch.float64, generator=gen)
    noises = []

    def noise(i):
        noises.append(torch.randn(500, dtype=torch.float64, generator=gen))
        return noises[-1]

    def velocities(z_src, z_tar, t):
        return exact_velocity(z_src, t), exact_velocity(z_tar, t, MU + 0.5)

    for steps in (3, 12):
        out = flow_edit(velocities, x_src, sampling_timesteps(steps, 2.0), noise)
        torch.testing.assert_close(out, x_src + 0.5, rtol=0, atol=1e-9)
    assert len(noises) == 15 and not torch.equal(noises[0], noises[1])  # fresh noise every step


def test_flow_edit_part_of_the_schedule_lands_on_the_target_point():
    """Point masses (the source at x_src, the target at b): every step stays on the line from
    x_src to b, and a schedule cut at t0 = 0.5 (strength 0.5) still ends on b exactly."""
    x_src, b = torch.tensor([1.0, -2.0], dtype=torch.float64), torch.tensor([0.5, 3.0], dtype=torch.float64)
    seen = []

    def velocities(z_src, z_tar, t):
        seen.append(t)
        return (z_src - x_src) / t, (z_tar - b) / t

    ts = [0.5, 0.3, 0.1, 0.0]
    noise = lambda i: torch.randn(2, dtype=torch.float64)  # noqa: E731
    torch.testing.assert_close(flow_edit(velocities, x_src, ts, noise), b, rtol=0, atol=1e-12)
    assert seen == ts[:-1]
    mid = flow_edit(velocities, x_src, ts[:2], noise)  # stopped at t = 0.3: 2/5 of the way
    torch.testing.assert_close(mid, x_src + (b - x_src) * 0.4, rtol=0, atol=1e-12)
