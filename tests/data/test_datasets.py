import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from PIL import Image

from latentseg.data.datasets import discover_dataset, discover_inputs, load_case, load_dataset
from latentseg.data.phantoms import write_phantom_dataset
from latentseg.errors import LatentSegError

SHARED = Path(__file__).resolve().parents[3] / "shared" / "data"


def test_nnunet_problems_are_all_reported(tmp_path):
    root = write_phantom_dataset(tmp_path / "ds", 4, 3, 32, seed=0)
    (root / "imagesTr" / "phantom_001_0000.nii.gz").unlink()  # missing image
    lab = nib.load(str(root / "labelsTr" / "phantom_002.nii.gz"))
    data = np.asanyarray(lab.dataobj).copy()
    data[0, 0, 0] = 7  # undeclared label value
    nib.save(nib.Nifti1Image(data, lab.affine), str(root / "labelsTr" / "phantom_002.nii.gz"))
    img = nib.load(str(root / "imagesTr" / "phantom_003_0000.nii.gz"))
    bad = img.get_fdata().astype(np.float32)
    bad[1, 1, 1] = np.nan
    nib.save(nib.Nifti1Image(bad, img.affine), str(root / "imagesTr" / "phantom_003_0000.nii.gz"))
    spec = discover_dataset(root)
    samples, problems = load_dataset(spec)
    assert len(samples) == 1
    assert len(problems) == 3
    assert any("phantom_001_0000.nii.gz: missing image" in p for p in problems)
    assert any("phantom_002.nii.gz: label values [7] are outside 0..2" in p for p in problems)
    assert any("phantom_003_0000.nii.gz: the image contains NaN or Inf" in p for p in problems)


def test_nnunet_shape_and_affine_mismatch(tmp_path):
    root = write_phantom_dataset(tmp_path / "ds", 2, 3, 32, seed=0)
    nib.save(
        nib.Nifti1Image(np.zeros((32, 32, 30), np.uint8), np.eye(4)), str(root / "labelsTr" / "phantom_000.nii.gz")
    )
    nib.save(
        nib.Nifti1Image(np.zeros((32, 32, 32), np.uint8), np.diag([2, 1, 1, 1])),
        str(root / "labelsTr" / "phantom_001.nii.gz"),
    )
    _, problems = load_dataset(discover_dataset(root))
    assert any("label shape (32, 32, 30) differs from image shape (32, 32, 32)" in p for p in problems)
    assert any("label affine differs" in p for p in problems)


def test_folder2d_pairs_and_text(tmp_path):
    root = write_phantom_dataset(tmp_path / "ds", 3, 2, 32, seed=0)
    Image.fromarray(np.zeros((32, 32), np.uint8)).save(root / "images" / "orphan.png")
    spec = discover_dataset(root)
    assert [c.case_id for c in spec.cases] == ["phantom_000", "phantom_001", "phantom_002"]
    assert all(c.text for c in spec.cases)
    assert any("orphan.png: image without a mask" in p for p in spec.problems)


def test_msd_layout_reads_acdc():
    if not (SHARED / "acdc" / "dataset.json").is_file():
        pytest.skip("shared ACDC data not present")
    spec = discover_dataset(SHARED / "acdc")
    assert spec.layout == "msd" and len(spec.cases) == 60
    assert spec.labels[3] == "left ventricle cavity"
    sample = load_case(spec.cases[0], num_classes=4, num_channels=1)
    assert sample["image"].shape[1:] == sample["label"].shape[1:]
    assert set(np.unique(sample["label"])) == {0, 1, 2, 3}


def test_inputs_group_nnunet_channels(tmp_path):
    for case in ("a", "b"):
        for ch in range(2):
            nib.save(
                nib.Nifti1Image(np.zeros((4, 4, 4), np.float32), np.eye(4)), str(tmp_path / f"{case}_{ch:04d}.nii.gz")
            )
    cases = discover_inputs(tmp_path)
    assert [(c.case_id, len(c.image_paths)) for c in cases] == [("a", 2), ("b", 2)]


def test_not_a_dataset(tmp_path):
    with pytest.raises(LatentSegError, match="not a dataset folder"):
        discover_dataset(tmp_path)
    with pytest.raises(LatentSegError, match="dataset folder not found"):
        discover_dataset(tmp_path / "nope")
    (tmp_path / "dataset.json").write_text("{broken")
    with pytest.raises(LatentSegError, match="cannot read dataset.json"):
        discover_dataset(tmp_path)
    (tmp_path / "dataset.json").write_text(json.dumps({"labels": {}}))
    with pytest.raises(LatentSegError, match="missing channel_names, file_ending"):
        discover_dataset(tmp_path)


