"""Patch size and per-axis downsampling planned from the data, as nnU-Net does from its fingerprint:
anisotropic volumes (few slices, or coarse slice spacing) are not downsampled along the coarse axis
until the other axes catch up, and no axis is downsampled below `MIN_FEATURE` voxels."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np

from latentseg.errors import LatentSegError

DEFAULT_PATCH = {2: 256, 3: 96}
MIN_FEATURE = 4  # an axis is halved only while it keeps at least this many voxels
SHORT_AXIS_RATIO = 4  # an axis this many times shorter than the longest may be a few-slice axis


def median_shape(shapes: Sequence[Sequence[int]]) -> list[int]:
    return [int(v) for v in np.median(np.asarray(shapes), axis=0)]


SHORT_RUN_MINUTES = 30.0  # a time budget up to this is a short run: 2D patches of SHORT_RUN_PATCH_2D
SHORT_RUN_PATCH_2D = 128  # MoNuSeg, 10 minutes on a CPU thread: 256^2 made 329 steps (Dice 0.781), 128^2 1273 (0.795)


# a 3D volume of few slices (an axis at most 1/SHORT_AXIS_RATIO of the longest, shorter than the
# default patch) takes its slices whole, and this much in-plane: on ACDC (median 216x256x9) 96x96
# cut through the largest hearts (93 voxels across; patient087 scored Dice 0.24 / 0.32) and 128x128
# fixed them (0.67 / 0.70; all cases 0.740 -> 0.781 in 15 min, benchmarks/results/realdata.json)
THIN_VOLUME_IN_PLANE = 128


def plan_patch(
    requested: Sequence[int], shapes: Sequence[Sequence[int]], dims: int, budget_minutes: float = 0.0
) -> list[int]:
    """The configured patch, or 256^2 (128^2 for a short time budget: more steps in the same
    minutes) / 96^3 (128^2 in-plane for a volume of few slices), shrunk per axis to the median
    image size."""
    median = median_shape(shapes)
    if requested:
        if len(requested) != dims:
            raise LatentSegError(f"data.patch_size {list(requested)} must have {dims} entries for {dims}D data")
        patch = [int(p) for p in requested]
    elif dims == 3 and (slices := [a for a in short_axes(median) if median[a] < DEFAULT_PATCH[3]]):
        patch = [DEFAULT_PATCH[3] if axis in slices else THIN_VOLUME_IN_PLANE for axis in range(3)]
    else:
        short = dims == 2 and 0 < budget_minutes <= SHORT_RUN_MINUTES
        patch = [SHORT_RUN_PATCH_2D if short else DEFAULT_PATCH[dims]] * dims
    return [min(p, m) for p, m in zip(patch, median, strict=True)]


# A grid coarser than the images' own when their structures are much larger than the patch, so that
# a patch sees one whole (nnU-Net's 3d_lowres does this for volumes larger than its patch). BU-BIL
# (one cell per image, its bounding box 366x450 pixels at the median of the training cases; patch
# 128), 10 minutes side by side, 2026-12-07/08: latentseg scored Dice 0.697-0.737 at 1/2 (the UNet
# on the images' own grid beside it 0.636-0.659) and 0.680 at 1/4, against 0.526-0.556 on the
# images' own grid in three earlier windows (benchmarks/results/realdata.json). MoNuSeg (34 pixels),
# ISBI 2012 EM (194), ACDC (70x64x9 voxels, patch 128x128x10) and LA2018 (162x96x62, patch 96x96x88)
# stay on their grids; at 1/2 by hand LA2018 gained no Dice (0.815 against 0.813) and lost NSD,
# and ISBI EM lost both (0.945 against 0.954), so a structure under two patches keeps the grid.
CONTEXT_PATCHES = 2.0  # a structure may span this many patch widths before the grid is coarsened
CONTEXT_FACTORS = (2, 4)  # the coarser grids tried, in order


def structure_extent(labels: Sequence[np.ndarray], dims: int) -> list[float]:
    """Per axis, the median over cases of the bounding box of each case's largest foreground
    component (as post-processing connects them), in voxels: how large the structures to segment
    are (0 without foreground)."""
    from scipy import ndimage

    from latentseg.postprocess import connected_components

    boxes = []
    for label in case_labels(labels, dims):
        components, count = connected_components(label > 0)
        if count == 0:
            continue
        largest = int(np.bincount(components.ravel())[1:].argmax()) + 1
        box = ndimage.find_objects(components)[largest - 1]
        boxes.append([s.stop - s.start for s in box])
    return [float(v) for v in np.median(boxes, axis=0)] if boxes else [0.0] * dims


def grid_ceiling(labels: Sequence[np.ndarray], num_classes: int, factor: int, dims: int) -> list[float]:
    """`label_ceiling` at `factor` along every axis, the background first (a thin background, as EM
    membranes between cells, is lost too), each on the foreground's window (`foreground_window`:
    beyond it the background is whole, and a CT's full volume would cost gigabytes)."""
    total = [factor] * dims
    windows = [
        label[w] for label in case_labels(labels, dims) if (w := foreground_window(label > 0, total)) is not None
    ]
    background = [(label == 0).astype(np.uint8) for label in windows]
    return label_ceiling(background, 2, total) + label_ceiling(windows, num_classes, total)


