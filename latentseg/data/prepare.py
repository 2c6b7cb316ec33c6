"""From dataset folders to preprocessed training data: load and check every case, decide what the
data decides (dimensionality, channels, classes, spacing, normalisation, patch and strides),
split by patient and preprocess. The decisions are recorded in a fingerprint saved with the model."""

from __future__ import annotations

import logging
import math
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from latentseg.config import AUTO_SAMPLES, UNPLANNED_SAMPLING, Config, DataConfig, ModelConfig, SampleConfig
from latentseg.data.datasets import (
    DatasetSpec,
    channels_of,
    discover_dataset,
    load_dataset,
    num_classes_of,
    reload_image,
)
from latentseg.data.planning import (
    MIN_FEATURE,
    describe_grid,
    describe_latent,
    label_ceiling,
    median_shape,
    plan_denoiser_strides,
    plan_grid_factor,
    plan_latent,
    plan_patch,
    plan_strides,
    round_up,
    total_stride,
)
from latentseg.data.preprocess import Preprocessing, ct_statistics_of, is_ct, preprocess_sample
from latentseg.data.splits import make_split
from latentseg.errors import LatentSegError, one_line
from latentseg.postprocess import single_component_classes

log = logging.getLogger("latentseg.data")


@dataclass
class TrainingData:
    train: list[dict[str, Any]]  # {"image", "label", "case_id", "dataset", "text"} in the network's space
    val: list[dict[str, Any]]
    fingerprint: dict[str, Any]
    labels_by_dataset: dict[str, dict[int, str]]  # each dataset's own label names (background included)
    latent: dict | None = None  # the latent planned from the labels: choice and ceilings (plans.json)
    store: CaseStore | None = None  # the files of the cases past `data.memory_gb`; removed with this object
    fit_sampler: bool = False  # DDIM steps and eta planned for several annotators: `train` fits them at its end


def load_datasets(data_dirs: list[Path], data: DataConfig) -> tuple[list[DatasetSpec], list[dict[str, Any]]]:
    """Every case of every dataset loaded and checked; all problems reported together."""
    specs, samples, problems = [], [], []
    for root in data_dirs:
        spec = discover_dataset(root, data.allow_outside_paths)
        spec.mask_values = list(data.mask_values)
        found, trouble = load_dataset(spec, data.max_voxels, keep_images=False)  # read again to preprocess
        for s in found:
            s["dataset"] = spec.name
        specs.append(spec)
        samples += found
        problems += trouble
        for warning in spec.warnings:
            log.warning("warning: %s", warning)
    if problems:
        hint = " ".join(f"`latentseg check-dataset {d}`" for d in data_dirs)
        more = f" (and {len(problems) - 1} more problems; run {hint})" if len(problems) > 1 else ""
        raise LatentSegError(problems[0] + more)
    if not samples:
        raise LatentSegError(f"{', '.join(map(str, data_dirs))}: no usable cases")
    return specs, samples


def _check_compatible(specs: list[DatasetSpec], samples: list[dict[str, Any]], same_labels: bool = True) -> None:
    if len({s["meta"].spatial_dims for s in samples}) > 1:
        raise LatentSegError("the datasets mix 2D and 3D images")
    if len({channels_of(s) for s in samples}) > 1:
        raise LatentSegError("the datasets have different channel counts")
    declared = {tuple(sorted(s.labels.items())) for s in specs if s.labels}
    if same_labels and len(declared) > 1:
        names = ", ".join(f"{s.name}: {s.labels}" for s in specs)
        raise LatentSegError(f"the datasets declare different labels ({names}); train them separately")


