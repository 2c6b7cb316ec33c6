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

from latentseg.data.datasets import extra_mask_of, mask_case_id, masks_beside_images, read_merged_mask
from latentseg.data.io import is_image_file, read_label, split_suffix
from latentseg.errors import LatentSegError
from latentseg.fusion import majority

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


def _predictions(pred_dir: Path) -> dict[str, Path]:
    """{case id: the label map `predict` wrote} (its maps, samples and overlays have other stems)."""
    return {split_suffix(p)[0]: p for p in sorted(pred_dir.iterdir()) if is_image_file(p)}


def _references(ref_dirs: list[Path], predictions: dict[str, Path]) -> dict[str, list[list[Path]]]:
    """{case id: its reference in each --ref folder that has it, as [mask, *further masks]}; a case
    may lack some raters. A reference pairs with the prediction of its case, whatever either's file
    type (`a.jpg` with `a.png`) and with a mask suffix (`a_segmentation.png`) where no prediction
    has its full name. In a folder of images beside their masks (BUSI) only the masks count, and a
    numbered further mask (`a_mask_1.png`) is merged into its case's."""
    found: dict[str, list[list[Path]]] = {}
    for d in ref_dirs:
        if not d.is_dir():
            raise LatentSegError(f"{d}: folder not found")
        files = sorted(p for p in _reference_folder(d).iterdir() if is_image_file(p))
        if not files:
            raise LatentSegError(f"{d}: no reference label files")
        in_folder: dict[str, list[Path]] = {}
        further: dict[str, list[Path]] = {}
        for p in masks_beside_images(files) or files:
            stem = split_suffix(p)[0]
            case = mask_case_id(stem, predictions)
            owner = None if case in predictions else extra_mask_of(stem, predictions)
            if owner is not None:
                further.setdefault(owner, []).append(p)
            else:
                in_folder.setdefault(case, []).append(p)
        for case, paths in in_folder.items():
            found.setdefault(case, []).extend([p, *further.get(case, [])] for p in paths)
    return found


def _read_case(pred_path: Path, refs: list[list[Path]]) -> tuple[np.ndarray, list[np.ndarray], tuple]:
    masks, spacing = [], None
    for paths in refs:
        ref, meta = read_merged_mask(paths)
        if masks and ref.shape != masks[0].shape:
            raise LatentSegError(f"{paths[0]}: shape {ref.shape} differs from {refs[0][0]} {masks[0].shape}")
        masks.append(ref)
        spacing = spacing or meta.spacing
    pred, _ = read_label(pred_path)
    if pred.shape != masks[0].shape:
        raise LatentSegError(f"{pred_path}: shape {pred.shape} differs from the reference {masks[0].shape}")
    return pred, masks, spacing


def evaluate(
    pred_dir: str | Path,
    ref_dir: str | Path | list[str | Path],
    labels: list[int] | None = None,
    nsd_tolerance: float = 1.0,
    output: str | Path | None = None,
) -> dict[str, Any]:
    """Compare every reference label file with the prediction of the same name.

    Args:
        ref_dir: a reference folder, or several (one per annotator): Dice, IoU, NSD and HD95 are
            then scored against the raters' majority, and the multi-rater metrics (GED, HM-IoU,
            QUBIQ Dice) need the samples `predict --save-samples` writes.
        labels: foreground labels to score; default: every non-zero value in any file.
        nsd_tolerance: NSD tolerance in physical units (mm for NIfTI, pixels for PNG).
        output: where to write summary.json (default: pred_dir/summary.json); a reliability
            diagram is written beside it when the predictions have probability maps.
    """
    pred_dir = Path(pred_dir)
    ref_dirs = [Path(d) for d in (ref_dir if isinstance(ref_dir, (list, tuple)) else [ref_dir])]
    if not pred_dir.is_dir():
        raise LatentSegError(f"{pred_dir}: folder not found")
    predictions = _predictions(pred_dir)
    by_case = _references(ref_dirs, predictions)
    missing = [refs[0][0].name for case, refs in by_case.items() if case not in predictions]
    if missing:
        raise LatentSegError(
            f"{pred_dir}: no prediction for {len(missing)} reference file(s): {', '.join(missing[:5])}"
        )
    references = {predictions[case].name: refs for case, refs in by_case.items()}  # keyed by prediction file
    cases = {name: _read_case(pred_dir / name, refs) for name, refs in references.items()}
    if labels is None:
        labels = sorted({int(v) for p, ms, _ in cases.values() for m in (p, *ms) for v in np.unique(m) if v != 0})
    per_case = []
    for name, (pred, masks, spacing) in cases.items():
        ref = majority(masks)
        scores = {str(lab): label_metrics(pred == lab, ref == lab, spacing, nsd_tolerance) for lab in labels}
        per_case.append({"prediction_file": str(pred_dir / name), "reference_file": str(references[name][0][0]),
                         "raters": len(masks), "metrics": scores})  # fmt: skip
    mean = {str(lab): {m: _mean([c["metrics"][str(lab)][m] for c in per_case]) for m in METRICS} for lab in labels}
    foreground = {m: _mean([mean[str(lab)][m] for lab in labels]) for m in METRICS}
    out = Path(output) if output else pred_dir / "summary.json"
    summary = {
        "foreground_mean": foreground,
        "mean": mean,
        "metric_per_case": per_case,
        "settings": {"labels": labels, "nsd_tolerance": nsd_tolerance, "references": [str(d) for d in ref_dirs]},
    }
    from latentseg.uncertainty_report import calibration_report, multirater_report

    calibration = calibration_report(pred_dir, cases, labels, out.with_name("reliability.png"))
    if calibration:
        summary["calibration"] = calibration
    if len(ref_dirs) > 1:
        summary["multirater"] = multirater_report(pred_dir, cases, labels)
    out.write_text(json.dumps(summary, indent=1))
    return summary


def uncertainty_lines(summary: dict[str, Any]) -> list[str]:
    """The calibration and multi-rater figures of a summary, one line each (for the console)."""
    fmt = lambda v: "n/a" if v is None else f"{v:.3f}"  # noqa: E731
    lines = []
    if "calibration" in summary:
        o = summary["calibration"]["overall"]
        lines.append("calibration: " + ", ".join(f"{k} {fmt(v)}" for k, v in o.items()))
    if "multirater" in summary:
        lines.append("annotators: " + ", ".join(f"{k} {fmt(v)}" for k, v in summary["multirater"]["mean"].items()))
    return lines


def format_table(summary: dict[str, Any], names: dict[str, str] | None = None) -> str:
    """A plain-text table of the per-label means and the foreground mean."""
    names = names or {}
    fmt = lambda v: "   n/a" if v is None else f"{v:6.3f}"  # noqa: E731
    rows = [f"{'label':<24}" + "".join(f"{m:>8}" for m in METRICS)]
    for lab, vals in summary["mean"].items():
        rows.append(f"{(lab + ' ' + names.get(lab, '')).strip():<24}" + "".join(f"  {fmt(vals[m])}" for m in METRICS))
    rows.append(f"{'foreground mean':<24}" + "".join(f"  {fmt(summary['foreground_mean'][m])}" for m in METRICS))
    return "\n".join(rows)
