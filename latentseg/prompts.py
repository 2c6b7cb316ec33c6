"""How a model is told what to segment, chosen once from its config (`text_input`):

- `none`: nothing; a prompt given anyway is refused;
- `sentence` (000, 001): one description per case, from the dataset's text.csv in training and
  from `--prompt`, `--text-file` or a text.csv beside the inputs in prediction;
- `class` and `text` (002): a prompt naming the target; every (case, target) of the training data
  becomes a binary task, and prediction takes the target's name (`class`: one of the model's
  names; `text`: any words, through the text encoder).

Each kind owns its `encoder` (strings -> the model's text input), its training texts and its
prediction inputs, so that training and prediction never ask which kind a model is.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from latentseg.config import Config, ModelConfig
from latentseg.data.datasets import Case, read_text_table
from latentseg.data.targets import ClassIds, read_label_map, target_names, target_tasks
from latentseg.errors import LatentSegError
from latentseg.text import TextEncoder, case_texts, load_text_encoder

log = logging.getLogger("latentseg.prompts")
CLASS_EMBEDDING_DIM = 64  # width of 002's learned class embeddings


class NoText:
    def plan(self, config: Config) -> TextEncoder | None:
        return None

    def encoder(self, m: ModelConfig) -> None:
        return None

    def check_names(self, m: ModelConfig, prompts: list[str]) -> None:
        """Any prompt is refused later, when the cases are read."""

    def training_texts(self, data, config: Config, encoder: Any) -> Any:
        return None

    def prediction_inputs(self, m: ModelConfig, cases: list[Case], request: dict[str, Any], device) -> dict:
        if request.get("prompt") is not None or request.get("text_file") is not None:
            raise LatentSegError("this model was trained without text (model.text_fusion=none): it takes no prompt")
        return {}


class Sentences:
    """000 section II-B / 001: a frozen text encoder reads one sentence per case."""

    def plan(self, config: Config) -> TextEncoder:
        encoder = self.encoder(config.model)
        config.model.text_dim = encoder.dim
        return encoder

    def encoder(self, m: ModelConfig) -> TextEncoder:
        return load_text_encoder(m.text_encoder, m.text_max_length)

    def check_names(self, m: ModelConfig, prompts: list[str]) -> None:
        """Any sentence is a valid description."""

    def training_texts(self, data, config: Config, encoder: TextEncoder) -> TextEncoder:
        for subset, name in ((data.train, "training"), (data.val, "validation")):
            for sample, text in zip(subset, case_texts(subset, config.data.allow_missing_text, name), strict=True):
                sample["text"] = text
        return encoder

    def prediction_inputs(self, m: ModelConfig, cases: list[Case], request: dict[str, Any], device) -> dict:
        prompt, text_file = request.get("prompt"), request.get("text_file")
        if prompt is not None:
            sentences = {case.case_id: _nonempty(prompt) for case in cases}
        else:
            if text_file is not None:
                table = read_text_table(Path(text_file))
                for case in cases:
                    case.text = table.get(case.case_id)
            samples = [{"case_id": case.case_id, "text": case.text} for case in cases]
            where = "the inputs (give --prompt, --text-file or a text.csv)"
            listed = case_texts(samples, request.get("allow_missing_text", False), where)
            sentences = {case.case_id: t for case, t in zip(cases, listed, strict=True)}
        encoder = self.encoder(m)
        return {case_id: encoder.encode([text]).to(device) for case_id, text in sentences.items()}


class TargetPrompt:
    """002: every (case, target) pair is a binary task prompted by the target's shared name."""

    def __init__(self, by_class: bool):
        self.by_class = by_class

    def plan(self, config: Config) -> TextEncoder | None:
        m = config.model
        if m.text_fusion == "none":
            m.text_fusion = "attention"  # the prompt needs a way into the image latent
        if self.by_class:
            m.text_dim = m.text_dim if m.text_dim >= 1 else CLASS_EMBEDDING_DIM
            return None
        return Sentences().plan(config)

    def encoder(self, m: ModelConfig) -> TextEncoder | ClassIds:
        return ClassIds(m.prompt_names) if self.by_class else Sentences().encoder(m)

    def training_texts(self, data, config: Config, encoder: TextEncoder | None) -> TextEncoder | ClassIds:
        m = config.model
        label_map = read_label_map(config.data.label_map) if config.data.label_map else {}
        targets = target_names(data.labels_by_dataset, label_map)
        names = sorted({name for t in targets.values() for name in t.values()})
        if not names:
            raise LatentSegError("model.prompt: the datasets have no foreground labels to prompt for")
        data.train = target_tasks(data.train, targets)
        data.val = target_tasks(data.val, targets, binarize=True)
        m.num_classes, m.prompt_names = 2, names
        data.fingerprint.update(
            labels={"0": "background", "1": "target"},
            mask_values=[],
            targets={ds: {str(i): n for i, n in t.items()} for ds, t in targets.items()},
        )
        log.info("%d targets (%s): %d training tasks", len(names), ", ".join(names), len(data.train))
        return ClassIds(names) if self.by_class else encoder

    def prediction_inputs(self, m: ModelConfig, cases: list[Case], request: dict[str, Any], device) -> dict:
        """The target the prompt names, the same for every case."""
        prompt = request.get("prompt")
        if prompt is None:
            raise LatentSegError(
                f"this model segments what a prompt names: give --prompt NAME or --prompts A,B "
                f"(trained on: {', '.join(m.prompt_names)})"
            )
        prompt = _nonempty(prompt)
        value = self.encoder(m).encode([prompt.strip() if self.by_class else prompt]).to(device)
        return {case.case_id: value for case in cases}

    def check_names(self, m: ModelConfig, prompts: list[str]) -> None:
        """Unknown class names are refused before anything is written (any words reach a text prompt)."""
        if self.by_class:
            ClassIds(m.prompt_names).encode(prompts)


def _nonempty(prompt: str) -> str:
    if not prompt.strip():
        raise LatentSegError("--prompt is empty: say what to segment")
    return prompt


TEXT_INPUTS = {"none": NoText(), "sentence": Sentences(), "class": TargetPrompt(True), "text": TargetPrompt(False)}


def text_input(m: ModelConfig):
    """The kind of text `m` takes: its prompt kind, else a sentence when it fuses text, else none."""
    if m.prompt != "none":
        return TEXT_INPUTS[m.prompt]
    return TEXT_INPUTS["sentence" if m.text_fusion != "none" else "none"]


def encoder_for(m: ModelConfig) -> TextEncoder | ClassIds | None:
    """What turns the strings of a trained model's batches into its text input."""
    return text_input(m).encoder(m)


def encode(encoder: TextEncoder | ClassIds | None, texts: list[str], device) -> torch.Tensor | Any | None:
    return encoder.encode(list(texts)).to(device) if encoder is not None else None