def test_training_labels_are_held_in_one_byte_per_voxel(tmp_path):
    """Labels, 0/255 masks mapped to classes, annotators' masks and preprocessed labels are uint8
    (int64 took 8 bytes a voxel: 2.4x the memory of a CT training set); 300 classes take uint16."""
    from latentseg.config import load_config
    from latentseg.data.io import compact_label
    from latentseg.data.prepare import prepare_training_data

    root = write_phantom_dataset(tmp_path / "d2", 6, 2, 32, seed=0, raters=3)
    samples, problems = load_dataset(discover_dataset(root))
    assert not problems and {s["label"].dtype for s in samples} == {np.dtype(np.uint8)}
    assert {s["raters"].dtype for s in samples} == {np.dtype(np.uint8)}
    data = prepare_training_data([root], load_config(None, ["data.raters=random"]))
    assert {s["label"].dtype for s in data.train + data.val} == {np.dtype(np.uint8)}
    assert {s["raters"].dtype for s in data.train} == {np.dtype(np.uint8)}
    assert compact_label(np.array([0, 300])).dtype == np.uint16
    assert np.array_equal(compact_label(np.array([0.0, 3.0])), [0, 3])


def test_released_images_are_read_again_unchanged(tmp_path):
    """check-dataset and train keep one raw image in memory at a time: a checked case's image is
    dropped (its channel count and CT intensity sample kept) and read again to preprocess it."""
    from latentseg.data.datasets import channels_of, reload_image

    root = write_phantom_dataset(tmp_path / "d3", 2, 3, 32, seed=0)
    meta = json.loads((root / "dataset.json").read_text())
    (root / "dataset.json").write_text(json.dumps({**meta, "channel_names": {"0": "CT"}}))
    kept, _ = load_dataset(discover_dataset(root))
    released, problems = load_dataset(discover_dataset(root), keep_images=False)
    assert not problems and all("image" not in s for s in released)
    assert [channels_of(s) for s in released] == [1, 1] and all(list(s["intensities"]) == [0] for s in released)
    for a, b in zip(kept, released, strict=True):
        reload_image(b)
        assert np.array_equal(a["image"], b["image"]) and set(a) == set(b)


def _busi_like(root: Path) -> np.ndarray:
    """BUSI's layout: class folders, each image beside `X_mask.png`, a second lesion of one image in
    `X_mask_1.png`, and the normal images' empty masks. Returns the merged mask of `benign (1)`."""
    for folder in ("benign", "normal"):
        (root / folder).mkdir(parents=True)
    first, second = np.zeros((40, 48), np.uint8), np.zeros((40, 48), np.uint8)
    first[5:15, 5:15] = 255
    second[25:35, 30:44] = 255
    image = np.full((40, 48), 90, np.uint8)
    for name in ("benign (1)", "benign (2)"):
        Image.fromarray(image).save(root / "benign" / f"{name}.png")
        Image.fromarray(first).save(root / "benign" / f"{name}_mask.png")
    Image.fromarray(second).save(root / "benign" / "benign (1)_mask_1.png")
    Image.fromarray(image).save(root / "normal" / "normal (1).png")
    Image.fromarray(np.zeros_like(first)).save(root / "normal" / "normal (1)_mask.png")
    return (first > 0) | (second > 0)


def test_images_beside_their_masks_in_class_folders_as_busi_ships_them(tmp_path):
    merged = _busi_like(tmp_path)
    spec = discover_dataset(tmp_path)
    assert spec.layout == "paired2d" and not spec.problems
    assert sorted(c.case_id for c in spec.cases) == ["benign (1)", "benign (2)", "normal (1)"]
    assert any("benign (1)_mask_1.png" in w and "merged into its mask" in w for w in spec.warnings)
    samples, problems = load_dataset(spec)
    assert not problems and spec.mask_values == [0, 255]
    labels = {s["case_id"]: s["label"][0] for s in samples}
    assert np.array_equal(labels["benign (1)"], merged)  # both lesions
    assert labels["benign (2)"].sum() == 100 and labels["normal (1)"].sum() == 0


