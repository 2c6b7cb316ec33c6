"""004 section 2.2: staged training timesteps and staged inference with two heads."""

import pytest
import torch

from latentseg.diffusion import DiffusionSchedule, StagedSampler, Stages, middle_timesteps, staged_timesteps


def as_denoise(heads_fn):
    """A (x_t, t) -> (eps, x0) oracle as the samplers' `denoise(z, t, heads) -> {head: output}`."""

    def denoise(x_t, t, heads):
        eps, x0 = heads_fn(x_t, t)
        return {name: value for name, value in (("eps", eps), ("x0", x0)) if name in heads}

    return denoise


def staged_sample(heads_fn, x_T, schedule, stages, middle_steps, draws, generator=None, final_head="eps"):
    return StagedSampler(schedule, stages, middle_steps, final_head).run(as_denoise(heads_fn), x_T, draws, generator)


def test_staged_timesteps_follow_the_three_stages():
    t = torch.tensor([999, 700, 601, 600, 450, 301, 300, 120, 0])
    st = staged_timesteps(t, Stages(600, 300))
    assert st.t.tolist() == [999, 999, 999, 600, 450, 301, 0, 0, 0]
    # alpha:beta = 1:3, 1:1, 3:1
    assert (st.seg_weight / st.noise_weight).tolist() == pytest.approx([3, 3, 3, 1, 1, 1, 1 / 3, 1 / 3, 1 / 3])
    kept = staged_timesteps(t, Stages(600, 300), last_stage_t="sampled")
    assert kept.t.tolist() == [999, 999, 999, 600, 450, 301, 300, 120, 0]


@pytest.mark.parametrize("high,low", [(300, 300), (300, 600), (600, 0), (1000, 300)])
def test_thresholds_out_of_order(high, low):
    with pytest.raises(ValueError, match="0 < low < high < T"):
        Stages(high, low)


def test_middle_timesteps_are_the_papers_interval_of_30():
    ts = middle_timesteps(Stages(600, 300), 10)
    assert ts[0] == 599 and ts[-1] == 299 and len(ts) == 11
    assert {a - b for a, b in zip(ts, ts[1:], strict=False)} == {30}


def test_staged_sample_with_oracle_heads_lands_on_x0_in_12_calls():
    sched = DiffusionSchedule()
    x0_true = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    calls = []

    def oracle(x_t, t):  # both heads exact for x0_true (batch repeats it per branch)
        calls.append((x_t.shape[0], int(t[0])))
        x0 = x0_true.repeat(x_t.shape[0] // 3, 1, 1, 1)
        ab = sched.alpha_bar(t, x_t)
        return (x_t - ab.sqrt() * x0) / (1 - ab).sqrt(), x0

    g = torch.Generator().manual_seed(1)
    result = staged_sample(oracle, torch.randn(3, 4, 8, 8, generator=g), sched, Stages(600, 300), 10, 5, generator=g)
    assert result.network_calls == len(calls) == 12
    assert [b for b, _ in calls] == [3] + [6] * 11  # the branches share one batch after the first jump
    assert [t for _, t in calls] == [999, *middle_timesteps(Stages(600, 300), 10)]
    assert result.latent_evaluations == 23
    calls.clear()  # staged-11: nine middle steps (interval 33.3)
    eleven = staged_sample(oracle, torch.randn(3, 4, 8, 8, generator=g), sched, Stages(600, 300), 9, 5, generator=g)
    assert eleven.network_calls == len(calls) == 11
    assert [t for _, t in calls] == [999, *middle_timesteps(Stages(600, 300), 9)]
    assert result.samples.shape == (2 * 5 * 3, 4, 8, 8)
    samples = result.samples.reshape(10, 3, 4, 8, 8)
    # at t = 0 a sample is x0 plus noise of std sqrt(1 - alpha-bar_0) = 0.01, with fresh noise per draw
    assert (samples - x0_true).abs().max() < 0.1
    assert (samples[0] - samples[1]).abs().max() > 1e-4


def test_staged_sample_final_step_with_the_x0_head():
    sched = DiffusionSchedule()
    x0_true = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))

    def eps_wrong_x0_right(x_t, t):  # the eps head is useless, the x0 head exact
        return torch.zeros_like(x_t), x0_true.repeat(x_t.shape[0] // 2, 1, 1, 1)

    g = torch.Generator().manual_seed(1)
    x_T = torch.randn(2, 4, 8, 8, generator=g)
    good = staged_sample(eps_wrong_x0_right, x_T, sched, Stages(), 10, 2, generator=g, final_head="x0")
    assert (good.samples.reshape(4, 2, 4, 8, 8)[:2] - x0_true).abs().max() < 0.1  # the x0 branch
    bad = staged_sample(eps_wrong_x0_right, x_T, sched, Stages(), 10, 2, generator=g, final_head="eps")
    assert (bad.samples.reshape(4, 2, 4, 8, 8)[:2] - x0_true).abs().max() > 0.1
    with pytest.raises(ValueError, match="final_head"):
        staged_sample(eps_wrong_x0_right, x_T, sched, Stages(), 10, 2, final_head="v")
