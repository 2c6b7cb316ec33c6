"""Is the uncertainty worth trusting? Calibration, error detection and agreement with annotators.

- Calibration (per label, one against the rest, and overall on the top label): expected
  calibration error over 15 equal-width bins of the predicted probability (Guo et al. 2017) and
  the Brier score; a reliability diagram.
- Error detection: the AUROC with which an uncertainty map (`CASE_std`, `CASE_entropy`) finds
  the voxels whose predicted label is wrong, over the whole image and within a band of a few
  voxels around the reference boundaries, where the hard voxels are.
- Several annotators (LIDC-style, as reported by the Probabilistic U-Net, PHiSeg, CIMD, BerDiff):
  the squared generalized energy distance GED^2 = 2 E d(S, Y) - E d(S, S') - E d(Y, Y') with
  d = 1 - IoU (two empty masks: d = 0), the Hungarian-matched IoU between samples and raters, and
  QUBIQ's Dice of the thresholded mean prediction against the thresholded raters' mean at
  0.1 ... 0.9.

AUROC and the Brier score come from scikit-learn; ECE, GED and HM-IoU are written here (scikit-learn
has no ECE; the tests check it against torchmetrics and GED against a case computed by hand).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy import ndimage
from scipy.optimize import linear_sum_assignment
from scipy.special import log_softmax, softmax
from sklearn.metrics import brier_score_loss, roc_auc_score

ECE_BINS = 15
BOUNDARY_BAND = 3  # voxels on each side of a reference boundary
QUBIQ_THRESHOLDS = tuple(round(0.1 * k, 1) for k in range(1, 10))


def calibration_bins(confidence: np.ndarray, correct: np.ndarray, bins: int = ECE_BINS) -> dict[str, np.ndarray]:
    """Per equal-width bin of [0, 1] (plus one for exactly 1): voxel count, mean confidence and
    accuracy (NaN where empty)."""
    confidence, correct = np.ravel(confidence).astype(np.float64), np.ravel(correct).astype(np.float64)
    # bins [k/B, (k+1)/B), and 1.0 in a bin of its own, as torchmetrics counts them
    index = np.searchsorted(np.linspace(0, 1, bins + 1), confidence, side="right") - 1
    count = np.bincount(index, minlength=bins + 1)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_conf = np.bincount(index, weights=confidence, minlength=bins + 1) / count
        accuracy = np.bincount(index, weights=correct, minlength=bins + 1) / count
    return {"count": count, "confidence": mean_conf, "accuracy": accuracy}


def expected_calibration_error(confidence: np.ndarray, correct: np.ndarray, bins: int = ECE_BINS) -> float:
    """sum_b |B_b| / N * |accuracy_b - confidence_b| over equal-width bins."""
    b = calibration_bins(confidence, correct, bins)
    filled = b["count"] > 0
    weights = b["count"][filled] / b["count"].sum()
    return float(np.sum(weights * np.abs(b["accuracy"][filled] - b["confidence"][filled])))


def binary_calibration(probability: np.ndarray, target: np.ndarray) -> dict[str, float]:
    """ECE and Brier score of one label's probability (one against the rest)."""
    p, y = np.ravel(probability).astype(np.float64), np.ravel(target).astype(bool)
    return {"ECE": expected_calibration_error(p, y), "Brier": float(brier_score_loss(y, p))}


def top_label_ece(probabilities: np.ndarray, reference: np.ndarray) -> float:
    """Overall ECE: the top label's probability against whether the top label is right. (C, *S)."""
    confidence = probabilities.max(0)
    correct = probabilities.argmax(0) == reference
    return expected_calibration_error(confidence, correct)


def boundary_band(reference: np.ndarray, width: int = BOUNDARY_BAND) -> np.ndarray:
    """Voxels within `width` voxels of a boundary between two labels of the reference."""
    edges = np.zeros(reference.shape, dtype=bool)
    for axis in range(reference.ndim):
        a = np.diff(reference, axis=axis) != 0
        lo = [slice(None)] * reference.ndim
        hi = [slice(None)] * reference.ndim
        lo[axis], hi[axis] = slice(0, -1), slice(1, None)
        edges[tuple(lo)] |= a
        edges[tuple(hi)] |= a
    if not edges.any():
        return edges
    return ndimage.distance_transform_edt(~edges) <= width


def error_auroc(uncertainty: np.ndarray, wrong: np.ndarray, mask: np.ndarray | None = None) -> float | None:
    """AUROC of `uncertainty` as a detector of `wrong` voxels (within `mask`); None when the voxels
    are all right or all wrong (the AUROC is undefined)."""
    u, w = np.ravel(uncertainty), np.ravel(wrong).astype(bool)
    if mask is not None:
        u, w = u[np.ravel(mask)], w[np.ravel(mask)]
    if w.all() or not w.any():
        return None
    return float(roc_auc_score(w, u))


