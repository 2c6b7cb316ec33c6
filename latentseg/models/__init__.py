"""Networks. Every model family implements the `Segmenter` protocol and registers by name in
`FAMILIES` (`model.mode`): `ldseg` (`LatentSegmenter`, 003 with the options of 000 / 002 / 004)
and `textdiff` (`TextDiffSegmenter`, 001). Training and prediction talk to the protocol only."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch
from torch import nn

from latentseg.config import Config, ModelConfig, SampleConfig, TrainConfig
from latentseg.models.denoiser import Denoiser
from latentseg.models.encoders import ImageEncoder, LabelDecoder, LabelEncoder, standardize
from latentseg.models.losses import Losses
from latentseg.models.objective import Objective, Phase
from latentseg.models.segmenter import LatentSegmenter, ldseg_problems


@runtime_checkable
class Segmenter(Protocol):
    """What training and prediction need of a model (besides `nn.Module`'s own methods).

    Training: `objective(config).losses(batch, phases)`; `phases(train)` lists the parts trained
    alone first and `freeze(name)` freezes one when its share of the run is over;
    `prepare_training` and `load_pretrained` run once before a fresh run.
    Prediction: `sample(window, options, text, generator)` -> (N, B, C, *S) probabilities, with
    `sampling_problems(options)` saying beforehand what the options cannot do on this model.
    """

    config: ModelConfig

    def objective(self, config: Config) -> Objective: ...

    def phases(self, train: TrainConfig) -> list[Phase]: ...

    def freeze(self, part: str) -> None: ...

    def prepare_training(self, train: TrainConfig) -> None: ...

    def load_pretrained(self) -> None: ...

    def sampling_problems(self, options: SampleConfig) -> list[str]: ...

    def sample(
        self, image: torch.Tensor, options: SampleConfig, text=None, generator: torch.Generator | None = None
    ) -> torch.Tensor: ...


def _no_planning(config: Config) -> None:
    """Nothing to settle before the data is read."""


def _no_problems(config: ModelConfig) -> list[str]:
    return []


@dataclass(frozen=True)
class Family:
    """A model family: how to build it, what its config cannot combine, and what it settles
    before (`plan`) and after (`data_problems`) the data is read."""

    build: Callable[[ModelConfig], nn.Module]
    problems: Callable[[ModelConfig], list[str]]
    plan: Callable[[Config], None] = _no_planning
    data_problems: Callable[[ModelConfig], list[str]] = _no_problems


def _textdiff() -> Family:
    from latentseg.models import textdiff

    return Family(textdiff.TextDiffSegmenter, textdiff.textdiff_problems, textdiff.plan, textdiff.data_problems)


FAMILIES: dict[str, Callable[[], Family]] = {
    "ldseg": lambda: Family(LatentSegmenter, ldseg_problems),
    "textdiff": _textdiff,  # diffusers is imported only for this family
}


def family(config: ModelConfig) -> Family:
    """The family `config.mode` names."""
    if config.mode not in FAMILIES:
        raise ValueError(f"mode must be one of {', '.join(FAMILIES)}, got {config.mode!r}")
    return FAMILIES[config.mode]()


def build_model(config: ModelConfig) -> nn.Module:
    """The model `config.mode` names, with freshly initialised weights."""
    return family(config).build(config)


def model_problems(config: ModelConfig) -> list[str]:
    """What the model config cannot combine, one line each (empty: nothing)."""
    return family(config).problems(config)


__all__ = [
    "FAMILIES",
    "Denoiser",
    "Family",
    "ImageEncoder",
    "LabelDecoder",
    "LabelEncoder",
    "LatentSegmenter",
    "Losses",
    "Phase",
    "Segmenter",
    "build_model",
    "family",
    "model_problems",
    "standardize",
]
