import gzip

import nibabel as nib
import numpy as np
import pytest
from PIL import Image

from latentseg.data.io import output_name, read_image, read_label, write_label, write_map
from latentseg.errors import LatentSegError


def nifti(path, data, affine=None, dtype=None):
    affine = np.diag([0.8, 0.9, 2.5, 1.0]) if affine is None else affine
    img = nib.Nifti1Image(data if dtype is None else data.astype(dtype), affine)
    img.header["descrip"] = b"from the scanner"
    nib.save(img, str(path))
    return path


def test_nifti_label_round_trip_keeps_affine_and_header(tmp_path):
    affine = np.array([[0, -0.8, 0, 10], [0.9, 0, 0, -5], [0, 0, 2.5, 3], [0, 0, 0, 1]])
    src = nifti(tmp_path / "img.nii.gz", np.random.rand(6, 5, 4).astype(np.float32), affine)
    image, meta = read_image(src)
    assert image.shape == (1, 6, 5, 4) and meta.spacing == pytest.approx((0.9, 0.8, 2.5))
    label = np.random.randint(0, 3, (6, 5, 4))
    write_label(tmp_path / "out.nii.gz", label, meta)
    out = nib.load(str(tmp_path / "out.nii.gz"))
    np.testing.assert_array_equal(out.affine, nib.load(str(src)).affine)
    assert out.header["descrip"] == b"from the scanner"
    assert out.header.get_sform(coded=True)[1] == nib.load(str(src)).header.get_sform(coded=True)[1]
    np.testing.assert_array_equal(np.asanyarray(out.dataobj), label)
    assert out.get_data_dtype() == np.uint8


def test_scaled_int_image_header_does_not_rescale_labels(tmp_path):
    img = nib.Nifti1Image(np.arange(24, dtype=np.int16).reshape(2, 3, 4), np.eye(4))
    img.header.set_slope_inter(2.0, 1.0)
    nib.save(img, str(tmp_path / "scaled.nii.gz"))
    _, meta = read_image(tmp_path / "scaled.nii.gz")
    write_label(tmp_path / "lab.nii.gz", np.ones((2, 3, 4), int), meta)
    assert np.all(nib.load(str(tmp_path / "lab.nii.gz")).get_fdata() == 1)


def test_multichannel_nifti_is_channel_first(tmp_path):
    src = nifti(tmp_path / "mc.nii.gz", np.random.rand(6, 5, 4, 2).astype(np.float32))
    image, meta = read_image(src)
    assert image.shape == (2, 6, 5, 4) and meta.spatial_shape == (6, 5, 4)
    write_map(tmp_path / "p.nii.gz", np.random.rand(3, 6, 5, 4), meta)
    assert nib.load(str(tmp_path / "p.nii.gz")).shape == (6, 5, 4, 3)


def test_png_grey_rgb_and_label(tmp_path):
    Image.fromarray(np.full((8, 9), 7, np.uint8)).save(tmp_path / "g.png")
    Image.fromarray(np.zeros((8, 9, 4), np.uint8)).save(tmp_path / "rgba.png")
    assert read_image(tmp_path / "g.png")[0].shape == (1, 8, 9)
    assert read_image(tmp_path / "rgba.png")[0].shape == (3, 8, 9)
    label, meta = read_label(tmp_path / "g.png")
    assert label.dtype == np.int64 and label.max() == 7 and meta.spacing == (1.0, 1.0)
    write_label(tmp_path / "o.png", label, meta)
    assert np.array_equal(np.asarray(Image.open(tmp_path / "o.png")), label)


def test_gif_masks_and_ppm_images_as_retinal_datasets_ship_them(tmp_path):
    """DRIVE's manual masks are GIFs, STARE's images PPMs; a prediction of either is a PNG."""
    mask = np.zeros((6, 7), np.uint8)
    mask[2:4, 1:5] = 255
    Image.fromarray(mask).save(tmp_path / "m.gif")
    rgb = np.random.default_rng(0).integers(0, 255, (6, 7, 3)).astype(np.uint8)
    Image.fromarray(rgb).save(tmp_path / "i.ppm")
    label, meta = read_label(tmp_path / "m.gif")
    assert np.array_equal(label, mask) and meta.format == "image2d"
    image, _ = read_image(tmp_path / "i.ppm")
    assert np.array_equal(image, np.moveaxis(rgb, -1, 0).astype(np.float32))
    assert output_name(meta, "m") == "m.png"


def test_float_labels_and_negative_labels_are_rejected(tmp_path):
    nifti(tmp_path / "half.nii.gz", np.full((3, 3, 3), 0.5, np.float32))
    with pytest.raises(LatentSegError, match=r"half\.nii\.gz: labels must be integers.*0\.5"):
        read_label(tmp_path / "half.nii.gz")
    nifti(tmp_path / "whole.nii.gz", np.ones((3, 3, 3), np.float32))  # integral floats are fine
    assert read_label(tmp_path / "whole.nii.gz")[0].dtype == np.int64
    nifti(tmp_path / "neg.nii.gz", -np.ones((3, 3, 3), np.int16))
    with pytest.raises(LatentSegError, match="must be >= 0"):
        read_label(tmp_path / "neg.nii.gz")


def test_colour_masks_are_rejected(tmp_path):
    rgb = np.zeros((4, 4, 3), np.uint8)
    rgb[0, 0] = (255, 0, 0)
    Image.fromarray(rgb).save(tmp_path / "c.png")
    with pytest.raises(LatentSegError, match="greyscale"):
        read_label(tmp_path / "c.png")


@pytest.mark.parametrize("name,content", [("bad.nii.gz", b"not a nifti"), ("bad.png", b"\x89PNG garbage")])
def test_corrupt_files_name_the_file(tmp_path, name, content):
    (tmp_path / name).write_bytes(content)
    with pytest.raises(LatentSegError, match=f"{name}: cannot read"):
        read_image(tmp_path / name)


def test_truncated_nifti(tmp_path):
    path = nifti(tmp_path / "t.nii.gz", np.random.rand(20, 20, 20).astype(np.float32))
    raw = gzip.decompress(path.read_bytes())
    path.write_bytes(gzip.compress(raw[: len(raw) // 2]))
    with pytest.raises(LatentSegError, match=r"t\.nii\.gz: cannot read"):
        read_image(path)


def test_unknown_suffix_and_missing_file(tmp_path):
    (tmp_path / "x.txt").write_text("hi")
    with pytest.raises(LatentSegError, match="unsupported file type"):
        read_image(tmp_path / "x.txt")
    with pytest.raises(LatentSegError, match="file not found"):
        read_image(tmp_path / "nope.nii.gz")
