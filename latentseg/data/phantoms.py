"""Synthetic phantoms in 2D and 3D, deterministic by seed, so the first command needs no data.

Each case is an "organ" (a smooth, irregular ellipse or ellipsoid) holding 0-2 "lesions" of
another intensity and texture, under a smooth bias field and noise.
Labels: 0 background, 1 organ, 2 lesion. Each case also has a one-sentence description derived
from its ground truth. In the *ambiguous* variant two similar lesions sit in different quadrants;
only the sentence says which one is the target (label 2); the other one is labelled organ.

Position words come from the first two array axes: axis 0 is up/down, axis 1 is left/right.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np
from PIL import Image
from scipy import ndimage

LABELS = {"background": 0, "organ": 1, "lesion": 2}
SMALL_LESION_RADIUS = 0.075  # as a fraction of the image size; below it a lesion is "small"


@dataclass
class Lesion:
    center: np.ndarray  # voxel coordinates
    radius: float  # voxels
    position: str  # e.g. "upper left"
    size_word: str  # "small" | "large"


@dataclass
class Phantom:
    image: np.ndarray  # (1, *S) float32
    label: np.ndarray  # (*S) uint8
    text: str
    lesions: list[Lesion] = field(default_factory=list)
    target: int | None = None  # index of the target lesion in the ambiguous variant
    raters: list[np.ndarray] = field(default_factory=list)  # (*S) uint8 labels, one per annotator


def smooth_field(shape: tuple[int, ...], rng: np.random.Generator, coarse: int = 6) -> np.ndarray:
    """A smooth random field with unit standard deviation: cubic zoom of coarse Gaussian noise."""
    small = rng.standard_normal((coarse,) * len(shape))
    zoomed = ndimage.zoom(small, [s / coarse for s in shape], order=3, mode="reflect")
    zoomed = zoomed[tuple(slice(0, s) for s in shape)]
    return ((zoomed - zoomed.mean()) / (zoomed.std() + 1e-8)).astype(np.float32)


def _rotation(dims: int, rng: np.random.Generator) -> np.ndarray:
    q, r = np.linalg.qr(rng.standard_normal((dims, dims)))
    return q * np.sign(np.diag(r))


def _blob(
    grid: np.ndarray, center: np.ndarray, radii: np.ndarray, rotation: np.ndarray, wobble: np.ndarray, roughness: float
) -> np.ndarray:
    """Mask of an irregular ellipse/ellipsoid: rotated normalized distance plus a smooth wobble < 1."""
    offset = np.tensordot(rotation.T, grid - center.reshape(-1, *([1] * (grid.ndim - 1))), axes=1)
    dist = np.sqrt(sum((offset[i] / radii[i]) ** 2 for i in range(len(radii))))
    return dist + roughness * wobble < 1.0


def _position(center: np.ndarray, organ_center: np.ndarray) -> str:
    vertical = "upper" if center[0] < organ_center[0] else "lower"
    horizontal = "left" if center[1] < organ_center[1] else "right"
    return f"{vertical} {horizontal}"


def _place_lesions(
    organ: np.ndarray, organ_center: np.ndarray, count: int, size: int, rng: np.random.Generator, ambiguous: bool
) -> list[Lesion]:
    inside = ndimage.distance_transform_edt(organ)
    lesions: list[Lesion] = []
    quadrants = [(a, b) for a in (True, False) for b in (True, False)]
    rng.shuffle(quadrants)
    shared_radius = rng.uniform(0.06, 0.1) * size
    for k in range(count):
        radius = shared_radius if ambiguous else rng.uniform(0.045, 0.12) * size
        quadrant = quadrants[k] if ambiguous else None
        candidates = np.argwhere(inside > radius + 2)
        if quadrant is not None:
            keep = ((candidates[:, 0] < organ_center[0]) == quadrant[0]) & (
                (candidates[:, 1] < organ_center[1]) == quadrant[1]
            )
            candidates = candidates[keep]
        candidates = [
            p
            for p in candidates[rng.permutation(len(candidates))[:400]]
            if all(np.linalg.norm(p - other.center) > radius + other.radius + 3 for other in lesions)
        ]
        if not candidates:
            break
        center = candidates[0].astype(np.float64)
        size_word = "small" if radius < SMALL_LESION_RADIUS * size else "large"
        lesions.append(Lesion(center, float(radius), _position(center, organ_center), size_word))
    return lesions


def describe(lesions: list[Lesion], target: int | None = None) -> str:
    """The one-sentence description of a case, derived from its ground truth."""
    if target is not None:
        return f"the lesion in the {lesions[target].position} of the organ"
    if not lesions:
        return "an organ with no lesion"
    if len(lesions) == 1:
        one = lesions[0]
        return f"one {one.size_word} lesion in the {one.position} of the organ"
    parts = [f"a {les.size_word} one in the {les.position}" for les in lesions]
    return f"two lesions: {' and '.join(parts)} of the organ"


def make_phantom(spatial_dims: int = 2, size: int = 128, seed: int = 0, ambiguous: bool = False) -> Phantom:
    """One phantom case, fully determined by its arguments.

    Args:
        spatial_dims: 2 or 3.
        size: edge length in voxels (the phantom is square or cubic).
        seed: the random seed.
        ambiguous: two similar lesions; the text names the target.
    """
    if spatial_dims not in (2, 3):
        raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}")
    if size < 32:
        raise ValueError(f"phantoms need size >= 32, got {size}")
    shape = (size,) * spatial_dims
    grid = np.indices(shape, dtype=np.float32)
    for attempt in range(50):  # the ambiguous variant redraws until both lesions fit
        rng = np.random.default_rng([seed, attempt])
        organ_center = size * (0.5 + rng.uniform(-0.06, 0.06, spatial_dims))
        organ_radii = size * rng.uniform(0.24, 0.36, spatial_dims)
        wobble = smooth_field(shape, rng)
        organ = _blob(grid, organ_center, organ_radii, _rotation(spatial_dims, rng), wobble, 0.12)
        count = 2 if ambiguous else int(rng.choice([0, 1, 2], p=[0.2, 0.4, 0.4]))
        lesions = _place_lesions(organ, organ_center, count, size, rng, ambiguous)
        if len(lesions) == count:
            break
    target = int(rng.integers(2)) if ambiguous else None

    label = organ.astype(np.uint8)
    lesion_masks = []
    for les in lesions:
        radii = les.radius * rng.uniform(0.8, 1.2, spatial_dims)
        mask = _blob(grid, les.center, radii, _rotation(spatial_dims, rng), smooth_field(shape, rng, 4), 0.08)
        mask &= organ
        lesion_masks.append(mask)
        if target is None or len(lesion_masks) - 1 == target:
            label[mask] = LABELS["lesion"]

    image = np.full(shape, 0.15, dtype=np.float32) + 0.04 * smooth_field(shape, rng, 12)
    image[organ] = 0.5 + 0.05 * smooth_field(shape, rng, 10)[organ]
    lesion_level = rng.choice([0.25, 0.78])  # darker or brighter than the organ
    for mask in lesion_masks:
        texture = rng.standard_normal(shape).astype(np.float32)
        texture = ndimage.gaussian_filter(texture, 1.0) * 2.0
        image[mask] = lesion_level + 0.06 * texture[mask]
    image *= 1.0 + 0.2 * smooth_field(shape, rng, 3)  # bias field
    image += rng.normal(0, 0.04, shape).astype(np.float32)
    text = describe(lesions, target)
    return Phantom(image[None].astype(np.float32), label, text, lesions, target)


def write_phantom_dataset(
    out_dir: str | Path,
    num_cases: int,
    spatial_dims: int = 2,
    size: int = 128,
    seed: int = 0,
    ambiguous: bool = False,
    prefix: str = "phantom",
    raters: int = 0,
) -> Path:
    """Write phantoms in the formats real datasets use, so the demo runs the real I/O path.

    3D: an nnU-Net v2 raw folder (`dataset.json`, `imagesTr/CASE_0000.nii.gz`, `labelsTr/CASE.nii.gz`).
    2D: `images/CASE.png` (8-bit grey), `masks/CASE.png` (label values 0, 1, 2).
    Both: `text.csv` with one sentence per case. With `raters` = K, also K annotations per case,
    `raters/rater_k/` (same names as the masks; `add_raters` says how they disagree), and the
    masks hold the model's consensus.
    """
    out = Path(out_dir)
    rows = []
    for i in range(num_cases):
        case = f"{prefix}_{i:03d}"
        ph = make_phantom(spatial_dims, size, seed * 100_000 + i, ambiguous)
        if raters:
            ph = add_raters(ph, raters, np.random.default_rng([seed, i, 17]))
        for k, mask in enumerate(ph.raters):
            folder = out / "raters" / f"rater_{k}"
            folder.mkdir(parents=True, exist_ok=True)
            if spatial_dims == 2:
                Image.fromarray(mask).save(folder / f"{case}.png")
            else:
                nib.save(nib.Nifti1Image(mask, np.eye(4)), str(folder / f"{case}.nii.gz"))
        if spatial_dims == 2:
            (out / "images").mkdir(parents=True, exist_ok=True)
            (out / "masks").mkdir(parents=True, exist_ok=True)
            grey = np.clip(np.round(ph.image[0] / 1.2 * 255), 0, 255).astype(np.uint8)
            Image.fromarray(grey).save(out / "images" / f"{case}.png")
            Image.fromarray(ph.label).save(out / "masks" / f"{case}.png")
            rows.append((f"{case}.png", ph.text))
        else:
            (out / "imagesTr").mkdir(parents=True, exist_ok=True)
            (out / "labelsTr").mkdir(parents=True, exist_ok=True)
            affine = np.eye(4)
            nib.save(nib.Nifti1Image(ph.image[0], affine), str(out / "imagesTr" / f"{case}_0000.nii.gz"))
            nib.save(nib.Nifti1Image(ph.label, affine), str(out / "labelsTr" / f"{case}.nii.gz"))
            rows.append((case, ph.text))
    if spatial_dims == 3:
        meta = {
            "name": f"latentseg {prefix}s",
            "channel_names": {"0": "MRI"},
            "labels": LABELS,
            "numTraining": num_cases,
            "file_ending": ".nii.gz",
        }
        (out / "dataset.json").write_text(json.dumps(meta, indent=2))
    with open(out / "text.csv", "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["filename" if spatial_dims == 2 else "case", "text"])
        writer.writerows(rows)
    return out


# --- several annotators (issue 17): a known model of disagreement ------------------------------

RATER_SHIFTS = (0, 2, -2, 1, -1)  # boundary bias of rater k (voxels; + dilates), cycled


def _shift(mask: np.ndarray, voxels: int) -> np.ndarray:
    if voxels == 0:
        return mask.copy()
    op = ndimage.binary_dilation if voxels > 0 else ndimage.binary_erosion
    return op(mask, iterations=abs(voxels))


def _ambiguous_structures(ph: Phantom, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Draw into `ph.image` a faint lesion and two lesions a narrow gap apart; returns their masks
    (faint, pair, gap) inside the organ."""
    size = ph.label.shape[0]
    organ = ph.label > 0
    free = organ & ~ndimage.binary_dilation(ph.label == LABELS["lesion"], iterations=3)
    inside = ndimage.distance_transform_edt(free)
    grid = np.indices(ph.label.shape, dtype=np.float32)
    masks = []
    for radius in (0.05 * size, 0.11 * size):  # the faint lesion; then room for the pair
        spots = np.argwhere(inside > radius + 1)
        if not len(spots):
            masks.append(np.zeros_like(organ))
            continue
        centre = spots[rng.integers(len(spots))].astype(np.float32)
        masks.append(np.sqrt(((grid - centre.reshape(-1, *[1] * organ.ndim)) ** 2).sum(0)) <= radius)
        inside = np.where(masks[-1], 0, inside)
    faint, room = masks
    axis_line = np.indices(organ.shape)[1]
    centre = ndimage.center_of_mass(room) if room.any() else (0, 0)
    gap = room & (np.abs(axis_line - (centre[1] if len(centre) > 1 else 0)) <= 1)
    pair = room & ~gap
    ph.image[0][faint] += 0.08  # barely brighter than the organ: some raters see it, some do not
    ph.image[0][pair] = 0.78 + 0.03 * rng.standard_normal(int(pair.sum())).astype(np.float32)
    return faint, pair, gap


def add_raters(ph: Phantom, count: int, rng: np.random.Generator) -> Phantom:
    """K annotations of `ph` from a known model of disagreement: rater k shifts every boundary by
    RATER_SHIFTS[k % 5] voxels; the faint lesion is drawn by the first half of the raters only; raters
    0 and 1 merge the two touching lesions into one (they fill the gap). `ph.label` becomes the
    consensus of the model (no shift, the faint lesion by majority, the pair kept apart)."""
    faint, pair, gap = _ambiguous_structures(ph, rng)
    organ, lesion = ph.label > 0, ph.label == LABELS["lesion"]
    raters = []
    for k in range(count):
        shift = RATER_SHIFTS[k % len(RATER_SHIFTS)]
        lesions = lesion | pair | (faint if k < (count + 1) // 2 else False) | (gap if k < 2 else False)
        label = _shift(organ, shift).astype(np.uint8)
        label[_shift(lesions, shift) & (label > 0)] = LABELS["lesion"]
        raters.append(label)
    ph.label = ph.label.copy()
    ph.label[pair | (faint if (count + 1) // 2 > count / 2 else False)] = LABELS["lesion"]
    ph.raters = raters
    return ph
