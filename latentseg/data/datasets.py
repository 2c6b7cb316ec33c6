"""Finding and loading the cases of a dataset in the layouts users already have.

- nnU-Net v2 raw: `dataset.json` (`channel_names`, `labels` name -> id, `file_ending`),
  `imagesTr/CASE_XXXX<ending>`, `labelsTr/CASE<ending>`.
- MSD: `dataset.json` with a `training` list of {"image", "label"} paths and `labels` id -> name.
- 2D folders: `images/` and `masks/` with matching stems.
Any of them may carry a `text.csv` (`filename,text`; also `text_annotations.csv`) with one
sentence per case.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from latentseg.data.io import ImageMeta, is_image_file, read_image, read_label, split_suffix
from latentseg.errors import LatentSegError, one_line

TEXT_TABLES = ("text.csv", "text_annotations.csv")


@dataclass
class Case:
    case_id: str
    image_paths: list[Path]  # one file per channel (nnU-Net), or one file holding all channels
    label_path: Path | None = None
    text: str | None = None


@dataclass
class DatasetSpec:
    root: Path
    layout: str  # "nnunet" | "msd" | "folder2d"
    cases: list[Case]
    labels: dict[int, str] = field(default_factory=dict)  # id -> name; empty: inferred from the data
    num_channels: int | None = None
    problems: list[str] = field(default_factory=list)  # found while listing (missing files, ...)
    warnings: list[str] = field(default_factory=list)  # allowed, but worth a look (empty masks, stray files)
    channel_names: dict[int, str] = field(default_factory=dict)
    mask_values: list[int] = field(default_factory=list)  # stored value of each class, e.g. [0, 255]

    @property
    def name(self) -> str:
        return self.root.name


def read_text_table(path: Path) -> dict[str, str]:
    """{filename and stem: sentence} from a CSV with a `text` column and `filename` or `case`."""
    try:
        with open(path, newline="", encoding="utf-8") as fh:
            rows = list(csv.DictReader(fh))
    except (OSError, csv.Error, UnicodeDecodeError) as err:
        raise LatentSegError(f"{path}: cannot read the text table ({one_line(err)})") from err
    if not rows or "text" not in rows[0] or not ({"filename", "case"} & set(rows[0])):
        raise LatentSegError(f"{path}: a text table needs a header with 'filename' (or 'case') and 'text'")
    table: dict[str, str] = {}
    for row in rows:
        key = row.get("filename") or row.get("case") or ""
        table[key] = row["text"]
        table[split_suffix(Path(key))[0]] = row["text"]
    return table


def _attach_text(root: Path, cases: list[Case]) -> None:
    for name in TEXT_TABLES:
        if (root / name).is_file():
            table = read_text_table(root / name)
            for case in cases:
                case.text = table.get(case.case_id)
            return


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise LatentSegError(f"{path}: cannot read dataset.json ({one_line(err)})") from err
    if not isinstance(data, dict):
        raise LatentSegError(f"{path}: dataset.json must hold a JSON object")
    return data


def _nnunet(root: Path, meta: dict[str, Any]) -> DatasetSpec:
    missing = [k for k in ("channel_names", "labels", "file_ending") if k not in meta]
    if missing:
        raise LatentSegError(f"{root / 'dataset.json'}: missing {', '.join(missing)} (nnU-Net v2 format)")
    ending = meta["file_ending"]
    channels = sorted(int(k) for k in meta["channel_names"])
    labels = {int(v): str(k) for k, v in meta["labels"].items() if not isinstance(v, (list, tuple))}
    problems = []
    label_files = sorted((root / "labelsTr").glob(f"*{ending}"))
    cases = []
    for lab in label_files:
        case_id = lab.name[: -len(ending)]
        images = [root / "imagesTr" / f"{case_id}_{c:04d}{ending}" for c in channels]
        problems += [f"{p}: missing image file for case {case_id}" for p in images if not p.is_file()]
        cases.append(Case(case_id, images, lab))
    known = {c.case_id for c in cases}
    for img in sorted((root / "imagesTr").glob(f"*_0000{ending}")):
        case_id = img.name[: -len(f"_0000{ending}")]
        if case_id not in known:
            problems.append(f"{img}: image without a label file in labelsTr")
    expected = meta.get("numTraining")
    if isinstance(expected, int) and expected != len(cases):
        problems.append(f"{root / 'dataset.json'}: numTraining is {expected} but labelsTr holds {len(cases)} cases")
    names = {int(k): str(v) for k, v in meta["channel_names"].items()}
    return DatasetSpec(root, "nnunet", cases, labels, len(channels), problems, channel_names=names)


def _msd(root: Path, meta: dict[str, Any]) -> DatasetSpec:
    cases, problems = [], []
    for entry in meta["training"]:
        image, label = root / entry["image"], root / entry["label"]
        case_id = split_suffix(image)[0]
        problems += [f"{p}: missing file for case {case_id}" for p in (image, label) if not p.is_file()]
        cases.append(Case(case_id, [image], label))
    raw_labels = meta.get("labels", {})
    labels = {int(k): str(v) for k, v in raw_labels.items()} if raw_labels else {}
    modality = meta.get("modality") or meta.get("channel_names") or {}
    names = {int(k): str(v) for k, v in modality.items()}
    return DatasetSpec(root, "msd", cases, labels, len(modality) or None, problems, channel_names=names)


def _image_files(folder: Path, warnings: list[str]) -> dict[str, Path]:
    files = {}
    for p in sorted(folder.iterdir()):
        if is_image_file(p):
            files[split_suffix(p)[0]] = p
        elif p.is_file() and not p.name.startswith("."):
            warnings.append(f"{p}: not an image file, skipped")
    return files


def _folder2d(root: Path) -> DatasetSpec:
    warnings: list[str] = []
    images = _image_files(root / "images", warnings)
    masks = _image_files(root / "masks", warnings)
    problems = [f"{masks[s]}: mask without an image in images/" for s in masks if s not in images]
    problems += [f"{images[s]}: image without a mask in masks/" for s in images if s not in masks]
    cases = [Case(s, [images[s]], masks[s]) for s in masks if s in images]
    return DatasetSpec(root, "folder2d", cases, {}, None, problems, warnings)


def discover_dataset(root: str | Path) -> DatasetSpec:
    """List the labelled cases of a dataset folder (nnU-Net, MSD or 2D images/masks)."""
    root = Path(root)
    if not root.is_dir():
        raise LatentSegError(f"{root}: dataset folder not found")
    if (root / "dataset.json").is_file():
        meta = _read_json(root / "dataset.json")
        spec = _msd(root, meta) if isinstance(meta.get("training"), list) else _nnunet(root, meta)
    elif (root / "images").is_dir() and (root / "masks").is_dir():
        spec = _folder2d(root)
    else:
        raise LatentSegError(
            f"{root}: not a dataset folder; expected dataset.json (nnU-Net or MSD) or images/ and masks/"
        )
    if not spec.cases:
        raise LatentSegError(f"{root}: no labelled cases found ({spec.layout} layout)")
    _attach_text(root, spec.cases)
    return spec


def discover_inputs(path: str | Path) -> list[Case]:
    """Cases to predict: one file, a folder of files, or a dataset root (its `imagesTs/` or
    `images/`). nnU-Net channel files `CASE_XXXX` are grouped into one multi-channel case."""
    path = Path(path)
    if path.is_file():
        return [Case(split_suffix(path)[0], [path])]
    if not path.is_dir():
        raise LatentSegError(f"{path}: input not found")
    folder = next((path / sub for sub in ("imagesTs", "images") if (path / sub).is_dir()), path)
    files = sorted(p for p in folder.iterdir() if is_image_file(p))
    if not files:
        raise LatentSegError(f"{folder}: no NIfTI or image files to predict")
    stems = [split_suffix(p)[0] for p in files]
    channel_files = all(len(s) > 5 and s[-5] == "_" and s[-4:].isdigit() for s in stems)
    groups: dict[str, list[Path]] = {}
    for p, stem in zip(files, stems, strict=True):
        groups.setdefault(stem[:-5] if channel_files else stem, []).append(p)
    cases = [Case(case_id, paths) for case_id, paths in groups.items()]
    _attach_text(path, cases)
    return cases


def load_image(case: Case) -> tuple[np.ndarray, ImageMeta]:
    """All channels of a case as (C, *S) float32, checked for NaN/Inf and matching grids."""
    arrays, metas = zip(*(read_image(p) for p in case.image_paths), strict=True)
    for p, m in zip(case.image_paths[1:], metas[1:], strict=True):
        if m.spatial_shape != metas[0].spatial_shape:
            raise LatentSegError(
                f"{p}: channel grid {m.spatial_shape} differs from {case.image_paths[0].name} {metas[0].spatial_shape}"
            )
    image = np.concatenate(arrays, axis=0)
    if not np.all(np.isfinite(image)):
        bad = next(p for p, a in zip(case.image_paths, arrays, strict=True) if not np.all(np.isfinite(a)))
        raise LatentSegError(f"{bad}: the image contains NaN or Inf values")
    return image, metas[0]


def _check_channels(case: Case, image: np.ndarray, meta: ImageMeta, num_channels: int | None) -> None:
    if num_channels is None or image.shape[0] == num_channels:
        return
    if image.shape[0] > num_channels and meta.spatial_dims == 3:
        raise LatentSegError(
            f"{case.image_paths[0]}: a 4D image ({image.shape[0]} channels) where 3D is expected "
            f"(the dataset declares {num_channels} channel(s))"
        )
    raise LatentSegError(f"{case.image_paths[0]}: expected {num_channels} channel(s), found {image.shape[0]}")


def load_case(case: Case, num_classes: int | None = None, num_channels: int | None = None) -> dict[str, Any]:
    """A training sample {"image", "label", "text", "case_id", "meta"}, with every check applied."""
    image, meta = load_image(case)
    _check_channels(case, image, meta, num_channels)
    if case.label_path is None:
        raise LatentSegError(f"case {case.case_id}: no label file")
    label, lmeta = read_label(case.label_path)
    if lmeta.spatial_shape != meta.spatial_shape:
        raise LatentSegError(
            f"{case.label_path}: label shape {lmeta.spatial_shape} differs from image shape {meta.spatial_shape}"
        )
    if meta.affine is not None and lmeta.affine is not None and not np.allclose(meta.affine, lmeta.affine, atol=1e-3):
        raise LatentSegError(f"{case.label_path}: label affine differs from the image affine")
    if num_classes is not None and label.max(initial=0) >= num_classes:
        bad = sorted(int(v) for v in np.unique(label) if v >= num_classes)
        raise LatentSegError(
            f"{case.label_path}: label values {bad} are outside 0..{num_classes - 1} (the declared labels)"
        )
    return {"image": image, "label": label[None], "text": case.text, "case_id": case.case_id, "meta": meta}


def num_classes_of(spec: DatasetSpec) -> int | None:
    """Classes declared by the dataset (background included), or None if it declares none."""
    return max(spec.labels) + 1 if spec.labels else None


def infer_mask_values(values: set[int]) -> list[int]:
    """Stored mask values -> classes for undeclared 2D masks: 0/255 masks are binary, values that
    are already 0..K-1 map to themselves, anything else maps in sorted order."""
    if values <= {0, 255} and 255 in values:
        return [0, 255]
    ordered = sorted(values | {0})
    return [] if ordered == list(range(len(ordered))) else ordered


def _apply_mask_values(samples: list[dict[str, Any]], spec: DatasetSpec, problems: list[str]) -> None:
    values = set().union(*(np.unique(s["label"]).tolist() for s in samples)) if samples else set()
    if not spec.mask_values:
        spec.mask_values = infer_mask_values(values)
    if not spec.mask_values:
        return
    lut = np.full(max(max(values, default=0), max(spec.mask_values)) + 1, -1, dtype=np.int64)
    lut[spec.mask_values] = np.arange(len(spec.mask_values))
    for s in list(samples):
        mapped = lut[s["label"]]
        if mapped.min() < 0:
            bad = sorted(set(np.unique(s["label"]).tolist()) - set(spec.mask_values))
            problems.append(f"{s['case_id']}: mask values {bad} are not among {spec.mask_values}")
            samples.remove(s)
        else:
            s["label"] = mapped


def load_dataset(spec: DatasetSpec) -> tuple[list[dict[str, Any]], list[str]]:
    """Every case loaded and checked; all problems are collected, one line each, not just the first.
    Empty masks are allowed and noted in `spec.warnings`."""
    problems = list(spec.problems)
    samples = []
    declared = num_classes_of(spec)
    bad_paths = {p.split(":")[0] for p in problems}
    for case in spec.cases:
        if any(str(p) in bad_paths for p in [*case.image_paths, case.label_path]):
            continue
        try:
            samples.append(load_case(case, declared, spec.num_channels))
        except LatentSegError as err:
            problems.append(str(err))
    if declared is None:
        _apply_mask_values(samples, spec, problems)
    spec.warnings += [f"{s['case_id']}: the mask is empty (no foreground)" for s in samples if not s["label"].any()]
    dims = {s["meta"].spatial_dims for s in samples}
    if len(dims) > 1:
        problems.append(f"{spec.root}: cases mix 2D and 3D images")
    channels = {s["image"].shape[0] for s in samples}
    if len(channels) > 1:
        problems.append(f"{spec.root}: cases have different channel counts {sorted(channels)}")
    return samples, problems
