"""MetaImage and NRRD through SimpleITK: read as the NIfTI that SimpleITK writes of the same image
(its own LPS -> RAS conversion is the oracle for the affine), written back with the source's
geometry, predicted as the NIfTI, bad files refused in one line naming them."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk

from latentseg.cli import main
from latentseg.data.datasets import discover_dataset, load_dataset
from latentseg.data.io import output_name, read_image, read_label, write_label, write_map
from latentseg.errors import LatentSegError


def oblique_image(array_kji: np.ndarray, spacing=(0.7, 0.8, 1.5)) -> sitk.Image:
    """A volume rotated 30 degrees about one axis and tilted 10 about another, off the origin."""
    a, b = np.deg2rad(30), np.deg2rad(10)
    rz = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    rx = np.array([[1, 0, 0], [0, np.cos(b), -np.sin(b)], [0, np.sin(b), np.cos(b)]])
    image = sitk.GetImageFromArray(array_kji)
    image.SetDirection(tuple((rz @ rx).ravel()))
    image.SetSpacing(spacing)
    image.SetOrigin((-20.5, 12.25, 40.0))
    return image


@pytest.fixture
def volume():
    rng = np.random.default_rng(0)
    return rng.integers(-500, 1500, size=(6, 9, 11)).astype(np.int16)  # (k, j, i): three different sizes


@pytest.mark.parametrize("suffix", [".mha", ".mhd", ".nrrd", ".nhdr"])
def test_reads_as_the_nifti_simpleitk_writes(volume, tmp_path, suffix):
    image = oblique_image(volume)
    sitk.WriteImage(image, str(tmp_path / f"case{suffix}"))
    sitk.WriteImage(image, str(tmp_path / "oracle.nii.gz"))
    data, meta = read_image(tmp_path / f"case{suffix}")
    oracle = nib.load(tmp_path / "oracle.nii.gz")
    assert meta.format == "itk" and data.shape == (1, 11, 9, 6)
    assert np.array_equal(data[0], np.asarray(oracle.dataobj))
    assert np.allclose(meta.affine, oracle.affine, atol=1e-5)
    assert np.allclose(meta.spacing, (0.7, 0.8, 1.5))


@pytest.mark.parametrize(("suffix", "written"), [(".mha", ".mha"), (".mhd", ".mha"), (".nrrd", ".nrrd")])
def test_outputs_keep_the_source_geometry(volume, tmp_path, suffix, written):
    source = oblique_image(volume)
    sitk.WriteImage(source, str(tmp_path / f"case{suffix}"))
    data, meta = read_image(tmp_path / f"case{suffix}")
    label = (data[0] > 500).astype(np.int64)
    label_path = tmp_path / "out" / output_name(meta, "case")
    map_path = tmp_path / "out" / output_name(meta, "case", "_prob")
    assert label_path.name == f"case{written}" and map_path.name == f"case_prob{written}"
    write_label(label_path, label, meta)
    write_map(map_path, np.stack([1.0 - label, label]).astype(np.float32), meta)
    for path in (label_path, map_path):
        back = sitk.ReadImage(str(path))  # NRRD stores spacing x direction: equal up to rounding
        assert np.allclose(back.GetOrigin(), source.GetOrigin()) and np.allclose(back.GetSpacing(), source.GetSpacing())
        assert np.allclose(back.GetDirection(), source.GetDirection())
    assert np.array_equal(sitk.GetArrayFromImage(sitk.ReadImage(str(label_path))), (volume > 500).astype(np.uint8))
    prob = sitk.GetArrayFromImage(sitk.ReadImage(str(map_path)))  # (k, j, i, class)
    assert prob.shape == (*volume.shape, 2) and np.array_equal(prob[..., 1], (volume > 500).astype(np.float32))
    assert np.array_equal(read_label(label_path)[0], label)  # and it reads back as it was written
    assert not [p for p in (tmp_path / "out").iterdir() if p.name.startswith(".tmp")]


def test_one_slice_is_a_2d_image_and_goes_back_as_it_came(tmp_path):
    rgb = np.arange(5 * 7 * 3, dtype=np.uint8).reshape(1, 5, 7, 3)  # (k=1, j, i, RGB)
    image = sitk.GetImageFromArray(rgb, isVector=True)
    image.SetSpacing((0.5, 0.25, 3.0))
    sitk.WriteImage(image, str(tmp_path / "slice.mha"))
    data, meta = read_image(tmp_path / "slice.mha")
    assert meta.spatial_shape == (7, 5) and data.shape == (3, 7, 5) and meta.spacing == (0.5, 0.25)
    assert np.array_equal(data[1], rgb[0, :, :, 1].T)
    write_label(tmp_path / "label.mha", (data[0] > 50).astype(np.int64), meta)
    back = sitk.ReadImage(str(tmp_path / "label.mha"))
    assert back.GetSize() == (7, 5, 1) and back.GetSpacing() == (0.5, 0.25, 3.0)


def test_a_colour_label_is_refused(tmp_path):
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((4, 5, 3), np.uint8), isVector=True), str(tmp_path / "l.mha"))
    with pytest.raises(LatentSegError, match=r"l\.mha: a label map must have one channel"):
        read_label(tmp_path / "l.mha")


def test_bad_files_get_one_line_naming_them(tmp_path):
    (tmp_path / "broken.mha").write_text("ObjectType = Image\nNDims = 3\nDimSize = 4 4\nElementDataFile = LOCAL\n")
    with pytest.raises(LatentSegError, match=r"broken\.mha: cannot read this image") as err:
        read_image(tmp_path / "broken.mha")
    assert "\n" not in str(err.value)
    sitk.WriteImage(sitk.Image([2, 2, 2, 2], sitk.sitkUInt8), str(tmp_path / "four.nrrd"))
    with pytest.raises(LatentSegError, match=r"four\.nrrd: expected a 2D or 3D image, got 4 dimensions"):
        read_image(tmp_path / "four.nrrd")
    sitk.WriteImage(sitk.Image([64, 64, 64], sitk.sitkUInt8), str(tmp_path / "big.mha"))
    with pytest.raises(LatentSegError, match=r"big\.mha: the header claims 64 x 64 x 64 x 1"):
        read_image(tmp_path / "big.mha", max_voxels=1000)


def _as_mha(nnunet: Path, out: Path) -> Path:
    """An nnU-Net folder of .nii.gz rewritten as .mha, as a challenge would distribute it."""
    for sub in ("imagesTr", "labelsTr"):
        (out / sub).mkdir(parents=True)
        for f in sorted((nnunet / sub).glob("*.nii.gz")):
            sitk.WriteImage(sitk.ReadImage(str(f)), str(out / sub / f.name.replace(".nii.gz", ".mha")))
    meta = json.loads((nnunet / "dataset.json").read_text())
    (out / "dataset.json").write_text(json.dumps({**meta, "file_ending": ".mha"}))
    return out


def test_an_nnunet_folder_of_mha_loads_and_predicts_as_its_nifti(data3d, model3d, tmp_path):
    mha = _as_mha(data3d["test"], tmp_path / "mha")
    spec = discover_dataset(mha)
    samples, problems = load_dataset(spec)
    assert not problems and len(samples) == len(discover_dataset(data3d["test"]).cases)
    case = spec.cases[0].case_id
    nifti = tmp_path / "nifti"
    nifti.mkdir()
    shutil.copy(data3d["test"] / "imagesTr" / f"{case}_0000.nii.gz", nifti)
    for source, out in ((mha / "imagesTr", "m"), (nifti, "n")):
        argv = ["predict", "--model", str(model3d), "--input", str(source), "--output", str(tmp_path / out)]
        assert main([*argv, "--samples", "2", "--seed", "0"]) == 0
    from_mha = sitk.ReadImage(str(tmp_path / "m" / f"{case}.mha"))
    from_nifti = np.asarray(nib.load(tmp_path / "n" / f"{case}.nii.gz").dataobj)
    assert np.array_equal(sitk.GetArrayFromImage(from_mha).transpose(2, 1, 0), from_nifti)
    assert from_nifti.any()
    source = sitk.ReadImage(str(mha / "imagesTr" / f"{case}_0000.mha"))
    assert from_mha.GetOrigin() == source.GetOrigin() and from_mha.GetDirection() == source.GetDirection()
    prob_mha = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "m" / f"{case}_prob.mha")))
    prob_nifti = nib.load(tmp_path / "n" / f"{case}_prob.nii.gz").get_fdata()
    assert np.abs(prob_mha.transpose(2, 1, 0, 3) - prob_nifti).max() < 1e-5
    assert main(["evaluate", "--pred", str(tmp_path / "m"), "--ref", str(mha / "labelsTr")]) == 0
