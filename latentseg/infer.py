"""Prediction: N diffusion samples per window of a sliding window (overlap 0.5, Gaussian blending),
fused into a mean probability, an argmax label and a per-voxel standard deviation, mapped back to
the input's grid and written in the input's own format."""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.data import MetaTensor
from monai.inferers import sliding_window_inference

from latentseg.checkpoint import load_model
from latentseg.config import Config, SampleConfig
from latentseg.data.datasets import Case, discover_inputs, load_image, read_text_table
from latentseg.data.io import ImageMeta, file_format, output_name, write_label, write_map
from latentseg.data.preprocess import Preprocessing, prepare_image, restore
from latentseg.data.targets import ClassIds
from latentseg.errors import LatentSegError, one_line
from latentseg.fusion import FUSIONS, check_fusion, entropy_map, fuse, uncertainty_map
from latentseg.models import LatentSegmenter
from latentseg.overlay import save_overlay
from latentseg.progress import progress_bar
from latentseg.text import TextEmbedding, case_texts, load_text_encoder

log = logging.getLogger("latentseg.predict")


def resolve_device(name: str = "auto") -> torch.device:
    """CUDA when present and asked for (or 'auto'), otherwise CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise LatentSegError(f"device {name!r} was requested but CUDA is not available")
    return torch.device(name)


@torch.no_grad()
def sample_volume(
    model: LatentSegmenter,
    image: torch.Tensor,
    roi_size: list[int],
    num_samples: int = 4,
    steps: int | None = 2,
    eta: float = 0.0,
    overlap: float = 0.5,
    sw_batch_size: int = 1,
    seed: int = 0,
    sampler: str = "ddim",
    middle_steps: int = 10,
    fusion: str = "mean",
    text: TextEmbedding | None = None,
    final_head: str = "eps",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fused class probabilities (C, *S), the samples' standard deviation (1, *S) and the entropy of
    their mean probabilities (1, *S) of one preprocessed (C_in, *S) image.

    All samples of a window are drawn in one batch; windows are stitched on the CPU. With `mean`
    fusion memory beyond the output maps is bounded by the window, not the volume; `vote` and
    `staple` fuse whole-image masks, so they keep every sample's probabilities (N x C maps).
    """
    try:
        check_fusion(fusion, num_samples)
    except ValueError as err:
        raise LatentSegError(str(err)) from err
    device = next(model.parameters()).device
    generator = torch.Generator().manual_seed(seed)

    def predictor(window: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        window_text = text.repeat(window.shape[0]) if text is not None else None  # one image: b windows
        probs = model.sample(window, num_samples, steps, eta, generator, sampler, middle_steps, window_text, final_head)
        if fusion == "mean":
            return probs.mean(0), uncertainty_map(probs)
        return probs.transpose(0, 1).flatten(1, 2), uncertainty_map(probs)  # (b, N*C, *roi)

    x = image.as_tensor() if isinstance(image, MetaTensor) else image
    try:
        mean, std = sliding_window_inference(
            x[None],
            roi_size,
            sw_batch_size,
            predictor,
            overlap=overlap,
            mode="gaussian",
            sw_device=device,
            device="cpu",
            progress=False,
        )
    except ValueError as err:  # e.g. staged sampling asked of a one-head model, a prompt of a text-free one
        raise LatentSegError(str(err)) from err
    if fusion == "mean":
        return mean[0], std[0], entropy_map(mean[None])[0]
    probs = mean.reshape(num_samples, model.config.num_classes, *mean.shape[2:])[:, None]  # (N, 1, C, *S)
    return fuse(probs, fusion).probs[0], std[0], entropy_map(probs)[0]


@dataclass
class Prediction:
    probabilities: np.ndarray  # (C, *S) fused over samples (mean, vote fractions or STAPLE posteriors)
    uncertainty: np.ndarray  # (*S) per-voxel standard deviation over samples
    label: np.ndarray  # (*S) argmax of the fused probabilities
    entropy: np.ndarray  # (*S) entropy of the samples' mean probabilities / log(C), in [0, 1]


def predict_array(model: LatentSegmenter, image: np.ndarray, roi_size: list[int], **sampling: Any) -> Prediction:
    """Segment one already preprocessed (C, *S) array on its own grid; `sampling` as in `sample_volume`."""
    mean, std, entropy = sample_volume(model, torch.from_numpy(image), roi_size, **sampling)
    probabilities = mean.numpy()
    return Prediction(probabilities, std[0].numpy(), probabilities.argmax(0).astype(np.uint8), entropy[0].numpy())


def predict_image(
    model: LatentSegmenter,
    config: Config,
    prep: Preprocessing,
    image: np.ndarray,
    meta: ImageMeta,
    num_samples: int,
    steps: int | None,
    seed: int = 0,
    text: TextEmbedding | None = None,
) -> Prediction:
    """Preprocess a raw image, sample, and map the result back onto the image's own grid."""
    x, transform = prepare_image(image, meta, prep)
    s = config.sample
    mean, std, entropy = sample_volume(
        model,
        x,
        config.data.patch_size,
        num_samples,
        steps,
        s.eta,
        s.overlap,
        s.sw_batch_size,
        seed,
        s.sampler,
        s.staged_middle_steps,
        s.fusion,
        text,
        s.staged_final_head,
    )
    back = restore({"prob": mean, "std": std, "entropy": entropy}, x, transform)
    probabilities = back["prob"]
    return Prediction(probabilities, back["std"][0], probabilities.argmax(0).astype(np.uint8), back["entropy"][0])


def _case_texts(
    model: LatentSegmenter,
    cases: list[Case],
    prompt: str | None,
    text_file: str | Path | None,
    allow_missing: bool,
) -> dict[str, TextEmbedding]:
    """Each case's text embedding for a text model (class ids for a class-prompt model); checks
    that text goes only to text models."""
    c = model.config
    if c.prompt != "none":
        return _prompt_inputs(model, cases, prompt)
    if c.text_fusion == "none":
        if prompt is not None or text_file is not None:
            raise LatentSegError("this model was trained without text (model.text_fusion=none): it takes no prompt")
        return {}
    if prompt is not None:
        if not prompt.strip():
            raise LatentSegError("--prompt is empty: say what to segment")
        sentences = {case.case_id: prompt for case in cases}
    else:
        if text_file is not None:
            table = read_text_table(Path(text_file))
            for case in cases:
                case.text = table.get(case.case_id)
        samples = [{"case_id": case.case_id, "text": case.text} for case in cases]
        listed = case_texts(samples, allow_missing, "the inputs (give --prompt, --text-file or a text.csv)")
        sentences = {case.case_id: t for case, t in zip(cases, listed, strict=True)}
    encoder = load_text_encoder(c.text_encoder, c.text_max_length)
    device = next(model.parameters()).device
    return {case_id: encoder.encode([text]).to(device) for case_id, text in sentences.items()}


def _prompt_inputs(model, cases: list[Case], prompt: str | None) -> dict[str, TextEmbedding | torch.Tensor]:
    """A universal model (002) segments the target its prompt names, the same for every case."""
    c = model.config
    if prompt is None:
        raise LatentSegError(
            f"this model segments what a prompt names: give --prompt NAME or --prompts A,B "
            f"(trained on: {', '.join(c.prompt_names)})"
        )
    if not prompt.strip():
        raise LatentSegError("--prompt is empty: say what to segment")
    device = next(model.parameters()).device
    if c.prompt == "class":
        ids = ClassIds(c.prompt_names).encode([prompt.strip()]).to(device)
        return {case.case_id: ids for case in cases}
    embedding = load_text_encoder(c.text_encoder, c.text_max_length).encode([prompt]).to(device)
    return {case.case_id: embedding for case in cases}


def sampling_problems(s: SampleConfig, denoiser_heads: int, num_samples: int | None = None) -> list[str]:
    """What is wrong with sampling settings for a model with `denoiser_heads` heads (empty: nothing)."""
    problems = []
    if s.fusion not in FUSIONS:
        problems.append(f"--fusion must be one of {', '.join(FUSIONS)}, got {s.fusion!r}")
    elif num_samples is not None and s.fusion != "mean" and num_samples < 2:
        problems.append(f"--fusion {s.fusion} needs at least 2 samples, got --samples {num_samples}")
    if s.sampler not in ("ddim", "staged"):
        problems.append(f"--sampler must be ddim or staged, got {s.sampler!r}")
    if s.staged_final_head not in ("eps", "x0"):
        problems.append(f"--staged-final-head must be eps or x0, got {s.staged_final_head!r}")
    if s.staged_middle_steps < 1:
        problems.append(f"--staged-middle-steps must be >= 1, got {s.staged_middle_steps}")
    if s.sampler == "staged" and denoiser_heads != 2:
        problems.append("--sampler staged needs a model trained with model.denoiser_heads=2")
    if s.sampler == "staged" and num_samples is not None and num_samples % 2:
        problems.append(f"--sampler staged draws equally from two heads: --samples must be even, got {num_samples}")
    return problems


def _check_output_dir(output: Path, input_path: Path, cases: list[Case]) -> None:
    inputs = {p.resolve() for c in cases for p in c.image_paths}
    input_dir = input_path.resolve() if input_path.is_dir() else input_path.resolve().parent
    if output.exists() and not output.is_dir():
        raise LatentSegError(f"{output}: exists and is not a folder; give --output a folder")
    if output.resolve() == input_dir or output.resolve() in {p.parent for p in inputs}:
        raise LatentSegError(f"{output}: the output directory is the input directory; refusing to overwrite inputs")


OUTPUT_SUFFIXES = ("", "_prob", "_std", "_entropy")


def output_names(case: Case, overlay: bool = True) -> list[str]:
    """The files `predict` writes for a case, the label map last."""
    ending = ".nii.gz" if file_format(case.image_paths[0]) == "nifti" else ".png"
    names = [f"{case.case_id}{suffix}{ending}" for suffix in OUTPUT_SUFFIXES[1:]]
    if overlay:
        names.append(f"{case.case_id}_overlay.png")
    return [*names, f"{case.case_id}{ending}"]


def check_output_clashes(cases: list[Case], overlay: bool = True) -> None:
    """Two inputs whose outputs share a name (`x.png` and `x_prob.png`) are refused before
    anything is written."""
    owner: dict[str, Case] = {}
    for case in cases:
        for name in output_names(case, overlay):
            other = owner.setdefault(name, case)
            if other is not case:
                raise LatentSegError(
                    f"{case.image_paths[0]}: its output {name} would overwrite the one of {other.image_paths[0]}; "
                    f"rename one of them"
                )


def plan_outputs(cases: list[Case], output: Path, overlay: bool, resume: bool, overwrite: bool) -> list[Case]:
    """The cases to run: with `resume`, the finished ones (all outputs present) are skipped; an
    existing output is otherwise refused unless `overwrite`."""
    todo = []
    for case in cases:
        present = [name for name in output_names(case, overlay) if (output / name).exists()]
        if resume and len(present) == len(output_names(case, overlay)):
            continue
        if present and not (resume or overwrite):
            raise LatentSegError(
                f"{output / present[0]}: exists (an earlier run?); rerun with --continue to skip finished cases "
                f"or --overwrite to replace them"
            )
        todo.append(case)
    return todo


STAGING_PREFIX = ".latentseg-partial-"


def remove_stale_staging(output: Path) -> None:
    """Staging folders left by a killed run (their process is gone) are removed."""
    for folder in output.glob(f"{STAGING_PREFIX}*"):
        pid = folder.name[len(STAGING_PREFIX) :].split("-", 1)[0]
        if not pid.isdigit() or not _process_alive(int(pid)):
            shutil.rmtree(folder, ignore_errors=True)


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _check_input(case: Case, image: np.ndarray, meta: ImageMeta, config: Config) -> None:
    if meta.spatial_dims != config.model.spatial_dims:
        raise LatentSegError(
            f"{case.image_paths[0]}: a {meta.spatial_dims}D input given to a {config.model.spatial_dims}D model"
        )
    if image.shape[0] != config.model.in_channels:
        raise LatentSegError(
            f"{case.image_paths[0]}: the model takes {config.model.in_channels} channel(s), "
            f"this input has {image.shape[0]}"
        )


def preprocessing_of(fingerprint: dict[str, Any], config: Config) -> Preprocessing:
    if "preprocessing" in fingerprint:
        return Preprocessing.from_dict(fingerprint["preprocessing"])
    return Preprocessing(config.model.spatial_dims, crop_foreground=False)  # models from before 0.2


def _write_case(
    folder: Path,
    case: Case,
    image: np.ndarray,
    meta: ImageMeta,
    pred: Prediction,
    mask_values: list[int],
    overlay: bool,
) -> None:
    label = np.asarray(mask_values)[pred.label] if mask_values else pred.label
    write_label(folder / output_name(meta, case.case_id), label, meta)
    prob = pred.probabilities if meta.format == "nifti" else 1.0 - pred.probabilities[0]
    write_map(folder / output_name(meta, case.case_id, "_prob"), prob, meta)
    std = pred.uncertainty if meta.format == "nifti" else np.clip(2 * pred.uncertainty, 0, 1)
    write_map(folder / output_name(meta, case.case_id, "_std"), std, meta)
    write_map(folder / output_name(meta, case.case_id, "_entropy"), np.clip(pred.entropy, 0, 1), meta)
    if overlay:
        save_overlay(folder / f"{case.case_id}_overlay.png", image, pred.label, pred.uncertainty)


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
    fusion: str | None = None,
    sampler: str | None = None,
    prompt: str | None = None,
    text_file: str | Path | None = None,
    allow_missing_text: bool = False,
    staged_final_head: str | None = None,
    staged_middle_steps: int | None = None,
    resume: bool = False,
    overwrite: bool = False,
    max_voxels: int | None = None,
) -> list[Path]:
    """Segment every case under `input_path` and write, per case, `CASE` (labels), `CASE_prob`
    (fused probabilities), `CASE_std` (the samples' standard deviation), `CASE_entropy` (entropy of
    their mean probabilities) and `CASE_overlay.png`.

    `fusion` (mean | vote | staple) and `sampler` (ddim | staged) default to the model's config.
    Text models take `prompt` for every case, or each case's sentence from `text_file` (a CSV
    `filename,text`) or from a text.csv beside the inputs.
    A case that fails (unreadable, NaN, wrong dimensionality, ...) is skipped and the others go
    on; the failures are raised together at the end. A case's files are staged in a temporary
    folder and moved into `output_dir` only once all of them are written (the label map last).
    Existing outputs are refused unless `overwrite`; `resume` skips the cases already finished.
    """
    if not 0 <= seed < 2**63:
        raise LatentSegError(f"--seed must be in [0, 2^63), got {seed}")
    if steps is not None and steps < 1:
        raise LatentSegError(f"--steps must be >= 1, got {steps}")
    if num_samples is not None and num_samples < 1:
        raise LatentSegError(f"--samples must be >= 1, got {num_samples}")
    model, config, fingerprint = load_model(model_dir, resolve_device(device))
    config.sample.fusion = fusion or config.sample.fusion
    config.sample.sampler = sampler or config.sample.sampler
    config.sample.staged_final_head = staged_final_head or config.sample.staged_final_head
    if staged_middle_steps is not None:
        config.sample.staged_middle_steps = staged_middle_steps
    prep = preprocessing_of(fingerprint, config)
    mask_values = fingerprint.get("mask_values") or []
    steps = steps or config.sample.steps
    num_samples = num_samples or config.sample.num_samples
    problems = sampling_problems(config.sample, model.config.denoiser_heads, num_samples)
    if problems:  # settings that would fail on every case are refused before the first one
        raise LatentSegError("\n".join(problems))
    input_path, output_dir = Path(input_path), Path(output_dir)
    cases = discover_inputs(input_path, config.model.in_channels)
    _check_output_dir(output_dir, input_path, cases)
    check_output_clashes(cases, overlays)
    texts = _case_texts(model, cases, prompt, text_file, allow_missing_text)

    written: list[Path] = []
    failures: list[str] = []
    created = not output_dir.exists()
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise LatentSegError(
            f"{output_dir}: cannot create the output folder ({err.strerror or one_line(err)})"
        ) from err
    remove_stale_staging(output_dir)
    cases = plan_outputs(cases, output_dir, overlays, resume, overwrite)
    staging = Path(tempfile.mkdtemp(prefix=f"{STAGING_PREFIX}{os.getpid()}-", dir=output_dir))
    try:
        for case in progress_bar(cases, desc="predict", unit="case", disable=not progress):
            try:
                image, meta = load_image(case, max_voxels or config.data.max_voxels)
                _check_input(case, image, meta, config)
                pred = predict_image(
                    model, config, prep, image, meta, num_samples, steps, seed, texts.get(case.case_id)
                )
                _write_case(staging, case, image, meta, pred, mask_values, overlays)
            except LatentSegError as err:
                failures.append(str(err))
                log.debug("failed: %s", err)
                for leftover in staging.iterdir():
                    leftover.unlink()
                continue
            staged = {path.name: path for path in staging.iterdir()}
            for name in output_names(case, overlays):  # the label map last: it marks a finished case
                written.append(staged[name].replace(output_dir / name))
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        if created and not any(output_dir.iterdir()):
            output_dir.rmdir()
    if failures:  # one line per failed case
        raise LatentSegError("\n".join(failures))
    return written
