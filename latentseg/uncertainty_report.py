"""The uncertainty part of `latentseg evaluate`: calibration and error detection from the maps
`predict` writes (`CASE_prob`, `CASE_std`, `CASE_entropy`), and agreement with several annotators
from the samples `predict --save-samples` writes (`CASE_sample00`, ...). The maths is in
`latentseg.uncertainty`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from latentseg.data.io import read_image, read_label, split_suffix
from latentseg.errors import LatentSegError
from latentseg.uncertainty import (
    binary_calibration,
    boundary_band,
    calibration_bins,
    error_auroc,
    expected_calibration_error,
    generalized_energy_distance,
    hungarian_iou,
    mean_pairwise_iou,
    qubiq_dice,
)

MAX_VOXELS_PER_CASE = 1_000_000  # calibration pools a random subset of each case's voxels
MAP_SCALE = {"_std": 0.5, "_entropy": 1.0, "_prob": 1.0}  # what 255 means in an 8-bit PNG map


def companion(pred_dir: Path, name: str, suffix: str) -> Path:
    """`x.png` -> `x_std.png` (`x.nii.gz` -> `x_std.nii.gz`)."""
    stem, ending = split_suffix(Path(name))
    return pred_dir / f"{stem}{suffix}{ending}"


def read_map(path: Path, suffix: str) -> np.ndarray:
    """A float map as `predict` wrote it: (C, *S) NIfTI, or an 8-bit PNG scaled back."""
    values, meta = read_image(path)
    return values / 255.0 * MAP_SCALE[suffix] if meta.format == "image2d" else values


def _label_probabilities(prob: np.ndarray, labels: list[int], pred: np.ndarray) -> dict[int, np.ndarray]:
    """{label: its probability map}. NIfTI maps hold one channel per class id; an 8-bit PNG map holds
    the foreground probability, which is a label's own only when there is one foreground label."""
    if prob.shape[0] > 1:
        return {lab: prob[lab] for lab in labels if lab < prob.shape[0]}
    return {labels[0]: prob[0]} if len(labels) == 1 else {}


class _Pool:
    """Voxels of every case, pooled (a random subset of each large case)."""

    def __init__(self) -> None:
        self.parts: dict[str, list[np.ndarray]] = {}
        self.rng = np.random.default_rng(0)

    def pick(self, size: int) -> np.ndarray | slice:
        if size <= MAX_VOXELS_PER_CASE:
            return slice(None)
        return self.rng.choice(size, MAX_VOXELS_PER_CASE, replace=False)

    def add(self, key: str, values: np.ndarray, index) -> None:
        self.parts.setdefault(key, []).append(np.ravel(values)[index])

    def get(self, key: str) -> np.ndarray:
        return np.concatenate(self.parts[key]) if key in self.parts else np.zeros(0)


def _pool_case(pool: _Pool, pred_dir: Path, name: str, pred: np.ndarray, ref: np.ndarray, labels: list[int]) -> bool:
    prob_path = companion(pred_dir, name, "_prob")
    if not prob_path.is_file():
        return False
    index = pool.pick(pred.size)
    prob = read_map(prob_path, "_prob")
    for lab, p in _label_probabilities(prob, labels, pred).items():
        pool.add(f"p{lab}", p, index)
        pool.add(f"y{lab}", ref == lab, index)
    pool.add("p_foreground", 1.0 - prob[0] if prob.shape[0] > 1 else prob[0], index)
    pool.add("y_foreground", ref != 0, index)
    if prob.shape[0] > 1:
        pool.add("top_conf", prob.max(0), index)
        pool.add("top_right", prob.argmax(0) == ref, index)
    pool.add("wrong", pred != ref, index)
    pool.add("band", boundary_band(ref), index)
    for suffix in ("_std", "_entropy"):
        path = companion(pred_dir, name, suffix)
        if path.is_file():
            pool.add(suffix, read_map(path, suffix)[0], index)
    return True


