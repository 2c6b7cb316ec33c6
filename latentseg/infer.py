"""Prediction: N diffusion samples per window of a sliding window (overlap 0.5, Gaussian blending),
fused into a mean probability, an argmax label and a per-voxel standard deviation, mapped back to
the input's grid and written in the input's own format.

The sampling settings travel as one `SampleConfig` (the model's, with the caller's overrides) from
the command line, the web page or validation down to `model.sample`; everything else `predict`
needs is one `PredictOptions`.
"""

from __future__ import annotations

import logging
import os
import shutil
import socket
import tempfile
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.data import MetaTensor
from monai.inferers import sliding_window_inference

from latentseg.checkpoint import load_model
from latentseg.config import AUTO_SAMPLES, Config, SampleConfig, concrete_sampling
from latentseg.data.datasets import Case, discover_inputs, load_image
from latentseg.data.io import VOLUME_FORMATS, ImageMeta, output_ending, output_name, write_label, write_map
from latentseg.data.preprocess import Preprocessing, complete_background, prepare_image, restore
from latentseg.errors import LatentSegError, one_line
from latentseg.fusion import check_fusion, entropy_map, fuse, uncertainty_map
from latentseg.models import Segmenter
from latentseg.overlay import save_overlay
from latentseg.package import model_folder
from latentseg.postprocess import keep_largest_component
from latentseg.progress import progress_bar
from latentseg.prompts import text_input
from latentseg.schema import hints, value_problem
from latentseg.text import TextEmbedding
from latentseg.uncertainty import calibrated

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
    model: Segmenter,
    image: torch.Tensor,
    roi_size: list[int],
    options: SampleConfig,
    seed: int = 0,
    text: TextEmbedding | torch.Tensor | None = None,
    keep_samples: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Fused class probabilities (C, *S), the samples' standard deviation (1, *S), the entropy of
    their mean probabilities (1, *S) of one preprocessed (C_in, *S) image, and with
    `keep_samples` every sample's probabilities (N, C, *S) (else None).

    All samples of a window are drawn in one batch; windows are stitched on the CPU. With `mean`
    fusion memory beyond the output maps is bounded by the window, not the volume; `vote` and
    `staple` fuse whole-image masks, so they keep every sample's probabilities (N x C maps).
    """
    options = concrete_sampling(options)
    try:
        check_fusion(options.fusion, options.num_samples)
    except ValueError as err:
        raise LatentSegError(str(err)) from err
    device = next(model.parameters()).device
    generator = torch.Generator().manual_seed(seed)
    keep_samples = keep_samples or options.fusion != "mean"

    def predictor(window: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        window_text = text.repeat(window.shape[0]) if text is not None else None  # one image: b windows
        probs = model.sample(window, options, window_text, generator)
        if keep_samples:
            return probs.transpose(0, 1).flatten(1, 2), uncertainty_map(probs)  # (b, N*C, *roi)
        return probs.mean(0), uncertainty_map(probs)

    x = image.as_tensor() if isinstance(image, MetaTensor) else image
    try:
        mean, std = sliding_window_inference(
            x[None], roi_size, options.sw_batch_size, predictor, overlap=options.overlap, mode="gaussian",
            sw_device=device, device="cpu", progress=False,
        )  # fmt: skip
    except ValueError as err:  # e.g. staged sampling asked of a one-head model, a prompt of a text-free one
        raise LatentSegError(str(err)) from err
    temperature = options.temperature
    if not keep_samples:
        fused = _scaled(mean[0], temperature)
        return fused, std[0], entropy_map(fused[None, None])[0], None
    probs = mean.reshape(options.num_samples, model.config.num_classes, *mean.shape[2:])[:, None]  # (N, 1, C, *S)
    mean_scaled = _scaled(probs.mean(0)[0], temperature)  # the entropy map is that of the samples' mean
    fused = mean_scaled if options.fusion == "mean" else _scaled(fuse(probs, options.fusion).probs[0], temperature)
    return fused, std[0], entropy_map(mean_scaled[None, None])[0], probs[:, 0]


def _scaled(probabilities: torch.Tensor, temperature: float) -> torch.Tensor:
    """The fused (C, *S) probabilities at the model's fitted temperature (`SampleConfig.temperature`)."""
    return torch.from_numpy(calibrated(probabilities.numpy(), temperature))


