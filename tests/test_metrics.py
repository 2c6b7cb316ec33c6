import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from latentseg.errors import LatentSegError
from latentseg.metrics import evaluate, label_metrics


def square(shape, lo, hi):
    m = np.zeros(shape, bool)
    m[lo:hi, lo:hi] = True
    return m


def test_dice_iou_against_hand_counts():
    ref = square((20, 20), 5, 15)  # 100 px
    pred = np.zeros_like(ref)
    pred[5:15, 10:20] = True  # 50 px overlap, 100 px predicted
    m = label_metrics(pred, ref, (1.0, 1.0), 1.0)
    assert (m["TP"], m["FP"], m["FN"]) == (50, 50, 50)
    assert m["Dice"] == pytest.approx(2 * 50 / 200)
    assert m["IoU"] == pytest.approx(50 / 150)


def test_identical_masks_and_a_known_shift():
    ref = square((40, 40), 10, 30)
    same = label_metrics(ref, ref, (1.0, 1.0), 1.0)
    assert same["Dice"] == 1.0 and same["NSD"] == 1.0 and same["HD95"] == 0.0
    shifted = np.roll(ref, 3, axis=0)
    m = label_metrics(shifted, ref, (1.0, 1.0), 1.0)
    assert m["HD95"] == pytest.approx(3.0)
    assert 0 < m["NSD"] < 1
    # spacing scales surface distances
    assert label_metrics(shifted, ref, (2.0, 1.0), 1.0)["HD95"] == pytest.approx(6.0)
    assert label_metrics(shifted, ref, (1.0, 1.0), 3.0)["NSD"] == pytest.approx(1.0)


def test_empty_cases_follow_nnunet():
    empty = np.zeros((10, 10), bool)
    both = label_metrics(empty, empty, (1.0, 1.0), 1.0)
    assert both["Dice"] is None and both["HD95"] is None
    one = label_metrics(square((10, 10), 2, 5), empty, (1.0, 1.0), 1.0)
    assert one["Dice"] == 0.0 and one["HD95"] is None


def test_evaluate_writes_nnunet_style_summary_with_header_spacing(tmp_path):
    (tmp_path / "pred").mkdir()
    (tmp_path / "ref").mkdir()
    affine = np.diag([2.0, 1.0, 1.0, 1.0])
    ref = np.zeros((20, 20, 6), np.uint8)
    ref[5:15, 5:15, 1:5] = 1
    ref[8:12, 8:12, 2:4] = 2
    pred = np.roll(ref, 1, axis=0)
    nib.save(nib.Nifti1Image(ref, affine), str(tmp_path / "ref" / "a.nii.gz"))
    nib.save(nib.Nifti1Image(pred, affine), str(tmp_path / "pred" / "a.nii.gz"))
    summary = evaluate(tmp_path / "pred", tmp_path / "ref", nsd_tolerance=1.0)
    on_disk = json.loads((tmp_path / "pred" / "summary.json").read_text())
    assert on_disk == summary
    assert set(summary["mean"]) == {"1", "2"}
    case = summary["metric_per_case"][0]["metrics"]
    assert case["2"]["HD95"] == pytest.approx(2.0)  # 1 voxel along an axis of 2 mm
    assert summary["foreground_mean"]["Dice"] == pytest.approx((case["1"]["Dice"] + case["2"]["Dice"]) / 2)


def test_evaluate_reports_missing_predictions_and_shape_mismatch(tmp_path):
    for d in ("pred", "ref"):
        (tmp_path / d).mkdir()
    nib.save(nib.Nifti1Image(np.zeros((4, 4, 4), np.uint8), np.eye(4)), str(tmp_path / "ref" / "a.nii.gz"))
    with pytest.raises(LatentSegError, match="no prediction for 1 reference file"):
        evaluate(tmp_path / "pred", tmp_path / "ref")
    nib.save(nib.Nifti1Image(np.zeros((4, 4, 5), np.uint8), np.eye(4)), str(tmp_path / "pred" / "a.nii.gz"))
    with pytest.raises(LatentSegError, match="differs from the reference"):
        evaluate(tmp_path / "pred", tmp_path / "ref")


def test_evaluate_pairs_a_case_across_file_types_and_mask_suffixes(tmp_path):
    """`predict` writes PNG for a JPEG or TIFF input: `a.png` is scored against `a.jpg` (read as
    0/255 at grey 128) and `b.png` against ISIC's `b_segmentation.png`."""
    from PIL import Image

    pred, ref = tmp_path / "pred", tmp_path / "ref"
    pred.mkdir()
    ref.mkdir()
    mask = np.zeros((32, 32), np.uint8)
    mask[8:24, 8:24] = 255
    half = mask.copy()
    half[8:16] = 0
    for name in ("a", "b"):
        Image.fromarray(mask).save(pred / f"{name}.png")
    Image.fromarray(mask).save(ref / "a.jpg", quality=90)
    Image.fromarray(half).save(ref / "b_segmentation.png")
    summary = evaluate(pred, ref)
    dice = {Path(c["reference_file"]).name: c["metrics"]["255"]["Dice"] for c in summary["metric_per_case"]}
    assert dice["a.jpg"] > 0.98 and dice["b_segmentation.png"] == pytest.approx(2 * 128 / (256 + 128))


def test_evaluate_against_images_beside_their_masks_merges_further_masks(tmp_path):
    """A BUSI folder as the reference: `x.png` (the image) is not a reference, `x_mask.png` is, and
    `x_mask_1.png` (a second lesion) is merged into it."""
    from PIL import Image

    pred, ref = tmp_path / "pred", tmp_path / "ref"
    pred.mkdir()
    ref.mkdir()
    first, second = np.zeros((32, 32), np.uint8), np.zeros((32, 32), np.uint8)
    first[2:10, 2:10], second[20:30, 20:30] = 255, 255
    Image.fromarray(np.full((32, 32), 80, np.uint8)).save(ref / "x.png")
    Image.fromarray(first).save(ref / "x_mask.png")
    Image.fromarray(second).save(ref / "x_mask_1.png")
    Image.fromarray(np.maximum(first, second)).save(pred / "x.png")
    summary = evaluate(pred, ref)
    (case,) = summary["metric_per_case"]
    assert case["raters"] == 1 and Path(case["reference_file"]).name == "x_mask.png"
    assert case["metrics"]["255"]["Dice"] == pytest.approx(1.0)
    Image.fromarray(first).save(pred / "x.png")  # the first lesion only: Dice 2*64 / (64 + 164)
    assert evaluate(pred, ref)["foreground_mean"]["Dice"] == pytest.approx(2 * 64 / (64 + 164))
