"""DICOM in, DICOM-SEG out.

A case is one folder holding one image series (one file per slice). It is read with pydicom and
checked before any pixel is used: every file an image, one series, one orientation, slices evenly
spaced along the slice normal (a missing or duplicated slice position is refused). The volume is
returned as nibabel would return a NIfTI of it: `data[i, j, k]` is column i, row j, slice k, with a
RAS+ affine built from ImagePositionPatient, ImageOrientationPatient and PixelSpacing (DICOM
patient coordinates are LPS+), so preprocessing and prediction treat it like any NIfTI volume.

The label map goes back as a DICOM-SEG written by highdicom: one segment per foreground label,
named from the model's label names, referencing the source series and sharing its study and frame
of reference. Maps (probabilities, uncertainty) are written as NIfTI with the series' affine.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from latentseg.errors import LatentSegError, one_line

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
GAP_TOLERANCE = 0.25  # a slice step this much (relative) beyond the median step means a missing slice


def is_dicom_file(path: Path) -> bool:
    """A DICOM Part 10 file (the 'DICM' marker after the 128-byte preamble), whatever its name."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(132)
    except OSError:
        return False
    return len(head) == 132 and head[128:] == b"DICM"


def dicom_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and is_dicom_file(p))


def is_series_folder(path: Path) -> bool:
    return path.is_dir() and bool(dicom_files(path))


def series_folders(path: Path) -> list[Path]:
    """The input as DICOM cases: the folder itself when it holds DICOM files, else its subfolders
    that do (one series each)."""
    if is_series_folder(path):
        return [path]
    return sorted(p for p in path.iterdir() if is_series_folder(p)) if path.is_dir() else []


def _read_headers(files: list[Path]) -> list[Any]:
    import pydicom
    from pydicom.errors import InvalidDicomError

    headers = []
    for f in files:
        try:
            headers.append(pydicom.dcmread(f, stop_before_pixels=True))
        except (InvalidDicomError, OSError, ValueError, EOFError) as err:
            raise LatentSegError(f"{f}: cannot read this DICOM file ({one_line(err)})") from err
    return headers


def _check_images(files: list[Path], headers: list[Any]) -> None:
    needed = ("Rows", "Columns", "ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing")
    for f, ds in zip(files, headers, strict=True):
        missing = [key for key in needed if key not in ds]
        if missing:
            kind = getattr(getattr(ds, "SOPClassUID", None), "name", None) or "unknown SOP class"
            raise LatentSegError(
                f"{f}: not an image slice ({kind}; no {', '.join(missing)}); remove it from the series"
            )
        if int(getattr(ds, "NumberOfFrames", 1) or 1) > 1:
            raise LatentSegError(f"{f}: a multi-frame DICOM image; only one file per slice is supported")


def _check_one_series(folder: Path, files: list[Path], headers: list[Any]) -> None:
    first = headers[0].get("SeriesInstanceUID")
    for f, ds in zip(files, headers, strict=True):
        if ds.get("SeriesInstanceUID") != first:
            raise LatentSegError(
                f"{folder}: holds more than one series ({files[0].name} is series {first}, {f.name} is series "
                f"{ds.get('SeriesInstanceUID')}); put each series in a folder of its own"
            )
    orientation = np.asarray(headers[0].ImageOrientationPatient, dtype=float)
    shape = (headers[0].Rows, headers[0].Columns)
    for f, ds in zip(files, headers, strict=True):
        if not np.allclose(np.asarray(ds.ImageOrientationPatient, dtype=float), orientation, atol=1e-4):
            raise LatentSegError(f"{f}: its orientation differs from {files[0].name}'s within one series")
        if (ds.Rows, ds.Columns) != shape:
            raise LatentSegError(f"{f}: its size {ds.Rows}x{ds.Columns} differs from {files[0].name}'s")


def _slice_order(files: list[Path], headers: list[Any]) -> tuple[list[int], float, np.ndarray]:
    """Indices of the slices along the slice normal, the slice step in mm and the normal (LPS)."""
    orientation = np.asarray(headers[0].ImageOrientationPatient, dtype=float)
    normal = np.cross(orientation[:3], orientation[3:])
    positions = np.array([np.dot(np.asarray(ds.ImagePositionPatient, dtype=float), normal) for ds in headers])
    order = list(np.argsort(positions, kind="stable"))
    if len(order) == 1:
        return order, float(getattr(headers[0], "SliceThickness", 1.0) or 1.0), normal
    steps = np.diff(positions[order])
    for k, step in enumerate(steps):
        if step < 1e-3:
            a, b = files[order[k]].name, files[order[k + 1]].name
            raise LatentSegError(
                f"{files[order[k + 1]]}: duplicated slice position {positions[order[k]]:.3f} mm ({a} and {b})"
            )
    median = float(np.median(steps))
    for k, step in enumerate(steps):
        if abs(step - median) > GAP_TOLERANCE * median:
            raise LatentSegError(
                f"{files[order[k + 1]]}: slice gap of {step:.3f} mm after {files[order[k]].name} where the series "
                f"steps {median:.3f} mm: a slice is missing or the spacing is uneven"
            )
    return order, median, normal


