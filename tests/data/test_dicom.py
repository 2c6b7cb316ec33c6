"""DICOM series in, DICOM-SEG out: a synthetic MR series written with pydicom from a NIfTI volume
(an oblique orientation), predicted as a series and as the NIfTI, the SEG read back with highdicom."""

from __future__ import annotations

import shutil

import nibabel as nib
import numpy as np
import pytest

pydicom = pytest.importorskip("pydicom")
hd = pytest.importorskip("highdicom")

from pydicom.dataset import FileMetaDataset  # noqa: E402
from pydicom.uid import ExplicitVRLittleEndian, generate_uid  # noqa: E402

from latentseg.cli import main  # noqa: E402
from latentseg.data.io import read_image  # noqa: E402

MR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.4"
COMPREHENSIVE_SR = "1.2.840.10008.5.1.4.1.1.88.33"


def oblique_affine(spacing=(1.0, 1.0, 1.5)) -> np.ndarray:
    """RAS+ affine rotated 30 degrees about the slice axis, tilted a little, with round numbers
    (DICOM stores positions as 16-character decimal strings)."""
    a, b = np.deg2rad(30), np.deg2rad(10)
    rz = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    rx = np.array([[1, 0, 0], [0, np.cos(b), -np.sin(b)], [0, np.sin(b), np.cos(b)]])
    affine = np.eye(4)
    affine[:3, :3] = np.round(rz @ rx, 8) * np.asarray(spacing)
    affine[:3, 3] = [-20.5, 12.25, 40.0]
    return affine


def _ds(value: float) -> str:
    return f"{value:.10g}"


def write_series(volume: np.ndarray, affine: np.ndarray, folder, series_uid=None, study_uid=None, frame_uid=None):
    """One MR slice file per k of `volume` (column, row, slice), as a scanner would store it."""
    folder.mkdir(parents=True, exist_ok=True)
    lps = np.diag([-1.0, -1.0, 1.0, 1.0]) @ affine
    spacing = np.linalg.norm(lps[:3, :3], axis=0)
    directions = lps[:3, :3] / spacing
    series_uid, study_uid, frame_uid = (
        series_uid or generate_uid(),
        study_uid or generate_uid(),
        frame_uid or generate_uid(),
    )
    for k in range(volume.shape[2]):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = MR_IMAGE_STORAGE
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = pydicom.Dataset()
        ds.file_meta = meta
        ds.SOPClassUID, ds.SOPInstanceUID = MR_IMAGE_STORAGE, meta.MediaStorageSOPInstanceUID
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study_uid, series_uid, frame_uid
        ds.Modality, ds.PatientName, ds.PatientID, ds.PatientBirthDate, ds.PatientSex = (
            "MR",
            "Test^Phantom",
            "P1",
            "",
            "O",
        )
        ds.StudyDate, ds.StudyTime, ds.AccessionNumber, ds.ReferringPhysicianName = "20261204", "120000", "", ""
        ds.StudyID, ds.SeriesNumber, ds.InstanceNumber = "1", 3, k + 1
        ds.Manufacturer = "test"
        ds.ImageOrientationPatient = [_ds(v) for v in (*directions[:, 0], *directions[:, 1])]
        ds.ImagePositionPatient = [_ds(v) for v in (lps @ np.array([0, 0, k, 1.0]))[:3]]
        ds.PixelSpacing = [_ds(spacing[1]), _ds(spacing[0])]  # between rows, between columns
        ds.SliceThickness = _ds(spacing[2])
        ds.Rows, ds.Columns = volume.shape[1], volume.shape[0]
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.PixelData = np.ascontiguousarray(volume[:, :, k].T.astype(np.int16)).tobytes()
        ds.save_as(folder / f"slice_{k:03d}.dcm", enforce_file_format=True)
    return folder


@pytest.fixture(scope="module")
def series_and_nifti(tmp_path_factory, data3d):
    """A 3D phantom stored twice: as a NIfTI with an oblique affine and as a DICOM series of it."""
    root = tmp_path_factory.mktemp("dicom")
    source = sorted((data3d["test"] / "imagesTr").glob("*.nii.gz"))[0]
    volume = np.round(np.asarray(nib.load(source).dataobj, dtype=np.float32) * 100).astype(np.int16)
    affine = oblique_affine((1.0, 1.0, 1.0))  # the model's spacing: no resampling ties between the two
    (root / "nifti").mkdir()
    nib.save(nib.Nifti1Image(volume, affine), root / "nifti" / "case.nii.gz")
    write_series(volume, affine, root / "series" / "case")
    return root, volume, affine


def test_the_series_reads_as_its_nifti(series_and_nifti, tmp_path):
    _, volume, _ = series_and_nifti
    volume = volume[:, :20]  # rows != columns
    affine = oblique_affine((0.7, 0.8, 1.5))
    image, meta = read_image(write_series(volume, affine, tmp_path / "series"))
    assert meta.format == "dicom" and image.shape == (1, *volume.shape)
    assert np.array_equal(image[0], volume)
    assert np.allclose(meta.affine, affine, atol=1e-6)
    assert np.allclose(meta.spacing, (0.7, 0.8, 1.5))