@dataclass
class Prediction:
    probabilities: np.ndarray  # (C, *S) fused over samples (mean, vote fractions or STAPLE posteriors)
    uncertainty: np.ndarray  # (*S) per-voxel standard deviation over samples
    label: np.ndarray  # (*S) argmax of the fused probabilities, post-processed (`postprocessed`)
    entropy: np.ndarray  # (*S) entropy of the samples' mean probabilities / log(C), in [0, 1]
    samples: np.ndarray | None = None  # (N, *S) each sample's labels, when asked for


def predict_array(
    model: Segmenter,
    image: np.ndarray,
    roi_size: list[int],
    options: SampleConfig,
    seed: int = 0,
    text: TextEmbedding | torch.Tensor | None = None,
) -> Prediction:
    """Segment one already preprocessed (C, *S) array on its own grid."""
    image = image if image.flags.writeable else np.array(image)  # a case kept on disk (training's validation)
    mean, std, entropy, _ = sample_volume(model, torch.from_numpy(image), roi_size, options, seed, text)
    probabilities = mean.numpy()
    label = postprocessed(probabilities.argmax(0).astype(np.uint8), options)
    return Prediction(probabilities, std[0].numpy(), label, entropy[0].numpy())


def postprocessed(label: np.ndarray, options: SampleConfig) -> np.ndarray:
    """The fused label with `options.largest_component`'s classes cut to their largest component
    ("auto", a model that was never planned: none)."""
    classes = options.largest_component
    return keep_largest_component(label, classes) if classes != "auto" and classes else label


def predict_image(
    model: Segmenter,
    config: Config,
    prep: Preprocessing,
    image: np.ndarray,
    meta: ImageMeta,
    options: SampleConfig | None = None,
    seed: int = 0,
    text: TextEmbedding | torch.Tensor | None = None,
    keep_samples: bool = False,
) -> Prediction:
    """Preprocess a raw image, sample (`options`, default the model's), and map the result back onto
    the image's own grid (with `keep_samples`, each sample's labels too)."""
    x, transform = prepare_image(image, meta, prep)
    options = options or config.sample
    maps = sample_prepared(model, config, x, options, seed, text, keep_samples)
    return restored_prediction(maps, x, transform, options)


def sample_prepared(
    model: Segmenter,
    config: Config,
    x: MetaTensor,
    options: SampleConfig,
    seed: int = 0,
    text: TextEmbedding | torch.Tensor | None = None,
    keep_samples: bool = False,
) -> dict[str, torch.Tensor]:
    """The network's part of `predict_image`: the maps of one preprocessed image on its
    preprocessed grid (`prob`, `std`, `entropy`, and with `keep_samples` every sample's
    probabilities as `samples`, (N, C, *S))."""
    mean, std, entropy, samples = sample_volume(model, x, config.data.patch_size, options, seed, text, keep_samples)
    maps = {"prob": mean, "std": std, "entropy": entropy}
    if keep_samples:
        maps["samples"] = samples
    return maps


def restored_prediction(
    maps: dict[str, torch.Tensor], x: MetaTensor, transform: Any, options: SampleConfig
) -> Prediction:
    """`sample_prepared`'s maps mapped back onto the image's own grid; the fused label and each
    sample's labels post-processed as `options` say (`postprocessed`)."""
    maps = dict(maps)
    samples = maps.pop("samples", None)
    if samples is not None:
        maps["samples"] = samples.flatten(0, 1)  # (N*C, *S): restored like any map, then one argmax each
    back = restore(maps, x, transform)
    classes = back["prob"].shape[0]
    probabilities = complete_background(back["prob"], classes)
    labels = None
    if samples is not None:
        per_sample = complete_background(back["samples"], classes).reshape(
            samples.shape[0], classes, *back["prob"].shape[1:]
        )
        labels = np.stack([postprocessed(s, options) for s in per_sample.argmax(1).astype(np.uint8)])
    label = postprocessed(probabilities.argmax(0).astype(np.uint8), options)
    return Prediction(probabilities, back["std"][0], label, back["entropy"][0], labels)


