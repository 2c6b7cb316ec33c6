"""UniSegDiff's staged training and inference (004 section 2.2). Owns no network: the sampler
takes a function returning the eps head's and the x0 head's outputs.

Stages of the chain t in {0, ..., T-1}, with thresholds high > low:
  rapid segmentation    t > high         trained at t = T-1, mainly x0   (alpha:beta = 1:3)
  probabilistic model   low < t <= high  trained as drawn, both          (1:1)
  denoising refinement  t <= low         trained at t = 0, mainly eps    (3:1)
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch

from latentseg.diffusion.samplers import _as_batch, ddim_jump, randn
from latentseg.diffusion.schedule import DiffusionSchedule

# 004 section 2.2: alpha:beta per stage, scaled so that alpha + beta = 2 (uniform training's 1 + 1)
STAGE_WEIGHTS = ((0.5, 1.5), (1.0, 1.0), (1.5, 0.5))


@dataclass(frozen=True)
class Stages:
    high: int = 600
    low: int = 300
    num_timesteps: int = 1000

    def __post_init__(self) -> None:
        if not 0 < self.low < self.high < self.num_timesteps:
            raise ValueError(
                f"staged thresholds must satisfy 0 < low < high < T={self.num_timesteps}, "
                f"got high={self.high}, low={self.low}"
            )


class StagedTimesteps(NamedTuple):
    t: torch.Tensor  # (B,) the timesteps the network sees
    alpha: torch.Tensor  # (B,) weight of the noise loss
    beta: torch.Tensor  # (B,) weight of the segmentation loss


def staged_timesteps(t: torch.Tensor, stages: Stages, last_stage_t: str = "zero") -> StagedTimesteps:
    """Map uniformly drawn timesteps to the stage rules of 004 section 2.2 (loss weights of Eq. 1).

    `last_stage_t="zero"` sets t <= low to 0 as the paper does; "sampled" keeps the drawn t.
    """
    if last_stage_t not in ("zero", "sampled"):
        raise ValueError(f"last_stage_t must be 'zero' or 'sampled', got {last_stage_t!r}")
    rapid, refine = t > stages.high, t <= stages.low
    out = torch.where(rapid, torch.full_like(t, stages.num_timesteps - 1), t)
    if last_stage_t == "zero":
        out = torch.where(refine, torch.zeros_like(t), out)
    stage = torch.where(rapid, 0, torch.where(refine, 2, 1))
    weights = torch.tensor(STAGE_WEIGHTS, dtype=torch.float32, device=t.device)[stage]
    return StagedTimesteps(out, weights[:, 0], weights[:, 1])


HeadsFn = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


class StagedResult(NamedTuple):
    samples: torch.Tensor  # (2 * draws * B, ...): branch-major (x0 branch first), then draws
    network_calls: int  # sequential calls of `heads_fn`
    latent_evaluations: int  # latents passed through the network in all, per conditioning image


def middle_timesteps(stages: Stages, steps: int) -> list[int]:
    """DDIM timesteps from high-1 down to low-1 (the last is where the stage ends, not evaluated):
    with 600/300 and 10 steps, 599, 569, ..., 329 -> 299 (interval 30, 004 section 2.2)."""
    if steps < 1:
        raise ValueError(f"staged sampling needs >= 1 middle step, got {steps}")
    return [int(v) for v in np.round(np.linspace(stages.high - 1, stages.low - 1, steps + 1))]


@torch.no_grad()
def staged_sample(
    heads_fn: HeadsFn,
    x_T: torch.Tensor,
    schedule: DiffusionSchedule,
    stages: Stages,
    middle_steps: int = 10,
    draws: int = 10,
    eta_final: float = 1.0,
    generator: torch.Generator | None = None,
    final_head: str = "eps",
) -> StagedResult:
    """004 section 2.2 staged inference, for a batch of B starting latents x_T.

    1. the x0 head jumps from T-1 to high-1 in one step;
    2. DDIM from high-1 to low-1 in `middle_steps` steps, once with each head (two branches, one batch);
    3. from low-1 the eps head takes each branch to t = 0 in one step, `draws` times with fresh noise
       (DDIM Eq. 12 with eta = `eta_final`), giving 2 * draws latents per image.
       `final_head="x0"` takes this last step with the x0 head instead (not in 004: an option for
       models whose eps head is the weaker one; the benchmark measures both).
    """
    if final_head not in ("eps", "x0"):
        raise ValueError(f"final_head must be 'eps' or 'x0', got {final_head!r}")
    if draws < 1:
        raise ValueError(f"staged sampling needs >= 1 draw per branch, got {draws}")
    batch = x_T.shape[0]
    top = schedule.num_timesteps - 1
    calls = 0

    # 1. rapid segmentation: one x0-head step T-1 -> high-1
    _, x0_hat = heads_fn(x_T, _as_batch(top, x_T))
    calls += 1
    x0, eps = schedule.split("x0", x0_hat, x_T, _as_batch(top, x_T))
    ts = middle_timesteps(stages, middle_steps)
    x = ddim_jump(schedule, x0, eps, top, ts[0])

    # 2. probabilistic modelling: both branches in one batch; branch 0 follows the x0 head, 1 the eps head
    x = torch.cat([x, x])
    for t, s in zip(ts[:-1], ts[1:], strict=True):
        eps_hat, x0_hat = heads_fn(x, _as_batch(t, x))
        calls += 1
        tb = _as_batch(t, x[:batch])
        x0_a, eps_a = schedule.split("x0", x0_hat[:batch], x[:batch], tb)
        x0_b, eps_b = schedule.split("eps", eps_hat[batch:], x[batch:], tb)
        x = ddim_jump(schedule, torch.cat([x0_a, x0_b]), torch.cat([eps_a, eps_b]), t, s)

    # 3. denoising refinement: one eps-head (or x0-head) evaluation per branch, `draws` noisy jumps to t = 0
    low = ts[-1]
    eps_hat, x0_hat = heads_fn(x, _as_batch(low, x))
    calls += 1
    x0, eps = schedule.split(final_head, eps_hat if final_head == "eps" else x0_hat, x, _as_batch(low, x))
    outs = [
        ddim_jump(schedule, x0, eps, low, 0, eta_final, randn(tuple(x.shape), generator, x) if eta_final > 0 else None)
        for _ in range(draws)
    ]
    samples = torch.stack(outs, dim=1)  # (2B, draws, ...): branch-major
    samples = samples.reshape(2, batch, draws, *x.shape[1:]).transpose(1, 2).reshape(-1, *x.shape[1:])
    return StagedResult(samples, calls, 1 + 2 * (calls - 1))
