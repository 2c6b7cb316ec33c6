"""One place that finishes the config: `resolve(config, data_dirs)` reads the data and computes
every derived setting once (dimensionality, channels, classes, patch and strides, the text
encoder's width, the prompt names, a backbone's config), as nnU-Net plans from its fingerprint.

The user's settings stay in `config.json`; the derived ones are saved beside the weights as
`plans.json` and applied on top of them when a model is loaded (`Plan.apply`). A model directory
from before plans existed holds a finished `config.json`; its plan is read from it
(`Plan.from_config`).
"""

from __future__ import annotations

import copy
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from latentseg.config import Config, step_limit
from latentseg.data.prepare import TrainingData, prepare_training_data
from latentseg.data.transforms import flip_word_pairs
from latentseg.errors import LatentSegError, one_line
from latentseg.models import family, model_problems
from latentseg.prompts import text_input

log = logging.getLogger("latentseg.plan")
PLAN_FILE = "plans.json"
PLAN_VERSION = 1
PLANNED = {
    "model": (
        "spatial_dims",
        "in_channels",
        "num_classes",
        "num_downsamplings",
        "decoder_skips",
        "decoder_image_latent",
        "decoder_full_skip",
        "decoder_fuse_kernel",
        "latent_reconstruction",
        "diffusion_trains_label_encoder",
        "strides",
        "denoiser_strides",
        "image_encoder_channels",
        "label_encoder_channels",
        "decoder_channels",
        "attention_stages",
        "text_fusion",
        "text_dim",
        "prompt_names",
        "backbone_config",
    ),
    "data": ("patch_size", "augmentation", "grid_factor"),
    "train": ("batch_size",),
    "sample": ("steps", "eta", "temperature", "num_samples", "largest_component"),
}
DERIVED_ONLY = ("spatial_dims", "in_channels", "num_classes", "text_dim", "prompt_names", "backbone_config")


