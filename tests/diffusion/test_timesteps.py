"""002 section 3.1: importance sampling of timesteps by their recent loss."""

import pytest
import torch

from latentseg.diffusion import ImportanceTimesteps, uniform_timesteps


def feed(sampler, loss_of_t, rounds=3):
    """Every timestep's loss, `rounds` times over, so every bin's history fills."""
    t = torch.arange(sampler.num_timesteps)
    for _ in range(rounds):
        sampler.update(t, loss_of_t(t.double()))


def test_uniform_with_weight_one_until_every_bin_has_its_history():
    s = ImportanceTimesteps(100, bins=10, history=5)
    t, w, _ = s.sample(2000, generator=torch.Generator().manual_seed(0))
    assert torch.equal(w, torch.ones(2000))
    assert 0 <= t.min() and t.max() <= 99 and len(t.unique()) > 90
    s.update(torch.arange(0, 100, 2), torch.ones(50))  # 5 losses per bin of 10 timesteps: warm
    assert s.warm
    s = ImportanceTimesteps(100, bins=10, history=5)
    s.update(torch.arange(0, 90), torch.ones(90))  # the last bin has none yet
    assert not s.warm


def test_timesteps_follow_the_root_mean_square_loss():
    s = ImportanceTimesteps(1000, bins=4, history=10, uniform_share=0.0)
    feed(s, lambda t: torch.where(t >= 500, 3.0, 1.0), rounds=1)  # only the last 10 per bin count
    assert s.probabilities().tolist() == pytest.approx([1 / 8, 1 / 8, 3 / 8, 3 / 8])
    t, w, _ = s.sample(20000, generator=torch.Generator().manual_seed(0))
    assert (t >= 500).float().mean().item() == pytest.approx(0.75, abs=0.02)
    # weights 1 / (T p(t)): 1 / (1000 * (1/8) / 250) = 2 for low t, 2/3 for high t
    assert w[t < 500].unique().tolist() == pytest.approx([2.0]) and w[t >= 500].unique().tolist() == pytest.approx(
        [2 / 3]
    )


def test_weighted_loss_is_unbiased():
    """E[w(t) f(t)] under importance sampling equals E[f(t)] under uniform sampling."""
    s = ImportanceTimesteps(1000, bins=20, history=10)
    f = lambda t: (t / 1000.0) ** 2 + 0.05  # noqa: E731
    feed(s, f)
    t, w, _ = s.sample(200_000, generator=torch.Generator().manual_seed(1))
    uniform = uniform_timesteps(200_000, 1000, generator=torch.Generator().manual_seed(2))
    assert (w * f(t.double())).mean().item() == pytest.approx(f(uniform.double()).mean().item(), rel=0.02)


def test_history_forgets_the_oldest_losses():
    s = ImportanceTimesteps(10, bins=1, history=3)
    s.update(torch.tensor([1, 2, 3, 4]), torch.tensor([1.0, 2.0, 3.0, 4.0]))
    assert s.losses[0].tolist() == [2.0, 3.0, 4.0]


@pytest.mark.parametrize("bins,history,message", [(0, 10, "bins <= T"), (1001, 10, "bins <= T"), (10, 0, "history")])
def test_bad_settings(bins, history, message):
    with pytest.raises(ValueError, match=message):
        ImportanceTimesteps(1000, bins, history)