FLAGS = {
    "steps": "--steps",
    "num_samples": "--samples",
    "sampler": "--sampler",
    "fusion": "--fusion",
    "staged_middle_steps": "--staged-middle-steps",
    "staged_final_head": "--staged-final-head",
    "eta": "--eta",
    "temperature": "--temperature",
    "largest_component": "--largest-component",
}


# the settings that make the samples what they are; changing one asks for the default count of samples
PROCESS = ("steps", "eta", "sampler", "fusion", "staged_middle_steps", "staged_final_head")


def sample_options(model: Segmenter, base: SampleConfig, overrides: dict[str, Any] | None = None) -> SampleConfig:
    """The model's sampling settings with `overrides` (None values keep the model's), every
    problem refused before the first case, in the command line's words."""
    changes = {k: v for k, v in (overrides or {}).items() if v is not None}
    unknown = sorted(set(changes) - {f.name for f in fields(SampleConfig)})
    if unknown:
        raise LatentSegError(f"unknown sampling settings: {', '.join(unknown)}")
    problems = []
    for key, value in changes.items():
        problem = value_problem(value, hints(SampleConfig)[key])
        if problem:
            problems.append(f"{FLAGS.get(key, key)} {problem}")
    if problems:
        raise LatentSegError("\n".join(problems))
    if "num_samples" not in changes and any(k in changes and changes[k] != getattr(base, k) for k in PROCESS):
        changes["num_samples"] = AUTO_SAMPLES  # a planned count holds for the sampling it was measured with
    options = concrete_sampling(replace(base, **changes))  # "auto" left by an unplanned model: its defaults
    try:
        check_fusion(options.fusion, options.num_samples)
    except ValueError as err:
        problems.append(str(err))
    problems += model.sampling_problems(options)
    if problems:
        raise LatentSegError("\n".join(problems))
    return options


def _check_output_dir(output: Path, input_path: Path, cases: list[Case]) -> None:
    inputs = {p.resolve() for c in cases for p in c.image_paths}
    input_dir = input_path.resolve() if input_path.is_dir() else input_path.resolve().parent
    if output.exists() and not output.is_dir():
        raise LatentSegError(f"{output}: exists and is not a folder; give --output a folder")
    if output.resolve() == input_dir or output.resolve() in {p.parent for p in inputs}:
        raise LatentSegError(f"{output}: the output directory is the input directory; refusing to overwrite inputs")


OUTPUT_SUFFIXES = ("", "_prob", "_std", "_entropy")


def output_names(case: Case, overlay: bool = True, samples: int = 0) -> list[str]:
    """The files `predict` writes for a case (`samples` sampled label maps among them), the label
    map last."""
    source = case.image_paths[0]
    names = [f"{case.case_id}{suffix}{output_ending(source, suffix)}" for suffix in OUTPUT_SUFFIXES[1:]]
    names += [f"{case.case_id}_sample{k:02d}{output_ending(source, '_sample')}" for k in range(samples)]
    if overlay:
        names.append(f"{case.case_id}_overlay.png")
    return [*names, f"{case.case_id}{output_ending(source)}"]


def check_output_clashes(cases: list[Case], overlay: bool = True, samples: int = 0) -> None:
    """Two inputs whose outputs share a name (`x.png` and `x_prob.png`) are refused before
    anything is written."""
    owner: dict[str, Case] = {}
    for case in cases:
        for name in output_names(case, overlay, samples):
            other = owner.setdefault(name, case)
            if other is not case:
                raise LatentSegError(
                    f"{case.image_paths[0]}: its output {name} would overwrite the one of {other.image_paths[0]}; "
                    f"rename one of them"
                )


