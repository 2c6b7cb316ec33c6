"""Overlay pictures: the image, the predicted labels on top of it and the uncertainty map.

Drawn with numpy and Pillow (a few milliseconds a case), not a plotting library: `predict` writes
one per case in a background thread while the network runs, and a plotted figure (about 0.3 s of
mostly GIL-holding work) made the writer, not the network, set the pace of a folder.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

TITLE_HEIGHT = 14
GAP = 4
MIN_PANEL = 128  # small images are enlarged (nearest neighbour) so titles fit


def normalised(a: np.ndarray) -> np.ndarray:
    """Intensities scaled to [0, 1] between their 0.5th and 99.5th percentiles."""
    lo, hi = np.percentile(a, [0.5, 99.5])
    return np.clip((a - lo) / (hi - lo + 1e-8), 0, 1)


def display_slice(image: np.ndarray, label: np.ndarray, uncertainty: np.ndarray, index: int | None = None):
    """image (C, *S), label (*S), uncertainty (*S) -> their 2D slices: for 3D slice `index` of the
    last axis (the middle one by default)."""
    if label.ndim == 3:
        k = label.shape[-1] // 2 if index is None else int(np.clip(index, 0, label.shape[-1] - 1))
        image, label, uncertainty = image[..., k], label[..., k], uncertainty[..., k]
    return image, label, uncertainty


def colour_panels(image: np.ndarray, label: np.ndarray, uncertainty: np.ndarray) -> tuple[np.ndarray, ...]:
    """2D image (C, H, W), label and uncertainty (H, W) -> (image, labels over the image, heat map)
    as (H, W, 3) uint8 pictures; labels in the tab10 colours at alpha 0.45, the map in magma scaled
    to its maximum."""
    import matplotlib

    grey = np.moveaxis(normalised(image), 0, -1) if image.shape[0] == 3 else normalised(image[0])[..., None]
    rgb = np.repeat(grey, 3 // grey.shape[-1], axis=-1)
    colours = np.asarray(matplotlib.colormaps["tab10"].colors)[(label.astype(np.int64) - 1) % 10]
    alpha = 0.45 * (label > 0)[..., None]
    overlay = rgb * (1 - alpha) + colours * alpha
    heat = matplotlib.colormaps["magma"](uncertainty / (uncertainty.max() + 1e-8))[..., :3]
    return tuple((p * 255).astype(np.uint8) for p in (rgb, overlay, heat))


def save_overlay(path: Path, image: np.ndarray, label: np.ndarray, uncertainty: np.ndarray) -> None:
    """image (C, *S) raw intensities, label (*S), uncertainty (*S) -> a three-panel PNG (for 3D
    the middle slice): the image, the labels over it, and the uncertainty (std) with its maximum
    in the title."""
    image, label, uncertainty = display_slice(image, label, uncertainty)
    panels = colour_panels(image, label, uncertainty)
    scale = max(1, -(-MIN_PANEL // max(label.shape)))
    panels = [np.kron(p, np.ones((scale, scale, 1), np.uint8)) for p in panels]
    h, w = panels[0].shape[:2]
    canvas = np.full((h + TITLE_HEIGHT, 3 * w + 2 * GAP, 3), 255, np.uint8)
    for k, panel in enumerate(panels):
        canvas[TITLE_HEIGHT:, k * (w + GAP) : k * (w + GAP) + w] = panel
    picture = Image.fromarray(canvas)
    draw = ImageDraw.Draw(picture)
    titles = ("image", "prediction", f"uncertainty (std, max {float(uncertainty.max()):.2f})")
    for k, title in enumerate(titles):
        draw.text((k * (w + GAP) + 2, 1), title, fill=(0, 0, 0))
    path.parent.mkdir(parents=True, exist_ok=True)
    picture.save(path, format="PNG")
