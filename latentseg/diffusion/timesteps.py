"""Which timesteps a training batch sees (003 Algorithm 1 line 5: t ~ Uniform{1..T})."""

from __future__ import annotations

import torch


def uniform_timesteps(
    batch_size: int,
    num_timesteps: int,
    device: torch.device | str = "cpu",
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """(B,) long tensor of timesteps drawn uniformly from {0, ..., T-1}."""
    return torch.randint(0, num_timesteps, (batch_size,), generator=generator).to(device)
