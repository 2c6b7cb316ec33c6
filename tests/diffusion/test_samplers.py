"""Every sampler runs a full loop with a toy model and is checked against a known answer."""

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler

from latentseg.diffusion import (
    DDIMSampler,
    DDPMSampler,
    DiffusionSchedule,
    ddim_jump,
    evenly_spaced_timesteps,
    sample_loop,
)


def toy_eps_model(x, t):
    """A fixed, non-trivial eps network: depends on x and t."""
    scale = (t.float() / 1000.0).reshape(-1, *([1] * (x.ndim - 1)))
    return torch.tanh(0.7 * x + 0.3) * (0.5 + scale) + 0.1 * torch.sin(3 * x)


@pytest.mark.parametrize("num_steps,eta", [(10, 0.0), (2, 0.0), (25, 0.5)])
def test_ddim_loop_matches_diffusers(num_steps, eta):
    ref = DDIMScheduler(
        num_train_timesteps=1000,
        beta_schedule="linear",
        clip_sample=False,
        set_alpha_to_one=True,
        steps_offset=0,
        timestep_spacing="leading",
        prediction_type="epsilon",
    )
    ref.set_timesteps(num_steps)
    ours = DDIMSampler(DiffusionSchedule("linear", 1000), "eps", eta=eta)
    ours.set_timesteps(ref.timesteps.tolist())  # the same explicit list
    assert ours.timesteps == ref.timesteps.tolist()

    g = torch.Generator().manual_seed(0)
    x_ref = torch.randn(2, 3, 8, 8, generator=g, dtype=torch.float64)
    x_ours = x_ref.clone()
    noises = [torch.randn(2, 3, 8, 8, generator=g, dtype=torch.float64) for _ in ours.timesteps]
    for t, noise in zip(ours.timesteps, noises, strict=True):
        tb = torch.full((2,), t)
        x_ref = ref.step(toy_eps_model(x_ref, tb), t, x_ref, eta=eta, variance_noise=noise).prev_sample

        out = toy_eps_model(x_ours, tb)
        if eta > 0 and t != ours.timesteps[-1]:
            # feed the same noise draw as diffusers got
            x0, eps = ours.schedule.split("eps", out, x_ours, tb)
            x_ours = ddim_jump(ours.schedule, x0, eps, t, ours._prev[t], eta, noise)
        else:
            x_ours = ours.step(out, t, x_ours).prev_sample
    torch.testing.assert_close(x_ours, x_ref, atol=1e-5, rtol=1e-5)


def test_evenly_spaced_timesteps_follow_003():
    assert evenly_spaced_timesteps(2, 1000) == [999, 0]
    assert evenly_spaced_timesteps(1, 1000) == [999]
    five = evenly_spaced_timesteps(5, 1000)
    assert five == [999, 749, 500, 250, 0]
    assert evenly_spaced_timesteps(1000, 1000) == list(range(999, -1, -1))
    with pytest.raises(ValueError):
        evenly_spaced_timesteps(0, 1000)


def test_prev_timestep_comes_from_the_list_not_t_minus_T_over_K():
    sampler = DDIMSampler(DiffusionSchedule(), "eps")
    sampler.set_timesteps(3)  # [999, 500, 0]: spacing is not T // K = 333
    assert sampler.timesteps == [999, 500, 0]
    assert sampler._prev == {999: 500, 500: 0, 0: -1}


def test_no_clipping_of_x0():
    sampler = DDIMSampler(DiffusionSchedule(), "x0")
    sampler.set_timesteps(2)
    x = torch.randn(1, 1, 4, 4)
    big = torch.full_like(x, 5.0)
    out = sampler.step(big, 0, x)
    torch.testing.assert_close(out.pred_x0, big)
    torch.testing.assert_close(out.prev_sample, big)  # the last step lands exactly on x0


def _gaussian_eps_model(mu, s, sched):
    """Bayes-optimal eps for data x0 ~ N(mu, s^2): E[eps | x_t]."""

    def fn(x, t):
        ab = torch.from_numpy(sched.alphas_cumprod[t.numpy()]).to(x.dtype).reshape(-1, 1)
        return (1 - ab).sqrt() * (x - ab.sqrt() * mu) / (ab * s**2 + 1 - ab)

    return fn


def test_ddim_eta1_with_all_steps_matches_ddpm_in_distribution():
    sched = DiffusionSchedule("linear", 1000)
    mu, s = 1.5, 0.4
    model = _gaussian_eps_model(mu, s, sched)
    n = 4000
    x_T = torch.randn(n, 1, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    ddpm = sample_loop(model, x_T, DDPMSampler(sched, "eps"), torch.Generator().manual_seed(4))
    ddim = DDIMSampler(sched, "eps", eta=1.0)
    ddim.set_timesteps(1000)
    ddim_out = sample_loop(model, x_T, ddim, torch.Generator().manual_seed(4))
    # same noise stream and, with eta = 1, the same transition: identical up to rounding
    torch.testing.assert_close(ddim_out, ddpm, atol=1e-6, rtol=1e-6)
    for out in (ddpm, ddim_out):
        assert out.mean().item() == pytest.approx(mu, abs=0.03)
        assert out.std().item() == pytest.approx(s, abs=0.03)
    # a different noise stream: same distribution, different samples
    other = sample_loop(model, x_T, ddim, torch.Generator().manual_seed(5))
    assert not torch.allclose(other, ddpm)
    assert abs(other.mean().item() - ddpm.mean().item()) < 0.03
    assert abs(other.std().item() - ddpm.std().item()) < 0.03


def test_deterministic_ddim_converges_to_the_data_distribution_as_steps_grow():
    """eta = 0 follows the probability-flow ODE: the mean is right at any K, the spread converges."""
    sched = DiffusionSchedule("linear", 1000)
    model = _gaussian_eps_model(-0.5, 0.2, sched)
    x_T = torch.randn(4000, 1, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    stds = []
    for k in (2, 10, 50, 1000):
        ddim = DDIMSampler(sched, "eps")
        ddim.set_timesteps(k)
        out = sample_loop(model, x_T, ddim)
        assert out.mean().item() == pytest.approx(-0.5, abs=0.02)
        stds.append(out.std().item())
    assert stds == sorted(stds)
    assert stds[-1] == pytest.approx(0.2, abs=0.01)


def test_jump_rejects_forward_jumps_and_missing_noise():
    sched = DiffusionSchedule()
    x = torch.zeros(1, 1)
    with pytest.raises(ValueError, match="backwards"):
        ddim_jump(sched, x, x, 10, 10)
    with pytest.raises(ValueError, match="noise"):
        ddim_jump(sched, x, x, 10, 5, eta=1.0)


def test_jump_to_clean_end_returns_x0():
    sched = DiffusionSchedule()
    x0, eps = torch.randn(2, 3).double(), torch.randn(2, 3).double()
    np.testing.assert_allclose(ddim_jump(sched, x0, eps, 599, -1).numpy(), x0.numpy())