def iou_distance(a: np.ndarray, b: np.ndarray) -> float:
    """1 - IoU of two binary masks; 0 for two empty masks (they agree)."""
    union = np.logical_or(a, b).sum()
    return 0.0 if union == 0 else 1.0 - float(np.logical_and(a, b).sum()) / float(union)


def generalized_energy_distance(samples: Sequence[np.ndarray], raters: Sequence[np.ndarray]) -> float:
    """GED^2 = 2 E d(S, Y) - E d(S, S') - E d(Y, Y'), d = 1 - IoU, over all pairs (binary masks)."""
    if len(samples) < 1 or len(raters) < 1:
        raise ValueError("GED needs at least one sample and one rater")
    cross = np.mean([iou_distance(s, y) for s in samples for y in raters])
    within_s = np.mean([iou_distance(a, b) for a in samples for b in samples])
    within_y = np.mean([iou_distance(a, b) for a in raters for b in raters])
    return float(2 * cross - within_s - within_y)


def hungarian_iou(samples: Sequence[np.ndarray], raters: Sequence[np.ndarray]) -> float:
    """Mean IoU of the best one-to-one matching of samples to raters, both repeated to the least
    common multiple of their counts (as PHiSeg and CIMD report HM-IoU)."""
    n, m = len(samples), len(raters)
    size = np.lcm(n, m)
    s = [samples[i % n] for i in range(size)]
    r = [raters[j % m] for j in range(size)]
    iou = np.array([[1.0 - iou_distance(a, b) for b in r] for a in s])
    rows, cols = linear_sum_assignment(-iou)
    return float(iou[rows, cols].mean())


def qubiq_dice(probability: np.ndarray, raters: Sequence[np.ndarray]) -> float:
    """QUBIQ: Dice of (probability > tau) against (raters' mean > tau), averaged over tau = 0.1 ... 0.9
    (two empty masks at a threshold: Dice 1)."""
    mean = np.mean([np.asarray(r, dtype=np.float64) for r in raters], axis=0)
    scores = []
    for tau in QUBIQ_THRESHOLDS:
        p, y = probability > tau, mean > tau
        total = p.sum() + y.sum()
        scores.append(1.0 if total == 0 else 2.0 * np.logical_and(p, y).sum() / total)
    return float(np.mean(scores))


def mean_pairwise_iou(masks: Sequence[np.ndarray]) -> float | None:
    """Mean IoU over distinct pairs: how much a set of masks (samples, or raters) agree."""
    pairs = [(i, j) for i in range(len(masks)) for j in range(i + 1, len(masks))]
    if not pairs:
        return None
    return float(np.mean([1.0 - iou_distance(masks[i], masks[j]) for i, j in pairs]))


def _log(probabilities: np.ndarray) -> np.ndarray:
    return np.log(np.clip(probabilities, 1e-8, None))


TEMPERATURES = np.exp(np.linspace(np.log(0.25), np.log(8.0), 61))  # the search grid, 1 included


def calibrated(probabilities: np.ndarray, temperature: float, axis: int = 0) -> np.ndarray:
    """softmax(log p / T) along the class axis: temperature scaling of probabilities (for one
    sample exactly that of its logits, as the log differs from them by a constant per voxel)."""
    if temperature == 1.0:
        return probabilities
    return softmax(_log(probabilities) / temperature, axis=axis)


def fit_temperature(
    probabilities: Sequence[np.ndarray], labels: Sequence[np.ndarray], max_voxels: int = 200_000
) -> float:
    """The temperature on the grid TEMPERATURES that minimises the negative log-likelihood of the
    (*S) integer labels under the (C, *S) probabilities, every case pooled (a random subset of
    `max_voxels` voxels per case)."""
    rng = np.random.default_rng(0)
    logp, y = [], []
    for p, lab in zip(probabilities, labels, strict=True):
        flat, target = p.reshape(p.shape[0], -1), np.ravel(lab).astype(np.int64)
        keep = rng.choice(target.size, max_voxels, replace=False) if target.size > max_voxels else slice(None)
        logp.append(_log(flat[:, keep]))
        y.append(target[keep])
    z, target = np.concatenate(logp, axis=1), np.concatenate(y)

    def nll(t: float) -> float:
        return float(-np.mean(log_softmax(z / t, axis=0)[target, np.arange(target.size)]))

    return float(min(TEMPERATURES, key=nll))
