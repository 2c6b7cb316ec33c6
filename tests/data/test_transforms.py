import numpy as np
import pytest

from latentseg.config import load_config
from latentseg.data.phantoms import make_phantom
from latentseg.data.transforms import flip_word_pairs, swap_words, train_transforms
from latentseg.errors import LatentSegError
from latentseg.plan import check_settings

PAIRS = [("upper", "lower"), ("left", "right")]


def test_swap_words_whole_words_in_any_case():
    assert swap_words("the lesion in the upper left", PAIRS) == "the lesion in the lower right"
    assert swap_words("Upper-left and LEFT, Right.", PAIRS) == "Lower-right and RIGHT, Left."
    assert swap_words("leftover uppermost bright", PAIRS) == "leftover uppermost bright"
    assert swap_words("", PAIRS) == "" and swap_words("upper", []) == "upper"


def test_flip_word_pairs_parse_and_refuse():
    assert flip_word_pairs(["0:upper/lower", " 1 : Left / Right "]) == {0: [("upper", "lower")], 1: [("left", "right")]}
    for bad in ["upper/lower", "0:upper", "x:a/b", "0:a/b/c"]:
        with pytest.raises(ValueError, match="AXIS:word/word"):
            flip_word_pairs([bad])
    with pytest.raises(ValueError, match="axis 2 of 2D"):
        flip_word_pairs(["2:front/back"], spatial_dims=2)
    assert flip_word_pairs(["auto"], 2)[1] == [("left", "right")]
    assert ("superior", "inferior") in flip_word_pairs(["auto"], 3)[2]  # RAS: axis 2 runs foot to head
    assert flip_word_pairs(["auto"]) == {} and flip_word_pairs([], 2) == {}
    with pytest.raises(LatentSegError, match="AXIS:word/word"):
        check_settings(load_config(None, ["data.text_flip_words=[upper-lower]"]))


def _quadrant(mask: np.ndarray) -> str:
    """Where the mask's centre of mass sits, in the phantom's words (axis 0 rows, axis 1 columns)."""
    rows, cols = np.nonzero(mask)
    vertical = "upper" if rows.mean() < mask.shape[0] / 2 else "lower"
    return f"{vertical} {'left' if cols.mean() < mask.shape[1] / 2 else 'right'}"


def test_flips_keep_the_sentence_true_of_the_image():
    """Ambiguous phantoms: after every random flip the sentence still names the target's quadrant
    (relative to the image centre, which is near the organ's)."""
    config = load_config(None, ["data.rotation_degrees=0", "data.intensity_augmentation=false", "data.augmentation=on"])
    phantom = make_phantom(2, 64, seed=3, ambiguous=True)
    target = phantom.label == 2
    assert phantom.text.endswith(f"{_quadrant(target)} of the organ")
    sample = {"image": phantom.image, "label": phantom.label[None].astype(np.float32), "text": phantom.text}
    transform = train_transforms([64, 64], config.data)
    transform.set_random_state(seed=0)
    texts = set()
    for _ in range(24):
        (out,) = transform(dict(sample))
        label = np.asarray(out["label"])[0]
        assert out["text"].endswith(f"{_quadrant(label == 2)} of the organ"), out["text"]
        texts.add(out["text"])
    assert len(texts) == 4  # every flip combination occurred

    plain = train_transforms([64, 64], config.data, swap_text=False)  # prompts: words stay
    plain.set_random_state(seed=0)
    assert {plain(dict(sample))[0]["text"] for _ in range(8)} == {phantom.text}


def test_uniform_patch_sampling_puts_a_share_of_patches_on_the_foreground():
    """nnU-Net's placement (`data.patch_sampling=uniform`): one patch in three centred on a random
    foreground voxel, the others anywhere; every patch lies inside the (padded) image."""
    from latentseg.config import DataConfig

    config = DataConfig(flips=False, rotation_degrees=0, intensity_augmentation=False, foreground_fraction=0.5)
    config.augmentation = "off"
    transform = train_transforms([16, 16], config)
    transform.set_random_state(seed=0)
    image = np.random.default_rng(0).random((1, 40, 30)).astype(np.float32)
    label = np.zeros((1, 40, 30), np.int64)
    label[0, 36:38, 26:28] = 1  # a corner a uniform patch rarely reaches
    hits = 0
    for _ in range(400):
        (out,) = transform({"image": image, "label": label, "text": ""})
        assert tuple(out["image"].shape) == (1, 16, 16)
        hits += int(out["label"].sum() > 0)
    assert 0.5 <= hits / 400 <= 0.75  # a half centred, plus the uniform patches that happen to reach it


def test_unplanned_auto_augmentation_is_refused_not_taken_as_on():
    from latentseg.config import DataConfig

    with pytest.raises(ValueError, match="plan the config"):
        train_transforms([16, 16], DataConfig(augmentation="auto"))