def test_slice_files_in_any_order_read_the_same(series_and_nifti, tmp_path):
    root, volume, _ = series_and_nifti
    shuffled = tmp_path / "shuffled"
    shuffled.mkdir()
    files = sorted((root / "series" / "case").iterdir())
    for i, f in enumerate(reversed(files)):  # names no longer follow the slice order
        shutil.copy(f, shuffled / f"im{i:03d}")
    image, _ = read_image(shuffled)
    assert np.array_equal(image[0], volume)


def test_series_predicts_as_the_nifti_and_the_seg_reads_back(series_and_nifti, model3d, tmp_path):
    root, volume, _ = series_and_nifti
    for source, out in (("nifti", "n"), ("series", "d")):
        argv = ["predict", "--model", str(model3d), "--input", str(root / source), "--output", str(tmp_path / out)]
        assert main(argv) == 0
    from_nifti = np.asarray(nib.load(tmp_path / "n" / "case.nii.gz").dataobj)
    prob_nifti = nib.load(tmp_path / "n" / "case_prob.nii.gz").get_fdata()
    prob_dicom = nib.load(tmp_path / "d" / "case_prob.nii.gz").get_fdata()
    assert np.abs(prob_nifti - prob_dicom).max() < 1e-4  # the same voxels on the same grid

    seg = hd.seg.segread(tmp_path / "d" / "case.dcm")
    sources = [pydicom.dcmread(f) for f in sorted((root / "series" / "case").iterdir())]
    assert seg.FrameOfReferenceUID == sources[0].FrameOfReferenceUID
    assert seg.StudyInstanceUID == sources[0].StudyInstanceUID
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == sources[0].SeriesInstanceUID
    assert [s.SegmentLabel for s in seg.SegmentSequence] == ["organ", "lesion"]  # the model's label names
    uids = [ds.SOPInstanceUID for ds in sources]  # slice k's file is slice_k
    labels = seg.get_pixels_by_source_instance(uids, combine_segments=True, skip_overlap_checks=True)
    assert np.array_equal(labels.transpose(2, 1, 0), from_nifti)  # (slice, row, column) -> NIfTI's axes
    assert from_nifti.any()


def _error(capsys, model3d, input_dir, tmp_path) -> str:
    assert main(["predict", "--model", str(model3d), "--input", str(input_dir), "--output", str(tmp_path / "o")]) == 2
    lines = [x for x in capsys.readouterr().err.splitlines() if x.startswith("latentseg: error:")]
    assert len(lines) == 1, lines
    assert not (tmp_path / "o").exists()  # nothing half-written
    return lines[0]


def _copy_series(root, tmp_path):
    folder = tmp_path / "case"
    shutil.copytree(root / "series" / "case", folder)
    return folder


def test_a_missing_slice_is_refused_naming_the_file(series_and_nifti, model3d, tmp_path, capsys):
    folder = _copy_series(series_and_nifti[0], tmp_path)
    (folder / "slice_005.dcm").unlink()
    err = _error(capsys, model3d, folder, tmp_path)
    assert "slice_006.dcm" in err and "missing" in err


def test_a_duplicated_slice_is_refused(series_and_nifti, model3d, tmp_path, capsys):
    folder = _copy_series(series_and_nifti[0], tmp_path)
    ds = pydicom.dcmread(folder / "slice_004.dcm")
    ds.SOPInstanceUID = generate_uid()
    ds.save_as(folder / "slice_004b.dcm")
    assert "duplicated slice position" in _error(capsys, model3d, folder, tmp_path)


def test_two_series_in_one_folder_are_refused(series_and_nifti, model3d, tmp_path, capsys):
    root, volume, affine = series_and_nifti
    folder = _copy_series(root, tmp_path)
    other = write_series(volume[:, :, :2], affine, tmp_path / "other")
    shutil.copy(other / "slice_000.dcm", folder / "z_other.dcm")
    err = _error(capsys, model3d, folder, tmp_path)
    assert "more than one series" in err and "z_other.dcm" in err


def test_a_structured_report_in_the_series_is_refused(series_and_nifti, model3d, tmp_path, capsys):
    folder = _copy_series(series_and_nifti[0], tmp_path)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = COMPREHENSIVE_SR, generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    sr = pydicom.Dataset()
    sr.file_meta = meta
    sr.SOPClassUID, sr.SOPInstanceUID, sr.Modality = COMPREHENSIVE_SR, meta.MediaStorageSOPInstanceUID, "SR"
    sr.SeriesInstanceUID = pydicom.dcmread(folder / "slice_000.dcm").SeriesInstanceUID
    sr.save_as(folder / "report.dcm", enforce_file_format=True)
    err = _error(capsys, model3d, folder, tmp_path)
    assert "report.dcm: not an image slice" in err and "Comprehensive SR" in err
