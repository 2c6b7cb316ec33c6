"""Robustness to noise (003 section IV-C, Eq. 19): I_sigma = I + N(0, sigma) on images scaled to
[0, 1], for a few sigma; Dice against the references at each, as in 003 Fig. 8.

`latentseg robustness --model DIR --input IMAGES --ref LABELS` makes the curve for a user's own
model and data (`noise_curve`); `benchmarks/robustness.py` compares latentseg with a UNet.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from latentseg.data.datasets import discover_inputs, load_image
from latentseg.data.io import is_image_file, read_label, split_suffix
from latentseg.errors import LatentSegError

SIGMAS = (0.0, 0.05, 0.1, 0.2)


def add_noise(image: np.ndarray, sigma: float, rng: np.random.Generator) -> np.ndarray:
    """003 Eq. 19 on the image scaled to [0, 1] (per image, min to max), mapped back to its range so
    that any intensity normalisation downstream sees the same image plus noise."""
    lo, hi = float(image.min()), float(image.max())
    scale = hi - lo if hi > lo else 1.0
    unit = (image - lo) / scale
    return ((unit + rng.normal(0.0, sigma, image.shape)) * scale + lo).astype(np.float32)


def foreground_dice(pred: np.ndarray, ref: np.ndarray, labels: Sequence[int]) -> float | None:
    """Mean Dice over the labels present in the prediction or the reference."""
    scores = []
    for lab in labels:
        p, r = pred == lab, ref == lab
        if p.any() or r.any():
            scores.append(2.0 * np.logical_and(p, r).sum() / (p.sum() + r.sum()))
    return float(np.mean(scores)) if scores else None


def _references(ref_dir: Path) -> dict[str, Path]:
    folder = next((ref_dir / s for s in ("labelsTr", "labelsTs", "masks") if (ref_dir / s).is_dir()), ref_dir)
    return {split_suffix(p)[0]: p for p in sorted(folder.iterdir()) if is_image_file(p)}


def referenced_cases(
    inputs: Path, references: Path, mask_values: Sequence[int] = (), limit: int = 0
) -> tuple[list, dict[str, np.ndarray], list[int]]:
    """The input cases that have a reference of the same name (the first `limit`; 0: all), their
    references as class ids by case id, and the foreground labels those hold."""
    refs = _references(Path(references))
    cases = [c for c in discover_inputs(inputs) if c.case_id in refs]
    if not cases:
        raise LatentSegError(f"{inputs}: no input has a reference of the same name in {references}")
    cases = cases[:limit] if limit else cases
    truth = {c.case_id: _class_ids(read_label(refs[c.case_id])[0], mask_values) for c in cases}
    return cases, truth, sorted({int(v) for t in truth.values() for v in np.unique(t) if v})


def noise_curve(
    segment: Callable[[np.ndarray, object], np.ndarray],
    inputs: Path,
    references: Path,
    sigmas: Sequence[float] = SIGMAS,
    labels: Sequence[int] | None = None,
    mask_values: Sequence[int] = (),
    seed: int = 0,
) -> dict:
    """Dice at each sigma. `segment(image, meta)` returns labels on the image's grid (class ids)."""
    cases, truth, found_labels = referenced_cases(inputs, references, mask_values)
    labels = labels or found_labels
    curve = []
    for sigma in sigmas:
        rng = np.random.default_rng(seed)
        scores = []
        for case in cases:
            image, meta = load_image(case)
            noisy = add_noise(image, sigma, rng) if sigma > 0 else image
            scores.append(foreground_dice(segment(noisy, meta), truth[case.case_id], labels))
        curve.append({"sigma": sigma, "dice": float(np.mean([s for s in scores if s is not None]))})
    return {"curve": curve, "cases": len(cases), "labels": list(labels)}


def _class_ids(label: np.ndarray, mask_values: Sequence[int]) -> np.ndarray:
    if not mask_values:
        return label
    lut = np.zeros(max(int(label.max()), max(mask_values)) + 1, dtype=np.int64)
    lut[list(mask_values)] = np.arange(len(mask_values))
    return lut[label]


def model_segmenter(model_dir: str | Path, sample: dict | None = None, seed: int = 0, device: str = "auto"):
    """`segment(image, meta)` for a trained latentseg model, and the mask values of its labels."""
    from latentseg.infer import predict_image

    model, config, prep, options, mask_values = loaded_for_prediction(model_dir, sample, device)

    def segment(image: np.ndarray, meta) -> np.ndarray:
        return predict_image(model, config, prep, image, meta, options, seed).label

    return segment, mask_values


def loaded_for_prediction(model_dir: str | Path, sample: dict | None = None, device: str = "auto") -> tuple:
    """(model, config, preprocessing, sampling options, mask values): what `predict_image` needs."""
    from latentseg.checkpoint import load_model
    from latentseg.infer import preprocessing_of, resolve_device, sample_options
    from latentseg.package import model_folder

    model, config, fingerprint = load_model(model_folder(model_dir), resolve_device(device))
    options = sample_options(model, config.sample, sample)
    return model, config, preprocessing_of(fingerprint, config), options, fingerprint.get("mask_values") or []


def plot_curves(curves: dict[str, dict], path: Path, title: str = "") -> None:
    """Dice against sigma, one line per method (003 Fig. 8)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4, 3.2))
    for name, result in curves.items():
        xs = [p["sigma"] for p in result["curve"]]
        ax.plot(xs, [p["dice"] for p in result["curve"]], marker="o", label=name)
    ax.set(xlabel="noise sigma (image scaled to [0, 1])", ylabel="Dice", title=title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def run(model_dir: str | Path, inputs: str | Path, references: str | Path, out: str | Path, sigmas=SIGMAS) -> dict:
    """The curve of one model, written as JSON and PNG into `out`."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    segment, mask_values = model_segmenter(model_dir)
    result = noise_curve(segment, Path(inputs), Path(references), sigmas, mask_values=mask_values)
    (out / "robustness.json").write_text(json.dumps(result, indent=1))
    plot_curves({Path(model_dir).name: result}, out / "robustness.png")
    return result
