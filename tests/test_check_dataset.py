"""`latentseg check-dataset` reports every problem at once, one line each, then exits non-zero."""

import gzip
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from PIL import Image

from latentseg.cli import main
from latentseg.data.phantoms import write_phantom_dataset

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def test_every_problem_is_reported_once(tmp_path, capsys):
    root = write_phantom_dataset(tmp_path / "ds", 7, 3, 32, seed=0)
    img = lambda i: root / "imagesTr" / f"phantom_00{i}_0000.nii.gz"  # noqa: E731
    lab = lambda i: root / "labelsTr" / f"phantom_00{i}.nii.gz"  # noqa: E731
    raw = gzip.decompress(img(0).read_bytes())  # 0: truncated image
    img(0).write_bytes(gzip.compress(raw[: len(raw) // 3]))
    ref = nib.load(str(lab(1)))  # 1: label affine disagrees
    nib.save(nib.Nifti1Image(np.asanyarray(ref.dataobj), np.diag([1.0, 1.0, 1.5, 1.0])), str(lab(1)))
    lab(2).unlink()  # 2: missing label file
    data = np.asanyarray(nib.load(str(lab(3))).dataobj).copy()  # 3: undeclared label value
    data[0, 0, 0] = 9
    nib.save(nib.Nifti1Image(data, np.eye(4)), str(lab(3)))
    nib.save(nib.Nifti1Image(np.zeros((32, 32, 32, 2), np.float32), np.eye(4)), str(img(4)))  # 4: a 4D image
    nib.save(nib.Nifti1Image(np.zeros((32, 32, 32), np.uint8), np.eye(4)), str(lab(5)))  # 5: empty mask, allowed

    assert main(["check-dataset", str(root)]) == 2
    captured = capsys.readouterr()
    errors = captured.err.strip().splitlines()
    assert any("phantom_000_0000.nii.gz: cannot read" in e for e in errors)
    assert any("phantom_001.nii.gz: label affine differs" in e for e in errors)
    assert any("phantom_002_0000.nii.gz: image without a label file" in e for e in errors)
    assert any("phantom_003.nii.gz: label values [9] are outside 0..2" in e for e in errors)
    assert any("phantom_004_0000.nii.gz: a 4D image (2 channels) where 3D is expected" in e for e in errors)
    assert any("numTraining is 7 but labelsTr holds 6 cases" in e for e in errors)
    assert errors[-1].endswith("6 problem(s) found") and len(errors) == 7
    assert "warning: phantom_005: the mask is empty" in captured.out


def test_png_folder_skips_stray_files_and_maps_0_255_masks(tmp_path, capsys):
    root = tmp_path / "png"
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    for i in range(3):
        Image.fromarray(np.full((16, 16, 3), 40 * i, np.uint8)).save(root / "images" / f"c{i}.png")
        mask = np.zeros((16, 16), np.uint8)
        mask[4:9, 4:9] = 255
        Image.fromarray(mask).save(root / "masks" / f"c{i}.png")
    (root / "images" / "Thumbs.db").write_bytes(b"junk")
    assert main(["check-dataset", str(root)]) == 0
    out = capsys.readouterr().out
    assert "Thumbs.db: not an image file, skipped" in out and "3 cases" in out
    assert "post-processing: classes [1] keep their largest component (labels in one piece per class: 1: 1.00)" in out


def test_acdc_reads_through_the_real_reader(capsys):
    if not (SHARED / "acdc" / "dataset.json").is_file():
        pytest.skip("shared ACDC data not present")
    assert main(["check-dataset", str(SHARED / "acdc")]) == 0
    out = capsys.readouterr().out
    assert "60 cases, msd layout, no problems found" in out
    assert "post-processing: classes [1, 2, 3] keep their largest component" in out