def plan_grid_factor(
    labels: Sequence[np.ndarray],
    num_classes: int,
    patch_at: Callable[[int], Sequence[int]],
    threshold: float = 0.98,
) -> dict:
    """How much coarser than the images' own grid to train and predict: 1 while the typical
    structure (`structure_extent`) spans at most CONTEXT_PATCHES patches along every axis;
    otherwise the first of CONTEXT_FACTORS where it does, as far as the labels survive it (their
    `grid_ceiling` at that factor at least `threshold` for every class; thin structures stop it).
    `patch_at(f)` is the patch planned on images shrunk by f. Returns the factor, the extent, the
    ceilings measured and the patch at that factor."""
    dims = len(patch_at(1))
    extent = structure_extent(labels, dims)
    report: dict = {"factor": 1, "extent": extent, "ceilings": {}}

    def fits(f: int) -> bool:
        return all(e / f <= CONTEXT_PATCHES * p for e, p in zip(extent, patch_at(f), strict=True))

    for f in () if fits(1) else CONTEXT_FACTORS:
        ceiling = [round(v, 4) for v in grid_ceiling(labels, num_classes, f, dims)]
        report["ceilings"][f] = ceiling
        if min(ceiling) < threshold:
            break
        report["factor"] = f
        if fits(f):
            break
    return report | {"patch": list(patch_at(report["factor"]))}


def describe_grid(report: dict) -> str:
    """One line for check-dataset and train: the grid chosen and why (`report` as `plan_grid_factor`
    returns it)."""
    patch = report["patch"]
    extent = "x".join(f"{v:.0f}" for v in report["extent"])
    ceilings = "; ".join(f"1/{f}: {min(c):.3f}" for f, c in report["ceilings"].items())
    tried = f"; worst label ceiling {ceilings}" if ceilings else ""
    grid = "the images' own" if report["factor"] == 1 else f"1/{report['factor']} of the images'"
    return f"grid: {grid} (the largest structures span {extent} voxels, the patch {list(patch)}{tried})"


def short_axes(shape: Sequence[int]) -> list[int]:
    """Axes at most 1/SHORT_AXIS_RATIO of the longest: the slice axis of a volume of few slices."""
    return [a for a, size in enumerate(shape) if size * SHORT_AXIS_RATIO <= max(shape)]


