"""Finding and loading the cases of a dataset in the layouts users already have.

- nnU-Net v2 raw: `dataset.json` (`channel_names`, `labels` name -> id, `file_ending`),
  `imagesTr/CASE_XXXX<ending>`, `labelsTr/CASE<ending>`.
- MSD: `dataset.json` with a `training` list of {"image", "label"} paths and `labels` id -> name.
- 2D folders: `images/` and `masks/` with matching stems.
- Paired 2D folders: images and their masks side by side (`X.png` and `X_mask.png`, as BUSI and
  GlaS ship), in one folder or in its sub-folders one level down (BUSI's `benign/`, `malignant/`).
Numbered further masks of one image (BUSI's `X_mask_1.png`, a second lesion) are merged into its
mask.
Any of them may carry a `text.csv` (`filename,text`; also `text_annotations.csv`) with one
sentence per case.
"""

from __future__ import annotations

import csv
import json
import re
import zlib
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from latentseg.data.dicom import series_folders
from latentseg.data.io import (
    DEFAULT_MAX_VOXELS,
    ImageMeta,
    compact_label,
    is_image_file,
    read_image,
    read_label,
    split_suffix,
)
from latentseg.errors import LatentSegError, one_line

TEXT_TABLES = ("text.csv", "text_annotations.csv")


@dataclass
class Case:
    case_id: str
    image_paths: list[Path]  # one file per channel (nnU-Net), or one file holding all channels
    label_path: Path | None = None
    text: str | None = None
    # further masks of the same image (BUSI's `X_mask_1.png`: a second lesion), merged into the
    # label where they are non-zero
    extra_label_paths: list[Path] = field(default_factory=list)


@dataclass
class DatasetSpec:
    root: Path
    layout: str  # "nnunet" | "msd" | "folder2d" | "paired2d"
    cases: list[Case]
    labels: dict[int, str] = field(default_factory=dict)  # id -> name; empty: inferred from the data
    num_channels: int | None = None
    problems: list[str] = field(default_factory=list)  # found while listing (missing files, ...)
    warnings: list[str] = field(default_factory=list)  # allowed, but worth a look (empty masks, stray files)
    channel_names: dict[int, str] = field(default_factory=dict)
    mask_values: list[int] = field(default_factory=list)  # stored value of each class, e.g. [0, 255]
    raters: dict[str, list[Path]] = field(default_factory=dict)  # case -> its annotators' masks (raters/*/)

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


def _int_keys(mapping: Any, path: Path, key: str) -> dict[int, str]:
    """{int(k): str(v)} of a dataset.json mapping whose keys are channel or label numbers."""
    if not isinstance(mapping, dict):
        raise LatentSegError(f"{path}: {key} must be an object, got {type(mapping).__name__}")
    out = {}
    for k, v in mapping.items():
        if not str(k).strip().isdigit():
            raise LatentSegError(f"{path}: {key} key {k!r} is not a non-negative integer")
        out[int(k)] = str(v)
    return out


def _nnunet_labels(labels: Any, path: Path) -> dict[int, str]:
    """nnU-Net's `labels` (name -> id; a list of ids is a region, left to nnU-Net) as id -> name."""
    if not isinstance(labels, dict):
        raise LatentSegError(f"{path}: labels must be an object of name: id, got {type(labels).__name__}")
    out = {}
    for name, value in labels.items():
        if isinstance(value, (list, tuple)):
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            if not (isinstance(value, str) and value.strip().isdigit()):
                raise LatentSegError(f"{path}: labels[{name!r}] must be a non-negative integer id, got {value!r}")
        out[int(value)] = str(name)
    return out


def _nnunet(root: Path, meta: dict[str, Any]) -> DatasetSpec:
    path = root / "dataset.json"
    missing = [k for k in ("channel_names", "labels", "file_ending") if k not in meta]
    if missing:
        raise LatentSegError(f"{path}: missing {', '.join(missing)} (nnU-Net v2 format)")
    ending = meta["file_ending"]
    if not isinstance(ending, str) or not ending.startswith("."):
        raise LatentSegError(f"{path}: file_ending must be a suffix such as '.nii.gz', got {ending!r}")
    names = _int_keys(meta["channel_names"], path, "channel_names")
    channels = sorted(names)
    labels = _nnunet_labels(meta["labels"], path)
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
        problems.append(f"{path}: numTraining is {expected} but labelsTr holds {len(cases)} cases")
    return DatasetSpec(root, "nnunet", cases, labels, len(channels), problems, channel_names=names)


