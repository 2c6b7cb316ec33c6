"""Training objectives, apart from the networks (as improved-diffusion's `training_losses`): the
latent diffusion loss of 003 Algorithm 1, with the timestep rule of the config (uniform, 002's
importance sampling or 004's stages) and the pre-training phases of 002 / 004.

An objective's `losses(batch, phases)` takes a batch {"image", "label", "text"} on the model's
device; `phases` names the pre-training phases still running (they replace the diffusion loss).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import torch

from latentseg.config import Config
from latentseg.diffusion import ImportanceTimesteps, StagedTimesteps, Stages, TimestepRule, UniformTimesteps, randn
from latentseg.models.losses import Losses


@dataclass(frozen=True)
class Phase:
    """A part trained alone for the first `until` share of the run, then frozen."""

    name: str  # "condition" (004 section 2.3: CFENet) | "autoencoder" (002 section 2.1: the mask AE)
    until: float
    description: str


class Objective(Protocol):
    def losses(self, batch: dict[str, Any], phases: tuple[str, ...] = ()) -> Losses: ...

    def state(self) -> dict[str, torch.Tensor]: ...

    def load_state(self, state: dict[str, torch.Tensor]) -> None: ...


def _uniform(config: Config) -> TimestepRule:
    return UniformTimesteps(config.model.num_timesteps)


def _importance(config: Config) -> TimestepRule:
    t = config.train
    return ImportanceTimesteps(config.model.num_timesteps, t.importance_bins, t.importance_history)


def _staged(config: Config) -> TimestepRule:
    m = config.model
    return StagedTimesteps(Stages(m.stage_high, m.stage_low, m.num_timesteps), config.train.last_stage_t)


TIMESTEP_RULES = {"uniform": _uniform, "importance": _importance, "staged": _staged}


def timestep_rule(config: Config) -> TimestepRule:
    """The rule `train.timesteps` names."""
    return TIMESTEP_RULES[config.train.timesteps](config)


class LatentDiffusionObjective:
    """003 Algorithm 1, one batch: L = CE + gamma * Dice + lambda * ||target - output||^2 (Eq. 18).

    The timestep rule draws t and weights the two terms per sample: 1 and 1 (uniform), 1 / (T p(t))
    for both (importance, 002 section 3.1), alpha and beta per stage (004 Eq. 1). With a frozen,
    pre-trained mask autoencoder nothing is decoded: the loss is the latent term alone (002).
    """

    def __init__(self, model, rule: TimestepRule, config: Config):
        self.model, self.rule = model, rule
        t = config.train
        self.gamma, self.lam, self.weight_decay = t.gamma_dice, t.lambda_noise, t.autoencoder_weight_decay

    def losses(self, batch: dict[str, Any], phases: tuple[str, ...] = ()) -> Losses:
        image, label, text = batch["image"], batch["label"], batch.get("text")
        if phases:  # pre-training the condition network and / or the mask autoencoder
            return self.model.pretrain_losses(image, label, phases, self.gamma, self.weight_decay)
        return self.diffusion_losses(image, label, text)

    def diffusion_losses(self, image, label, text=None, generator: torch.Generator | None = None) -> Losses:
        m = self.model
        cond = m.conditioning(image, text)  # line 3
        z0 = m.encode_label(label)  # line 4
        z_clean = z0 if m.diffusion_trains_label_encoder else z0.detach()
        t, noise_weight, seg_weight = self.rule.sample(z0.shape[0], z0.device, generator)  # line 5
        noise = randn(z0.shape, generator, z0)  # line 6
        z_t = m.schedule.q_sample(z_clean, t, noise)  # line 7, Eq. 11
        outputs = m.denoise_all(z_t, t, cond)
        diff = m.heads.diffusion_loss(outputs, z_clean, noise, t)  # Eq. 17
        seg = torch.zeros_like(diff)
        if m.decodes_in_training:  # lines 8-9, Eq. 12-16
            seg = self.segmentation(outputs, z_t, t, cond, label)
        if m.reconstructs_latent:  # the clean latent alone must give the mask (see ModelConfig.latent_reconstruction)
            seg = seg + m.segmentation_loss(m.decode_latent_alone(z0, cond), label, self.gamma)
        self.rule.update(t, seg + self.lam * diff)  # the unweighted loss at each t (002: importance)
        total = (seg_weight * seg + self.lam * noise_weight * diff).mean()  # Eq. 18; 004 Eq. 1 when staged
        return Losses(total, seg.mean(), diff.mean())

    def segmentation(self, outputs, z_t, t, cond, label) -> torch.Tensor:
        """(B,) CE + gamma * Dice of every latent the heads decode (Eq. 13-16)."""
        seg = None
        for z, weight in self.model.heads.decoded(outputs, z_t, t):
            term = self.model.segmentation_loss(self.model.decode(z, cond), label, self.gamma)
            term = term if weight is None else weight * term
            seg = term if seg is None else seg + term
        return seg

    def state(self) -> dict[str, torch.Tensor]:
        return self.rule.state()

    def load_state(self, state: dict[str, torch.Tensor]) -> None:
        self.rule.load_state(state)