def plan_outputs(
    cases: list[Case], output: Path, overlay: bool, resume: bool, overwrite: bool, samples: int = 0
) -> list[Case]:
    """The cases to run: with `resume`, the finished ones (all outputs present) are skipped; an
    existing output is otherwise refused unless `overwrite`."""
    todo = []
    for case in cases:
        expected = output_names(case, overlay, samples)
        present = [name for name in expected if (output / name).exists()]
        if resume and len(present) == len(expected):
            continue
        if present and not (resume or overwrite):
            raise LatentSegError(
                f"{output / present[0]}: exists (an earlier run?); rerun with --continue to skip finished cases "
                f"or --overwrite to replace them"
            )
        todo.append(case)
    return todo


STAGING_PREFIX = ".latentseg-partial-"


def staging_prefix() -> str:
    """`.latentseg-partial-PID-HOST-`: parts of one prediction may run on several machines."""
    host = "".join(ch for ch in socket.gethostname() if ch.isalnum())[:32] or "host"
    return f"{STAGING_PREFIX}{os.getpid()}-{host}-"


def remove_stale_staging(output: Path) -> None:
    """Staging folders left by a killed run on this machine (their process is gone) are removed;
    another machine's are left alone."""
    here = staging_prefix().split("-")[-2]
    for folder in output.glob(f"{STAGING_PREFIX}*"):
        parts = folder.name[len(STAGING_PREFIX) :].split("-")  # PID-HOST-RANDOM (PID-RANDOM before 0.3)
        pid, host = parts[0], parts[1] if len(parts) >= 3 else here
        if host == here and (not pid.isdigit() or not _process_alive(int(pid))):
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
    label_names: dict[int, str] | None = None,
) -> None:
    stored = (lambda labels: np.asarray(mask_values)[labels]) if mask_values else (lambda labels: labels)  # noqa: E731
    write_label(folder / output_name(meta, case.case_id), stored(pred.label), meta, label_names)
    for k, sample in enumerate(pred.samples if pred.samples is not None else []):
        write_label(folder / output_name(meta, case.case_id, f"_sample{k:02d}"), stored(sample), meta)
    volume = meta.format in VOLUME_FORMATS
    prob = pred.probabilities if volume else 1.0 - pred.probabilities[0]
    write_map(folder / output_name(meta, case.case_id, "_prob"), prob, meta)
    std = pred.uncertainty if volume else np.clip(2 * pred.uncertainty, 0, 1)
    write_map(folder / output_name(meta, case.case_id, "_std"), std, meta)
    write_map(folder / output_name(meta, case.case_id, "_entropy"), np.clip(pred.entropy, 0, 1), meta)
    if overlay:
        save_overlay(folder / f"{case.case_id}_overlay.png", image, pred.label, pred.uncertainty)


@dataclass
class PredictOptions:
    """What `predict` needs besides the sampling settings."""

    seed: int = 0
    device: str = "auto"
    overlays: bool = True
    progress: bool = True
    prompt: str | None = None  # text models: for every case; prompted models: the target
    text_file: str | Path | None = None  # text models: a CSV filename,text
    allow_missing_text: bool = False
    resume: bool = False  # skip the cases whose outputs are all present (--continue)
    overwrite: bool = False  # replace existing outputs (refused otherwise)
    max_voxels: int | None = None  # default: the model's data.max_voxels
    save_samples: bool = False  # also write each sample's labels: CASE_sample00, CASE_sample01, ...
    # this process segments cases part_id, part_id + num_parts, ... of the sorted input (nnU-Net's
    # -num_parts / -part_id); under torchrun, by default, one part per rank
    num_parts: int | None = None
    part_id: int | None = None
    engine: str = "torch"  # torch | onnxruntime (the graphs `latentseg export --onnx` wrote)