def _msd_entry(entry: Any, index: int, path: Path) -> tuple[str, str]:
    if not isinstance(entry, dict):
        raise LatentSegError(f"{path}: training[{index}] must be an object with image and label, got {entry!r}")
    missing = [k for k in ("image", "label") if not isinstance(entry.get(k), str) or not entry.get(k)]
    if missing:
        raise LatentSegError(f"{path}: training[{index}] has no {' or '.join(missing)} path")
    return entry["image"], entry["label"]


def _msd(root: Path, meta: dict[str, Any]) -> DatasetSpec:
    path = root / "dataset.json"
    cases, problems = [], []
    for index, entry in enumerate(meta["training"]):
        image_name, label_name = _msd_entry(entry, index, path)
        image, label = root / image_name, root / label_name
        case_id = split_suffix(image)[0]
        problems += [f"{p}: missing file for case {case_id}" for p in (image, label) if not p.is_file()]
        cases.append(Case(case_id, [image], label))
    labels = _int_keys(meta.get("labels") or {}, path, "labels")
    modality = meta.get("modality") or meta.get("channel_names") or {}
    names = _int_keys(modality, path, "modality")
    return DatasetSpec(root, "msd", cases, labels, len(modality) or None, problems, channel_names=names)


def outside_paths(root: Path, cases: list[Case]) -> list[str]:
    """Case files that lead out of the dataset folder (a `../` path or a symlink), one line each."""
    base = root.resolve()
    problems = []
    for case in cases:
        for p in [*case.image_paths, *([case.label_path] if case.label_path else []), *case.extra_label_paths]:
            target = p.resolve()
            if not target.is_relative_to(base):
                how = "a symlink" if p.is_symlink() or any(q.is_symlink() for q in p.parents) else "a path"
                problems.append(
                    f"{p}: {how} that leads out of the dataset folder (to {target}); "
                    f"set data.allow_outside_paths=true if this is intended"
                )
    return problems


def _image_files(folder: Path, warnings: list[str]) -> dict[str, Path]:
    files = {}
    for p in sorted(folder.iterdir()):
        if is_image_file(p):
            files[split_suffix(p)[0]] = p
        elif p.is_file() and not p.name.startswith("."):
            warnings.append(f"{p}: not an image file, skipped")
    return files


MASK_SUFFIXES = ("_segmentation", "_mask", "_seg", "_label", "_labels", "_gt", "_anno", "_annotation")


def mask_case_id(stem: str, case_ids: set[str] | dict) -> str:
    """The case a mask file's stem belongs to: itself, or, where no case has that name, the stem
    without a mask suffix that names one (ISIC's `X_segmentation.png` for `X.jpg`, BUSI's
    `X_mask.png`, GlaS's `X_anno.bmp`)."""
    if stem in case_ids:
        return stem
    return _unsuffixed_case(stem, case_ids) or stem


def _has_mask_suffix(name: str) -> bool:
    return any(name.lower().endswith(suffix) for suffix in MASK_SUFFIXES)


def _unsuffixed_case(stem: str, case_ids: set[str] | dict) -> str | None:
    """The case that `stem` without a mask suffix names, or None."""
    for suffix in MASK_SUFFIXES:
        if stem.lower().endswith(suffix) and stem[: -len(suffix)] in case_ids:
            return stem[: -len(suffix)]
    return None


_NUMBERED = re.compile(r"^(.*?)_(\d+)$")


def extra_mask_of(stem: str, case_ids: set[str] | dict) -> str | None:
    """The case whose further, numbered mask this stem names (BUSI's `X_mask_1` for image `X`), or
    None."""
    numbered = _NUMBERED.match(stem)
    if numbered is None:
        return None
    base = numbered.group(1)
    if not _has_mask_suffix(base):
        return None
    case_id = mask_case_id(base, case_ids)
    return case_id if case_id in case_ids else None


