import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler

from latentseg.diffusion import DiffusionSchedule


@pytest.mark.parametrize("name,diffusers_name", [("linear", "linear"), ("cosine", "squaredcos_cap_v2")])
def test_betas_match_diffusers(name, diffusers_name):
    ours = DiffusionSchedule(name, 1000)
    ref = DDPMScheduler(num_train_timesteps=1000, beta_schedule=diffusers_name)
    np.testing.assert_allclose(ours.betas, ref.betas.double().numpy(), rtol=1e-5, atol=1e-7)
    assert ours.alphas_cumprod.dtype == np.float64
    assert np.all(np.diff(ours.alphas_cumprod) < 0)


def test_q_sample_matches_closed_form_and_diffusers():
    sched = DiffusionSchedule("linear", 1000)
    ref = DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear")
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(4, 3, 8, 8, generator=g), torch.randn(4, 3, 8, 8, generator=g)
    t = torch.tensor([0, 10, 500, 999])
    ours = sched.q_sample(x0.double(), t, noise.double())
    theirs = ref.add_noise(x0, noise, t)
    torch.testing.assert_close(ours.float(), theirs, atol=1e-5, rtol=1e-5)
    ab = sched.alphas_cumprod[500]
    torch.testing.assert_close(ours[2], np.sqrt(ab) * x0[2].double() + np.sqrt(1 - ab) * noise[2].double())


@pytest.mark.parametrize("prediction_type", ["eps", "x0", "v"])
def test_split_inverts_each_parameterization(prediction_type):
    sched = DiffusionSchedule("cosine", 1000)
    g = torch.Generator().manual_seed(1)
    x0, noise = (
        torch.randn(5, 2, 6, 6, 6, generator=g).double(),
        torch.randn(5, 2, 6, 6, 6, generator=g).double(),
    )
    t = torch.tensor([0, 1, 300, 700, 998])
    x_t = sched.q_sample(x0, t, noise)
    out = sched.target(prediction_type, x0, t, noise)
    x0_hat, eps_hat = sched.split(prediction_type, out, x_t, t)
    torch.testing.assert_close(x0_hat, x0, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(eps_hat, noise, atol=1e-6, rtol=1e-6)


def test_posterior_matches_closed_form_and_eq8():
    """q(x_{t-1}|x_t,x0) against Ho et al. Eq. 7, and with x0 from eps against 003 Eq. 8."""
    sched = DiffusionSchedule("linear", 1000)
    g = torch.Generator().manual_seed(2)
    x0, eps = (
        torch.randn(3, 1, 4, 4, generator=g).double(),
        torch.randn(3, 1, 4, 4, generator=g).double(),
    )
    t = torch.tensor([1, 400, 999])
    x_t = sched.q_sample(x0, t, eps)
    mean, var = sched.posterior_mean_variance(x0, x_t, t)
    for i, ti in enumerate(t.tolist()):
        b, ab, ab_prev = sched.betas[ti], sched.alphas_cumprod[ti], sched.alphas_cumprod[ti - 1]
        expect_mean = np.sqrt(ab_prev) * b / (1 - ab) * x0[i] + np.sqrt(1 - b) * (1 - ab_prev) / (1 - ab) * x_t[i]
        torch.testing.assert_close(mean[i], expect_mean)
        assert var[i].item() == pytest.approx((1 - ab_prev) / (1 - ab) * b)
        eq8 = (x_t[i] - b / np.sqrt(1 - ab) * eps[i]) / np.sqrt(1 - b)
        torch.testing.assert_close(mean[i], eq8)


def test_posterior_at_t0_is_x0():
    sched = DiffusionSchedule("linear", 1000)
    x0 = torch.randn(2, 1, 3, 3).double()
    x_t = sched.q_sample(x0, torch.tensor([0, 0]), torch.randn_like(x0))
    mean, var = sched.posterior_mean_variance(x0, x_t, torch.tensor([0, 0]))
    torch.testing.assert_close(mean, x0)
    assert torch.all(var == 0)


def test_unknown_names_are_rejected():
    with pytest.raises(ValueError, match="unknown beta schedule"):
        DiffusionSchedule("quadratic")
    with pytest.raises(ValueError, match="unknown prediction_type"):
        DiffusionSchedule().target("score", torch.zeros(1), torch.zeros(1, dtype=torch.long), torch.zeros(1))
