"""Fusing several segmentation samples: mean probability and uncertainty maps."""

from __future__ import annotations

import torch


def uncertainty_map(probs: torch.Tensor) -> torch.Tensor:
    """Per-voxel standard deviation over samples, the largest over classes.

    Args:
        probs: (N, B, C, *S) class probabilities of N samples.
    Returns:
        (B, 1, *S); 0 where all samples agree, at most 0.5.
    """
    if probs.shape[0] < 2:
        return torch.zeros_like(probs[0, :, :1])
    return probs.std(dim=0, unbiased=False).amax(dim=1, keepdim=True)