def plan_strides(
    patch: Sequence[int],
    spacing: Sequence[float],
    num_downsamplings: int,
    frozen: Sequence[int] = (),
    late: Sequence[int] = (),
) -> list[list[int]]:
    """One per-axis stride list per stage. An axis is halved while it keeps >= MIN_FEATURE voxels
    and its spacing is at most twice the finest spacing among the axes that can still be halved;
    `frozen` axes are never halved (see `frozen_axes`), `late` axes not in the first half of the
    stages (thin slices: the fine stages, whose features the decoder's skips carry, keep them apart)."""
    sizes, spacing = [float(p) for p in patch], [float(s) for s in spacing]
    strides = []
    for index in range(num_downsamplings):
        held = set(frozen) | (set(late) if index < num_downsamplings // 2 else set())
        can_halve = [size / 2 >= MIN_FEATURE and axis not in held for axis, size in enumerate(sizes)]
        if not any(can_halve):  # every axis is late: halve them now rather than not at all
            can_halve = [size / 2 >= MIN_FEATURE and axis not in frozen for axis, size in enumerate(sizes)]
        if not any(can_halve):
            break
        finest = min(sp for sp, ok in zip(spacing, can_halve, strict=True) if ok)
        stage = [2 if ok and sp <= 2 * finest else 1 for sp, ok in zip(spacing, can_halve, strict=True)]
        strides.append(stage)
        sizes = [s / f for s, f in zip(sizes, stage, strict=True)]
        spacing = [s * f for s, f in zip(spacing, stage, strict=True)]
        # a late axis held back keeps up with the finest halved axis, so that it is not the only one
        # halved when released
        finest_halved = min((sp for sp, f in zip(spacing, stage, strict=True) if f == 2), default=0.0)
        spacing = [max(sp, finest_halved) if axis in late and axis in held else sp for axis, sp in enumerate(spacing)]
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


MAX_CEILING_CASES = 16  # label ceilings are measured on at most this many training cases


def evenly_spaced(items: Sequence, count: int) -> list:
    """At most `count` of `items`, spread evenly over them, in order."""
    if not items:
        return []
    picks = np.linspace(0, len(items) - 1, min(len(items), count)).round().astype(int)
    return [items[i] for i in sorted(set(picks.tolist()))]


def case_labels(labels: Sequence[np.ndarray], dims: int) -> list[np.ndarray]:
    """The labels that planning measures: at most MAX_CEILING_CASES of them, evenly spread, each
    as an array of its `dims` spatial axes (a leading channel axis dropped)."""
    return [np.asarray(label).reshape(np.shape(label)[-dims:]) for label in evenly_spaced(labels, MAX_CEILING_CASES)]


def label_ceiling(labels: Sequence[np.ndarray], num_classes: int, total: Sequence[int]) -> list[float]:
    """How well a latent downsampled by `total` per axis can hold the labels: per foreground class,
    the mean Dice over cases of argmax(upsample(average-pool(one-hot))) against the label (a cheap
    proxy of a trained label autoencoder's reconstruction). Classes a case lacks are skipped there."""
    import torch
    import torch.nn.functional as F

    per_class: list[list[float]] = [[] for _ in range(1, num_classes)]
    for label in case_labels(labels, len(total)):
        window = foreground_window(label, total)
        if window is None:  # no foreground: no class to score
            continue
        y = torch.from_numpy(np.array(label[window], dtype=np.int64))  # a copy: the label may be a read-only memmap
        onehot = F.one_hot(y, num_classes).movedim(-1, 0)[None].float()  # (1, C, *S)
        pool = (F.avg_pool2d, F.avg_pool3d)[len(total) - 2]
        coarse = pool(onehot, kernel_size=list(total), stride=list(total), ceil_mode=True)
        back = F.interpolate(coarse, size=tuple(y.shape), mode=("bilinear", "trilinear")[len(total) - 2])
        pred = back[0].argmax(0)
        for c in range(1, num_classes):
            p, r = pred == c, y == c
            if p.any() or r.any():
                per_class[c - 1].append(float(2 * (p & r).sum() / (p.sum() + r.sum())))
    return [float(np.mean(v)) if v else 1.0 for v in per_class]


CEILING_MARGIN = 2  # latent cells of background kept around the foreground by `foreground_window`


def foreground_window(label: np.ndarray, total: Sequence[int]) -> tuple[slice, ...] | None:
    """The part of `label` that decides its label ceiling at stride `total`: the foreground's bounding
    box widened by `CEILING_MARGIN` latent cells, on the latent grid. Outside it every cell that
    interpolation reaches is pure background, so the ceiling is the same as on the whole image (up
    to the last partial cell's rounding), at a fraction of the cost for a small organ in a large CT."""
    window = []
    for axis, t in enumerate(total):
        along = np.flatnonzero(np.any(label, axis=tuple(a for a in range(label.ndim) if a != axis)))
        if along.size == 0:
            return None
        start = max(0, (int(along[0]) // t - CEILING_MARGIN) * t)
        stop = min(label.shape[axis], (int(along[-1]) // t + 1 + CEILING_MARGIN) * t)
        window.append(slice(start, stop))
    return tuple(window)


def frozen_axes(labels: Sequence[np.ndarray], num_classes: int, dims: int, threshold: float = 0.98) -> list[int]:
    """Short axes (at most a quarter of the longest: the slice axis of a volume with few, thick
    slices, whatever its header says) along which halving the labels alone loses a class below
    `threshold`. Without decoder skips they are never downsampled; with skips, late."""
    frozen = []
    # only slice axes: 2D images and near-isotropic volumes are halved as planned
    for axis in short_axes(np.asarray(labels[0]).shape[-dims:]):
        stride = [2 if a == axis else 1 for a in range(dims)]
        if min(label_ceiling(labels, num_classes, stride)) < threshold:
            frozen.append(axis)
    return frozen


def plan_latent(
    labels: Sequence[np.ndarray],
    num_classes: int,
    patch: Sequence[int],
    spacing: Sequence[float],
    threshold: float = 0.98,
    min_downsamplings: int = 3,
    max_downsamplings: int = 4,
    skips: bool = True,
) -> dict:
    """The latent of a dataset, from its training labels: axes that cannot be halved without losing
    a class are frozen; then the coarsest number of downsamplings (from `min_downsamplings` to
    `max_downsamplings`) whose label ceiling reaches `threshold` for every class, without decoder
    skips; where none does, the coarsest latent with skips from the image encoder (the decoder then
    takes the boundaries from the image side), or, with `skips` refused, the workable latent whose
    worst class keeps the most. Returns the choice and every ceiling measured."""
    frozen = frozen_axes(labels, num_classes, len(patch), threshold)
    ceilings = _ceilings(labels, num_classes, patch, spacing, frozen, max_downsamplings)
    workable = {n: c for n, c in ceilings.items() if n >= min_downsamplings} or ceilings
    fits = [n for n, c in workable.items() if min(c) >= threshold]
    if fits or (not skips and workable):
        best = max(fits) if fits else max(workable, key=lambda n: (min(workable[n]), n))
        return {"num_downsamplings": best, "decoder_skips": False, "frozen_axes": frozen, "ceilings": ceilings}
    # with skips the decoder takes the detail from the image side: thin axes are halved, but only in
    # the coarse half of the stages (keeping a few-slice axis whole at every stage made a step on
    # ACDC 1.7x slower; halving it first cost the myocardium 0.07 Dice, benchmarks/results/realdata.json)
    ceilings = _ceilings(labels, num_classes, patch, spacing, [], max_downsamplings, late=frozen)
    coarsest = max(ceilings, default=1)
    return {"num_downsamplings": coarsest, "decoder_skips": True, "frozen_axes": [], "thin_axes": frozen,
            "ceilings": ceilings}  # fmt: skip


def _ceilings(labels, num_classes, patch, spacing, frozen, max_downsamplings, late=()) -> dict[int, list[float]]:
    """The label ceiling of each number of downsamplings the patch allows (up to the maximum)."""
    ceilings: dict[int, list[float]] = {}
    for n in range(1, max_downsamplings + 1):
        strides = plan_strides(patch, spacing, n, frozen, late)
        if len(strides) < n:  # no axis can be halved again
            break
        total = total_stride(strides, len(patch))
        ceilings[n] = [round(v, 4) for v in label_ceiling(labels, num_classes, total)]
    return ceilings


def describe_latent(latent: dict, strides: Sequence, dims: int) -> str:
    """One line for check-dataset and train: the choice and the ceilings behind it."""
    total = "x".join(str(v) for v in total_stride(strides, dims))
    ceilings = "; ".join(f"{n}: {', '.join(f'{v:.3f}' for v in c)}" for n, c in latent["ceilings"].items())
    frozen = f", axes {latent['frozen_axes']} kept whole" if latent["frozen_axes"] else ""
    if latent.get("thin_axes"):
        frozen = f", axes {latent['thin_axes']} too thin to halve without skips (halved late)"
    skips = "with" if latent["decoder_skips"] else "without"
    return (
        f"latent: {latent['num_downsamplings']} downsamplings (1/{total}){frozen}, {skips} decoder skips; "
        f"label ceiling per class by downsamplings: {ceilings}"
    )
