"""UniSegDiff's staged training and inference (004 section 2.2). Owns no network: the sampler
takes a function returning the eps head's and the x0 head's outputs.

Stages of the chain t in {0, ..., T-1}, with thresholds high > low:
  rapid segmentation    t > high         trained at t = T-1, mainly x0   (alpha:beta = 1:3)
  probabilistic model   low < t <= high  trained as drawn, both          (1:1)
  denoising refinement  t <= low         trained at t = 0, mainly eps    (3:1)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch

from latentseg.diffusion.samplers import Denoise, as_batch, ddim_jump, randn
from latentseg.diffusion.schedule import DiffusionSchedule
from latentseg.diffusion.timesteps import TimestepDraw, uniform_timesteps

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


def staged_timesteps(t: torch.Tensor, stages: Stages, last_stage_t: str = "zero") -> TimestepDraw:
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
    return TimestepDraw(out, weights[:, 0], weights[:, 1])  # t, alpha (noise), beta (segmentation)


class StagedTimesteps:
    """004 section 2.2 as a timestep rule: t drawn uniformly, then moved by its stage, and the two
    loss terms weighted alpha:beta per stage (`staged_timesteps`)."""

    def __init__(self, stages: Stages, last_stage_t: str = "zero"):
        self.stages, self.last_stage_t = stages, last_stage_t

    def sample(
        self, batch_size: int, device: torch.device | str = "cpu", generator: torch.Generator | None = None
    ) -> TimestepDraw:
        t = uniform_timesteps(batch_size, self.stages.num_timesteps, device, generator)
        return TimestepDraw(*staged_timesteps(t, self.stages, self.last_stage_t))

    def update(self, t: torch.Tensor, losses: torch.Tensor) -> None:
        """The stages are fixed: nothing is learned from the losses."""

    def state(self) -> dict[str, torch.Tensor]:
        return {}

    def load_state(self, state: dict[str, torch.Tensor]) -> None:
        """Nothing to restore."""


class StagedResult(NamedTuple):
    samples: torch.Tensor  # (2 * draws * B, ...): branch-major (x0 branch first), then draws
    network_calls: int  # sequential calls of the network
    latent_evaluations: int  # latents passed through the network in all, per conditioning image


def middle_timesteps(stages: Stages, steps: int) -> list[int]:
    """DDIM timesteps from high-1 down to low-1 (the last is where the stage ends, not evaluated):
    with 600/300 and 10 steps, 599, 569, ..., 329 -> 299 (interval 30, 004 section 2.2)."""
    if steps < 1:
        raise ValueError(f"staged sampling needs >= 1 middle step, got {steps}")
    return [int(v) for v in np.round(np.linspace(stages.high - 1, stages.low - 1, steps + 1))]


class StagedSampler:
    """004 section 2.2 staged inference for a two-head (eps, x0) denoiser, `num_samples / 2` draws
    per branch:

    1. the x0 head jumps from T-1 to high-1 in one step;
    2. DDIM from high-1 to low-1 in `middle_steps` steps, once with each head (two branches, one batch);
    3. from low-1 the eps head takes each branch to t = 0 in one step, `draws` times with fresh noise
       (DDIM Eq. 12 with eta = `eta_final`), giving 2 * draws latents per image.
       `final_head="x0"` takes this last step with the x0 head instead (not in 004: an option for
       models whose eps head is the weaker one; the benchmark measures both).
    """

    def __init__(
        self,
        schedule: DiffusionSchedule,
        stages: Stages,
        middle_steps: int = 10,
        final_head: str = "eps",
        eta_final: float = 1.0,
    ):
        if final_head not in ("eps", "x0"):
            raise ValueError(f"final_head must be 'eps' or 'x0', got {final_head!r}")
        self.schedule, self.stages, self.final_head, self.eta_final = schedule, stages, final_head, eta_final
        self.timesteps = middle_timesteps(stages, middle_steps)

    def problems(self, num_samples: int, heads: tuple[str, ...]) -> list[str]:
        found = []
        if set(heads) != {"eps", "x0"}:
            found.append("--sampler staged needs a model trained with model.denoiser_heads=2")
        if num_samples % 2:
            found.append(f"--sampler staged draws equally from two heads: --samples must be even, got {num_samples}")
        return found

    def sample(
        self, denoise: Denoise, shape: tuple[int, ...], num_samples: int, generator: torch.Generator | None, like
    ) -> torch.Tensor:
        if num_samples < 2 or num_samples % 2:
            raise ValueError(
                f"staged sampling draws the same number from both heads: samples must be even, got {num_samples}"
            )
        return self.run(denoise, randn(shape, generator, like), num_samples // 2, generator).samples

    @torch.no_grad()
    def run(
        self, denoise: Denoise, x_T: torch.Tensor, draws: int, generator: torch.Generator | None = None
    ) -> StagedResult:
        """The three stages from a batch of B starting latents; `draws` final draws per branch."""
        if draws < 1:
            raise ValueError(f"staged sampling needs >= 1 draw per branch, got {draws}")
        x = self._rapid(denoise, x_T)
        x = self._middle(denoise, torch.cat([x, x]), x_T.shape[0])
        samples = self._refine(denoise, x, draws, generator, x_T.shape[0])
        calls = len(self.timesteps) + 1
        return StagedResult(samples, calls, 1 + 2 * (calls - 1))

    def _rapid(self, denoise: Denoise, x_T: torch.Tensor) -> torch.Tensor:
        """1. rapid segmentation: one x0-head step T-1 -> high-1."""
        top = as_batch(self.schedule.num_timesteps - 1, x_T)
        x0, eps = self.schedule.split("x0", denoise(x_T, top, ("x0",))["x0"], x_T, top)
        return ddim_jump(self.schedule, x0, eps, self.schedule.num_timesteps - 1, self.timesteps[0])

    def _middle(self, denoise: Denoise, x: torch.Tensor, batch: int) -> torch.Tensor:
        """2. probabilistic modelling: both branches in one batch; the first half follows the x0
        head, the second the eps head."""
        for t, s in zip(self.timesteps[:-1], self.timesteps[1:], strict=True):
            out = denoise(x, as_batch(t, x), ("eps", "x0"))
            tb = as_batch(t, x[:batch])
            x0_a, eps_a = self.schedule.split("x0", out["x0"][:batch], x[:batch], tb)
            x0_b, eps_b = self.schedule.split("eps", out["eps"][batch:], x[batch:], tb)
            x = ddim_jump(self.schedule, torch.cat([x0_a, x0_b]), torch.cat([eps_a, eps_b]), t, s)
        return x

    def _refine(
        self, denoise: Denoise, x: torch.Tensor, draws: int, generator: torch.Generator | None, batch: int
    ) -> torch.Tensor:
        """3. denoising refinement: one evaluation per branch, `draws` noisy jumps to t = 0."""
        low, head = self.timesteps[-1], self.final_head
        x0, eps = self.schedule.split(head, denoise(x, as_batch(low, x), (head,))[head], x, as_batch(low, x))
        noisy = self.eta_final > 0
        outs = [
            ddim_jump(
                self.schedule, x0, eps, low, 0, self.eta_final, randn(tuple(x.shape), generator, x) if noisy else None
            )
            for _ in range(draws)
        ]
        samples = torch.stack(outs, dim=1)  # (2B, draws, ...): branch-major
        return samples.reshape(2, batch, draws, *x.shape[1:]).transpose(1, 2).reshape(-1, *x.shape[1:])
