"""The loss terms every family shares: the segmentation loss of 003 Eq. 14-16 and the triple a
training step reports."""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from monai.losses import DiceLoss


class Losses(NamedTuple):
    total: torch.Tensor
    segmentation: torch.Tensor  # CE + gamma * Dice, 003 Eq. 16
    diffusion: torch.Tensor  # ||target - f_denoiser||^2, 003 Eq. 17


def dice_ce(logits: torch.Tensor, label: torch.Tensor, gamma: float, dice: DiceLoss) -> torch.Tensor:
    """(B,) CE + gamma * Dice per image (003 Eq. 14-16); the batch mean is MONAI's DiceCELoss.

    `dice`: DiceLoss(to_onehot_y=True, softmax=True, reduction="none").
    """
    ce = F.cross_entropy(logits, label[:, 0].long(), reduction="none").flatten(1).mean(1)
    return ce + gamma * dice(logits, label).flatten(1).mean(1)


def per_sample_mse(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(B,) mean squared error of each sample."""
    return (a - b).pow(2).flatten(1).mean(1)


def soft_dice_loss() -> DiceLoss:
    """The Dice term of `dice_ce`, per image."""
    return DiceLoss(to_onehot_y=True, softmax=True, reduction="none")
