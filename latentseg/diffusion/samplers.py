"""Reverse-process samplers: DDPM ancestral sampling, DDIM over an explicit timestep list, and a
generic jump from any t to any s < t.

Every sampler offers `set_timesteps(...)` and `step(model_output, t, x_t)`, returning the previous
sample and the predicted x0. The previous timestep is always read from the timestep list, never
computed as t - T // K. x0 is never clipped: latents are standardized, not bounded to [-1, 1].
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import NamedTuple, Protocol

import numpy as np
import torch

from latentseg.diffusion.schedule import DiffusionSchedule, PredictionType


class StepOutput(NamedTuple):
    prev_sample: torch.Tensor
    pred_x0: torch.Tensor


def evenly_spaced_timesteps(num_steps: int, num_timesteps: int) -> list[int]:
    """003 section V-B (after Nichol & Dhariwal): K evenly spaced reals between the first and the
    last timestep inclusive, rounded to the nearest integer, in descending order.

    K = 1 is the single step from pure noise at t = T-1 straight to x0.
    """
    if num_steps < 1:
        raise ValueError(f"the number of sampling steps must be >= 1, got {num_steps}")
    if num_steps > num_timesteps:
        raise ValueError(f"cannot take {num_steps} steps in a chain of {num_timesteps} timesteps")
    if num_steps == 1:
        return [num_timesteps - 1]
    steps = np.round(np.linspace(0, num_timesteps - 1, num_steps)).astype(int)
    return sorted({int(s) for s in steps}, reverse=True)


def randn(shape: tuple[int, ...], generator: torch.Generator | None, like: torch.Tensor) -> torch.Tensor:
    """Standard normal noise on `like`'s device and dtype. A seeded generator (a CPU one) makes the
    draw reproducible on any device."""
    if generator is None:
        return torch.randn(shape, device=like.device, dtype=like.dtype)
    return torch.randn(shape, generator=generator, dtype=like.dtype).to(like.device)


def _noise_like(x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    return randn(tuple(x.shape), generator, x)


def as_batch(t: int, x: torch.Tensor) -> torch.Tensor:
    """Timestep t for every sample of x: a (B,) long tensor."""
    return torch.full((x.shape[0],), t, dtype=torch.long, device=x.device)


def ddim_jump(
    schedule: DiffusionSchedule,
    x0: torch.Tensor,
    eps: torch.Tensor,
    t: int,
    s: int,
    eta: float = 0.0,
    noise: torch.Tensor | None = None,
) -> torch.Tensor:
    """Song et al. (2021) DDIM Eq. 12 from timestep t to any s < t (s = -1 is the clean end).

    x_s = sqrt(ab_s) x0 + sqrt(1 - ab_s - sigma^2) eps + sigma z,
    sigma = eta sqrt((1 - ab_s) / (1 - ab_t)) sqrt(1 - ab_t / ab_s)   (DDIM Eq. 16)
    """
    if s >= t:
        raise ValueError(f"a jump must go backwards in time, got t={t} -> s={s}")
    ab_t = schedule.alpha_bar(as_batch(t, x0), x0)
    ab_s = schedule.alpha_bar(as_batch(s, x0), x0)
    sigma = eta * ((1 - ab_s) / (1 - ab_t)).sqrt() * (1 - ab_t / ab_s).sqrt()
    x_s = ab_s.sqrt() * x0 + (1 - ab_s - sigma**2).clamp_min(0).sqrt() * eps
    if eta > 0:
        if noise is None:
            raise ValueError("eta > 0 needs a noise tensor")
        x_s = x_s + sigma * noise
    return x_s


class DDIMSampler:
    """DDIM over an explicit, descending list of timesteps.

    Args:
        schedule: the forward process the network was trained with.
        prediction_type: what the network outputs ("eps", "x0" or "v").
        eta: 0 is deterministic DDIM; 1 has the variance of DDPM's posterior.
    """

    def __init__(self, schedule: DiffusionSchedule, prediction_type: PredictionType, eta: float = 0.0):
        self.schedule = schedule
        self.prediction_type = prediction_type
        self.eta = eta
        self.timesteps: list[int] = []
        self._prev: dict[int, int] = {}

    def set_timesteps(self, steps: int | Sequence[int]) -> None:
        """An int K gives K evenly spaced steps; a sequence is used as given (sorted descending)."""
        if isinstance(steps, int):
            timesteps = evenly_spaced_timesteps(steps, self.schedule.num_timesteps)
        else:
            timesteps = sorted({int(s) for s in steps}, reverse=True)
            if not timesteps or timesteps[0] >= self.schedule.num_timesteps or timesteps[-1] < 0:
                raise ValueError(f"timesteps must lie in [0, {self.schedule.num_timesteps}), got {steps}")
        self.timesteps = timesteps
        self._prev = dict(zip(timesteps, timesteps[1:] + [-1], strict=True))

    def step(
        self,
        model_output: torch.Tensor,
        t: int,
        x_t: torch.Tensor,
        generator: torch.Generator | None = None,
    ) -> StepOutput:
        # 1. previous timestep from the list (-1 = the clean end, alpha-bar = 1)
        s = self._prev[t]
        # 2. x0 and eps implied by the network output (003 Eq. 11 inverted; no clipping)
        x0, eps = self.schedule.split(self.prediction_type, model_output, x_t, as_batch(t, x_t))
        # 3. DDIM Eq. 12 to the previous timestep
        noise = _noise_like(x_t, generator) if self.eta > 0 and s >= 0 else None
        eta = self.eta if s >= 0 else 0.0
        return StepOutput(ddim_jump(self.schedule, x0, eps, t, s, eta, noise), x0)


class DDPMSampler:
    """Ancestral sampling, 003 Algorithm 2 / Eq. 8, with sigma_t^2 = beta-tilde_t.

    Algorithm 2 line 5 prints 1/sqrt(alpha-bar_t); Eq. 8 and Ho et al. have 1/sqrt(alpha_t),
    which is what the posterior mean below reduces to for an eps network.
    """

    def __init__(self, schedule: DiffusionSchedule, prediction_type: PredictionType):
        self.schedule = schedule
        self.prediction_type = prediction_type
        self.timesteps = list(range(schedule.num_timesteps - 1, -1, -1))

    def set_timesteps(self, steps: int | Sequence[int] | None = None) -> None:
        if steps not in (None, self.schedule.num_timesteps):
            raise ValueError("DDPM runs every timestep of the chain; use DDIM for fewer steps")

    def step(
        self,
        model_output: torch.Tensor,
        t: int,
        x_t: torch.Tensor,
        generator: torch.Generator | None = None,
    ) -> StepOutput:
        t_batch = as_batch(t, x_t)
        x0, _ = self.schedule.split(self.prediction_type, model_output, x_t, t_batch)
        mean, variance = self.schedule.posterior_mean_variance(x0, x_t, t_batch)
        if t == 0:  # Algorithm 2 line 4: no noise on the last step
            return StepOutput(mean, x0)
        return StepOutput(mean + variance.sqrt() * _noise_like(x_t, generator), x0)


Sampler = DDIMSampler | DDPMSampler
ModelFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
# (z_t, t as a (B,) long tensor, the heads wanted) -> {head: output}; heads are "eps", "x0" or "v".
# The conditioning is bound inside, repeated to match z_t's batch.
Denoise = Callable[[torch.Tensor, torch.Tensor, tuple[str, ...]], dict[str, torch.Tensor]]


class LatentSampler(Protocol):
    """Draws `num_samples` clean latents per conditioning image: (num_samples * B, ...), sample-major."""

    def sample(
        self, denoise: Denoise, shape: tuple[int, ...], num_samples: int, generator: torch.Generator | None, like
    ) -> torch.Tensor: ...

    def problems(self, num_samples: int, heads: tuple[str, ...]) -> list[str]: ...


def sample_loop(
    model_fn: ModelFn,
    x_T: torch.Tensor,
    sampler: Sampler,
    generator: torch.Generator | None = None,
    post_step: Callable[[torch.Tensor], torch.Tensor] | None = None,
    final_x0: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """Run `sampler` from x_T over its timesteps; returns the clean sample.

    Args:
        model_fn: (x_t, t as a (B,) long tensor) -> network output. Conditioning is bound inside.
        post_step: applied to the sample after every step (e.g. re-standardizing a latent).
        final_x0: (model_output, x_t, t) -> x0 for the last step, in place of the sampler's own
            estimate (e.g. 003 Eq. 12 as printed). The sampler's last step lands on its x0 estimate.
    """
    x = x_T
    last = sampler.timesteps[-1]
    for t in sampler.timesteps:
        t_batch = as_batch(t, x)
        out = model_fn(x, t_batch)
        if t == last and final_x0 is not None:
            x = final_x0(out, x, t_batch)
        else:
            x = sampler.step(out, t, x, generator).prev_sample
        if post_step is not None:
            x = post_step(x)
    return x


def make_sampler(
    schedule: DiffusionSchedule,
    prediction_type: PredictionType,
    steps: int | None,
    eta: float = 0.0,
) -> Sampler:
    """DDIM with `steps` evenly spaced timesteps, or full DDPM when steps is None."""
    if steps is None:
        return DDPMSampler(schedule, prediction_type)
    sampler = DDIMSampler(schedule, prediction_type, eta)
    sampler.set_timesteps(steps)
    return sampler


class ChainSampler:
    """003 Algorithm 2: each sample its own chain from pure noise, DDIM with `steps` steps (DDPM's
    full chain when steps is None), one network head of `prediction_type`.

    Args:
        post_step: applied after every step (e.g. re-standardizing the latent).
        final_x0: (output, z_t, t) -> x0 for the last step (e.g. 003 Eq. 12 as printed).
    """

    def __init__(
        self,
        schedule: DiffusionSchedule,
        prediction_type: PredictionType,
        steps: int | None = 2,
        eta: float = 0.0,
        post_step: Callable[[torch.Tensor], torch.Tensor] | None = None,
        final_x0: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    ):
        self.chain = make_sampler(schedule, prediction_type, steps, eta)
        self.prediction_type = prediction_type
        self.post_step, self.final_x0 = post_step, final_x0

    def problems(self, num_samples: int, heads: tuple[str, ...]) -> list[str]:
        if self.prediction_type not in heads:
            return [f"the sampler needs a {self.prediction_type} head; this model has {', '.join(heads)}"]
        return []

    def sample(
        self, denoise: Denoise, shape: tuple[int, ...], num_samples: int, generator: torch.Generator | None, like
    ) -> torch.Tensor:
        z_T = randn((num_samples * shape[0], *shape[1:]), generator, like)  # (N*B, ...) line 1
        head = (self.prediction_type,)
        return sample_loop(
            lambda z, t: denoise(z, t, head)[self.prediction_type],
            z_T,
            self.chain,
            generator,
            self.post_step,
            self.final_x0,
        )