def test_noise_augmentation_adds_noise_relative_to_each_channels_range():
    """`data.noise_augmentation=S` (003 Eq. 19 in training): on a share of patches, Gaussian noise with
    a standard deviation drawn up to S of each channel's range; the label is untouched."""
    from latentseg.config import DataConfig

    config = DataConfig(noise_augmentation=0.2, noise_probability=0.5)
    config.augmentation = "off"
    transform = train_transforms([32, 32], config)
    transform.set_random_state(seed=0)
    ramp = np.linspace(0.0, 1.0, 32 * 32, dtype=np.float32).reshape(32, 32)
    image = np.stack([ramp, 1000.0 * ramp])  # two channels, ranges 1 and 1000
    label = (ramp > 0.5).astype(np.int64)[None]
    noisy, spreads = 0, []
    for _ in range(200):
        (out,) = transform({"image": image, "label": label, "text": ""})
        residual = np.asarray(out["image"]) - image
        assert np.array_equal(np.asarray(out["label"]), label)
        if np.abs(residual).max() > 0:
            noisy += 1
            relative = residual.std(axis=(1, 2)) / np.array([1.0, 1000.0])
            np.testing.assert_allclose(relative[0], relative[1], rtol=0.15)  # same share of each range
            spreads.append(relative[0])
    assert 80 <= noisy <= 120  # noise_probability 0.5
    assert max(spreads) <= 0.2 * 1.05 and min(spreads) < 0.05 and max(spreads) > 0.15  # sigma ~ U(0, 0.2)
    config.noise_augmentation = 0.0
    (out,) = train_transforms([32, 32], config)({"image": image, "label": label, "text": ""})
    assert np.array_equal(np.asarray(out["image"]), image)  # off by default


class _PadThenCrop:
    """The crop as it was until 2026-12-07 (MONAI's SpatialPadd over the whole image, then a
    foreground-centred or uniform window of the padded arrays): the oracle of the one-step crop."""

    def __init__(self, patch, foreground, seed):
        from monai.transforms import SpatialPadd

        self.pad = SpatialPadd(["image", "label"], spatial_size=patch)
        self.patch, self.foreground = patch, foreground
        self.R = np.random.RandomState(seed)

    def __call__(self, d):
        d = self.pad(d)
        label, shape = d["label"], d["label"].shape[1:]
        if self.R.random() < self.foreground and bool((label[0] > 0).any()):
            voxels = (label[0] > 0).nonzero()
            centre = [int(v) for v in voxels[self.R.randint(len(voxels))]]
            start = [min(max(0, c - p // 2), s - p) for c, p, s in zip(centre, self.patch, shape, strict=True)]
        else:
            start = [self.R.randint(0, s - p + 1) for p, s in zip(self.patch, shape, strict=True)]
        window = (slice(None), *(slice(a, a + p) for a, p in zip(start, self.patch, strict=True)))
        return {k: np.asarray(d[k][window]) for k in ("image", "label")}


@pytest.mark.parametrize("shape", [(40, 30, 12), (20, 9, 7)])  # larger than the patch, and smaller on two axes
def test_the_one_step_crop_draws_what_pad_then_crop_drew(shape):
    """Same seed, same patches as padding the whole image first; on a memory-mapped file as well,
    reading only the patch."""
    import tempfile

    from latentseg.data.transforms import RandForegroundCropd

    rng = np.random.default_rng(0)
    image = rng.random((2, *shape)).astype(np.float32)
    label = np.zeros((1, *shape), np.uint8)
    label[0, 3:6, 2:5, 1:4] = 1
    patch = [16, 16, 8]
    new = RandForegroundCropd(["image", "label"], patch, 0.5)
    new.set_random_state(seed=3)
    old = _PadThenCrop(patch, 0.5, seed=3)
    with tempfile.TemporaryDirectory() as tmp:
        np.save(f"{tmp}/image.npy", image)
        mapped = np.load(f"{tmp}/image.npy", mmap_mode="r")
        for k in range(60):
            (out,) = new({"image": mapped if k % 2 else image, "label": label})
            expected = old({"image": image, "label": label})
            assert not isinstance(out["image"], np.memmap) and tuple(out["image"].shape) == (2, *patch)
            assert np.array_equal(out["image"], expected["image"]) and np.array_equal(out["label"], expected["label"])


def test_stored_foreground_voxels_centre_the_patches():
    """A sample kept on disk carries a sample of its foreground voxels; the centred patches use it."""
    from latentseg.data.transforms import RandForegroundCropd

    label = np.zeros((1, 64, 64), np.uint8)
    label[0, 50:52, 10:12] = 1
    crop = RandForegroundCropd(["image", "label"], [8, 8], 1.0)
    crop.set_random_state(seed=0)
    stored = np.argwhere(label[0] > 0)[:1]  # one voxel: every patch is centred on it
    for _ in range(5):
        (out,) = crop({"image": label.astype(np.float32), "label": label, "foreground": stored})
        assert "foreground" not in out and out["label"][0, 4, 4] == 1
