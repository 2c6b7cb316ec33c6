"""What the method benchmarks share: data splits, one timed training run scored on a test set,
the plateau epoch, and collecting per-run results (each run writes WORK/<dataset>/<method>/
result.json, so runs may go in parallel processes)."""

from __future__ import annotations

import csv
import dataclasses
import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from benchmarks.realdata import DATASETS, SHARED, link_test_files, write_split
from latentseg.config import SampleConfig, load_config
from latentseg.data.datasets import discover_inputs
from latentseg.data.phantoms import write_phantom_dataset
from latentseg.data.splits import patient_of
from latentseg.demo import DEMOS
from latentseg.infer import predict
from latentseg.metrics import evaluate
from latentseg.training import train

SAMPLE_FIELDS = {f.name for f in dataclasses.fields(SampleConfig)}


@dataclass
class DataSplit:
    train_root: Path
    test_inputs: Path  # what `predict` reads
    references: Path  # what `evaluate` compares with
    settings: list[str]
    text_file: Path | None = None  # per-case sentences of the test inputs
    extra: dict = field(default_factory=dict)


def phantom_data(work: Path, ambiguous: bool = False) -> DataSplit:
    """The demo's 2D split (200 training / 20 test phantoms, 128^2), or its ambiguous variant."""
    n_train, n_test, size, settings = DEMOS[2]
    train_dir, test_dir = work / "data" / "train", work / "data" / "test"
    if not (train_dir / "text.csv").is_file():
        write_phantom_dataset(train_dir, n_train, 2, size, seed=1, ambiguous=ambiguous)
    if not (test_dir / "text.csv").is_file():
        write_phantom_dataset(test_dir, n_test, 2, size, seed=2, ambiguous=ambiguous)
    return DataSplit(train_dir, test_dir, test_dir, [s for s in settings if "steps" not in s])


def real_data(name: str, work: Path) -> DataSplit:
    """The real-data benchmark's split, with validation cases for the plateau curve (MoNuSeg's own
    `val` images; elsewhere every 8th training patient)."""
    work.mkdir(parents=True, exist_ok=True)
    images, labels = link_test_files(name, work)
    split = write_split(name, work)
    given = {}
    if (SHARED / name / "metadata.csv").is_file():
        with open(SHARED / name / "metadata.csv") as fh:
            given = {r["filename"].rsplit(".", 1)[0]: r["split"] for r in csv.DictReader(fh)}
    with open(split) as fh:
        rows = list(csv.DictReader(fh))
    patients = sorted({patient_of(r["case"]) for r in rows if r["split"] == "train"})
    val_patients = set(patients[7::8])  # every 8th patient, so a patient's frames stay together
    for r in rows:
        if r["split"] == "train" and (
            given.get(r["case"]) == "val" or (not given and patient_of(r["case"]) in val_patients)
        ):
            r["split"] = "val"
    with open(split, "w", newline="") as fh:
        w = csv.DictWriter(fh, ["case", "split"])
        w.writeheader()
        w.writerows(rows)
    text = next(
        (SHARED / name / t for t in ("text.csv", "text_annotations.csv") if (SHARED / name / t).is_file()), None
    )
    return DataSplit(SHARED / name, images, labels, DATASETS[name]["settings"] + [f"data.split={split}"], text)


def plateau_epoch(log: dict, batch_size: int, train_cases: int) -> float | None:
    """Epoch at which validation Dice first reaches 98% of its best."""
    dice, steps = log.get("val_dice", []), log.get("val_step", [])
    if not dice:
        return None
    best = max(dice)
    step = next(s for s, d in zip(steps, dice, strict=True) if d >= 0.98 * best)
    return step * batch_size / train_cases


def train_and_score(
    work: Path,
    data: DataSplit,
    train_settings: list[str],
    evaluations: list[tuple[str, dict]],
    minutes: float,
    measure: Callable[[Path, dict], dict] | None = None,
    reuse: bool = False,
) -> dict:
    """Train for `minutes` (validating every 200 steps), then predict and evaluate the test set once
    per (label, predict options); `measure(model_dir, options)` may add figures per evaluation.
    `reuse` keeps an already trained model and its training figures, and only re-evaluates."""
    model_dir = work / "model"
    config = load_config(
        None,
        data.settings
        + train_settings
        + ["train.steps=1000000", f"train.max_minutes={minutes}", "train.val_every=200", "train.val_cases=8"]
        + ["train.checkpoint_every=1000000", "train.log_every=50"],
    )
    t0 = time.time()
    previous = json.loads((work / "result.json").read_text()) if reuse and (work / "result.json").is_file() else None
    if previous is None:
        train(data.train_root, model_dir, config)
    log = json.loads((model_dir / "training_log.json").read_text())
    train_cases = len(json.loads((model_dir / "fingerprint.json").read_text())["train_cases"])
    result = {
        "train_minutes": previous["train_minutes"] if previous else (time.time() - t0) / 60,
        "steps": log["step"][-1],
        "plateau_epoch": plateau_epoch(log, config.train.batch_size, train_cases),
        "epochs": log["step"][-1] * config.train.batch_size / train_cases,
        "val_curve": {"step": log["val_step"], "dice": log["val_dice"]},
        "evaluations": {},
    }
    if previous and "branches" in previous:
        result["branches"] = previous["branches"]
    for label, options in evaluations:
        pred = work / f"pred_{label}"
        sampling = {k: v for k, v in options.items() if k in SAMPLE_FIELDS}
        opts = {k: v for k, v in options.items() if k not in SAMPLE_FIELDS}
        if data.text_file is not None and config.model.text_fusion != "none":
            opts.setdefault("text_file", data.text_file)
        t0 = time.time()
        predict(model_dir, data.test_inputs, pred, sampling, progress=False, **opts)
        seconds = (time.time() - t0) / len(discover_inputs(data.test_inputs))
        summary = evaluate(pred, data.references)
        result["evaluations"][label] = {
            "dice": summary["foreground_mean"]["Dice"],
            "nsd": summary["foreground_mean"]["NSD"],
            "iou": summary["foreground_mean"]["IoU"],
            "dice_per_class": {k: v["Dice"] for k, v in summary["mean"].items()},
            "seconds_per_case": seconds,
            **(measure(model_dir, options) if measure else {}),
        }
        print(f"{work.parent.name}/{work.name}/{label}: {json.dumps(result['evaluations'][label])}", flush=True)
    (work / "result.json").write_text(json.dumps(result, indent=1))
    return result


def collect(work: Path, results_path: Path) -> dict:
    results: dict = {
        "machine": {"cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__}
    }
    for path in sorted(work.glob("*/*/result.json")):
        results.setdefault(path.parent.parent.name, {})[path.parent.name] = json.loads(path.read_text())
    results_path.write_text(json.dumps(results, indent=1))
    return results