def read_series(folder: str | Path, max_voxels: int) -> tuple[np.ndarray, dict[str, Any]]:
    """The series in `folder` as (column, row, slice) float32 voxels, with its RAS+ affine, spacing
    and the source datasets (slice order), each problem a one-line error naming the file."""
    from latentseg.data.io import check_size

    folder = Path(folder)
    files = dicom_files(folder)
    if not files:
        raise LatentSegError(f"{folder}: no DICOM files in this folder")
    headers = _read_headers(files)
    _check_images(files, headers)
    _check_one_series(folder, files, headers)
    check_size(files[0], (headers[0].Columns, headers[0].Rows, len(files)), max_voxels)
    order, step, normal = _slice_order(files, headers)
    datasets = [_read_pixels(files[i]) for i in order]
    volume = np.stack([_voxels(files[i], ds) for i, ds in zip(order, datasets, strict=True)], axis=-1)
    volume = np.ascontiguousarray(volume.transpose(1, 0, 2))  # (rows, cols, k) -> (cols, rows, k) as NIfTI
    affine = series_affine(datasets[0], step, normal)
    row_spacing, col_spacing = (float(v) for v in datasets[0].PixelSpacing)
    return volume, {"affine": affine, "spacing": (col_spacing, row_spacing, step), "datasets": datasets}


def _read_pixels(path: Path) -> Any:
    import pydicom

    try:
        return pydicom.dcmread(path)
    except Exception as err:  # noqa: BLE001 - pydicom raises many kinds for a damaged file
        raise LatentSegError(f"{path}: cannot read this DICOM file ({one_line(err)})") from err


def _voxels(path: Path, ds: Any) -> np.ndarray:
    try:
        pixels = ds.pixel_array.astype(np.float32)
    except Exception as err:  # noqa: BLE001 - missing decoders, truncated pixel data, ...
        raise LatentSegError(f"{path}: cannot decode the pixel data ({one_line(err)})") from err
    slope, intercept = float(getattr(ds, "RescaleSlope", 1) or 1), float(getattr(ds, "RescaleIntercept", 0) or 0)
    return pixels * slope + intercept


def series_affine(first: Any, step: float, normal: np.ndarray) -> np.ndarray:
    """RAS+ affine of voxel (column, row, slice) from the first slice's position and orientation."""
    orientation = np.asarray(first.ImageOrientationPatient, dtype=float)
    row_spacing, col_spacing = (float(v) for v in first.PixelSpacing)
    lps = np.eye(4)
    lps[:3, 0] = orientation[:3] * col_spacing  # along a row: the column index grows
    lps[:3, 1] = orientation[3:] * row_spacing  # down a column: the row index grows
    lps[:3, 2] = normal * step
    lps[:3, 3] = np.asarray(first.ImagePositionPatient, dtype=float)
    return LPS_TO_RAS @ lps


def write_seg(path: Path, label: np.ndarray, datasets: Sequence[Any], names: dict[int, str]) -> None:
    """The label map (column, row, slice) as a DICOM-SEG over the source slices (one segment per
    label in `names`, 0 excepted), written atomically."""
    import highdicom as hd
    from pydicom.sr.codedict import codes

    from latentseg import __version__
    from latentseg.data.io import atomic_write

    frames = np.ascontiguousarray(label.transpose(2, 1, 0)).astype(np.uint8)  # (slice, row, column)
    segments = [
        hd.seg.SegmentDescription(
            segment_number=k,
            segment_label=(names.get(k) or f"label {k}")[:64],
            segmented_property_category=codes.SCT.Tissue,
            segmented_property_type=codes.SCT.Tissue,
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=hd.AlgorithmIdentificationSequence(
                name="latentseg", version=__version__, family=codes.cid7162.ArtificialIntelligence
            ),
        )
        for k in sorted(n for n in names if n > 0)
    ]
    seg = hd.seg.Segmentation(
        source_images=list(datasets),
        pixel_array=frames,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=segments,
        series_instance_uid=hd.UID(),
        series_number=int(getattr(datasets[0], "SeriesNumber", 0) or 0) + 1000,
        sop_instance_uid=hd.UID(),
        instance_number=1,
        manufacturer="latentseg",
        manufacturer_model_name="latentseg",
        software_versions=__version__,
        device_serial_number="0",
        series_description="latentseg segmentation",
        omit_empty_frames=False,
    )
    atomic_write(path, lambda tmp: seg.save_as(tmp))
