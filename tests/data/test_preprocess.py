import nibabel as nib
import numpy as np
import pytest
import torch
from monai.transforms import NormalizeIntensity

from latentseg.cli import main
from latentseg.data.io import read_image, read_label
from latentseg.data.preprocess import (
    CT_VALUES_PER_CASE,
    NormalizeChannelsd,
    Preprocessing,
    complete_background,
    ct_statistics_of,
    intensity_sample,
    prepare_image,
    preprocess_sample,
    restore,
)


def oblique_affine(spacing=(0.8, 1.3, 3.0), angle=0.35):
    c, s = np.cos(angle), np.sin(angle)
    rot = np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]]) @ np.array(
        [[1, 0, 0], [0, np.cos(0.2), -np.sin(0.2)], [0, np.sin(0.2), np.cos(0.2)]]
    )
    affine = np.eye(4)
    affine[:3, :3] = rot @ np.diag([-spacing[0], spacing[1], spacing[2]])  # a flipped axis too
    affine[:3, 3] = [12.5, -30.0, 7.0]
    return affine


def write_case(path, shape=(37, 29, 11), affine=None):
    rng = np.random.default_rng(0)
    image = (rng.random(shape) * 100 + 20).astype(np.float32)
    label = np.zeros(shape, np.uint8)
    label[8:28, 6:22, 3:8] = 1
    label[12:20, 10:16, 4:7] = 2
    affine = oblique_affine() if affine is None else affine
    img = nib.Nifti1Image(image, affine)
    img.header["descrip"] = b"scanner X"
    nib.save(img, str(path / "img.nii.gz"))
    nib.save(nib.Nifti1Image(label, affine), str(path / "lab.nii.gz"))
    return path / "img.nii.gz", path / "lab.nii.gz"


@pytest.mark.parametrize("spacing", [None, [1.0, 1.0, 2.0]])
def test_restore_maps_outputs_back_onto_the_oblique_input_grid(tmp_path, spacing):
    img_path, lab_path = write_case(tmp_path)
    image, meta = read_image(img_path)
    label, _ = read_label(lab_path)
    prep = Preprocessing(3, spacing=spacing)
    x, transform = prepare_image(image, meta, prep)
    assert x.shape[0] == 1 and torch.isclose(x.mean(), torch.tensor(0.0), atol=1e-4)
    # a perfect network: the label pushed through the same chain, one-hot, mapped back
    sample = preprocess_sample({"image": image, "label": label[None], "meta": meta}, prep)
    assert sample["label"].shape[1:] == x.shape[1:]
    onehot = torch.from_numpy(np.stack([sample["label"][0] == k for k in range(3)]).astype(np.float32))
    back = restore({"prob": onehot}, x, transform)["prob"]
    assert back.shape == (3, *label.shape)
    agreement = (back.argmax(0) == label).mean()
    assert agreement == 1.0 if spacing is None else agreement > 0.97
    out = restore({"std": torch.zeros(1, *x.shape[1:])}, x, transform)["std"]
    assert out.shape == (1, *label.shape)


@pytest.mark.parametrize("spacing", [None, [1.0, 1.0, 2.0]])
def test_restored_probabilities_sum_to_one_outside_the_foreground_crop(tmp_path, spacing):
    img_path, lab_path = write_case(tmp_path)
    image, meta = read_image(img_path)
    image[:, :3] = 0  # a zero border (first spatial axis) that the foreground crop removes
    label, _ = read_label(lab_path)
    prep = Preprocessing(3, spacing=spacing)
    x, transform = prepare_image(image, meta, prep)
    assert x.shape[1:].numel() < image[0].size * (1 if spacing is None else 2)  # cropped
    sample = preprocess_sample({"image": image, "label": label[None], "meta": meta}, prep)
    onehot = np.stack([sample["label"][0] == k for k in range(3)]).astype(np.float32)
    two_samples = torch.from_numpy(np.concatenate([onehot, onehot]))  # (N*C, *S)
    back = restore({"prob": torch.from_numpy(onehot), "samples": two_samples}, x, transform)
    assert back["prob"][:, :2].max() == 0  # the inversion pads with zeros: no class at all there
    prob = complete_background(back["prob"], 3)
    np.testing.assert_allclose(prob.sum(0), 1.0, atol=1e-5)
    np.testing.assert_array_equal(prob[0, :2], 1.0)  # the cropped border is background
    samples = complete_background(back["samples"], 3).reshape(2, 3, *label.shape)
    np.testing.assert_allclose(samples.sum(1), 1.0, atol=1e-5)
    inside = np.ones(label.shape, bool)
    inside[:4] = False  # away from the border, nothing changes
    np.testing.assert_array_equal(prob[:, inside], back["prob"][:, inside])


