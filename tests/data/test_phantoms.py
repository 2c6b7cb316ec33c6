import numpy as np
import pytest

from latentseg.data.datasets import discover_dataset, load_dataset
from latentseg.data.phantoms import describe, make_phantom, write_phantom_dataset


@pytest.mark.parametrize("dims", [2, 3])
def test_phantoms_are_deterministic_by_seed(dims):
    a, b = make_phantom(dims, 32, seed=7), make_phantom(dims, 32, seed=7)
    np.testing.assert_array_equal(a.image, b.image)
    np.testing.assert_array_equal(a.label, b.label)
    assert a.text == b.text
    c = make_phantom(dims, 32, seed=8)
    assert not np.array_equal(a.image, c.image)
    assert a.image.shape == (1,) + (32,) * dims and a.image.dtype == np.float32


def test_labels_match_the_description():
    counts = {0: 0, 1: 0, 2: 0}
    for seed in range(40):
        ph = make_phantom(2, 96, seed)
        assert set(np.unique(ph.label)) <= {0, 1, 2}
        assert (ph.label == 1).sum() > 0
        n = len(ph.lesions)
        counts[n] += 1
        assert ((ph.label == 2).sum() > 0) == (n > 0)
        assert ph.text == describe(ph.lesions)
        if n == 0:
            assert ph.text == "an organ with no lesion"
        if n == 1:
            assert ph.text.startswith("one ") and ph.lesions[0].position in ph.text
    assert all(v > 0 for v in counts.values())


def test_lesions_differ_in_intensity_from_the_organ():
    ph = make_phantom(2, 128, seed=1)
    assert ph.lesions
    organ, lesion = ph.image[0][ph.label == 1], ph.image[0][ph.label == 2]
    assert abs(np.median(organ) - np.median(lesion)) > 0.15


def test_ambiguous_variant_has_two_lesions_and_text_names_the_target():
    for seed in range(15):
        ph = make_phantom(2, 96, seed, ambiguous=True)
        assert len(ph.lesions) == 2
        target, other = ph.lesions[ph.target], ph.lesions[1 - ph.target]
        assert target.position != other.position
        assert ph.text == f"the lesion in the {target.position} of the organ"
        ys, xs = np.nonzero(ph.label == 2)
        centre = np.array([ys.mean(), xs.mean()])
        assert np.linalg.norm(centre - target.center) < np.linalg.norm(centre - other.center)
        # the other lesion is drawn in the image but labelled as organ
        r = int(other.radius * 0.5)
        cy, cx = other.center.astype(int)
        assert np.all(ph.label[cy - r : cy + r, cx - r : cx + r] == 1)


@pytest.mark.parametrize("dims,layout", [(2, "folder2d"), (3, "nnunet")])
def test_written_datasets_read_back_through_the_real_readers(tmp_path, dims, layout):
    root = write_phantom_dataset(tmp_path / "ds", 3, dims, 32, seed=4)
    spec = discover_dataset(root)
    assert spec.layout == layout
    samples, problems = load_dataset(spec)
    assert problems == []
    for i, sample in enumerate(samples):
        ph = make_phantom(dims, 32, 4 * 100_000 + i)
        np.testing.assert_array_equal(sample["label"][0], ph.label)
        assert sample["text"] == ph.text
    if dims == 3:
        assert (root / "imagesTr" / "phantom_000_0000.nii.gz").is_file()
        assert spec.labels == {0: "background", 1: "organ", 2: "lesion"}
