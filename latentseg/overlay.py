"""Overlay pictures: the image, the predicted labels on top of it and the uncertainty map."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def _display_slice(image: np.ndarray, label: np.ndarray, uncertainty: np.ndarray):
    """2D arrays to draw; for 3D the middle slice along the last axis."""
    if label.ndim == 3:
        k = label.shape[-1] // 2
        image, label, uncertainty = image[..., k], label[..., k], uncertainty[..., k]
    if image.shape[0] == 3:
        shown = np.moveaxis(image, 0, -1)
        shown = (shown - shown.min()) / (np.ptp(shown) + 1e-8)
    else:
        shown = image[0]
    return shown, label, uncertainty


def save_overlay(path: Path, image: np.ndarray, label: np.ndarray, uncertainty: np.ndarray) -> None:
    """image (C, *S) raw intensities, label (*S), uncertainty (*S) -> a three-panel PNG."""
    shown, lab, unc = _display_slice(image, label, uncertainty)
    fig, axes = plt.subplots(1, 3, figsize=(9, 3.2))
    cmap = "gray" if shown.ndim == 2 else None
    axes[0].imshow(shown, cmap=cmap)
    axes[0].set_title("image")
    axes[1].imshow(shown, cmap=cmap)
    masked = np.ma.masked_where(lab == 0, lab)
    axes[1].imshow(masked, cmap="tab10", vmin=0, vmax=9, alpha=0.45, interpolation="nearest")
    axes[1].set_title("prediction")
    im = axes[2].imshow(unc, cmap="magma", vmin=0)
    axes[2].set_title("uncertainty (std)")
    fig.colorbar(im, ax=axes[2], fraction=0.046)
    for ax in axes:
        ax.axis("off")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)
    plt.close(fig)