def _load_onnx(model_dir: Path, device: torch.device):
    from latentseg.onnx_engine import load_onnx_model

    return load_onnx_model(model_dir, device)


ENGINES = {"torch": load_model, "onnxruntime": _load_onnx}


def my_part(options: PredictOptions) -> tuple[int, int]:
    """(num_parts, part_id) of this process: as given, else the torchrun rank, else (1, 0)."""
    from latentseg.distributed import world_from_environment

    if options.num_parts is None and options.part_id is None:
        world = world_from_environment()
        return world.size, world.rank
    num_parts = 1 if options.num_parts is None else options.num_parts
    part_id = 0 if options.part_id is None else options.part_id
    if num_parts < 1 or not 0 <= part_id < num_parts:
        raise LatentSegError(f"--part-id must be in [0, --num-parts), got part {part_id} of {num_parts}")
    return num_parts, part_id


def predict(
    model_dir: str | Path,
    input_path: str | Path,
    output_dir: str | Path,
    sample: dict[str, Any] | None = None,
    options: PredictOptions | None = None,
    **option_values: Any,
) -> list[Path]:
    """Segment every case under `input_path` and write, per case, `CASE` (labels), `CASE_prob`
    (fused probabilities), `CASE_std` (the samples' standard deviation), `CASE_entropy` (entropy of
    their mean probabilities) and `CASE_overlay.png`.

    `sample` overrides the model's sampling settings (`SampleConfig` fields: steps, num_samples,
    sampler, fusion, ...); `options` (or its fields as keywords) says the rest. Text models take
    `prompt` for every case, or each case's sentence from `text_file` or a text.csv beside the
    inputs. A case that fails (unreadable, NaN, wrong dimensionality, ...) is skipped and the
    others go on; the failures are raised together at the end. A case's files are staged in a
    temporary folder and moved into `output_dir` only once all of them are written (the label map
    last). Existing outputs are refused unless `overwrite`; `resume` skips the finished cases.
    """
    opts = replace(options or PredictOptions(), **option_values)
    if not 0 <= opts.seed < 2**63:
        raise LatentSegError(f"--seed must be in [0, 2^63), got {opts.seed}")
    num_parts, part_id = my_part(opts)
    if opts.engine not in ENGINES:
        raise LatentSegError(f"--engine must be one of {', '.join(ENGINES)}, got {opts.engine!r}")
    model, config, fingerprint = ENGINES[opts.engine](model_folder(model_dir), resolve_device(opts.device))
    settings = sample_options(model, config.sample, sample)  # refused before the first case
    if settings.num_samples == 1 and not (sample or {}).get("num_samples"):
        log.info(
            "1 sample per image, as train planned (its validation samples agreed): CASE_std is 0 and "
            "CASE_entropy is the uncertainty map; --samples N draws N"
        )
    input_path, output_dir = Path(input_path), Path(output_dir)
    cases = discover_inputs(input_path, config.model.in_channels)
    _check_output_dir(output_dir, input_path, cases)
    saved = settings.num_samples if opts.save_samples else 0
    check_output_clashes(cases, opts.overlays, saved)  # over every part: their outputs share a folder
    cases = cases[part_id::num_parts]
    request = {"prompt": opts.prompt, "text_file": opts.text_file, "allow_missing_text": opts.allow_missing_text}
    device = next(model.parameters()).device
    texts = text_input(config.model).prediction_inputs(config.model, cases, request, device)
    created = not output_dir.exists()
    _make_output_dir(output_dir)
    remove_stale_staging(output_dir)
    cases = plan_outputs(cases, output_dir, opts.overlays, opts.resume, opts.overwrite, saved)
    names = {int(k): str(v) for k, v in (fingerprint.get("labels") or {}).items()}
    prep = preprocessing_of(fingerprint, config)
    job = CaseJob(model, config, prep, settings, fingerprint.get("mask_values") or [], opts, names)
    try:
        return _run_cases(job, cases, texts, output_dir)
    finally:
        if created and num_parts == 1 and output_dir.is_dir() and not any(output_dir.iterdir()):
            output_dir.rmdir()