def calibration_report(pred_dir: Path, cases: dict[str, tuple], labels: list[int], diagram: Path) -> dict | None:
    """ECE, Brier and error-detection AUROC per label and overall (None without probability maps)."""
    pool = _Pool()
    found = [
        _pool_case(pool, pred_dir, name, pred, _reference(masks), labels) for name, (pred, masks, _) in cases.items()
    ]
    if not any(found):
        return None
    report: dict[str, Any] = {"per_label": {}, "overall": {}, "cases": int(sum(found))}
    for lab in labels:
        if f"p{lab}" in pool.parts:
            report["per_label"][str(lab)] = binary_calibration(pool.get(f"p{lab}"), pool.get(f"y{lab}"))
    # foreground against background: what an 8-bit PNG map of several classes still allows
    report["foreground"] = binary_calibration(pool.get("p_foreground"), pool.get("y_foreground"))
    if "top_conf" in pool.parts:
        report["overall"]["ECE"] = expected_calibration_error(pool.get("top_conf"), pool.get("top_right"))
        report["overall_ECE_of"] = "the top class"
    elif len(report["per_label"]) == 1:
        report["overall"].update(next(iter(report["per_label"].values())))
        report["overall_ECE_of"] = "the one label"
    else:
        report["overall"].update(report["foreground"])
        report["overall_ECE_of"] = "foreground against background"
    wrong, band = pool.get("wrong").astype(bool), pool.get("band").astype(bool)
    for suffix in ("_std", "_entropy"):
        if suffix in pool.parts:
            key = suffix.strip("_")
            report["overall"][f"AUROC_{key}"] = error_auroc(pool.get(suffix), wrong)
            report["overall"][f"AUROC_{key}_boundary"] = error_auroc(pool.get(suffix), wrong, band)
    report["overall"]["error_rate"] = float(wrong.mean())
    report["overall"]["error_rate_boundary"] = float(wrong[band].mean()) if band.any() else None
    _reliability_diagram(pool, labels, diagram)
    report["reliability_diagram"] = str(diagram)
    return report


def _reference(masks: list[np.ndarray]) -> np.ndarray:
    from latentseg.fusion import majority

    return majority(masks)


def _reliability_diagram(pool: _Pool, labels: list[int], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = [lab for lab in labels if f"p{lab}" in pool.parts]
    fig, axes = plt.subplots(1, max(len(shown), 1), figsize=(3.2 * max(len(shown), 1), 3.2), squeeze=False)
    for ax, lab in zip(axes[0], shown, strict=False):
        b = calibration_bins(pool.get(f"p{lab}"), pool.get(f"y{lab}"))
        centres = (np.arange(len(b["count"])) + 0.5) / (len(b["count"]) - 1)
        filled = b["count"] > 0
        ax.bar(centres[filled], b["accuracy"][filled], width=1 / (len(b["count"]) - 1), edgecolor="k", alpha=0.7)
        ax.plot([0, 1], [0, 1], "r--", lw=1)
        ax.set(xlim=(0, 1), ylim=(0, 1), xlabel="predicted probability", ylabel="observed frequency")
        ax.set_title(f"label {lab}: ECE {expected_calibration_error(pool.get(f'p{lab}'), pool.get(f'y{lab}')):.3f}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def read_samples(pred_dir: Path, name: str) -> list[np.ndarray]:
    """The masks `predict --save-samples` wrote for one case: `x_sample00.png`, `x_sample01.png`, ..."""
    stem, ending = split_suffix(Path(name))
    paths = sorted(pred_dir.glob(f"{stem}_sample[0-9][0-9]{ending}"))
    return [read_label(p)[0] for p in paths]


def multirater_report(pred_dir: Path, cases: dict[str, tuple], labels: list[int]) -> dict:
    """GED^2, Hungarian-matched IoU and QUBIQ Dice of the samples against every case's raters."""
    per_case = []
    for name, (_, masks, _) in cases.items():
        samples = read_samples(pred_dir, name)
        if not samples:
            raise LatentSegError(
                f"{pred_dir / name}: multi-rater metrics (several --ref) need the sampled masks; "
                f"predict with --save-samples (and --samples N)"
            )
        per_case.append(
            {"case": name, "raters": len(masks), "samples": len(samples), **_case_agreement(samples, masks, labels)}
        )
    keys = [k for k in per_case[0] if k not in ("case", "raters", "samples")]
    means = {k: _mean([c[k] for c in per_case]) for k in keys}
    return {"mean": means, "per_case": per_case}


def _case_agreement(samples: list[np.ndarray], raters: list[np.ndarray], labels: list[int]) -> dict[str, float | None]:
    """Per label (binary), averaged over labels: the multi-rater metrics of one case."""
    found: dict[str, list[float | None]] = {
        "GED": [],
        "HM_IoU": [],
        "QUBIQ_Dice": [],
        "sample_pairwise_IoU": [],
        "rater_pairwise_IoU": [],
    }
    for lab in labels:
        s = [m == lab for m in samples]
        r = [m == lab for m in raters]
        found["GED"].append(generalized_energy_distance(s, r))
        found["HM_IoU"].append(hungarian_iou(s, r))
        found["QUBIQ_Dice"].append(qubiq_dice(np.mean(s, axis=0), r))
        found["sample_pairwise_IoU"].append(mean_pairwise_iou(s))
        found["rater_pairwise_IoU"].append(mean_pairwise_iou(r))
    return {k: _mean(v) for k, v in found.items()}


def _mean(values: list[float | None]) -> float | None:
    finite = [v for v in values if v is not None]
    return float(np.mean(finite)) if finite else None
