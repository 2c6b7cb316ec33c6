"""Post-processing of a predicted label map: classes that are one structure in the training labels
(a heart's ventricles, an atrium) keep only their largest connected component, as nnU-Net decides
per class; the rest are left as predicted. Components are connected through faces, edges and
corners (8-connectivity in 2D, 26 in 3D). `predict` applies it to the fused label and to each
saved sample; the probability and uncertainty maps are not changed."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy import ndimage

# a class is one structure when it forms one component in at least this fraction of the training
# labels that hold it (ACDC: RV 0.95, myocardium 0.93, LV 0.98; MoNuSeg's nuclei: never)
SINGLE_COMPONENT_FRACTION = 0.9


def connected_components(mask: np.ndarray) -> tuple[np.ndarray, int]:
    """The components of a binary mask (numbered from 1) and their count, connected through faces,
    edges and corners."""
    return ndimage.label(mask, structure=np.ones((3,) * mask.ndim, dtype=bool))


def keep_largest_component(label: np.ndarray, classes: Sequence[int]) -> np.ndarray:
    """`label` with every voxel of each class in `classes` outside that class's largest connected
    component set to background (0); a new array, the input is not changed."""
    out = label.copy()
    for c in classes:
        components, count = connected_components(label == c)
        if count > 1:
            sizes = np.bincount(components.ravel())
            sizes[0] = 0
            out[(components > 0) & (components != sizes.argmax())] = 0
    return out


def single_component_classes(
    labels: Sequence[np.ndarray], num_classes: int, fraction: float = SINGLE_COMPONENT_FRACTION
) -> tuple[list[int], dict[int, float]]:
    """The foreground classes that form one connected component in at least `fraction` of the
    label maps holding them, and that share per class (classes no label holds are left out)."""
    single: dict[int, list[bool]] = {c: [] for c in range(1, num_classes)}
    for label in labels:
        label = np.asarray(label)
        for c in single:
            mask = label == c
            if mask.any():
                single[c].append(connected_components(mask)[1] == 1)
    shares = {c: float(np.mean(v)) for c, v in single.items() if v}
    return [c for c, share in shares.items() if share >= fraction], shares