def _make_output_dir(output_dir: Path) -> None:
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise LatentSegError(
            f"{output_dir}: cannot create the output folder ({err.strerror or one_line(err)})"
        ) from err


@dataclass
class CaseInput:
    """One case as read (raw image and its geometry) and as the network takes it."""

    image: np.ndarray
    meta: ImageMeta
    x: MetaTensor
    transform: Any


@dataclass
class CaseJob:
    """What every case of one `predict` call shares."""

    model: Segmenter
    config: Config
    prep: Preprocessing
    sample_config: SampleConfig
    mask_values: list[int]
    options: PredictOptions
    label_names: dict[int, str] | None = None  # DICOM-SEG segment names

    def read(self, case: Case) -> CaseInput:
        """One case's image, checked against the model, and preprocessed."""
        image, meta = load_image(case, self.options.max_voxels or self.config.data.max_voxels)
        _check_input(case, image, meta, self.config)
        return CaseInput(image, meta, *prepare_image(image, meta, self.prep))

    def sample(self, case: CaseInput, text) -> dict[str, torch.Tensor]:
        o = self.options
        return sample_prepared(self.model, self.config, case.x, self.sample_config, o.seed, text, o.save_samples)

    def write(self, case: Case, read: CaseInput, maps: dict[str, torch.Tensor], staging: Path, output: Path):
        """The case's maps restored to its grid and its files written into its own staging
        folder, then moved into `output`, the label map last (it marks a finished case)."""
        pred = restored_prediction(maps, read.x, read.transform, self.sample_config)
        folder = Path(tempfile.mkdtemp(dir=staging))
        try:
            o = self.options
            _write_case(folder, case, read.image, read.meta, pred, self.mask_values, o.overlays, self.label_names)
            staged = {path.name: path for path in folder.iterdir()}
            saved = self.sample_config.num_samples if o.save_samples else 0
            return [staged[name].replace(output / name) for name in output_names(case, o.overlays, saved)]
        finally:
            shutil.rmtree(folder, ignore_errors=True)


def _written(done, failures: list[str]) -> list[Path]:
    try:
        return done.result()
    except LatentSegError as err:
        failures.append(str(err))
        return []


def _run_cases(job: CaseJob, cases: list[Case], texts: dict, output_dir: Path) -> list[Path]:
    """Cases run in order; the next case is read and preprocessed, and the last one restored to its
    grid and written, in background threads while the network runs, so a folder goes at network
    speed. Each case is staged in a hidden folder and moved into place when whole; failures are
    listed at the end."""
    from concurrent.futures import ThreadPoolExecutor

    written: list[Path] = []
    failures: list[str] = []
    staging = Path(tempfile.mkdtemp(prefix=staging_prefix(), dir=output_dir))
    reader, writer = ThreadPoolExecutor(1), ThreadPoolExecutor(1)
    writes = []
    try:
        upcoming = reader.submit(job.read, cases[0]) if cases else None
        for k, case in enumerate(progress_bar(cases, desc="predict", unit="case", disable=not job.options.progress)):
            current, upcoming = upcoming, reader.submit(job.read, cases[k + 1]) if k + 1 < len(cases) else None
            try:
                read = current.result()
                maps = job.sample(read, texts.get(case.case_id))
            except LatentSegError as err:
                failures.append(str(err))
                log.debug("failed: %s", err)
                continue
            writes.append(writer.submit(job.write, case, read, maps, staging, output_dir))
            while len(writes) > 1:  # at most one case waits to be written: memory stays bounded
                written += _written(writes.pop(0), failures)
        for done in writes:
            written += _written(done, failures)
    finally:
        for pool in (reader, writer):
            pool.shutdown(wait=True, cancel_futures=True)
        shutil.rmtree(staging, ignore_errors=True)
    if failures:  # one line per failed case
        raise LatentSegError("\n".join(failures))
    return written
