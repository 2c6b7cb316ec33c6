"""Fusing several segmentation samples into one mask and uncertainty maps.

- `mean`: argmax of the mean class probabilities.
- `vote`: per-voxel majority of the samples' argmax labels.
- `staple`: STAPLE (Warfield et al. 2004) as used by UniSegDiff (004 section 2.4, Eq. 2-3), one
  class against the rest, on the samples' argmax labels.
Maps: per-voxel standard deviation over samples and the entropy of the mean probabilities.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal, NamedTuple

import numpy as np
import torch

FusionName = Literal["mean", "vote", "staple"]
FUSIONS: tuple[str, ...] = ("mean", "vote", "staple")


class Fused(NamedTuple):
    probs: torch.Tensor  # (B, C, *S): mean probabilities, vote fractions or STAPLE posteriors
    label: torch.Tensor  # (B, *S) long


def uncertainty_map(probs: torch.Tensor) -> torch.Tensor:
    """Per-voxel standard deviation over samples, the largest over classes.

    Args:
        probs: (N, B, C, *S) class probabilities of N samples.
    Returns:
        (B, 1, *S); 0 where all samples agree, at most 0.5.
    """
    if probs.shape[0] < 2:
        return torch.zeros_like(probs[0, :, :1])
    # Two passes by hand: torch.std over a short leading axis runs 30-40x slower on a CPU (16 ms
    # for four 2-class 256^2 samples, 230 ms at 96^3; this takes 0.4 and 8 ms).
    spread = (probs - probs.mean(dim=0)).square_().mean(dim=0)
    return spread.sqrt_().amax(dim=1, keepdim=True)


def entropy_map(probs: torch.Tensor) -> torch.Tensor:
    """Entropy of the mean class probabilities over samples, divided by log(C): (N, B, C, *S) ->
    (B, 1, *S) in [0, 1]; 0 where every sample is certain of the same class."""
    mean = probs.mean(dim=0)
    ent = -(mean * mean.clamp_min(1e-12).log()).sum(dim=1, keepdim=True)
    return ent / math.log(probs.shape[2])


def staple(
    masks: torch.Tensor | Sequence[torch.Tensor],
    iterations: int = 20,
    sensitivity: float = 0.9,
    specificity: float = 0.9,
    prior: float | None = None,
) -> torch.Tensor:
    """Binary STAPLE by expectation-maximisation, vectorised over voxels and raters.

    004 section 2.4 initialises each rater's alpha_j (sensitivity) to 0.9 and beta_j (labelling
    background as target, i.e. 1 - specificity) to 0.1, and runs 20 iterations; so do we. For the
    prior P(y_i = 1) it writes 50%. A fixed 0.5 collapses on small structures: on ACDC masks (1-2%
    foreground) with 20 noisy raters the consensus agrees with SimpleITK's on only 61% of voxels.
    The default, `prior=None`, is Warfield's and ITK's: the raters' mean foreground fraction.
    `prior=0.5` gives the paper's literal setting.

    Args:
        masks: (N, *S) binary masks of N raters (samples), or a sequence of N (*S) masks; N >= 2.
    Returns:
        (*S) posterior probability that each voxel is target, P(y_i = 1 | {z_ij}).
    """
    if not isinstance(masks, torch.Tensor):
        check_same_shape(list(masks))
        masks = torch.stack(list(masks)) if masks else torch.zeros(0)
    if masks.shape[0] < 2:
        raise ValueError(f"STAPLE needs at least 2 masks, got {masks.shape[0]}")
    if iterations < 1:
        raise ValueError(f"STAPLE needs at least 1 iteration, got {iterations}")
    d = masks.reshape(masks.shape[0], -1).to(torch.float64)  # (N, V): D_ij
    g = float(d.mean()) if prior is None else prior
    g = min(max(g, 1e-12), 1 - 1e-12)
    p = torch.full((d.shape[0],), sensitivity, dtype=torch.float64)  # alpha_j
    q = torch.full((d.shape[0],), specificity, dtype=torch.float64)  # 1 - beta_j
    eps = 1e-12
    n_fg = d.sum(1)  # voxels each rater calls target
    for _ in range(iterations):
        # E-step, 004 Eq. 2, in log space (a product of N probabilities underflows):
        # log P(z_i | y=1) = sum_j log(1 - p_j) + sum_j D_ij log(p_j / (1 - p_j)), likewise for y=0
        lp, l1p = p.clamp_min(eps).log(), (1 - p).clamp_min(eps).log()
        lq, l1q = q.clamp_min(eps).log(), (1 - q).clamp_min(eps).log()
        log_fg = math.log(g) + l1p.sum() + (lp - l1p) @ d
        log_bg = math.log(1 - g) + lq.sum() + (l1q - lq) @ d
        w = torch.sigmoid(log_fg - log_bg)  # (V,) P(y_i = 1 | {z_ij})
        # M-step, 004 Eq. 3: each rater's sensitivity and specificity under the posterior
        sw, sb = w.sum().clamp_min(eps), (1 - w).sum().clamp_min(eps)
        dw = d @ w  # sum_i D_ij W_i
        p = dw / sw
        q = (d.shape[1] - n_fg - (w.sum() - dw)) / sb  # sum_i (1 - D_ij)(1 - W_i) / sum_i (1 - W_i)
    return w.reshape(masks.shape[1:]).to(torch.float32)


def staple_labels(labels: torch.Tensor, num_classes: int, **kwargs) -> torch.Tensor:
    """Multi-class STAPLE, one class against the rest: (N, *S) integer labels -> (C, *S) posteriors.

    With two classes the background posterior is 1 - the foreground's, so the consensus is exactly
    binary STAPLE's; with more, each class's posterior comes from its own EM run.
    """
    if num_classes == 2:
        fg = staple(labels == 1, **kwargs)
        return torch.stack([1 - fg, fg])
    return torch.stack([staple(labels == c, **kwargs) for c in range(num_classes)])


def check_fusion(fusion: str, num_samples: int) -> None:
    """A known fusion, and at least 2 samples for the ones that fuse masks."""
    if fusion not in FUSIONS:
        raise ValueError(f"--fusion must be one of {', '.join(FUSIONS)}, got {fusion!r}")
    if fusion != "mean" and num_samples < 2:
        raise ValueError(f"--fusion {fusion} needs at least 2 samples, got --samples {num_samples}")


def fuse(probs: torch.Tensor, fusion: str = "mean") -> Fused:
    """Fuse N samples' class probabilities (N, B, C, *S) into probabilities and labels per image."""
    n, _, c = probs.shape[:3]
    check_fusion(fusion, n)
    if fusion == "mean":
        mean = probs.mean(dim=0)
        return Fused(mean, mean.argmax(dim=1))
    labels = probs.argmax(dim=2)  # (N, B, *S)
    if fusion == "vote":
        onehot = torch.nn.functional.one_hot(labels, c).movedim(-1, 2).float()  # (N, B, C, *S)
        votes = onehot.mean(dim=0)
        return Fused(votes, votes.argmax(dim=1))  # ties go to the lower class
    fused = torch.stack([staple_labels(labels[:, b], c) for b in range(labels.shape[1])])
    return Fused(fused, fused.argmax(dim=1))


def check_same_shape(masks: list[torch.Tensor]) -> None:
    """Masks to fuse must share one grid."""
    shapes = {tuple(m.shape) for m in masks}
    if len(shapes) > 1:
        raise ValueError(f"masks to fuse have different shapes: {sorted(shapes)}")


def majority(masks: list[np.ndarray]) -> np.ndarray:
    """Per voxel, the label most raters gave (ties to the lower label)."""
    if len(masks) == 1:
        return masks[0]
    values = np.unique(np.concatenate([np.unique(m) for m in masks]))
    votes = np.stack([sum((m == v).astype(np.int32) for m in masks) for v in values])
    return values[votes.argmax(0)]