def test_predict_on_an_oblique_anisotropic_volume_keeps_geometry(tmp_path, model3d):
    inputs = tmp_path / "in"
    inputs.mkdir()
    write_case(inputs)
    (inputs / "lab.nii.gz").unlink()
    assert (
        main(
            [
                "predict",
                "--model",
                str(model3d),
                "--input",
                str(inputs),
                "--output",
                str(tmp_path / "out"),
                "--samples",
                "2",
            ]
        )
        == 0
    )
    src = nib.load(str(inputs / "img.nii.gz"))
    for name, shape in [("img.nii.gz", src.shape), ("img_std.nii.gz", src.shape), ("img_prob.nii.gz", (*src.shape, 3))]:
        out = nib.load(str(tmp_path / "out" / name))
        assert out.shape == shape
        np.testing.assert_array_equal(out.affine, src.affine)
        assert out.header["descrip"] == b"scanner X"
        assert out.header.get_qform(coded=True)[1] == src.header.get_qform(coded=True)[1]


def test_normalize_channels_matches_monai_and_clips_ct():
    rng = np.random.default_rng(1)
    image = torch.from_numpy(rng.normal(50, 20, (2, 8, 8, 8)).astype(np.float32))
    stats = {"lo": 30.0, "hi": 70.0, "mean": 50.0, "std": 10.0}
    out = NormalizeChannelsd("image", {1: stats})({"image": image})["image"]
    torch.testing.assert_close(out[0], NormalizeIntensity()(image[0]))
    torch.testing.assert_close(out[1], (image[1].clamp(30, 70) - 50) / 10)


def test_ct_statistics_use_foreground_percentiles():
    img = np.arange(1000, dtype=np.float32).reshape(1, 10, 10, 10)
    lab = np.zeros((1, 10, 10, 10), np.int64)
    lab[0, 5:] = 1  # values 500..999
    stats = ct_statistics_of([intensity_sample(img, lab, 0, np.random.default_rng(0))])
    assert stats["lo"] == pytest.approx(np.percentile(np.arange(500, 1000), 0.5))
    assert stats["hi"] == pytest.approx(np.percentile(np.arange(500, 1000), 99.5))
    assert stats["mean"] == pytest.approx(749.5, abs=0.5)


def test_ct_statistics_from_a_sample_of_a_large_foreground_match_all_of_it():
    """Each case gives at most CT_VALUES_PER_CASE foreground values (nnU-Net's fingerprint does the
    same); on two cases of 200k foreground voxels the statistics stay within 1% of the full ones."""
    rng = np.random.default_rng(1)
    images = [rng.normal(40 + 20 * k, 50, (1, 100, 100, 40)).astype(np.float32) for k in range(2)]
    labels = [np.zeros((1, 100, 100, 40), np.uint8) for _ in range(2)]
    for lab in labels:
        lab[0, 10:60, 10:60, :] = 1
    samples = [intensity_sample(i, lab, 0, rng) for i, lab in zip(images, labels, strict=True)]
    assert all(s["foreground"].size == CT_VALUES_PER_CASE for s in samples)
    full = np.concatenate([i[0][lab[0] > 0] for i, lab in zip(images, labels, strict=True)])
    lo, hi = np.percentile(full, [0.5, 99.5])
    stats = ct_statistics_of(samples)
    assert stats["lo"] == pytest.approx(lo, rel=0.05) and stats["hi"] == pytest.approx(hi, rel=0.05)
    assert stats["mean"] == pytest.approx(np.clip(full, lo, hi).mean(), rel=0.01)
    assert stats["std"] == pytest.approx(np.clip(full, lo, hi).std(), rel=0.01)
    empty = [intensity_sample(images[0], np.zeros_like(labels[0]), 0, rng)]  # no foreground: all voxels
    assert ct_statistics_of(empty)["mean"] == pytest.approx(40, abs=1)
