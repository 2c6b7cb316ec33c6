"""Reading and writing images and label maps: NIfTI through nibabel, 2D images through Pillow,
MetaImage and NRRD through SimpleITK, DICOM series (a folder per series) through pydicom with
DICOM-SEG written by highdicom.

Readers return a channel-first array and an `ImageMeta` with the spacing, affine and header, so a
prediction can be written back on exactly the input's grid. Every failure is a `LatentSegError`
naming the file.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import nibabel as nib
import numpy as np
from PIL import Image, UnidentifiedImageError

from latentseg.data.itk import ITK_SUFFIXES, itk_output_suffix, read_itk, write_itk
from latentseg.errors import LatentSegError, one_line

NIFTI_SUFFIXES = (".nii.gz", ".nii")
IMAGE2D_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".gif", ".ppm", ".pgm")
IMAGE_SUFFIXES = NIFTI_SUFFIXES + ITK_SUFFIXES + IMAGE2D_SUFFIXES
JPEG_SUFFIXES = (".jpg", ".jpeg")  # label maps stored so are read as 0/255 at a threshold of 128
FileFormat = Literal["nifti", "itk", "image2d", "dicom"]
VOLUME_FORMATS = ("nifti", "itk", "dicom")  # formats whose maps are float images with every class


DEFAULT_MAX_VOXELS = 2**29  # 512 x 512 x 2048; `data.max_voxels` / `--max-voxels` change it


@dataclass
class ImageMeta:
    path: Path
    format: FileFormat
    spatial_shape: tuple[int, ...]
    spacing: tuple[float, ...]
    affine: np.ndarray | None = None  # NIfTI, MetaImage/NRRD and DICOM: RAS+
    header: Any = None  # NIfTI: the nibabel header; MetaImage/NRRD: origin, spacing, direction; copied onto outputs
    file_shape: tuple[int, ...] | None = None  # NIfTI, MetaImage/NRRD: the spatial shape stored (H, W, 1 for 2D)
    source: Any = None  # DICOM only: the series' datasets in slice order, which a DICOM-SEG references

    @property
    def spatial_dims(self) -> int:
        return len(self.spatial_shape)


def check_size(path: Path, shape: tuple[int, ...], max_voxels: int) -> None:
    """Refuse an image whose header claims more voxels than allowed, before its data is read."""
    voxels = int(np.prod([int(v) for v in shape], dtype=object))
    if voxels > max_voxels:
        raise LatentSegError(
            f"{path}: the header claims {' x '.join(str(int(v)) for v in shape)} = {voxels:,} values, over the "
            f"limit of {max_voxels:,} (raise it with data.max_voxels or --max-voxels if the image is real)"
        )


def file_format(path: Path) -> FileFormat:
    if path.is_dir():
        return "dicom"  # a folder holding one DICOM series
    name = path.name.lower()
    if name.endswith(NIFTI_SUFFIXES):
        return "nifti"
    if name.endswith(ITK_SUFFIXES):
        return "itk"
    if name.endswith(IMAGE2D_SUFFIXES):
        return "image2d"
    raise LatentSegError(
        f"{path}: unsupported file type; use NIfTI ({', '.join(NIFTI_SUFFIXES)}), MetaImage or NRRD "
        f"({', '.join(ITK_SUFFIXES)}), a 2D image ({', '.join(IMAGE2D_SUFFIXES)}) or a DICOM series folder"
    )


def split_suffix(path: Path) -> tuple[str, str]:
    """('case', '.nii.gz') for case.nii.gz; ('case', '.png') for case.png."""
    name = path.name
    for suffix in IMAGE_SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)], name[-len(suffix) :]
    return path.stem, path.suffix


def is_image_file(path: Path) -> bool:
    return path.is_file() and path.name.lower().endswith(IMAGE_SUFFIXES)


def _load_nifti(path: Path, max_voxels: int = DEFAULT_MAX_VOXELS) -> tuple[np.ndarray, ImageMeta]:
    try:
        img = nib.load(str(path))
    except Exception as err:  # nibabel raises many types for truncated or corrupt files
        raise LatentSegError(f"{path}: cannot read this NIfTI file ({type(err).__name__}: {one_line(err)})") from err
    check_size(path, img.shape, max_voxels)
    try:
        data = np.asanyarray(img.dataobj)
    except Exception as err:  # noqa: BLE001
        raise LatentSegError(f"{path}: cannot read this NIfTI file ({type(err).__name__}: {one_line(err)})") from err
    stored = data.shape[:3] if data.ndim >= 3 else data.shape
    spatial = stored[:2] if len(stored) == 3 and stored[2] == 1 else stored  # an H x W x 1 file is a 2D slice
    if len(spatial) == 2 and data.ndim >= 3:
        data = data[:, :, 0]
    spacing = tuple(float(z) for z in img.header.get_zooms()[: len(spatial)])
    meta = ImageMeta(path, "nifti", tuple(spatial), spacing, img.affine.copy(), img.header.copy(), tuple(stored))
    return data, meta


GREY_MODES = ("1", "L", "I", "I;16", "I;16B", "I;16L", "F")


def _grey_or_rgb(img: Image.Image) -> Image.Image:
    """Grey stays grey (alpha dropped), a palette of greys is grey, anything else becomes RGB."""
    if img.mode in GREY_MODES:
        return img
    if img.mode == "LA":
        return img.convert("L")
    if img.mode in ("P", "PA"):
        palette = np.asarray(img.convert("RGB"))
        return img.convert("L") if _is_grey(palette) else img.convert("RGB")
    return img if img.mode == "RGB" else img.convert("RGB")


def _is_grey(rgb: np.ndarray) -> bool:
    return bool(np.array_equal(rgb[..., 0], rgb[..., 1]) and np.array_equal(rgb[..., 0], rgb[..., 2]))


def _load_2d(path: Path, max_voxels: int = DEFAULT_MAX_VOXELS) -> tuple[np.ndarray, ImageMeta]:
    try:
        with Image.open(path) as img:
            check_size(path, img.size, max_voxels)  # from the header, before the pixels are decoded
            img.load()
            data = np.asarray(_grey_or_rgb(img))
    except Image.DecompressionBombError as err:
        raise LatentSegError(f"{path}: refused, the header claims too many pixels ({one_line(err)})") from err
    except (OSError, UnidentifiedImageError, ValueError, SyntaxError) as err:
        raise LatentSegError(f"{path}: cannot read this image ({one_line(err)})") from err
    return data, ImageMeta(path, "image2d", tuple(data.shape[:2]), (1.0, 1.0))


def _load_itk(path: Path, max_voxels: int = DEFAULT_MAX_VOXELS) -> tuple[np.ndarray, ImageMeta]:
    data, info = read_itk(path, max_voxels)
    meta = ImageMeta(
        path, "itk", info["spatial_shape"], info["spacing"], info["affine"], info["geometry"], info["file_shape"]
    )
    return data, meta


VOLUME_READERS = {"nifti": _load_nifti, "itk": _load_itk}  # file formats read as (*S[, C]) with an affine


def read_image(path: str | Path, max_voxels: int = DEFAULT_MAX_VOXELS) -> tuple[np.ndarray, ImageMeta]:
    """An image as float32 (C, *spatial) plus its metadata.

    NIfTI: 2D (also stored as H x W x 1), 3D volumes, or 4D with channels last. MetaImage and NRRD:
    2D or 3D, vector pixels as channels. 2D images: grey (a palette of greys included) or RGB;
    alpha is dropped. An image whose header claims more than `max_voxels` values is refused before
    its data is read.
    """
    path = Path(path)
    if path.is_dir():
        return _load_dicom(path, max_voxels)
    if not path.is_file():
        raise LatentSegError(f"{path}: file not found")
    reader = VOLUME_READERS.get(file_format(path))
    if reader is not None:
        data, meta = reader(path, max_voxels)
        if data.ndim == meta.spatial_dims + 1:
            data = np.moveaxis(data, -1, 0)
        elif data.ndim == meta.spatial_dims:
            data = data[None]
        else:
            raise LatentSegError(f"{path}: expected a 2D, 3D or 4D NIfTI image, got shape {data.shape}")
    else:
        data, meta = _load_2d(path, max_voxels)
        data = data[None] if data.ndim == 2 else np.moveaxis(data, -1, 0)
    return np.ascontiguousarray(data, dtype=np.float32), meta


def _load_dicom(path: Path, max_voxels: int) -> tuple[np.ndarray, ImageMeta]:
    from latentseg.data.dicom import read_series

    volume, info = read_series(path, max_voxels)
    meta = ImageMeta(path, "dicom", volume.shape, info["spacing"], info["affine"], source=info["datasets"])
    return volume[None], meta


def read_label(path: str | Path, max_voxels: int = DEFAULT_MAX_VOXELS) -> tuple[np.ndarray, ImageMeta]:
    """A label map as int64 (*spatial). Rejects non-integer values and colour masks. A JPEG mask
    (Kvasir-SEG's, say) cannot hold exact values: it is read as 0/255, foreground where its grey
    value is at least 128."""
    path = Path(path)
    if not path.is_file():
        raise LatentSegError(f"{path}: file not found")
    reader = VOLUME_READERS.get(file_format(path))
    if reader is not None:
        data, meta = reader(path, max_voxels)
        if data.ndim == meta.spatial_dims + 1 and data.shape[-1] == 1:
            data = data[..., 0]
        if data.ndim != len(meta.spatial_shape):
            raise LatentSegError(f"{path}: a label map must have one channel, got shape {data.shape}")
    else:
        data, meta = _load_2d(path, max_voxels)
        if path.name.lower().endswith(JPEG_SUFFIXES):  # lossy: edges and colours blur, so threshold
            grey = data.mean(axis=-1) if data.ndim == 3 else data
            data = np.where(grey >= 128, 255, 0).astype(np.uint8)
        if data.ndim == 3:
            if not (np.all(data[..., 0] == data[..., 1]) and np.all(data[..., 0] == data[..., 2])):
                raise LatentSegError(f"{path}: a label map must be greyscale, this one has colours")
            data = data[..., 0]
    if not np.issubdtype(data.dtype, np.integer):
        if not np.all(np.isfinite(data)):
            raise LatentSegError(f"{path}: the label map contains NaN or Inf")
        frac = data[data != np.round(data)]
        if frac.size:
            raise LatentSegError(
                f"{path}: labels must be integers, found non-integer values such as {float(frac.flat[0]):g}"
            )
    data = data.astype(np.int64)
    if data.min(initial=0) < 0:
        raise LatentSegError(f"{path}: labels must be >= 0, found {int(data.min())}")
    return data, meta


def compact_label(label: np.ndarray) -> np.ndarray:
    """Integer labels in the smallest unsigned type that holds them (uint8 for up to 255 classes):
    a training set's labels are held in memory, and int64 took 8 bytes per voxel, twice the image's."""
    top = int(label.max(initial=0))
    dtype = np.uint8 if top < 2**8 else np.uint16 if top < 2**16 else np.int64
    return label.astype(dtype, copy=False)


def atomic_write(path: Path, write) -> None:
    """Write through a temporary file in the same folder, then rename: never a half-written file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=split_suffix(path)[1], dir=path.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _write_nifti(path: Path, data: np.ndarray, meta: ImageMeta, dtype: type) -> None:
    if meta.file_shape is not None and meta.file_shape != meta.spatial_shape:  # back to H x W x 1
        data = data.reshape(*meta.file_shape, *data.shape[meta.spatial_dims :])
    header = meta.header.copy() if meta.header is not None else nib.Nifti1Header()
    header.set_data_dtype(dtype)
    img = nib.Nifti1Image(data.astype(dtype), meta.affine, header=header)
    img.header.set_slope_inter(1.0, 0.0)
    atomic_write(path, lambda tmp: nib.save(img, str(tmp)))


def _write_itk(path: Path, data: np.ndarray, meta: ImageMeta) -> None:
    atomic_write(path, lambda tmp: write_itk(tmp, data, meta.spatial_dims, meta.file_shape, meta.header))


def _write_png(path: Path, data: np.ndarray) -> None:
    atomic_write(path, lambda tmp: Image.fromarray(data).save(tmp, format="PNG"))


def write_label(path: str | Path, label: np.ndarray, meta: ImageMeta, names: dict[int, str] | None = None) -> None:
    """Label map on the input's grid: NIfTI keeps the input's affine and header; PNG stays PNG; a
    DICOM series gets a DICOM-SEG (`.dcm`, segments named from `names`) or, for other names, NIfTI."""
    path = Path(path)
    if tuple(label.shape) != meta.spatial_shape:
        raise ValueError(f"label shape {label.shape} does not match the input grid {meta.spatial_shape}")
    if meta.format == "dicom" and path.name.endswith(".dcm"):
        from latentseg.data.dicom import write_seg

        found = {int(v) for v in np.unique(label) if v}
        write_seg(path, label, meta.source, {k: v for k, v in (names or {}).items()} or {k: str(k) for k in found})
    elif meta.format == "itk":
        _write_itk(path, compact_label(label), meta)
    elif meta.format in ("nifti", "dicom"):
        _write_nifti(path, label, meta, np.uint8 if label.max(initial=0) < 256 else np.uint16)
    else:
        _write_png(path, label.astype(np.uint8))


def write_map(path: str | Path, values: np.ndarray, meta: ImageMeta) -> None:
    """A float map (*S) or (C, *S) in [0, 1]: float32 NIfTI or MetaImage/NRRD (channels last), or an
    8-bit PNG."""
    path = Path(path)
    if meta.format in VOLUME_FORMATS:
        data = np.moveaxis(values, 0, -1) if values.ndim == meta.spatial_dims + 1 else values
        if meta.format == "itk":
            _write_itk(path, data.astype(np.float32), meta)
        else:
            _write_nifti(path, data, meta, np.float32)
    else:
        if values.ndim != 2:
            raise ValueError("a PNG map must be 2D")
        _write_png(path, np.clip(np.round(values * 255), 0, 255).astype(np.uint8))


def output_name(meta: ImageMeta, case_id: str, suffix: str = "") -> str:
    """File name of an output for this case, in the input's format (DICOM: the label map as a
    DICOM-SEG, maps and samples as NIfTI; MetaImage and NRRD: one file, .mha or .nrrd)."""
    return f"{case_id}{suffix}{output_ending(meta.path, suffix)}"


def output_ending(source: Path, suffix: str = "") -> str:
    """The ending of output `suffix` ("" for the label map) of the input `source`."""
    fmt = file_format(source)
    if fmt == "dicom":
        return ".dcm" if suffix == "" else ".nii.gz"
    if fmt == "itk":
        return itk_output_suffix(source)
    return ".nii.gz" if fmt == "nifti" else ".png"