def test_numbered_further_masks_merge_in_images_and_masks_folders_too(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "masks").mkdir()
    a, b = np.zeros((20, 20), np.uint8), np.zeros((20, 20), np.uint8)
    a[2:6, 2:6], b[12:18, 12:18] = 255, 255
    Image.fromarray(np.full((20, 20), 50, np.uint8)).save(tmp_path / "images" / "x.png")
    Image.fromarray(a).save(tmp_path / "masks" / "x_mask.png")
    Image.fromarray(b).save(tmp_path / "masks" / "x_mask_2.png")
    spec = discover_dataset(tmp_path)
    assert not spec.problems and spec.cases[0].extra_label_paths == [tmp_path / "masks" / "x_mask_2.png"]
    samples, _ = load_dataset(spec)
    assert samples[0]["label"].sum() == 16 + 36


def test_paired_folder_problems_name_the_file(tmp_path):
    _busi_like(tmp_path)
    (tmp_path / "benign" / "benign (2)_mask.png").unlink()  # an image without its mask
    Image.fromarray(np.zeros((40, 48), np.uint8)).save(tmp_path / "normal" / "benign (1).png")  # a name twice
    Image.fromarray(np.zeros((40, 48), np.uint8)).save(tmp_path / "normal" / "benign (1)_mask.png")
    spec = discover_dataset(tmp_path)
    assert any(
        p.startswith(str(tmp_path / "benign" / "benign (2).png")) and "without a mask" in p for p in spec.problems
    )
    assert any("a second image named benign (1)" in p for p in spec.problems)
    small = np.zeros((10, 10), np.uint8)
    Image.fromarray(small).save(tmp_path / "benign" / "benign (1)_mask_1.png")  # a further mask of another shape
    spec = discover_dataset(tmp_path)
    case = next(c for c in spec.cases if c.case_id == "benign (1)")
    with pytest.raises(LatentSegError, match=r"benign \(1\)_mask_1.png: mask shape"):
        load_case(case)


def test_predicting_a_folder_of_images_beside_their_masks_skips_the_masks(tmp_path):
    _busi_like(tmp_path)
    assert [c.case_id for c in discover_inputs(tmp_path / "benign")] == ["benign (1)", "benign (2)"]
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "lone_mask.png")  # no image "lone": an input
    assert [c.case_id for c in discover_inputs(tmp_path)] == ["lone_mask"]


def test_a_folder_of_images_without_masks_is_not_a_dataset(tmp_path):
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "a.png")
    with pytest.raises(LatentSegError, match="not a dataset folder.*X_mask.png"):
        discover_dataset(tmp_path)


def _jpeg_mask(path: Path, mask: np.ndarray) -> None:
    """A 0/255 mask saved as an RGB JPEG, as Kvasir-SEG ships them: edges blur into grey values."""
    Image.fromarray(np.repeat(mask[..., None], 3, axis=-1)).save(path, quality=75)


def test_masks_named_as_isic_busi_and_kvasir_ship_them(tmp_path):
    """ISIC's `X_segmentation.png` and BUSI's `X_mask.png` belong to image X; a JPEG mask (Kvasir)
    is read as 0/255 at grey 128, with one warning; a second mask of one image is skipped, named."""
    (tmp_path / "images").mkdir()
    (tmp_path / "masks").mkdir()
    mask = np.zeros((40, 48), np.uint8)
    mask[10:30, 12:36] = 255
    for name in ("ISIC_0001", "benign (1)", "kvasir1"):
        Image.fromarray(np.full((40, 48, 3), 90, np.uint8)).save(tmp_path / "images" / f"{name}.jpg")
    Image.fromarray(mask).save(tmp_path / "masks" / "ISIC_0001_segmentation.png")
    Image.fromarray(mask).save(tmp_path / "masks" / "benign (1)_mask.png")
    Image.fromarray(mask).save(tmp_path / "masks" / "benign (1).png")  # a second mask for the same image
    _jpeg_mask(tmp_path / "masks" / "kvasir1.jpg", mask)
    spec = discover_dataset(tmp_path)
    assert not spec.problems
    assert sorted(c.case_id for c in spec.cases) == ["ISIC_0001", "benign (1)", "kvasir1"]
    assert any("JPEG masks are lossy" in w and "kvasir1.jpg" in w for w in spec.warnings)
    assert any("a second mask for image benign (1)" in w for w in spec.warnings)
    samples, problems = load_dataset(spec)
    assert not problems and spec.mask_values == [0, 255]
    for s in samples:
        assert set(np.unique(s["label"]).tolist()) == {0, 1}
        assert np.mean(s["label"][0] == (mask > 0)) > 0.99  # the JPEG's blurred edge rounds either way