@dataclass
class Plan:
    """The derived settings of a trained model: {section: {field: value}}."""

    model: dict[str, Any] = field(default_factory=dict)
    data: dict[str, Any] = field(default_factory=dict)
    train: dict[str, Any] = field(default_factory=dict)
    sample: dict[str, Any] = field(default_factory=dict)
    version: int = PLAN_VERSION
    latent: dict[str, Any] = field(default_factory=dict)  # how the latent was chosen: label ceilings

    @classmethod
    def from_config(cls, config: Config) -> Plan:
        """The planned fields of a finished config."""
        sections = {name: getattr(config, name) for name in PLANNED}
        return cls(
            **{name: {key: copy.deepcopy(getattr(sections[name], key)) for key in PLANNED[name]} for name in PLANNED}
        )

    def apply(self, config: Config) -> Config:
        """A copy of the user's `config` with the planned values set."""
        finished = copy.deepcopy(config)
        for name in PLANNED:
            section = getattr(finished, name)
            for key, value in getattr(self, name).items():
                setattr(section, key, copy.deepcopy(value))
        return finished.validate("plans.json")

    def to_dict(self) -> dict[str, Any]:
        sections = {name: getattr(self, name) for name in PLANNED}
        return {"version": self.version, **sections, "latent": self.latent}

    def save(self, path: Path) -> None:
        path.write_text(json.dumps(self.to_dict(), indent=2))

    @classmethod
    def load(cls, path: Path) -> Plan:
        try:
            raw = json.loads(Path(path).read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            raise LatentSegError(f"{path}: cannot read the plan ({one_line(err)})") from err
        problems = _plan_problems(raw, path)
        if problems:
            raise LatentSegError("\n".join(problems))
        sections = {name: dict(raw.get(name) or {}) for name in PLANNED}
        return cls(**sections, version=int(raw["version"]), latent=dict(raw.get("latent") or {}))


def _plan_problems(raw: Any, path: Path) -> list[str]:
    if not isinstance(raw, dict):
        return [f"{path}: must hold a JSON object, got {type(raw).__name__}"]
    found = [f"{path}: missing key {key!r}" for key in ("version", "model") if key not in raw]
    if found:
        return found
    if raw["version"] != PLAN_VERSION:
        return [f"{path}: plan version {raw['version']!r}; this latentseg reads version {PLAN_VERSION}"]
    for section in PLANNED:
        if not isinstance(raw.get(section, {}), dict):
            found.append(f"{path}: {section} must be an object")
            continue
        found += [f"{path}: unknown key {section}.{key}" for key in raw.get(section, {}) if key not in PLANNED[section]]
    return found


def user_settings(config: Config) -> dict[str, Any]:
    """The config as `config.json` keeps it: the user's settings, without the purely derived fields."""
    raw = config.to_dict()
    for key in DERIVED_ONLY:
        raw["model"].pop(key, None)
    return raw


@dataclass
class Resolved:
    """A finished config, its plan, the prepared data and what encodes the batches' text."""

    config: Config
    plan: Plan
    data: TrainingData
    encoder: Any


def check_settings(config: Config) -> None:
    """Settings that can be refused before any data is read."""
    problems = config.problems() or [f"model: {p}" for p in model_problems(config.model)]
    try:
        flip_word_pairs(config.data.text_flip_words)  # the axes are checked once the data is read
    except ValueError as err:
        problems.append(str(err))
    if problems:
        raise LatentSegError("\n".join(problems))


def resolve(user: Config, data_dirs: list[Path]) -> Resolved:
    """Read the data and finish a copy of `user`: every derived setting, computed once."""
    config = copy.deepcopy(user)
    texts = text_input(config.model)
    encoder = texts.plan(config)  # text_dim, and text fusion for prompts
    family(config.model).plan(config)  # e.g. a backbone's config
    data = prepare_training_data(data_dirs, config)  # dims, channels, classes, patch, strides
    try:
        flip_word_pairs(config.data.text_flip_words, config.model.spatial_dims)
    except ValueError as err:
        raise LatentSegError(str(err)) from None
    problems = family(config.model).data_problems(config.model)
    if problems:
        raise LatentSegError("\n".join(problems))
    encoder = texts.training_texts(data, config, encoder)  # prompts: binary tasks and their names
    plan_batches(config)
    check_settings(config)
    plan = Plan.from_config(config)
    plan.latent = _json_keys(data.latent or {})
    return Resolved(config, plan, data, encoder)


def _json_keys(report: dict) -> dict:
    """The latent report as JSON keeps it (ceilings keyed by strings), so a saved plan compares equal."""
    return json.loads(json.dumps(report))


AUTO_BATCH = {2: 8, 3: 2}  # patches per step: nnU-Net's 3D batch; 2D as the accuracy bar trains
AUGMENT_AFTER_MINUTES = 60.0
AUGMENT_AFTER_STEPS = 5000


def plan_batches(config: Config) -> None:
    """Decide, in place, what the training batches need: augmentation from the budget and the batch
    size from the dimension ("auto" settings only)."""
    config.data.augmentation = plan_augmentation(config)
    if config.train.batch_size == "auto":
        config.train.batch_size = AUTO_BATCH[config.model.spatial_dims]


def plan_augmentation(config: Config) -> str:
    """ "auto" -> on for long runs only: augmentation slows what a short run learns (measured on
    ACDC, benchmarks/results/pipeline.json) and pays off when the data would otherwise be overfit."""
    if config.data.augmentation != "auto":
        return config.data.augmentation
    t = config.train
    long_run = t.max_minutes > AUGMENT_AFTER_MINUTES if t.max_minutes > 0 else step_limit(t) > AUGMENT_AFTER_STEPS
    return "on" if long_run else "off"


def load_plan(model_dir: Path, config: Config) -> Config:
    """A saved model's finished config: `config.json` with `plans.json` applied (old model
    directories, without a plan, hold a finished config.json)."""
    path = model_dir / PLAN_FILE
    if not path.is_file():
        return config
    return Plan.load(path).apply(config)
