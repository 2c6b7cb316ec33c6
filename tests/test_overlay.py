import numpy as np
from PIL import Image

from latentseg.overlay import GAP, TITLE_HEIGHT, colour_panels, save_overlay


def _case(shape):
    rng = np.random.default_rng(0)
    image = rng.random((1, *shape)).astype(np.float32)
    label = np.zeros(shape, np.uint8)
    label[4:12, 4:12] = 1
    uncertainty = np.zeros(shape)
    uncertainty[8, 8] = 0.3
    return image, label, uncertainty


def test_three_panels_side_by_side_with_labels_only_where_predicted(tmp_path):
    image, label, uncertainty = _case((160, 160))
    save_overlay(tmp_path / "o.png", image, label, uncertainty)
    picture = np.asarray(Image.open(tmp_path / "o.png"))
    assert picture.shape == (160 + TITLE_HEIGHT, 3 * 160 + 2 * GAP, 3)
    grey, labelled, heat = (picture[TITLE_HEIGHT:, k * (160 + GAP) : k * (160 + GAP) + 160] for k in range(3))
    assert (grey[..., 0] == grey[..., 2]).all()  # the image panel is grey
    assert not np.array_equal(labelled[4:12, 4:12], grey[4:12, 4:12])  # coloured where labelled
    np.testing.assert_array_equal(labelled[20:, 20:], grey[20:, 20:])  # untouched elsewhere
    assert heat[8, 8].sum() > heat[0, 0].sum()  # the uncertain pixel is bright
    assert (picture[:TITLE_HEIGHT] < 128).any()  # titles are written


def test_small_and_3d_images_are_enlarged_and_sliced(tmp_path):
    image, label, uncertainty = _case((16, 16))
    volume = np.stack([label * 0, label, label * 0], -1)  # only the middle slice is labelled
    save_overlay(tmp_path / "o.png", np.stack([image] * 3, -1), volume, np.stack([uncertainty] * 3, -1))
    picture = np.asarray(Image.open(tmp_path / "o.png"))
    assert picture.shape[0] == 128 + TITLE_HEIGHT  # 16 px enlarged 8 times
    _, labelled, _ = colour_panels(image, label, uncertainty)
    np.testing.assert_array_equal(picture[TITLE_HEIGHT::8, 128 + GAP :: 8][:16, :16], labelled)
