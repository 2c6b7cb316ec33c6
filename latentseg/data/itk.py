"""MetaImage (`.mha`, `.mhd`) and NRRD (`.nrrd`, `.nhdr`) through SimpleITK, the formats of many
challenge datasets and of 3D Slicer, which nnU-Net reads with its SimpleITK reader too.

An image is returned as nibabel returns a NIfTI: `data[i, j, k]` is voxel (i, j, k) along the
file's first, second and third axis (SimpleITK's arrays are the other way round, (k, j, i)),
channels (vector pixels) first, with a RAS+ affine built from the file's origin, spacing and
direction (ITK's world is LPS+). So preprocessing and prediction treat it like any NIfTI. An
image with one slice along its third axis is a 2D image, as an H x W x 1 NIfTI is.

Outputs go back in the input's family, one file each: `.mha` for MetaImage inputs (a `.mhd`
header would point at a data file by name, which an atomic rename cannot keep) and `.nrrd` for
NRRD, with the source's origin, spacing and direction copied exactly.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from latentseg.errors import LatentSegError, one_line

ITK_SUFFIXES = (".mha", ".mhd", ".nrrd", ".nhdr")
OUTPUT_SUFFIX = {".mha": ".mha", ".mhd": ".mha", ".nrrd": ".nrrd", ".nhdr": ".nrrd"}


def itk_output_suffix(source: Path) -> str:
    """The one-file suffix outputs of this input take (.mha or .nrrd)."""
    name = source.name.lower()
    return next(out for suffix, out in OUTPUT_SUFFIX.items() if name.endswith(suffix))


def _sitk():
    import SimpleITK as sitk

    return sitk


def read_geometry(path: Path) -> tuple[tuple[int, ...], dict[str, Any], int]:
    """The size, the geometry (origin, spacing, direction as stored) and the components per pixel,
    from the header alone."""
    sitk = _sitk()
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError as err:
        raise LatentSegError(f"{path}: cannot read this image ({_itk_message(err)})") from err
    geometry = {"origin": reader.GetOrigin(), "spacing": reader.GetSpacing(), "direction": reader.GetDirection()}
    return tuple(int(v) for v in reader.GetSize()), geometry, int(reader.GetNumberOfComponents())


def _itk_message(err: Exception) -> str:
    """ITK's exceptions carry a file and line of ITK's sources first; keep the description."""
    text = one_line(err)
    return text.split("Description:")[-1].strip() if "Description:" in text else text


def ras_affine(geometry: dict[str, Any]) -> np.ndarray:
    """The RAS+ affine of voxel (i, j[, k]) from ITK's LPS+ origin, spacing and direction."""
    dims = len(geometry["spacing"])
    direction = np.asarray(geometry["direction"], dtype=float).reshape(dims, dims)
    affine = np.eye(dims + 1)
    affine[:dims, :dims] = direction * np.asarray(geometry["spacing"], dtype=float)[None, :]
    affine[:dims, dims] = geometry["origin"]
    flip = np.diag([-1.0, -1.0, *([1.0] * (dims - 2)), 1.0])  # L -> R, P -> A
    return flip @ affine


def read_itk(path: Path, max_voxels: int) -> tuple[np.ndarray, dict[str, Any]]:
    """(data as (*spatial[, C]) in file axis order, info) where info holds the spatial shape, the
    stored shape, the spacing, the RAS+ affine and the source geometry. A 2D or 3D image only."""
    from latentseg.data.io import check_size

    size, geometry, components = read_geometry(path)
    if len(size) not in (2, 3):
        raise LatentSegError(f"{path}: expected a 2D or 3D image, got {len(size)} dimensions of size {size}")
    check_size(path, (*size, components), max_voxels)
    sitk = _sitk()
    try:
        array = sitk.GetArrayFromImage(sitk.ReadImage(str(path)))
    except RuntimeError as err:
        raise LatentSegError(f"{path}: cannot read this image ({_itk_message(err)})") from err
    spatial_axes = tuple(reversed(range(len(size))))
    data = array.transpose(*spatial_axes, *range(len(size), array.ndim))  # (k, j, i[, C]) -> (i, j, k[, C])
    spatial = size[:2] if len(size) == 3 and size[2] == 1 else size
    if len(spatial) == 2 and len(size) == 3:
        data = data[:, :, 0]
        geometry_2d = _in_plane(geometry)
    else:
        geometry_2d = geometry
    info = {
        "spatial_shape": tuple(spatial),
        "file_shape": tuple(size),
        "spacing": tuple(float(s) for s in geometry_2d["spacing"]),
        "affine": ras_affine(geometry_2d),
        "geometry": geometry,
    }
    return data, info


def _in_plane(geometry: dict[str, Any]) -> dict[str, Any]:
    """The first two axes' part of a 3D geometry (a single-slice volume read as 2D)."""
    direction = np.asarray(geometry["direction"], dtype=float).reshape(3, 3)[:2, :2]
    return {"origin": geometry["origin"][:2], "spacing": geometry["spacing"][:2], "direction": direction.ravel()}


def write_itk(path: Path, data: np.ndarray, spatial_dims: int, file_shape: tuple[int, ...], geometry: dict) -> None:
    """`data` (*spatial[, C]) in file axis order, written with the source's geometry; compressed."""
    sitk = _sitk()
    channels = data.shape[spatial_dims:]  # () or (C,)
    data = data.reshape(*file_shape, *channels)
    dims = len(file_shape)
    array = np.ascontiguousarray(data.transpose(*reversed(range(dims)), *range(dims, data.ndim)))
    image = sitk.GetImageFromArray(array, isVector=bool(channels))
    image.SetOrigin(tuple(geometry["origin"]))
    image.SetSpacing(tuple(geometry["spacing"]))
    image.SetDirection(tuple(geometry["direction"]))
    sitk.WriteImage(image, str(path), True)