def plan_preprocessing(
    config: Config, specs: list[DatasetSpec], samples: list[dict[str, Any]]
) -> tuple[Preprocessing, dict]:
    """How the cases are preprocessed, and the grid's plan (`plan_grid`; {} where a spacing is set)."""
    dims = samples[0]["meta"].spatial_dims
    spacing, grid = None, {}
    resampled = dims == 2 or config.data.resample  # 2D images keep their grid unless a coarser one is planned
    if config.data.spacing and resampled:
        spacing = list(config.data.spacing)
    elif resampled:
        median = [float(v) for v in np.median([s["meta"].spacing for s in samples], axis=0)]
        grid = plan_grid(config, samples)
        if "extent" in grid:
            log.info("%s", describe_grid(grid))
        if dims == 3 or grid["factor"] > 1:
            spacing = [v * grid["factor"] for v in median]
    names = specs[0].channel_names
    ct = {  # from each case's `intensity_sample`, kept when its image was released (`load_dataset`)
        str(c): ct_statistics_of([s["intensities"][c] for s in samples]) for c, name in names.items() if is_ct(name)
    }
    prep = Preprocessing(
        dims, spacing, "RAS" if dims == 3 and config.data.resample else None, config.data.crop_foreground, ct
    )
    return prep, grid


def plan_grid(config: Config, samples: list[dict[str, Any]]) -> dict:
    """Fill `data.grid_factor` left to "auto" from the cases' labels as read (`plan_grid_factor`);
    returns the plan ({"factor": F} alone where the user set it). TextDiff
    (001) keeps the grid: its frozen DDPM backbone learned the images' scale in `pretrain-ddpm`."""
    data = config.data
    if data.grid_factor == "auto" and config.model.mode != "ldseg":
        data.grid_factor = 1
    if data.grid_factor != "auto":
        return {"factor": data.grid_factor}
    labels = [s["label"][0] for s in samples]
    dims = samples[0]["meta"].spatial_dims
    shapes = [label.shape[-dims:] for label in labels]

    def patch_at(factor: int) -> list[int]:
        shrunk = [[max(1, n // factor) for n in shape] for shape in shapes]
        return plan_patch(data.patch_size, shrunk, dims, config.train.max_minutes)

    grid = plan_grid_factor(labels, config.model.num_classes, patch_at, config.model.latent_ceiling)
    data.grid_factor = grid["factor"]
    return grid


def plan_network(
    config: Config,
    shapes: list[tuple[int, ...]],
    spacing: list[float],
    labels: list[np.ndarray] | None = None,
    multi_rater: bool = False,
) -> dict | None:
    """Patch size, latent and per-axis strides (unless configured), the channel lists cut to match;
    how the label encoder trains (`plan_label_encoder_training`; `multi_rater`: several annotators).
    With `model.num_downsamplings` or `model.decoder_skips` left to "auto", the latent is planned
    from the training `labels` (`plan_latent`); returns that plan's report (None when not planned)."""
    m, dims = config.model, config.model.spatial_dims
    patch = plan_patch(config.data.patch_size, shapes, dims, config.train.max_minutes)
    latent = _plan_latent(config, patch, spacing, labels)
    if not m.strides:
        frozen, late = (latent["frozen_axes"], latent.get("thin_axes", [])) if latent else ([], [])
        m.strides = plan_strides(patch, spacing, _downsamplings(m, latent), frozen, late)
        if not m.strides:
            raise LatentSegError(
                f"data.patch_size {patch} is too small for the network: an axis needs at least "
                f"{2 * MIN_FEATURE} voxels to be downsampled once (median image {median_shape(shapes)})"
            )
        n = len(m.strides)
        for name in ("image_encoder_channels", "label_encoder_channels", "decoder_channels"):
            setattr(m, name, getattr(m, name)[: n + 1])
        # counted on the patch the network sees: rounded up to the stride (ACDC: 9 slices become 10)
        rounded = round_up(patch, total_stride(m.strides, dims))
        m.attention_stages = min(m.attention_stages, attention_stages_within(rounded, m.strides, dims))
    m.num_downsamplings = len(m.strides)
    if m.decoder_skips == "auto":  # skips need the learned image encoder and a decoder trained with it
        can_skip = m.label_autoencoder == "joint" and m.image_encoder == "learned"
        m.decoder_skips = bool(latent and latent["decoder_skips"]) and can_skip
    if m.decoder_image_latent == "auto":
        m.decoder_image_latent = m.decoder_skips is True
    if m.decoder_full_skip == "auto":
        m.decoder_full_skip = False
    if m.decoder_fuse_kernel == "auto":  # ACDC, 15 min: 0.726 in 1033 steps against 0.679 in 870 with 3x3
        m.decoder_fuse_kernel = 1
    plan_label_encoder_training(m, multi_rater)
    stride = total_stride(m.strides, dims)
    config.data.patch_size = round_up(patch, stride)
    if not m.denoiser_strides:
        grid = [p // t for p, t in zip(config.data.patch_size, stride, strict=True)]
        m.denoiser_strides = plan_denoiser_strides(grid, len(m.denoiser_channels))
    return latent


def plan_label_encoder_training(m: ModelConfig, multi_rater: bool) -> None:
    """Where the training data has several annotators and the decoder has skips, the label encoder
    learns by decoding its own latent (`latent_reconstruction`) and not from the diffusion loss,
    which collapses it (BU-BIL, 8 min: a full and an empty mask encoded 0.5% apart and the decoder
    ignored the latent, so all samples were one mask; detached: 140% apart, and the samples spread,
    benchmarks/latent_collapse.py). Elsewhere 003's end-to-end training: on ACDC (15 min, side by
    side) the detached encoder cost 0.070 Dice (0.615 against 0.685) and 31% of the steps
    (benchmarks/results/label_encoder_acdc.json)."""
    if m.diffusion_trains_label_encoder == "auto":
        detach = m.decoder_skips is True and multi_rater and m.latent_reconstruction is not False
        m.diffusion_trains_label_encoder = not detach
    if m.latent_reconstruction == "auto":  # a detached encoder learns from reconstruction alone
        m.latent_reconstruction = not m.diffusion_trains_label_encoder


# DDIM steps and eta: one sample as good as the mean in 2 steps (003 section V-B) | samples that
# spread as annotators do (BU-BIL, 10 annotators: the samples' pairwise IoU 0.804 at DDIM-10,
# eta 1, the annotators' 0.764, against 0.933 at DDIM-2; benchmarks/results/uncertainty.json)
# (the temperature is not planned here: `fit_from_validation` fits it at the end of training; until
# 2026-12-06 this copied UNPLANNED_SAMPLING's temperature 1, so one-annotator data never got a fit)
SINGLE_RATER_SAMPLING = {k: UNPLANNED_SAMPLING[k] for k in ("steps", "eta")}
# several annotators: their samples are the point, so the count is never cut to one (`fit_from_validation`
# plans it for one-annotator data, where samples that agree would only repeat the mask); steps and
# eta are where training starts: with validation cases `train` fits them at its end
# (`latentseg.sampler_fit`: the same DDIM-10 spread BU-BIL's samples to pairwise IoU 0.363 in a model
# trained at full resolution)
MULTI_RATER_SAMPLING = {"steps": 10, "eta": 1.0, "num_samples": AUTO_SAMPLES}
# An x0-predicting denoiser on one-annotator data: its first step already gives the clean latent,
# and a second changed nothing measured (saved 15-minute models, 2026-12-06: ACDC Dice 0.7834 at
# DDIM-1 and DDIM-2, ECE 0.0077 both, std-map error AUROC 0.927 against 0.920; MoNuSeg 0.7915
# both), so one step: a denoiser pass less per sample. eps prediction needs its second step (its
# x0 at t = T divides by sqrt(alpha-bar_T)).
SINGLE_RATER_X0_STEPS = 1


def plan_sampling(sample: SampleConfig, multi_rater: bool, prediction_type: str = "x0") -> set[str]:
    """Fill `sample.steps` and `sample.eta` left to "auto" (see MULTI_RATER_SAMPLING and
    SINGLE_RATER_X0_STEPS); returns the names it filled."""
    planned = MULTI_RATER_SAMPLING if multi_rater else SINGLE_RATER_SAMPLING
    if not multi_rater and prediction_type == "x0":
        planned = planned | {"steps": SINGLE_RATER_X0_STEPS}
    filled = {key for key in planned if getattr(sample, key) == "auto"}
    for key in filled:
        setattr(sample, key, planned[key])
    return filled


def plan_postprocessing(sample: SampleConfig, labels: list[np.ndarray], num_classes: int) -> None:
    """Fill `sample.largest_component` left to "auto": the classes that are one structure in the
    training labels (`single_component_classes`)."""
    if sample.largest_component != "auto" or not labels:
        return
    sample.largest_component, shares = single_component_classes(labels, num_classes)
    log.info("%s", describe_postprocessing(sample.largest_component, shares))


def describe_postprocessing(classes: list[int], shares: dict[int, float]) -> str:
    """One line for check-dataset and train: the classes cut to their largest component, and why."""
    found = ", ".join(f"{c}: {share:.2f}" for c, share in shares.items())
    return f"post-processing: classes {classes} keep their largest component (labels in one piece per class: {found})"


DEFAULT_DOWNSAMPLINGS = 4  # 003 section IV-B, when the latent is not planned from labels
MAX_ATTENTION_TOKENS = 1024  # self-attention over more voxels than this costs more than it gives on a CPU


def attention_stages_within(patch: list[int], strides: list, dims: int) -> int:
    """How many of the image encoder's last stages have at most MAX_ATTENTION_TOKENS voxels."""
    grids = [math.prod(p // t for p, t in zip(patch, total_stride(strides[: i + 1], dims), strict=True))
             for i in range(len(strides))]  # fmt: skip
    count = 0
    for tokens in reversed(grids):
        if tokens > MAX_ATTENTION_TOKENS:
            break
        count += 1
    return count


def _downsamplings(m, latent: dict | None) -> int:
    if isinstance(m.num_downsamplings, int):
        return m.num_downsamplings
    return latent["num_downsamplings"] if latent else DEFAULT_DOWNSAMPLINGS


def _plan_latent(config: Config, patch: list[int], spacing: list[float], labels) -> dict | None:
    m = config.model
    wanted = "auto" in (m.num_downsamplings, m.decoder_skips) and m.mode == "ldseg"
    if not wanted or not labels:
        return None
    if m.strides:  # the user's strides: only whether their latent needs skips is planned
        total = total_stride(m.strides, m.spatial_dims)
        ceiling = [round(v, 4) for v in label_ceiling(labels, m.num_classes, total)]
        fits = min(ceiling) >= m.latent_ceiling
        return {"num_downsamplings": len(m.strides), "decoder_skips": not fits, "frozen_axes": [],
                "ceilings": {len(m.strides): ceiling}}  # fmt: skip
    refused = m.decoder_skips is False  # by the user: the best latent without skips
    latent = plan_latent(labels, m.num_classes, patch, spacing, m.latent_ceiling, skips=not refused,
                         min_downsamplings=m.min_latent_downsamplings)  # fmt: skip
    if isinstance(m.num_downsamplings, int):  # chosen by the user: skips follow that latent's ceiling
        ceiling = latent["ceilings"].get(m.num_downsamplings)
        latent["num_downsamplings"] = m.num_downsamplings
        latent["decoder_skips"] = ceiling is None or min(ceiling) < m.latent_ceiling
    return latent


def prepare_training_data(data_dirs: list[Path], config: Config) -> TrainingData:
    """Load, check, configure, split by patient and preprocess; fills the data-decided settings."""
    specs, samples = load_datasets(data_dirs, config.data)
    if len({spec.name for spec in specs}) < len(specs):
        raise LatentSegError(f"two datasets share a folder name ({', '.join(spec.name for spec in specs)})")
    _check_compatible(specs, samples, same_labels=config.model.prompt == "none")  # prompts: labels differ
    labels = specs[0].labels
    found = max(int(s["label"].max()) for s in samples) + 1
    config.model.spatial_dims = samples[0]["meta"].spatial_dims
    config.model.in_channels = channels_of(samples[0])
    config.model.num_classes = max(num_classes_of(specs[0]) or found, 2)

    train_ids, val_ids = [], []
    for spec in specs:
        ids = [s["case_id"] for s in samples if s["dataset"] == spec.name]
        tr, va = make_split(ids, config.data.split, config.data.val_fraction, config.train.seed, spec.root)
        train_ids += [(spec.name, c) for c in tr]
        val_ids += [(spec.name, c) for c in va]
    keep = set(train_ids) | set(val_ids)
    samples = [s for s in samples if (s["dataset"], s["case_id"]) in keep]

    prep, grid = plan_preprocessing(config, specs, samples)
    spacings = [list(s["meta"].spacing) for s in samples]
    store = CaseStore(config.data)
    for s in samples:  # one raw image in memory at a time
        reload_image(s, config.data.max_voxels)
        s.update(preprocess_sample(s, prep))
        del s["meta"]
        store.hold(s)
    store.report(len(samples))
    raters = use_raters(samples, config.data.raters)
    multi_rater = raters.get("mode") == "random"
    filled = plan_sampling(config.sample, multi_rater, config.model.prediction_type)
    fit_sampler = multi_rater and {"steps", "eta"} <= filled and config.sample.sampler == "ddim"
    shapes = [s["image"].shape[1:] for s in samples]
    train_labels = [s["label"][0] for s in samples if (s["dataset"], s["case_id"]) in set(train_ids)]
    spacing = prep.spacing or [float(v) for v in np.median(spacings, axis=0)]
    latent = plan_network(config, shapes, spacing, train_labels, multi_rater)
    plan_postprocessing(config.sample, train_labels, config.model.num_classes)
    if latent:
        log.info("%s", describe_latent(latent, config.model.strides, config.model.spatial_dims))
    if multi_rater:
        m, smp = config.model, config.sample
        encoder = "end to end" if m.diffusion_trains_label_encoder else "from its own latent (latent_reconstruction)"
        fitted = ", fitted to the annotators on the validation cases after training" if fit_sampler else ""
        log.info(
            "several annotators: the label encoder learns %s; DDIM-%s, eta %s%s", encoder, smp.steps, smp.eta, fitted
        )

    names = labels or {i: str(i) for i in range(config.model.num_classes)}
    fingerprint = {
        "datasets": [{"root": str(s.root), "layout": s.layout, "cases": len(s.cases)} for s in specs],
        "labels": {str(k): v for k, v in sorted(names.items())},
        "mask_values": specs[0].mask_values,
        "num_channels": config.model.in_channels,
        "channel_names": {str(k): v for k, v in specs[0].channel_names.items()},
        "spatial_dims": config.model.spatial_dims,
        "median_spacing": [float(v) for v in np.median(spacings, axis=0)],
        "median_shape": median_shape(shapes),
        "preprocessing": prep.to_dict(),
        "grid": grid,
        "train_cases": [f"{d}/{c}" for d, c in train_ids],
        "val_cases": [f"{d}/{c}" for d, c in val_ids],
        "raters": raters,
    }
    train = [s for s in samples if (s["dataset"], s["case_id"]) in set(train_ids)]
    val = [s for s in samples if (s["dataset"], s["case_id"]) in set(val_ids)]
    names_by_dataset = {spec.name: _label_names(spec, samples) for spec in specs}
    store = store if store.folder else None
    return TrainingData(train, val, fingerprint, names_by_dataset, latent, store, fit_sampler)


FOREGROUND_VOXELS = 10_000  # foreground voxels kept per case on disk for centred patches (nnU-Net's count)
SPILLED = ("image", "label", "raters")


def memory_budget(data: DataConfig) -> float:
    """Bytes of preprocessed cases to hold in memory: `data.memory_gb`, or half the machine's memory."""
    if data.memory_gb != "auto":
        return data.memory_gb * 2**30
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2
    except (AttributeError, ValueError, OSError):  # no sysconf (Windows): hold everything
        return math.inf


class CaseStore:
    """Preprocessed cases in memory up to the budget; past it, each case's arrays go to .npy files
    in a temporary folder and come back memory-mapped, so a training set larger than memory still
    trains (`RandForegroundCropd` reads only the patch). The folder goes with this object."""

    def __init__(self, data: DataConfig):
        self.budget, self.held, self.spilled = memory_budget(data), 0, 0
        self.parent = data.cache_dir or None
        self.folder: tempfile.TemporaryDirectory | None = None

    def hold(self, sample: dict[str, Any]) -> None:
        size = sum(sample[k].nbytes for k in SPILLED if k in sample)
        if self.held + size <= self.budget:
            self.held += size
            return
        if self.folder is None:
            try:
                self.folder = tempfile.TemporaryDirectory(prefix="latentseg-cache-", dir=self.parent)
            except OSError as err:
                raise LatentSegError(
                    f"{self.parent or tempfile.gettempdir()}: cannot keep training cases there "
                    f"({one_line(err)}); set data.cache_dir"
                ) from err
        spill(sample, Path(self.folder.name) / f"{self.spilled:05d}")
        self.spilled += 1

    def report(self, cases: int) -> None:
        if self.spilled:
            log.info(
                "memory: %d of %d preprocessed cases held (%.1f GiB, data.memory_gb), %d kept in %s, read patch "
                "by patch",
                cases - self.spilled, cases, self.held / 2**30, self.spilled, self.folder.name,
            )  # fmt: skip


def spill(sample: dict[str, Any], stem: Path) -> None:
    """A case's arrays written to `stem`_KEY.npy and replaced by read-only memory maps of them, with a
    sample of its foreground voxels for the patches centred on foreground."""
    voxels = np.argwhere(np.asarray(sample["label"][0]) > 0)
    if len(voxels) > FOREGROUND_VOXELS:  # a random sample, still in C order
        voxels = voxels[np.sort(np.random.default_rng(0).choice(len(voxels), FOREGROUND_VOXELS, replace=False))]
    sample["foreground"] = voxels.astype(np.int32)
    for key in SPILLED:
        if key in sample:
            path = stem.parent / f"{stem.name}_{key}.npy"
            try:
                np.save(path, sample[key])
            except OSError as err:
                raise LatentSegError(
                    f"{path}: cannot write a training case there ({one_line(err)}); set data.cache_dir"
                ) from err
            sample[key] = np.load(path, mmap_mode="r")


def _label_names(spec: DatasetSpec, samples: list[dict[str, Any]]) -> dict[int, str]:
    """A dataset's declared label names, or its label values found in the data as names."""
    if spec.labels:
        return spec.labels
    values = {int(v) for s in samples if s["dataset"] == spec.name for v in np.unique(s["label"])}
    return {i: str(i) for i in sorted(values)}


def use_raters(samples: list[dict[str, Any]], mode: str) -> dict[str, Any]:
    """Several annotators: `random` keeps their masks for training to draw from, `majority` makes
    their per-voxel majority the label, `none` drops them. Returns what the fingerprint records."""
    from latentseg.fusion import majority

    with_raters = [s for s in samples if "raters" in s]
    if not with_raters:
        return {}
    mode = "random" if mode == "auto" else mode
    counts = sorted({len(s["raters"]) for s in with_raters})
    for s in with_raters:
        if mode == "majority":
            s["label"] = majority(list(s["raters"]))[None]
        if mode != "random":
            del s["raters"]
    return {"mode": mode, "cases": len(with_raters), "annotators_per_case": counts}


def check_plan(samples: list[dict[str, Any]], num_classes: int, config: Config) -> str:
    """What `train` would plan for the grid, the latent and the post-processing, from the labels as
    stored (check-dataset's lines); on a coarser grid the latent is planned on every f-th voxel."""
    dims = samples[0]["meta"].spatial_dims
    config.model.num_classes = num_classes
    grid = plan_grid(config, samples)
    f = grid["factor"]
    spacing = [float(v) * f for v in np.median([s["meta"].spacing for s in samples], axis=0)]
    m, labels = config.model, [s["label"][0][(slice(None, None, f),) * dims] for s in samples]
    patch = plan_patch(config.data.patch_size, [label.shape for label in labels], dims, config.train.max_minutes)
    latent = plan_latent(labels, num_classes, patch, spacing, m.latent_ceiling, m.min_latent_downsamplings)
    late = latent.get("thin_axes", [])
    strides = plan_strides(patch, spacing, latent["num_downsamplings"], latent["frozen_axes"], late)
    postprocessing = describe_postprocessing(*single_component_classes(labels, num_classes))
    lines = [describe_grid(grid)] if "extent" in grid else []
    return "\n".join([*lines, describe_latent(latent, strides, dims), postprocessing])
