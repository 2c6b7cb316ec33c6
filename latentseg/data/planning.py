"""Patch size and per-axis downsampling planned from the data, as nnU-Net does from its fingerprint:
anisotropic volumes (few slices, or coarse slice spacing) are not downsampled along the coarse axis
until the other axes catch up, and no axis is downsampled below `MIN_FEATURE` voxels."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from latentseg.errors import LatentSegError

DEFAULT_PATCH = {2: 256, 3: 96}
MIN_FEATURE = 4  # an axis is halved only while it keeps at least this many voxels


def median_shape(shapes: Sequence[Sequence[int]]) -> list[int]:
    return [int(v) for v in np.median(np.asarray(shapes), axis=0)]


def plan_patch(requested: Sequence[int], shapes: Sequence[Sequence[int]], dims: int) -> list[int]:
    """The configured patch (or 256^2 / 96^3), shrunk per axis to the median image size."""
    if requested:
        if len(requested) != dims:
            raise LatentSegError(f"data.patch_size {list(requested)} must have {dims} entries for {dims}D data")
        patch = [int(p) for p in requested]
    else:
        patch = [DEFAULT_PATCH[dims]] * dims
    return [min(p, m) for p, m in zip(patch, median_shape(shapes), strict=True)]


def plan_strides(patch: Sequence[int], spacing: Sequence[float], num_downsamplings: int) -> list[list[int]]:
    """One per-axis stride list per stage. An axis is halved while it keeps >= MIN_FEATURE voxels
    and its spacing is at most twice the finest spacing among the axes that can still be halved."""
    sizes, spacing = [float(p) for p in patch], [float(s) for s in spacing]
    strides = []
    for _ in range(num_downsamplings):
        can_halve = [size / 2 >= MIN_FEATURE for size in sizes]
        if not any(can_halve):
            break
        finest = min(sp for sp, ok in zip(spacing, can_halve, strict=True) if ok)
        stage = [2 if ok and sp <= 2 * finest else 1 for sp, ok in zip(spacing, can_halve, strict=True)]
        strides.append(stage)
        sizes = [s / f for s, f in zip(sizes, stage, strict=True)]
        spacing = [s * f for s, f in zip(spacing, stage, strict=True)]
    return strides


def total_stride(strides: Sequence[Sequence[int] | int], dims: int) -> list[int]:
    total = [1] * dims
    for stage in strides:
        stage = [stage] * dims if isinstance(stage, int) else stage
        total = [t * s for t, s in zip(total, stage, strict=True)]
    return total


def round_up(patch: Sequence[int], multiple: Sequence[int]) -> list[int]:
    return [int(math.ceil(p / m) * m) for p, m in zip(patch, multiple, strict=True)]


def plan_denoiser_strides(latent: Sequence[int], levels: int) -> list[list[int]]:
    """Halve the latent grid between denoiser levels along axes that keep >= 2 voxels."""
    sizes, strides = list(latent), []
    for _ in range(levels - 1):
        stage = [2 if s >= 4 else 1 for s in sizes]
        strides.append(stage)
        sizes = [math.ceil(s / f) for s, f in zip(sizes, stage, strict=True)]
    return strides