def _pair_masks(images: dict[str, Path], mask_files: dict[str, Path], warnings: list[str]):
    """{case: mask}, {case: [further numbered masks]} and the masks that name no image."""
    masks: dict[str, Path] = {}
    extra: dict[str, list[Path]] = {}
    orphans: list[Path] = []
    for stem, path in mask_files.items():
        case_id = mask_case_id(stem, images)
        if case_id not in images and (owner := extra_mask_of(stem, images)) is not None:
            extra.setdefault(owner, []).append(path)
        elif case_id not in images:
            orphans.append(path)
        elif case_id in masks:
            warnings.append(f"{path}: a second mask for image {case_id} (besides {masks[case_id].name}), skipped")
        else:
            masks[case_id] = path
    merged = [p for case_id, paths in extra.items() if case_id in masks for p in paths]
    if merged:
        warnings.append(
            f"{merged[0]}{f' and {len(merged) - 1} more' if len(merged) > 1 else ''}: a further numbered mask of "
            "an image, merged into its mask where non-zero"
        )
    orphans += [p for case_id, paths in extra.items() if case_id not in masks for p in paths]
    return masks, extra, orphans


def _jpeg_warning(masks: dict[str, Path], warnings: list[str]) -> None:
    jpeg = [p for p in masks.values() if p.suffix.lower() in (".jpg", ".jpeg")]
    if jpeg:
        warnings.append(
            f"{jpeg[0]}{f' and {len(jpeg) - 1} more' if len(jpeg) > 1 else ''}: JPEG masks are lossy; "
            "read as foreground where the grey value is >= 128"
        )


def _folder2d(root: Path) -> DatasetSpec:
    warnings: list[str] = []
    images = _image_files(root / "images", warnings)
    masks, extra, orphans = _pair_masks(images, _image_files(root / "masks", warnings), warnings)
    _jpeg_warning(masks, warnings)
    problems = [f"{p}: mask without an image in images/" for p in orphans]
    problems += [f"{images[s]}: image without a mask in masks/" for s in images if s not in masks]
    cases = [Case(s, [images[s]], masks[s], extra_label_paths=extra.get(s, [])) for s in masks]
    return DatasetSpec(root, "folder2d", cases, {}, None, problems, warnings)


def _is_mask_name(stem: str) -> bool:
    """`X_mask`, `X_anno`, ... and their numbered further masks (`X_mask_1`)."""
    numbered = _NUMBERED.match(stem)
    return _has_mask_suffix(stem) or (numbered is not None and _has_mask_suffix(numbered.group(1)))


def _paired_folder(folder: Path, warnings: list[str]):
    """One folder of images beside their masks: ({case: image}, {case: mask}, {case: extras}, orphans)."""
    files = _image_files(folder, warnings)
    images = {stem: p for stem, p in files.items() if not _is_mask_name(stem)}
    mask_files = {stem: p for stem, p in files.items() if _is_mask_name(stem)}
    masks, extra, orphans = _pair_masks(images, mask_files, warnings)
    return images, masks, extra, orphans


def _paired2d(root: Path) -> DatasetSpec | None:
    """Images beside their masks in `root` or in its sub-folders one level down; None where no
    image there has a mask named after it."""
    warnings: list[str] = []
    folders = [root, *sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))]
    found = [_paired_folder(folder, warnings) for folder in folders]
    if not any(masks for _, masks, _, _ in found):
        return None
    cases: list[Case] = []
    problems: list[str] = []
    seen: dict[str, Path] = {}
    for images, masks, extra, orphans in found:
        problems += [f"{p}: mask without an image beside it" for p in orphans]
        problems += [f"{images[s]}: image without a mask beside it ({s}_mask.png)" for s in images if s not in masks]
        for s in masks:
            if s in seen:
                problems.append(f"{images[s]}: a second image named {s} (besides {seen[s]}); case names must be unique")
                continue
            seen[s] = images[s]
            cases.append(Case(s, [images[s]], masks[s], extra_label_paths=extra.get(s, [])))
        _jpeg_warning(masks, warnings)
    return DatasetSpec(root, "paired2d", cases, {}, None, problems, warnings)


