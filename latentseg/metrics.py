"""Evaluation: Dice, IoU, NSD and HD95 per case and label with MONAI's metrics, spacing taken from
the file headers, written as an nnU-Net-style `summary.json`."""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.metrics import compute_dice, compute_hausdorff_distance, compute_iou, compute_surface_dice

from latentseg.data.io import is_image_file, read_label
from latentseg.errors import LatentSegError

METRICS = ("Dice", "IoU", "NSD", "HD95")
# MONAI 1.5+ warns about its own internal call; nothing for users to act on
warnings.filterwarnings("ignore", message=".*always_return_as_numpy.*", category=FutureWarning)


def _finite_or_none(value: float) -> float | None:
    return float(value) if math.isfinite(value) else None


def label_metrics(pred: np.ndarray, ref: np.ndarray, spacing: tuple[float, ...], nsd_tolerance: float) -> dict:
    """Metrics for one binary mask pair. Empty reference and prediction: Dice, IoU, NSD and HD95 are
    undefined (None), as in nnU-Net; one of them empty: Dice = IoU = NSD = 0 and HD95 = None."""
    tp = int(np.sum(pred & ref))
    fp, fn = int(np.sum(pred & ~ref)), int(np.sum(~pred & ref))
    out: dict[str, Any] = {"TP": tp, "FP": fp, "FN": fn, "n_pred": tp + fp, "n_ref": tp + fn}
    if tp + fp == 0 and tp + fn == 0:
        return out | dict.fromkeys(METRICS)
    if tp + fp == 0 or tp + fn == 0:
        return out | {"Dice": 0.0, "IoU": 0.0, "NSD": 0.0, "HD95": None}
    onehot = lambda m: torch.from_numpy(np.stack([~m, m]))[None].float()  # noqa: E731  (1, 2, *S)
    p, r = onehot(pred), onehot(ref)
    out["Dice"] = float(compute_dice(p, r, include_background=False)[0, 0])
    out["IoU"] = float(compute_iou(p, r, include_background=False)[0, 0])
    out["NSD"] = float(compute_surface_dice(p, r, [nsd_tolerance], spacing=list(spacing))[0, 0])
    out["HD95"] = _finite_or_none(float(compute_hausdorff_distance(p, r, percentile=95, spacing=list(spacing))[0, 0]))
    return out


def _reference_folder(ref_dir: Path) -> Path:
    for sub in ("labelsTr", "labelsTs", "masks"):
        if (ref_dir / sub).is_dir():
            return ref_dir / sub
    return ref_dir


def _mean(values: list[float | None]) -> float | None:
    finite = [v for v in values if v is not None]
    return float(np.mean(finite)) if finite else None


def evaluate(
    pred_dir: str | Path,
    ref_dir: str | Path,
    labels: list[int] | None = None,
    nsd_tolerance: float = 1.0,
    output: str | Path | None = None,
) -> dict[str, Any]:
    """Compare every reference label file with the prediction of the same name.

    Args:
        labels: foreground labels to score; default: every non-zero value in any file.
        nsd_tolerance: NSD tolerance in physical units (mm for NIfTI, pixels for PNG).
        output: where to write summary.json (default: pred_dir/summary.json).
    """
    pred_dir, ref_dir = Path(pred_dir), Path(ref_dir)
    for d in (pred_dir, ref_dir):
        if not d.is_dir():
            raise LatentSegError(f"{d}: folder not found")
    refs = sorted(p for p in _reference_folder(ref_dir).iterdir() if is_image_file(p))
    if not refs:
        raise LatentSegError(f"{ref_dir}: no reference label files")
    missing = [r.name for r in refs if not (pred_dir / r.name).is_file()]
    if missing:
        raise LatentSegError(
            f"{pred_dir}: no prediction for {len(missing)} reference file(s): {', '.join(missing[:5])}"
        )
    pairs = []
    for ref_path in refs:
        ref, meta = read_label(ref_path)
        pred, _ = read_label(pred_dir / ref_path.name)
        if pred.shape != ref.shape:
            raise LatentSegError(
                f"{pred_dir / ref_path.name}: shape {pred.shape} differs from the reference {ref.shape}"
            )
        pairs.append((ref_path, pred, ref, meta.spacing))
    if labels is None:
        labels = sorted({int(v) for _, p, r, _ in pairs for v in np.union1d(np.unique(p), np.unique(r)) if v != 0})

    per_case = []
    for ref_path, pred, ref, spacing in pairs:
        scores = {str(lab): label_metrics(pred == lab, ref == lab, spacing, nsd_tolerance) for lab in labels}
        per_case.append(
            {"prediction_file": str(pred_dir / ref_path.name), "reference_file": str(ref_path), "metrics": scores}
        )
    mean = {str(lab): {m: _mean([c["metrics"][str(lab)][m] for c in per_case]) for m in METRICS} for lab in labels}
    foreground = {m: _mean([mean[str(lab)][m] for lab in labels]) for m in METRICS}
    summary = {
        "foreground_mean": foreground,
        "mean": mean,
        "metric_per_case": per_case,
        "settings": {"labels": labels, "nsd_tolerance": nsd_tolerance},
    }
    out = Path(output) if output else pred_dir / "summary.json"
    out.write_text(json.dumps(summary, indent=1))
    return summary


def format_table(summary: dict[str, Any], names: dict[str, str] | None = None) -> str:
    """A plain-text table of the per-label means and the foreground mean."""
    names = names or {}
    fmt = lambda v: "   n/a" if v is None else f"{v:6.3f}"  # noqa: E731
    rows = [f"{'label':<24}" + "".join(f"{m:>8}" for m in METRICS)]
    for lab, vals in summary["mean"].items():
        rows.append(f"{(lab + ' ' + names.get(lab, '')).strip():<24}" + "".join(f"  {fmt(vals[m])}" for m in METRICS))
    rows.append(f"{'foreground mean':<24}" + "".join(f"  {fmt(summary['foreground_mean'][m])}" for m in METRICS))
    return "\n".join(rows)
