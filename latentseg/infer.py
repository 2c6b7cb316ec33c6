"""Prediction: N diffusion samples per window of a sliding window, fused into a mean probability,
an argmax label and a per-voxel standard deviation, written in the input's own format."""

from __future__ import annotations

import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from monai.inferers import sliding_window_inference

from latentseg.checkpoint import load_model
from latentseg.data.datasets import Case, discover_inputs, load_image
from latentseg.data.io import output_name, write_label, write_map
from latentseg.data.transforms import normalize_image
from latentseg.errors import LatentSegError
from latentseg.fusion import uncertainty_map
from latentseg.models import LatentSegmenter
from latentseg.overlay import save_overlay
from latentseg.progress import progress_bar


def resolve_device(name: str = "auto") -> torch.device:
    """CUDA when present and asked for (or 'auto'), otherwise CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise LatentSegError(f"device {name!r} was requested but CUDA is not available")
    return torch.device(name)


@dataclass
class Prediction:
    probabilities: np.ndarray  # (C, *S) mean over samples
    uncertainty: np.ndarray  # (*S) per-voxel standard deviation over samples
    label: np.ndarray  # (*S) argmax of the mean probability


@torch.no_grad()
def predict_array(
    model: LatentSegmenter,
    image: np.ndarray,
    roi_size: list[int],
    num_samples: int = 4,
    steps: int | None = 2,
    eta: float = 0.0,
    overlap: float = 0.5,
    sw_batch_size: int = 1,
    seed: int = 0,
) -> Prediction:
    """Segment one normalized (C, *S) image; all samples of a window are drawn in one batch."""
    device = next(model.parameters()).device
    generator = torch.Generator().manual_seed(seed)

    def predictor(window: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        probs = model.sample(window, num_samples, steps, eta, generator)  # (N, b, C, *roi)
        return probs.mean(0), uncertainty_map(probs)

    x = torch.from_numpy(image)[None].to(device)
    mean, std = sliding_window_inference(
        x, roi_size, sw_batch_size, predictor, overlap=overlap, mode="gaussian", progress=False
    )
    probabilities = mean[0].cpu().numpy()
    return Prediction(probabilities, std[0, 0].cpu().numpy(), probabilities.argmax(0).astype(np.uint8))


def _check_output_dir(output: Path, input_path: Path, cases: list[Case]) -> None:
    inputs = {p.resolve() for c in cases for p in c.image_paths}
    input_dir = input_path.resolve() if input_path.is_dir() else input_path.resolve().parent
    if output.resolve() == input_dir or output.resolve() in {p.parent for p in inputs}:
        raise LatentSegError(f"{output}: the output directory is the input directory; refusing to overwrite inputs")


def predict(
    model_dir: str | Path,
    input_path: str | Path,
    output_dir: str | Path,
    steps: int | None = None,
    num_samples: int | None = None,
    seed: int = 0,
    device: str = "auto",
    overlays: bool = True,
    progress: bool = True,
) -> list[Path]:
    """Segment every case under `input_path` and write, per case, `CASE` (labels), `CASE_prob`
    (mean probabilities), `CASE_std` (uncertainty) and `CASE_overlay.png`.

    Every input is read and checked before anything is written; outputs are staged in a
    temporary folder and moved into `output_dir` only when every case succeeded.
    """
    if steps is not None and steps < 1:
        raise LatentSegError(f"--steps must be >= 1, got {steps}")
    if num_samples is not None and num_samples < 1:
        raise LatentSegError(f"--samples must be >= 1, got {num_samples}")
    model, config, _ = load_model(model_dir, resolve_device(device))
    steps = steps or config.sample.steps
    num_samples = num_samples or config.sample.num_samples
    input_path, output_dir = Path(input_path), Path(output_dir)
    cases = discover_inputs(input_path)
    _check_output_dir(output_dir, input_path, cases)
    for case in cases:  # validate everything first: nothing is written for a bad input set
        _check_input(case, config.model.spatial_dims, config.model.in_channels)

    output_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".latentseg-partial-", dir=output_dir))
    written = []
    try:
        for case in progress_bar(cases, desc="predict", unit="case", disable=not progress):
            image, meta = load_image(case)
            pred = predict_array(
                model,
                normalize_image(image),
                config.data.patch_size,
                num_samples,
                steps,
                config.sample.eta,
                config.sample.overlap,
                config.sample.sw_batch_size,
                seed,
            )
            write_label(staging / output_name(meta, case.case_id), pred.label, meta)
            prob = pred.probabilities if meta.format == "nifti" else 1.0 - pred.probabilities[0]
            write_map(staging / output_name(meta, case.case_id, "_prob"), prob, meta)
            std = pred.uncertainty if meta.format == "nifti" else np.clip(2 * pred.uncertainty, 0, 1)
            write_map(staging / output_name(meta, case.case_id, "_std"), std, meta)
            if overlays:
                save_overlay(staging / f"{case.case_id}_overlay.png", image, pred.label, pred.uncertainty)
        for path in sorted(staging.iterdir()):
            target = output_dir / path.name
            path.replace(target)
            written.append(target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return written


def _check_input(case: Case, spatial_dims: int, in_channels: int) -> None:
    image, meta = load_image(case)
    if meta.spatial_dims != spatial_dims:
        raise LatentSegError(f"{case.image_paths[0]}: a {meta.spatial_dims}D input given to a {spatial_dims}D model")
    if image.shape[0] != in_channels:
        raise LatentSegError(
            f"{case.image_paths[0]}: the model takes {in_channels} channel(s), this input has {image.shape[0]}"
        )
