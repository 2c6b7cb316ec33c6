"""Training augmentation as MONAI dictionary transforms acting on "image" and "label"
(000 section III-B: flips, rotations, intensity scaling and shifts)."""

from __future__ import annotations

import math
from collections.abc import Sequence

from monai.transforms import (
    Compose,
    EnsureTyped,
    RandCropByPosNegLabeld,
    RandFlipd,
    RandRotated,
    RandScaleIntensityd,
    RandShiftIntensityd,
    SpatialPadd,
)

from latentseg.config import DataConfig


def train_transforms(patch_size: Sequence[int], config: DataConfig) -> Compose:
    """Pad, crop (a share of patches centred on foreground, as nnU-Net), flip, rotate in-plane,
    jitter intensity."""
    keys = ["image", "label"]
    fg = config.foreground_fraction
    steps: list = [
        SpatialPadd(keys, spatial_size=patch_size),
        RandCropByPosNegLabeld(keys, "label", patch_size, pos=fg, neg=1 - fg, num_samples=1),
    ]
    if config.flips:
        steps += [RandFlipd(keys, prob=0.5, spatial_axis=axis) for axis in range(len(patch_size))]
    if config.rotation_degrees > 0:
        angle = math.radians(config.rotation_degrees)
        # in the plane of the first two axes: range_x in 2D, a rotation about the last axis in 3D
        in_plane = {"range_x": angle} if len(patch_size) == 2 else {"range_z": angle}
        steps.append(RandRotated(keys, prob=0.2, mode=("bilinear", "nearest"), padding_mode="zeros", **in_plane))
    if config.intensity_augmentation:
        steps += [RandScaleIntensityd("image", factors=0.1, prob=0.3), RandShiftIntensityd("image", 0.1, prob=0.3)]
    steps.append(EnsureTyped(keys, track_meta=False))
    return Compose(steps)