def discover_dataset(root: str | Path, allow_outside_paths: bool = False) -> DatasetSpec:
    """List the labelled cases of a dataset folder (nnU-Net, MSD or 2D images/masks). Files that
    lead out of the folder are problems unless `allow_outside_paths`."""
    root = Path(root)
    if not root.is_dir():
        raise LatentSegError(f"{root}: dataset folder not found")
    if (root / "dataset.json").is_file():
        meta = _read_json(root / "dataset.json")
        spec = _msd(root, meta) if isinstance(meta.get("training"), list) else _nnunet(root, meta)
    elif (root / "images").is_dir() and (root / "masks").is_dir():
        spec = _folder2d(root)
    elif (paired := _paired2d(root)) is not None:
        spec = paired
    else:
        raise LatentSegError(
            f"{root}: not a dataset folder; expected dataset.json (nnU-Net or MSD), images/ and masks/, "
            "or images beside masks named after them (X.png and X_mask.png)"
        )
    if not spec.cases:
        raise LatentSegError(f"{root}: no labelled cases found ({spec.layout} layout)")
    if not allow_outside_paths:
        spec.problems += outside_paths(root, spec.cases)
    _attach_raters(spec)
    _attach_text(root, spec.cases)
    return spec


RATERS = "raters"  # <dataset>/raters/<annotator>/<the case's label file name>: one mask per annotator


def _attach_raters(spec: DatasetSpec) -> None:
    """Each case's annotator masks, when the dataset has a raters/ folder; a case none of them
    annotated is a problem."""
    folder = spec.root / RATERS
    if not folder.is_dir():
        return
    annotators = sorted(p for p in folder.iterdir() if p.is_dir())
    if not annotators:
        spec.problems.append(f"{folder}: holds no annotator folders (raters/<name>/<case mask>)")
        return
    for case in spec.cases:
        stem = split_suffix(case.label_path)[0] if case.label_path else case.case_id
        found = [p for d in annotators for p in sorted(d.iterdir()) if is_image_file(p) and split_suffix(p)[0] == stem]
        if found:
            spec.raters[case.case_id] = found
        else:
            spec.problems.append(f"case {case.case_id}: no annotator mask in {folder}/*/ (raters/<name>/{stem}.*)")


def discover_inputs(path: str | Path, num_channels: int | None = None) -> list[Case]:
    """Cases to predict: one file, a folder of files, a dataset root (its `imagesTs/` or
    `images/`), or DICOM: a folder holding one series, or a folder of such folders (one case each).
    Files named as nnU-Net channels (`CASE_0000`, `CASE_0001`, ...) are grouped into one
    multi-channel case only when every case has the channels 0..k-1 and k is the model's channel
    count (`num_channels`); otherwise every file is a case of its own."""
    path = Path(path)
    if path.is_file():
        return [Case(split_suffix(path)[0], [path])]
    if not path.is_dir():
        raise LatentSegError(f"{path}: input not found")
    series = series_folders(path)
    if series:  # DICOM: one series per folder, the folder's name the case's
        return [Case(folder.name, [folder]) for folder in series]
    folder = next((path / sub for sub in ("imagesTs", "images") if (path / sub).is_dir()), path)
    files = _without_masks(sorted(p for p in folder.iterdir() if is_image_file(p)))
    if not files:
        raise LatentSegError(f"{folder}: no NIfTI or image files to predict")
    groups = _channel_groups(files, num_channels)
    cases = [Case(case_id, paths) for case_id, paths in groups.items()] if groups else _single_file_cases(files)
    _attach_text(path, cases)
    return cases


def masks_beside_images(files: list[Path]) -> list[Path]:
    """The files that are the mask of another file beside them (BUSI's `X_mask.png` and
    `X_mask_1.png` beside `X.png`)."""
    stems = {split_suffix(p)[0] for p in files}

    def is_mask(stem: str) -> bool:  # a stripped or numbered name is never the stem itself
        return _is_mask_name(stem) and (
            _unsuffixed_case(stem, stems) is not None or extra_mask_of(stem, stems) is not None
        )

    return [p for p in files if is_mask(split_suffix(p)[0])]


def _without_masks(files: list[Path]) -> list[Path]:
    masks = set(masks_beside_images(files))
    return [p for p in files if p not in masks]


