"""Universal prompted segmentation (002 section 2): one model for several datasets, the target
chosen by a prompt. Every (case, target) pair becomes a binary task: the image, the mask of that
one target, and the target's shared name as the prompt.

A label mapping table gives the shared names (002's table across datasets), as YAML:

    # dataset folder name -> {label id: shared name}
    ACDC: {1: right ventricle, 2: myocardium, 3: left ventricle}
    LA2018: {1: left atrium}

A dataset the table does not name keeps its own label names (dataset.json / the phantoms' names);
label ids a listed dataset leaves out are not targets.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from latentseg.errors import LatentSegError, one_line


def read_label_map(path: str | Path) -> dict[str, dict[int, str]]:
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as err:
        raise LatentSegError(f"{path}: cannot read the label map ({one_line(err)})") from err
    if not isinstance(raw, dict) or not all(isinstance(v, dict) for v in raw.values()):
        raise LatentSegError(f"{path}: a label map is a mapping of dataset name -> {{label id: name}}")
    table = {}
    for dataset, labels in raw.items():
        try:
            table[str(dataset)] = {int(k): str(v).strip() for k, v in labels.items()}
        except (TypeError, ValueError):
            raise LatentSegError(f"{path}: {dataset}: label ids must be integers, got {list(labels)}") from None
        if any(not name for name in table[str(dataset)].values()) or 0 in table[str(dataset)]:
            raise LatentSegError(f"{path}: {dataset}: names must be non-empty and 0 (background) is not a target")
    return table


def target_names(labels_by_dataset: dict[str, dict[int, str]], label_map: dict[str, dict[int, str]]) -> dict:
    """{dataset: {label id: shared name}} of every target; the label map wins over a dataset's own names."""
    unknown = sorted(set(label_map) - set(labels_by_dataset))
    if unknown:
        raise LatentSegError(
            f"the label map names dataset(s) {', '.join(unknown)} that are not being trained on "
            f"(the datasets are: {', '.join(sorted(labels_by_dataset))})"
        )
    return {
        name: label_map.get(name, {i: n for i, n in labels.items() if i != 0})
        for name, labels in labels_by_dataset.items()
    }


def target_tasks(
    samples: list[dict[str, Any]], targets: dict[str, dict[int, str]], binarize: bool = False
) -> list[dict[str, Any]]:
    """One task per (case, target of its dataset): the sample with `target` (label id) and `text`
    (the shared name). `binarize` replaces the label by the target's mask now (validation); for
    training the mask is cut out per batch (`select_target`), so the label arrays are not copied."""
    tasks = []
    for s in samples:
        for label_id, name in sorted(targets[s["dataset"]].items()):
            task = {**s, "target": label_id, "text": name}
            if binarize:
                task["label"] = select_target(task)["label"]
                del task["target"]
            tasks.append(task)
    return tasks


def select_target(data: dict[str, Any]) -> dict[str, Any]:
    """The label replaced by the binary mask of `data["target"]` (a dictionary transform)."""
    if "target" not in data:
        return data
    label = data["label"]
    mask = label == data["target"]
    return {**data, "label": mask.astype(np.float32) if isinstance(mask, np.ndarray) else mask.float()}


class ClassIds:
    """The class-prompt model's counterpart of `TextEncoder.encode`: target names -> (B,) ids."""

    def __init__(self, names: list[str]):
        self.names = list(names)

    def index(self, name: str) -> int:
        if name not in self.names:
            raise LatentSegError(f"unknown class {name!r}; this model knows: {', '.join(self.names)}")
        return self.names.index(name)

    def encode(self, texts: list[str]) -> torch.Tensor:
        return torch.tensor([self.index(t) for t in texts], dtype=torch.long)
