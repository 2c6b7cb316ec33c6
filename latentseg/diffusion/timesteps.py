"""Which timesteps a training batch sees: uniform (003 Algorithm 1 line 5: t ~ Uniform{0..T-1}) or
importance sampling (002 section 3.1: "time-steps are weighted according to the average term they
contribute to the denoising loss").

Importance sampling follows the loss-second-moment rule of improved DDPM (Nichol & Dhariwal 2021):
p(t) proportional to sqrt(E[L_t^2]) over the last `history` losses seen at t, mixed with a little
of the uniform distribution, and each sample's loss weighted by 1 / (T p(t)) so that the expected
loss stays that of uniform sampling. On a CPU budget 1000 separate histories would take thousands
of steps to fill, so the T timesteps are grouped into `bins` equal intervals (bins = T is the
original per-t rule); t is uniform within its bin. Until every bin holds `history` losses, t is
drawn uniformly with weight 1.
"""

from __future__ import annotations

from typing import NamedTuple, Protocol

import torch


class TimestepDraw(NamedTuple):
    t: torch.Tensor  # (B,) the timesteps the network sees
    noise_weight: torch.Tensor  # (B,) weight of the noise (latent) loss
    seg_weight: torch.Tensor  # (B,) weight of the segmentation loss


class TimestepRule(Protocol):
    """Which timesteps a training batch sees and how each sample's loss terms are weighted (as
    improved-diffusion's ScheduleSampler)."""

    def sample(
        self, batch_size: int, device: torch.device | str = "cpu", generator: torch.Generator | None = None
    ) -> TimestepDraw: ...

    def update(self, t: torch.Tensor, losses: torch.Tensor) -> None: ...

    def state(self) -> dict[str, torch.Tensor]: ...

    def load_state(self, state: dict[str, torch.Tensor]) -> None: ...


class UniformTimesteps:
    """003 Algorithm 1 line 5: t ~ Uniform{0..T-1}, every loss weighted 1."""

    def __init__(self, num_timesteps: int):
        self.num_timesteps = num_timesteps

    def sample(
        self, batch_size: int, device: torch.device | str = "cpu", generator: torch.Generator | None = None
    ) -> TimestepDraw:
        t = uniform_timesteps(batch_size, self.num_timesteps, device, generator)
        ones = torch.ones(batch_size, device=device)
        return TimestepDraw(t, ones, ones)

    def update(self, t: torch.Tensor, losses: torch.Tensor) -> None:
        """Uniform sampling learns nothing from the losses."""

    def state(self) -> dict[str, torch.Tensor]:
        return {}

    def load_state(self, state: dict[str, torch.Tensor]) -> None:
        """Nothing to restore."""


def uniform_timesteps(
    batch_size: int,
    num_timesteps: int,
    device: torch.device | str = "cpu",
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """(B,) long tensor of timesteps drawn uniformly from {0, ..., T-1}."""
    return torch.randint(0, num_timesteps, (batch_size,), generator=generator).to(device)


class ImportanceTimesteps:
    """Draws timesteps in proportion to the recent loss at each one; owns no network.

    Args:
        num_timesteps: T.
        bins: number of equal intervals of {0..T-1} that share one loss history (1 <= bins <= T).
        history: losses remembered per bin.
        uniform_share: share of the uniform distribution mixed in, so that no bin's weight explodes.
    """

    def __init__(self, num_timesteps: int, bins: int = 50, history: int = 10, uniform_share: float = 0.001):
        if not 1 <= bins <= num_timesteps:
            raise ValueError(f"importance sampling needs 1 <= bins <= T={num_timesteps}, got {bins}")
        if history < 1:
            raise ValueError(f"importance sampling needs history >= 1, got {history}")
        self.num_timesteps, self.bins, self.history = num_timesteps, bins, history
        self.uniform_share = uniform_share
        self.losses = torch.zeros(bins, history, dtype=torch.float64)
        self.counts = torch.zeros(bins, dtype=torch.long)
        # bin b covers {edges[b], ..., edges[b+1]-1}
        self.edges = torch.linspace(0, num_timesteps, bins + 1).round().long()

    @property
    def warm(self) -> bool:
        return bool((self.counts >= self.history).all())

    def probabilities(self) -> torch.Tensor:
        """(bins,) probability of each bin (uniform over timesteps while warming up)."""
        sizes = (self.edges[1:] - self.edges[:-1]).double()
        uniform = sizes / self.num_timesteps
        if not self.warm:
            return uniform
        weights = self.losses.pow(2).mean(1).sqrt()
        if weights.sum() <= 0:
            return uniform
        return (1 - self.uniform_share) * weights / weights.sum() + self.uniform_share * uniform

    def sample(
        self, batch_size: int, device: torch.device | str = "cpu", generator: torch.Generator | None = None
    ) -> TimestepDraw:
        """(B,) timesteps and (B,) loss weights 1 / (T p(t)) (all 1 while warming up), the same for
        both loss terms: the whole per-sample loss is reweighted."""
        p_bin = self.probabilities()
        b = torch.multinomial(p_bin, batch_size, replacement=True, generator=generator)
        low, size = self.edges[b], self.edges[b + 1] - self.edges[b]
        t = low + (torch.rand(batch_size, generator=generator, dtype=torch.float64) * size).long()
        p_t = p_bin[b] / size.double()  # t is uniform within its bin
        weights = (1.0 / (self.num_timesteps * p_t)).float().to(device)
        return TimestepDraw(t.to(device), weights, weights)

    def update(self, t: torch.Tensor, losses: torch.Tensor) -> None:
        """Remember each sample's loss at its timestep (oldest forgotten first)."""
        bins = torch.bucketize(t.detach().cpu(), self.edges[1:], right=True)
        for b, loss in zip(bins.tolist(), losses.detach().double().cpu().tolist(), strict=True):
            if self.counts[b] >= self.history:
                self.losses[b] = torch.roll(self.losses[b], -1)
                self.losses[b, -1] = loss
            else:
                self.losses[b, self.counts[b]] = loss
            self.counts[b] += 1

    def state(self) -> dict[str, torch.Tensor]:
        """The loss history, for a checkpoint (`load_state` restores it)."""
        return {"importance/losses": self.losses.clone(), "importance/counts": self.counts.clone()}

    def load_state(self, state: dict[str, torch.Tensor]) -> None:
        losses, counts = state.get("importance/losses"), state.get("importance/counts")
        if losses is not None and counts is not None and losses.shape == self.losses.shape:
            self.losses, self.counts = losses.double().clone(), counts.long().clone()