CHANNEL_SUFFIX = re.compile(r"^(?P<case>.+)_(?P<channel>\d{4})$")


def _channel_groups(files: list[Path], num_channels: int | None) -> dict[str, list[Path]] | None:
    """{case: channel files in order} when the files form an nnU-Net channel layout, else None."""
    groups: dict[str, dict[int, Path]] = {}
    for p in files:
        match = CHANNEL_SUFFIX.match(split_suffix(p)[0])
        if match is None:
            return None
        groups.setdefault(match["case"], {})[int(match["channel"])] = p
    counts = {len(channels) for channels in groups.values()}
    complete = all(sorted(channels) == list(range(len(channels))) for channels in groups.values())
    if not complete or len(counts) != 1:
        return None
    (k,) = counts
    if num_channels is not None and k != num_channels:
        return None
    if num_channels is None and k > 1 and len(groups) < 2:  # one case of k "channels" is more likely k slices
        return None
    return {case: [channels[c] for c in sorted(channels)] for case, channels in groups.items()}


def _single_file_cases(files: list[Path]) -> list[Case]:
    """One case per file; two files with one name (`a.png`, `a.jpg`) are refused, naming both."""
    seen: dict[str, Path] = {}
    for p in files:
        case_id = split_suffix(p)[0]
        if case_id in seen:
            raise LatentSegError(
                f"{p}: has the same case name {case_id!r} as {seen[case_id].name}; their outputs would collide "
                f"(rename one)"
            )
        seen[case_id] = p
    return [Case(case_id, [p]) for case_id, p in seen.items()]


def load_image(case: Case, max_voxels: int = DEFAULT_MAX_VOXELS) -> tuple[np.ndarray, ImageMeta]:
    """All channels of a case as (C, *S) float32, checked for NaN/Inf and matching grids."""
    arrays, metas = zip(*(read_image(p, max_voxels) for p in case.image_paths), strict=True)
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


SPACING_TOLERANCE = 1e-3  # relative; image and label grids further apart than this are refused


def load_case(
    case: Case, num_classes: int | None = None, num_channels: int | None = None, max_voxels: int = DEFAULT_MAX_VOXELS
) -> dict[str, Any]:
    """A training sample {"image", "label", "text", "case_id", "meta"}, with every check applied."""
    image, meta = load_image(case, max_voxels)
    _check_channels(case, image, meta, num_channels)
    if case.label_path is None:
        raise LatentSegError(f"case {case.case_id}: no label file")
    label, lmeta = read_merged_mask([case.label_path, *case.extra_label_paths], max_voxels)
    if lmeta.spatial_shape != meta.spatial_shape:
        raise LatentSegError(
            f"{case.label_path}: label shape {lmeta.spatial_shape} differs from image shape {meta.spatial_shape}"
        )
    _check_same_grid(case.label_path, meta, lmeta)
    if num_classes is not None and label.max(initial=0) >= num_classes:
        bad = sorted(int(v) for v in np.unique(label) if v >= num_classes)
        raise LatentSegError(
            f"{case.label_path}: label values {bad} are outside 0..{num_classes - 1} (the declared labels)"
        )
    label = compact_label(label)[None]
    return {"image": image, "label": label, "text": case.text, "case_id": case.case_id, "meta": meta}


def read_merged_mask(paths: list[Path], max_voxels: int = DEFAULT_MAX_VOXELS) -> tuple[np.ndarray, ImageMeta]:
    """The mask in `paths[0]` with each further mask of the same image (BUSI's `X_mask_1.png`)
    written over it where that mask is non-zero."""
    label, meta = read_label(paths[0], max_voxels)
    for path in paths[1:]:
        extra, extra_meta = read_label(path, max_voxels)
        if extra_meta.spatial_shape != meta.spatial_shape:
            raise LatentSegError(
                f"{path}: mask shape {extra_meta.spatial_shape} differs from {paths[0].name}'s {meta.spatial_shape}"
            )
        label = np.where(extra != 0, extra, label)
    return label, meta


