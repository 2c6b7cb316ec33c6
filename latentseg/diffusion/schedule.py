"""Noise schedules, the forward process and the conversions between parameterizations.

Timesteps are 0-indexed, t in {0, ..., T-1}, as in diffusers: index t holds the papers'
alpha-bar_{t+1}. The papers' "1 ... T inclusive" is therefore "0 ... T-1" here.

Everything is computed in float64 and cast to the caller's dtype at the point of use. This
module never owns a network.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Literal, NamedTuple

import numpy as np
import torch

PredictionType = Literal["eps", "x0", "v"]
ScheduleName = Literal["linear", "cosine"]
PREDICTION_TYPES: tuple[str, ...] = ("eps", "x0", "v")


def linear_betas(num_timesteps: int, beta_start: float = 1e-4, beta_end: float = 0.02) -> np.ndarray:
    """Ho et al. (2020) linear schedule, scaled so T=1000 gives beta in [1e-4, 0.02]."""
    scale = 1000.0 / num_timesteps
    return np.linspace(scale * beta_start, scale * beta_end, num_timesteps, dtype=np.float64)


def cosine_betas(num_timesteps: int, s: float = 0.008, max_beta: float = 0.999) -> np.ndarray:
    """Nichol & Dhariwal (2021) Eq. 17: alpha-bar(t) = f(t)/f(0), f(t) = cos^2(((t/T)+s)/(1+s) pi/2)."""

    def f(t: float) -> float:
        return math.cos((t / num_timesteps + s) / (1 + s) * math.pi / 2) ** 2

    betas = [min(1 - f(i + 1) / f(i), max_beta) for i in range(num_timesteps)]
    return np.asarray(betas, dtype=np.float64)


def make_betas(name: ScheduleName, num_timesteps: int) -> np.ndarray:
    if name == "linear":
        return linear_betas(num_timesteps)
    if name == "cosine":
        return cosine_betas(num_timesteps)
    raise ValueError(f"unknown beta schedule {name!r}; choose 'linear' or 'cosine'")


def _gather(values: np.ndarray, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """values[t] as a tensor broadcastable to `like` (B, 1, 1, ...). t = -1 means 'clean' (1.0)."""
    t_np = t.detach().cpu().numpy().astype(np.int64)
    padded = np.concatenate([values, [1.0]])  # index -1 -> alpha-bar = 1 (no noise)
    out = torch.from_numpy(padded[t_np]).to(device=like.device, dtype=like.dtype)
    return out.reshape(-1, *([1] * (like.ndim - 1)))


class DiffusionSchedule:
    """The forward process q(x_t | x_0) and the parameterization algebra.

    Args:
        name: "linear" or "cosine" beta schedule.
        num_timesteps: T, the length of the Markov chain.
    """

    def __init__(self, name: ScheduleName = "linear", num_timesteps: int = 1000) -> None:
        self.name = name
        self.num_timesteps = num_timesteps
        self.betas = make_betas(name, num_timesteps)
        self.alphas = 1.0 - self.betas  # 003 Eq. 5: alpha_t = 1 - beta_t
        self.alphas_cumprod = np.cumprod(self.alphas)  # alpha-bar_t = prod_{i<=t} alpha_i

    def alpha_bar(self, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """alpha-bar_t broadcast to `like`; t = -1 gives 1 (the clean end of the chain)."""
        return _gather(self.alphas_cumprod, t, like)

    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """003 Eq. 11: z_t = sqrt(alpha-bar_t) z_0 + sqrt(1 - alpha-bar_t) eps."""
        ab = self.alpha_bar(t, x0)
        return ab.sqrt() * x0 + (1 - ab).sqrt() * noise

    def v_target(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """Salimans & Ho (2022): v = sqrt(alpha-bar) eps - sqrt(1 - alpha-bar) x0."""
        ab = self.alpha_bar(t, x0)
        return ab.sqrt() * noise - (1 - ab).sqrt() * x0

    def target(
        self,
        prediction_type: PredictionType,
        x0: torch.Tensor,
        t: torch.Tensor,
        noise: torch.Tensor,
    ) -> torch.Tensor:
        """What a network of the given parameterization is trained to output."""
        return _parameterization(prediction_type).target(self, x0, t, noise)

    def split(
        self,
        prediction_type: PredictionType,
        model_output: torch.Tensor,
        x_t: torch.Tensor,
        t: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(x0, eps) implied by a network output and x_t, by inverting Eq. 11 exactly."""
        ab = self.alpha_bar(t, x_t)
        return _parameterization(prediction_type).split(model_output, x_t, ab.sqrt(), (1 - ab).sqrt())

    def posterior_mean_variance(
        self, x0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """q(x_{t-1} | x_t, x_0) of Ho et al. (2020) Eq. 6-7: mean and variance beta-tilde_t."""
        ab = self.alpha_bar(t, x_t)
        ab_prev = self.alpha_bar(t - 1, x_t)  # t = 0 -> index -1 -> 1.0
        beta = _gather(self.betas, t, x_t)
        alpha = 1 - beta
        coef_x0 = ab_prev.sqrt() * beta / (1 - ab)
        coef_xt = alpha.sqrt() * (1 - ab_prev) / (1 - ab)
        variance = beta * (1 - ab_prev) / (1 - ab)
        return coef_x0 * x0 + coef_xt * x_t, variance


class Parameterization(NamedTuple):
    """What a network predicts: its training target, and (x0, eps) from its output and x_t
    (with sa = sqrt(alpha-bar_t), s1a = sqrt(1 - alpha-bar_t))."""

    target: Callable[[DiffusionSchedule, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
    split: Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


PARAMETERIZATIONS: dict[str, Parameterization] = {
    "eps": Parameterization(
        lambda schedule, x0, t, noise: noise,
        lambda out, x_t, sa, s1a: ((x_t - s1a * out) / sa, out),
    ),
    "x0": Parameterization(
        lambda schedule, x0, t, noise: x0,
        lambda out, x_t, sa, s1a: (out, (x_t - sa * out) / s1a.clamp_min(1e-12)),
    ),
    "v": Parameterization(
        lambda schedule, x0, t, noise: schedule.v_target(x0, t, noise),
        lambda out, x_t, sa, s1a: (sa * x_t - s1a * out, s1a * x_t + sa * out),
    ),
}


def _parameterization(prediction_type: str) -> Parameterization:
    try:
        return PARAMETERIZATIONS[prediction_type]
    except KeyError:
        raise ValueError(f"unknown prediction_type {prediction_type!r}; choose one of {PREDICTION_TYPES}") from None
