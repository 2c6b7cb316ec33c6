"""Train / validation / test splits that never separate the cases of one patient.

Cases whose ids differ only by a time-point suffix (`patient001_frame01` and `_frame02`, `_ED` /
`_ES`, `_t3`, `_phase2`, ...) belong to one patient and always land on the same side.

Split sources (`data.split`):
- "random": a seeded random split of patients, `data.val_fraction` of them for validation;
- "dataset": the dataset.json's `suggested_split_by_patient` or `split` {"train": [...], "test": [...]};
  test cases are left out of training, validation is drawn from the rest;
- "fold:I/K": patient-grouped K-fold cross-validation, fold I is the validation set;
- a path to a CSV with columns `case,split` (split: train, val or test).
"""

from __future__ import annotations

import csv
import json
import random
import re
from pathlib import Path

from latentseg.errors import LatentSegError, one_line

TIMEPOINT = re.compile(r"^(.+?)[_-](?:frame|phase|time|tp|t|ed|es|visit|scan)\d*$", re.IGNORECASE)


def patient_of(case_id: str) -> str:
    """The patient a case belongs to: its id without a time-point suffix."""
    match = TIMEPOINT.match(case_id)
    return match.group(1) if match else case_id


def _grouped(case_ids: list[str]) -> dict[str, list[str]]:
    groups: dict[str, list[str]] = {}
    for case in sorted(case_ids):
        groups.setdefault(patient_of(case), []).append(case)
    return groups


def random_split(case_ids: list[str], val_fraction: float, seed: int) -> tuple[list[str], list[str]]:
    """Seeded split by patient; at least one patient stays in training."""
    groups = _grouped(case_ids)
    patients = sorted(groups)
    random.Random(seed).shuffle(patients)
    n_val = min(int(round(val_fraction * len(patients))), len(patients) - 1)
    val = [c for p in patients[:n_val] for c in groups[p]]
    train = [c for p in patients[n_val:] for c in groups[p]]
    return sorted(train), sorted(val)


def kfold_split(case_ids: list[str], fold: int, folds: int, seed: int) -> tuple[list[str], list[str]]:
    groups = _grouped(case_ids)
    if not 0 <= fold < folds or folds < 2 or folds > len(groups):
        raise LatentSegError(f"fold {fold}/{folds} is impossible with {len(groups)} patients")
    patients = sorted(groups)
    random.Random(seed).shuffle(patients)
    val_patients = set(patients[fold::folds])
    val = [c for p in val_patients for c in groups[p]]
    return sorted(set(case_ids) - set(val)), sorted(val)


def _read_csv_split(path: Path) -> dict[str, str]:
    try:
        with open(path, newline="") as fh:
            rows = list(csv.DictReader(fh))
    except OSError as err:
        raise LatentSegError(f"{path}: cannot read the split file ({one_line(err)})") from err
    if not rows or not {"case", "split"} <= set(rows[0]):
        raise LatentSegError(f"{path}: a split file needs the columns case,split")
    bad = sorted({r["split"] for r in rows} - {"train", "val", "test"})
    if bad:
        raise LatentSegError(f"{path}: unknown split names {bad}; use train, val or test")
    return {r["case"]: r["split"] for r in rows}


def _dataset_test_cases(root: Path) -> set[str]:
    meta = json.loads((root / "dataset.json").read_text()) if (root / "dataset.json").is_file() else {}
    split = meta.get("suggested_split_by_patient") or meta.get("split")
    if not isinstance(split, dict) or "test" not in split:
        raise LatentSegError(f"{root}: data.split=dataset needs a 'suggested_split_by_patient' in dataset.json")
    return set(split["test"])


def check_patients_not_split(first: list[str], second: list[str], what: str) -> None:
    shared = {patient_of(c) for c in first} & {patient_of(c) for c in second}
    if shared:
        raise LatentSegError(f"{what}: patients {sorted(shared)[:5]} have cases on both sides of the split")


def make_split(
    case_ids: list[str], split: str, val_fraction: float, seed: int, dataset_root: Path | None = None
) -> tuple[list[str], list[str]]:
    """(train, val) case ids; test cases named by the split source are left out of both."""
    if split == "random":
        return random_split(case_ids, val_fraction, seed)
    if split.startswith("fold:"):
        try:
            fold, folds = (int(v) for v in split[5:].split("/"))
        except ValueError as err:
            raise LatentSegError(f"data.split={split!r}: expected fold:I/K, e.g. fold:0/5") from err
        return kfold_split(case_ids, fold, folds, seed)
    if split == "dataset":
        if dataset_root is None:
            raise LatentSegError("data.split=dataset needs a dataset folder")
        test = _dataset_test_cases(dataset_root)
        remaining = [c for c in case_ids if c not in test]
        check_patients_not_split(remaining, sorted(test & set(case_ids)), str(dataset_root / "dataset.json"))
        return random_split(remaining, val_fraction, seed)
    table = _read_csv_split(Path(split))
    unknown = sorted(set(case_ids) - set(table))
    if unknown:
        raise LatentSegError(f"{split}: no split given for cases {unknown[:5]}")
    train = sorted(c for c in case_ids if table[c] == "train")
    val = sorted(c for c in case_ids if table[c] == "val")
    test = sorted(c for c in case_ids if table[c] == "test")
    check_patients_not_split(train, val + test, split)
    check_patients_not_split(val, test, split)
    return train, val