def _check_same_grid(label_path: Path, meta: ImageMeta, lmeta: ImageMeta) -> None:
    """The label must lie on the image's grid: the same affine and the same header spacing, within
    a tolerance (a header's pixdim can disagree with its affine)."""
    spacing_differs = not np.allclose(meta.spacing, lmeta.spacing, rtol=SPACING_TOLERANCE, atol=1e-6)
    detail = f" (spacing {_fmt(lmeta.spacing)} against {_fmt(meta.spacing)})" if spacing_differs else ""
    if meta.affine is not None and lmeta.affine is not None:
        scale = max(1.0, float(np.abs(meta.affine[:3, 3]).max()))
        if not np.allclose(meta.affine, lmeta.affine, atol=SPACING_TOLERANCE * scale):
            raise LatentSegError(f"{label_path}: label affine differs from the image affine{detail}")
    if spacing_differs:
        raise LatentSegError(
            f"{label_path}: label spacing {_fmt(lmeta.spacing)} differs from the image's {_fmt(meta.spacing)}"
        )


def _fmt(values) -> str:
    return "(" + ", ".join(f"{v:g}" for v in values) + ")"


def load_raters(paths: list[Path], sample: dict[str, Any], num_classes: int | None, max_voxels: int) -> np.ndarray:
    """(K, *S) the annotators' masks of one case, on its label's grid."""
    masks = []
    for path in paths:
        mask, meta = read_label(path, max_voxels)
        if mask.shape != sample["label"].shape[1:]:
            raise LatentSegError(
                f"{path}: annotator mask shape {mask.shape} differs from the image's {sample['label'].shape[1:]}"
            )
        if num_classes is not None and mask.max(initial=0) >= num_classes:
            raise LatentSegError(
                f"{path}: annotator mask values {sorted(set(np.unique(mask).tolist()))} "
                f"are outside 0..{num_classes - 1}"
            )
        masks.append(compact_label(mask))
    return compact_label(np.stack(masks))


def _remove(samples: list[dict[str, Any]], sample: dict[str, Any]) -> None:
    """Drop `sample` by identity (its arrays make `list.remove`'s equality ambiguous)."""
    samples[:] = [s for s in samples if s is not sample]


def _check_rater_values(spec: DatasetSpec, samples: list[dict[str, Any]], problems: list[str]) -> None:
    """An annotator's mask may hold only values the dataset's masks use (0/255, or its class ids)."""
    allowed = set().union(*(np.unique(s["label"]).tolist() for s in samples)) if samples else set()
    for s in list(samples):
        if "raters" not in s:
            continue
        bad = [
            (path, sorted(set(np.unique(m).tolist()) - allowed))
            for path, m in zip(spec.raters[s["case_id"]], s["raters"], strict=True)
        ]
        bad = [(path, values) for path, values in bad if values]
        for path, values in bad:
            problems.append(f"{path}: annotator mask values {values} are not among the masks' values {sorted(allowed)}")
        if bad:
            _remove(samples, s)


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


def mixed_encodings(values_by_case: dict[str, set[int]]) -> str | None:
    """A problem line when some masks are stored 0/255 and others as small class ids (0/1/2...),
    which would otherwise train as 2 + K classes; None when the encodings agree."""
    binary = sorted(c for c, v in values_by_case.items() if 255 in v and v <= {0, 255})
    ids = sorted(c for c, v in values_by_case.items() if v - {0} and max(v) < 255)
    if not binary or not ids:
        return None
    example_ids = sorted(values_by_case[ids[0]])
    return (
        f"mixed mask encodings: {', '.join(binary[:3])}{' ...' if len(binary) > 3 else ''} "
        f"({len(binary)} masks) store 0/255, {', '.join(ids[:3])}{' ...' if len(ids) > 3 else ''} "
        f"({len(ids)} masks) store class ids {example_ids}; re-save one group, or set data.mask_values"
    )


