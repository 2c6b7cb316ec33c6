"""Fusion: STAPLE against SimpleITK's STAPLEImageFilter as oracle, vote, mean, maps, bad input."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from scipy import ndimage

from latentseg.fusion import entropy_map, fuse, staple, staple_labels, uncertainty_map

ACDC = Path(__file__).resolve().parents[2] / "shared" / "data" / "acdc"


def sitk_staple(masks: list[np.ndarray]) -> np.ndarray:
    f = sitk.STAPLEImageFilter()
    f.SetForegroundValue(1)
    return sitk.GetArrayFromImage(f.Execute([sitk.GetImageFromArray(m.astype(np.uint8)) for m in masks]))


def noisy_raters(truth: np.ndarray, n: int, seed: int) -> list[np.ndarray]:
    """n raters of different quality: each flips a different fraction of voxels, and some also
    dilate or erode the truth, so their sensitivities and specificities differ."""
    rng = np.random.default_rng(seed)
    raters = []
    for j in range(n):
        m = truth.astype(bool)
        if j % 3 == 1:
            m = ndimage.binary_dilation(m)
        elif j % 3 == 2:
            m = ndimage.binary_erosion(m)
        raters.append(m ^ (rng.random(truth.shape) < 0.02 + 0.01 * j))
    return raters


def agreement(ours: torch.Tensor, oracle: np.ndarray) -> float:
    return float(((ours.numpy() > 0.5) == (oracle > 0.5)).mean())


@pytest.mark.parametrize("shape", [(64, 64), (24, 32, 20)])
def test_staple_matches_simpleitk_on_random_masks(shape):
    rng = np.random.default_rng(1)
    truth = ndimage.gaussian_filter(rng.random(shape), 2) > 0.5
    raters = noisy_raters(truth, 20, seed=2)
    oracle = sitk_staple(raters)
    ours = staple(torch.from_numpy(np.stack(raters)))  # 004's init (0.9 / 0.1) and 20 iterations
    assert agreement(ours, oracle) >= 0.999
    # run to convergence from ITK's own start, the posteriors agree to float precision
    converged = staple(torch.from_numpy(np.stack(raters)), iterations=100, sensitivity=0.99999, specificity=0.99999)
    assert np.abs(converged.numpy() - oracle).max() < 1e-4
    # the paper's literal fixed prior of 0.5 is available, and still agrees on these masks
    assert agreement(staple(torch.from_numpy(np.stack(raters)), prior=0.5), oracle) >= 0.999


def test_staple_matches_simpleitk_on_real_acdc_masks():
    labels = sorted((ACDC / "labelsTr").glob("*.nii.gz")) if ACDC.is_dir() else []
    if not labels:
        pytest.skip("../shared/data/acdc not present")
    ref = sitk.GetArrayFromImage(sitk.ReadImage(str(labels[0])))
    for cls in (1, 2, 3):
        raters = noisy_raters(ref == cls, 20, seed=cls)
        oracle = sitk_staple(raters)
        assert agreement(staple(torch.from_numpy(np.stack(raters))), oracle) >= 0.999


def test_staple_outvotes_a_majority_of_noisy_raters_as_simpleitk_does():
    """Two exact raters and three that each flip 30% of the voxels at random: where all three noisy
    raters are wrong (2.7% of voxels) a majority vote is wrong, and STAPLE, which learns each
    rater's sensitivity and specificity, follows the two reliable ones. SimpleITK agrees."""
    rng = np.random.default_rng(0)
    truth = np.zeros((48, 48), dtype=bool)
    truth[10:38, 12:40] = True
    noisy = [truth ^ (rng.random(truth.shape) < 0.3) for _ in range(3)]
    raters = [truth, truth, *noisy]
    vote = np.sum(raters, axis=0) >= 3
    ours = staple(torch.from_numpy(np.stack(raters))).numpy() > 0.5
    assert (vote != truth).mean() > 0.015  # the vote's own errors
    assert np.array_equal(ours, truth)  # STAPLE has none
    assert not np.array_equal(ours, vote)
    assert np.array_equal(ours, sitk_staple([r.astype(np.uint8) for r in raters]) > 0.5)


def test_staple_labels_one_vs_rest_and_binary_case():
    rng = np.random.default_rng(0)
    labels = torch.from_numpy(rng.integers(0, 3, size=(5, 16, 16)))
    post = staple_labels(labels, 3)
    assert post.shape == (3, 16, 16)
    assert torch.allclose(post[1], staple(labels == 1))
    binary = staple_labels((labels > 0).long(), 2)
    assert torch.allclose(binary.sum(0), torch.ones(16, 16))


def test_fuse_mean_vote_staple():
    # 3 samples, 1 image, 2 classes, 4 voxels; sample probabilities for the foreground
    fg = torch.tensor([[0.9, 0.6, 0.1, 0.4], [0.8, 0.4, 0.2, 0.45], [0.7, 0.4, 0.3, 0.95]])
    probs = torch.stack([1 - fg, fg], dim=1)[:, None]  # (N=3, B=1, C=2, 4)
    mean = fuse(probs, "mean")
    assert mean.label.tolist() == [[1, 0, 0, 1]]  # mean fg: .8, .47, .2, .6
    vote = fuse(probs, "vote")
    assert vote.label.tolist() == [[1, 0, 0, 0]]  # fg votes: 3, 1, 0, 1 of 3
    assert torch.allclose(vote.probs[0, 1], torch.tensor([1.0, 1 / 3, 0.0, 1 / 3]))
    st = fuse(probs, "staple")
    assert st.probs.shape == (1, 2, 4) and st.label.shape == (1, 4)


def test_uncertainty_and_entropy_maps():
    certain = torch.tensor([0.0, 1.0])[None, None, :, None].expand(4, 1, 2, 3)
    assert uncertainty_map(certain).abs().max() == 0
    assert entropy_map(certain).abs().max() < 1e-6
    split = torch.stack([torch.tensor([0.0, 1.0]), torch.tensor([1.0, 0.0])])[:, None, :, None]
    assert torch.allclose(uncertainty_map(split), torch.tensor(0.5))
    assert torch.allclose(entropy_map(split), torch.tensor(1.0))


@pytest.mark.parametrize("shape", [(4, 1, 2, 9, 7), (3, 2, 4, 5, 6, 7)])
def test_uncertainty_map_is_numpy_std_over_samples(shape):
    probs = torch.softmax(torch.randn(*shape, generator=torch.Generator().manual_seed(0)), dim=2)
    expected = probs.numpy().astype(np.float64).std(axis=0).max(axis=1, keepdims=True)
    np.testing.assert_allclose(uncertainty_map(probs).numpy(), expected, atol=1e-6)


def test_staple_needs_two_masks():
    with pytest.raises(ValueError, match="at least 2 masks"):
        staple(torch.ones(1, 4, 4))
    with pytest.raises(ValueError, match="at least 2 samples"):
        fuse(torch.rand(1, 1, 2, 4, 4), "staple")


def test_staple_masks_of_different_shapes():
    with pytest.raises(ValueError, match="different shapes"):
        staple([torch.ones(4, 4), torch.ones(4, 5)])


def test_unknown_fusion():
    with pytest.raises(ValueError, match="mean, vote, staple"):
        fuse(torch.rand(2, 1, 2, 4), "median")
