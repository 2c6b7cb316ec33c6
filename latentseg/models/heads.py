"""What the denoiser's outputs mean: one head of the configured parameterization (003), or an eps
head and an x0 head on one encoder (004 section 2.1). A head set says what each head is trained
toward and which clean latents the segmentation loss decodes, so the objective never asks which
kind of model it trains."""

from __future__ import annotations

from collections.abc import Callable

import torch

from latentseg.diffusion import DiffusionSchedule
from latentseg.models.losses import per_sample_mse

Outputs = dict[str, torch.Tensor]  # head name ("eps", "x0", "v") -> the denoiser's output


def _exact_x0(schedule: DiffusionSchedule, kind: str, out: torch.Tensor, z_t: torch.Tensor, t: torch.Tensor):
    return schedule.split(kind, out, z_t, t)[0]  # Eq. 11 inverted


def _paper_x0(schedule: DiffusionSchedule, kind: str, out: torch.Tensor, z_t: torch.Tensor, t: torch.Tensor):
    return z_t - out  # 003 Eq. 12 as printed: z_dn = z_t - f_denoiser(z_t, z_i, t)


X0_ESTIMATES = {"exact": _exact_x0, "paper": _paper_x0}


class OneHead:
    """A denoiser with one output of `prediction_type` (eps, x0 or v)."""

    def __init__(self, schedule: DiffusionSchedule, prediction_type: str, x0_estimate: str = "exact"):
        self.schedule, self.kind = schedule, prediction_type
        self.names: tuple[str, ...] = (prediction_type,)
        self._estimate = X0_ESTIMATES[x0_estimate]
        self.paper_estimate = self._estimate is _paper_x0

    def estimate_x0(self, out: torch.Tensor, z_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self._estimate(self.schedule, self.kind, out, z_t, t)

    def diffusion_loss(self, outputs: Outputs, z0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """003 Eq. 17: ||target - f_denoiser||^2 per sample."""
        return per_sample_mse(outputs[self.kind], self.schedule.target(self.kind, z0, t, noise))

    def decoded(
        self, outputs: Outputs, z_t: torch.Tensor, t: torch.Tensor
    ) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
        """The clean latents the segmentation loss decodes, each with its per-sample weight (None: 1)."""
        return [(self.estimate_x0(outputs[self.kind], z_t, t), None)]

    def final_x0(self) -> Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor] | None:
        """The last sampling step's x0 when it is not the sampler's own (003 Eq. 12 as printed)."""
        return self.estimate_x0 if self.paper_estimate else None


class TwoHeads:
    """004 section 2.1: an eps head and an x0 head. L_noise is the eps head's error plus the x0
    head's latent error; the x0 head's latent is decoded, and, with `eps_seg_loss`, also the eps
    head's estimate where sampling uses that head (t <= stage_high; 003 trains its eps denoiser
    through the decoder, 004 does not)."""

    names: tuple[str, ...] = ("eps", "x0")

    def __init__(self, schedule: DiffusionSchedule, eps_seg_loss: bool = False, stage_high: int = 600):
        self.schedule, self.eps_seg_loss, self.stage_high = schedule, eps_seg_loss, stage_high

    def diffusion_loss(self, outputs: Outputs, z0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return per_sample_mse(outputs["eps"], noise) + per_sample_mse(outputs["x0"], z0)

    def decoded(
        self, outputs: Outputs, z_t: torch.Tensor, t: torch.Tensor
    ) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
        latents: list[tuple[torch.Tensor, torch.Tensor | None]] = [(outputs["x0"], None)]
        if self.eps_seg_loss:
            z_eps = self.schedule.split("eps", outputs["eps"], z_t, t)[0]
            latents.append((z_eps, (t <= self.stage_high).float()))  # above it, sampling takes the x0 head
        return latents

    def final_x0(self) -> None:
        return None