def _apply_mask_values(samples: list[dict[str, Any]], spec: DatasetSpec, problems: list[str]) -> None:
    per_case = {s["case_id"]: set(np.unique(s["label"]).tolist()) for s in samples}
    values = set().union(*per_case.values()) if samples else set()
    values |= {int(v) for s in samples if "raters" in s for v in np.unique(s["raters"])}
    if not spec.mask_values:
        mixed = mixed_encodings({str(_label_file(spec, c)): v for c, v in per_case.items()})
        if mixed:
            problems.append(f"{spec.root}: {mixed}")
            samples.clear()
            return
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
            _remove(samples, s)
            continue
        s["label"] = compact_label(mapped)
        if "raters" in s:
            raters = lut[np.clip(s["raters"], 0, len(lut) - 1)]
            if raters.min() < 0 or s["raters"].max() >= len(lut):
                bad = sorted(set(np.unique(s["raters"]).tolist()) - set(spec.mask_values))
                problems.append(f"{s['case_id']}: annotator mask values {bad} are not among {spec.mask_values}")
                _remove(samples, s)
                continue
            s["raters"] = compact_label(raters)


def _label_file(spec: DatasetSpec, case_id: str) -> str:
    case = next((c for c in spec.cases if c.case_id == case_id), None)
    return case.label_path.name if case is not None and case.label_path is not None else case_id


def load_dataset(
    spec: DatasetSpec, max_voxels: int = DEFAULT_MAX_VOXELS, keep_images: bool = True
) -> tuple[list[dict[str, Any]], list[str]]:
    """Every case loaded and checked; all problems are collected, one line each, not just the first.
    Empty masks are allowed and noted in `spec.warnings`. Without `keep_images` each image is
    dropped once its case is checked (`release_image`), so only one raw image is in memory at a
    time; `reload_image` reads it again."""
    problems = list(spec.problems)
    samples = []
    declared = num_classes_of(spec)
    bad_paths = {p.split(":")[0] for p in problems}
    for case in spec.cases:
        if any(str(p) in bad_paths for p in [*case.image_paths, case.label_path]):
            continue
        try:
            sample = load_case(case, declared, spec.num_channels, max_voxels)
            if case.case_id in spec.raters:
                sample["raters"] = load_raters(spec.raters[case.case_id], sample, declared, max_voxels)
            if not keep_images:
                release_image(sample, case)
            samples.append(sample)
        except LatentSegError as err:
            problems.append(str(err))
    _check_rater_values(spec, samples, problems)
    if declared is None:
        _apply_mask_values(samples, spec, problems)
    spec.warnings += [f"{s['case_id']}: the mask is empty (no foreground)" for s in samples if not s["label"].any()]
    dims = {s["meta"].spatial_dims for s in samples}
    if len(dims) > 1:
        problems.append(f"{spec.root}: cases mix 2D and 3D images")
    problems += _channel_count_problems(spec, samples)
    return samples, problems


def release_image(sample: dict[str, Any], case: Case) -> None:
    """Drop a checked sample's image, keeping what planning needs of it: its channel count, and an
    `intensity_sample` of each channel (for the CT statistics of channels named CT; with several
    datasets the first one's names decide, so every channel keeps one)."""
    from latentseg.data.preprocess import intensity_sample  # MONAI: imported when needed

    image = sample.pop("image")
    rng = np.random.default_rng(zlib.crc32(case.case_id.encode()))
    sample["channels"] = int(image.shape[0])
    sample["intensities"] = {c: intensity_sample(image, sample["label"], c, rng) for c in range(image.shape[0])}
    sample["case"] = case


def reload_image(sample: dict[str, Any], max_voxels: int = DEFAULT_MAX_VOXELS) -> None:
    """The image of a sample whose image `release_image` dropped, read again (checked as before)."""
    if "image" not in sample:
        sample["image"] = load_image(sample["case"], max_voxels)[0]
    for key in ("case", "channels", "intensities"):
        sample.pop(key, None)


def channels_of(sample: dict[str, Any]) -> int:
    return sample["channels"] if "channels" in sample else int(sample["image"].shape[0])


def _channel_count_problems(spec: DatasetSpec, samples: list[dict[str, Any]]) -> list[str]:
    """Cases whose channel count differs from the most common one, each named."""
    counts = Counter(channels_of(s) for s in samples)
    if len(counts) < 2:
        return []
    usual = counts.most_common(1)[0][0]
    odd = [s for s in samples if channels_of(s) != usual]
    return [
        f"{s['meta'].path}: {channels_of(s)} channel(s) where the other {counts[usual]} cases have {usual}" for s in odd
    ]
