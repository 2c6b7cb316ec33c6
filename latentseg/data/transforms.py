"""Preprocessing and augmentation as MONAI dictionary transforms acting on "image" and "label"."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from monai.transforms import (
    Compose,
    EnsureTyped,
    NormalizeIntensity,
    RandCropByPosNegLabeld,
    RandFlipd,
    RandScaleIntensityd,
    RandShiftIntensityd,
    SpatialPadd,
)

from latentseg.config import DataConfig

DEFAULT_PATCH = {2: 256, 3: 96}


def normalize_image(image: np.ndarray) -> np.ndarray:
    """Z-score each channel of one image (MR and other modalities; 002 section 3.1)."""
    return np.asarray(NormalizeIntensity(channel_wise=True)(image), dtype=np.float32)


def resolve_patch_size(requested: Sequence[int], shapes: Sequence[Sequence[int]], multiple: Sequence[int]) -> list[int]:
    """The training patch: the configured size (or 256^2 / 96^3), shrunk to the largest image,
    rounded up to a multiple of the network's total stride."""
    dims = len(multiple)
    if requested:
        if len(requested) != dims:
            raise ValueError(f"patch_size {list(requested)} must have {dims} entries for {dims}D data")
        patch = list(requested)
    else:
        patch = [DEFAULT_PATCH[dims]] * dims
    largest = [max(s[i] for s in shapes) for i in range(dims)]
    patch = [min(p, n) for p, n in zip(patch, largest, strict=True)]
    return [int(-(-p // m) * m) for p, m in zip(patch, multiple, strict=True)]


def train_transforms(patch_size: Sequence[int], config: DataConfig) -> Compose:
    """Pad, crop (a share of patches centred on foreground, as nnU-Net), flip, jitter intensity."""
    keys = ["image", "label"]
    fg = config.foreground_fraction
    steps = [
        SpatialPadd(keys, spatial_size=patch_size),
        RandCropByPosNegLabeld(keys, "label", patch_size, pos=fg, neg=1 - fg, num_samples=1),
    ]
    if config.flips:
        steps += [RandFlipd(keys, prob=0.5, spatial_axis=axis) for axis in range(len(patch_size))]
    if config.intensity_augmentation:
        steps += [RandScaleIntensityd("image", factors=0.1, prob=0.3), RandShiftIntensityd("image", 0.1, prob=0.3)]
    steps.append(EnsureTyped(keys, track_meta=False))
    return Compose(steps)
