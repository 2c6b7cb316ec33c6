from latentseg.data.planning import plan_denoiser_strides, plan_patch, plan_strides, round_up, total_stride


def test_isotropic_plans_match_the_paper_defaults():
    assert plan_strides([128, 128], [1, 1], 4) == [[2, 2]] * 4
    assert plan_strides([96, 96, 96], [1, 1, 1], 4) == [[2, 2, 2]] * 4


def test_few_slices_are_not_downsampled_below_four():
    strides = plan_strides([128, 128, 10], [1, 1, 1], 4)
    assert strides == [[2, 2, 2], [2, 2, 1], [2, 2, 1], [2, 2, 1]]
    assert total_stride(strides, 3) == [16, 16, 2]


def test_coarse_slice_spacing_waits_for_the_other_axes():
    strides = plan_strides([160, 160, 40], [1.5, 1.5, 10.0], 4)
    assert [s[2] for s in strides] == [1, 1, 2, 2]  # in-plane spacing reaches 6 >= 10/2 at stage 3


def test_patch_shrinks_to_the_median_image_and_rounds_to_the_stride():
    shapes = [(200, 180, 70), (220, 60, 80), (240, 60, 60)]
    assert plan_patch([], shapes, 3) == [96, 60, 70]
    assert round_up([96, 96, 9], [16, 16, 2]) == [96, 96, 10]


def test_denoiser_strides_skip_short_latent_axes():
    assert plan_denoiser_strides([8, 8, 5], 2) == [[2, 2, 2]]
    assert plan_denoiser_strides([8, 8, 2], 2) == [[2, 2, 1]]


# --- the latent planned from the labels (issue 16) ---------------------------------------------

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from latentseg.data.planning import foreground_window, frozen_axes, label_ceiling, plan_latent  # noqa: E402


def disc(shape, radius, centre=None) -> np.ndarray:
    grid = np.indices(shape)
    centre = centre or [s / 2 for s in shape]
    return (sum((g - c) ** 2 for g, c in zip(grid, centre, strict=True)) <= radius**2).astype(np.int64)


def test_label_ceiling_is_one_for_blocks_on_the_grid_and_low_for_thin_lines():
    block = np.zeros((64, 64), np.int64)
    block[16:48, 16:48] = 1  # aligned with 16-voxel cells: only the corners round off (bilinear upsampling)
    assert 0.94 < label_ceiling([block], 2, [16, 16])[0] < 1.0
    assert label_ceiling([block], 2, [4, 4])[0] > 0.995
    line = np.zeros((64, 64), np.int64)
    line[:, 31] = 1  # one voxel wide: pooling by 4 leaves a quarter of a cell
    assert label_ceiling([line], 2, [4, 4])[0] < 0.5
    assert label_ceiling([line], 2, [1, 1]) == [1.0]


def whole_image_ceiling(label: np.ndarray, num_classes: int, total: list[int]) -> list[float]:
    """The label ceiling computed on the whole image, as it was before the foreground window."""
    y = torch.as_tensor(label).long()
    onehot = F.one_hot(y, num_classes).movedim(-1, 0)[None].float()
    pool, mode = (F.avg_pool2d, "bilinear") if label.ndim == 2 else (F.avg_pool3d, "trilinear")
    coarse = pool(onehot, kernel_size=total, stride=total, ceil_mode=True)
    pred = F.interpolate(coarse, size=tuple(y.shape), mode=mode)[0].argmax(0)
    return [
        float(2 * ((pred == c) & (y == c)).sum() / ((pred == c).sum() + (y == c).sum())) for c in range(1, num_classes)
    ]


@pytest.mark.parametrize("total", [[4, 4, 2], [8, 8, 4], [16, 16, 4]])
def test_the_foreground_window_gives_the_whole_image_ceiling(total):
    """A small organ of two classes in a large volume (as in CT): measured on the window around it,
    the ceiling is the whole image's, class by class."""
    label = np.zeros((192, 160, 40), np.int64)
    label[40:60, 30:52, 10:19] = disc((20, 22, 9), 8, [9.5, 10.5, 4]) * 2
    label[44:49, 35:41, 12:16] = 1
    window = foreground_window(label, total)
    assert label[window].size < label.size / 4
    assert label_ceiling([label], 3, total) == pytest.approx(whole_image_ceiling(label, 3, total), abs=1e-6)
    assert foreground_window(np.zeros_like(label), total) is None


def test_thin_slices_freeze_the_slice_axis():
    volume = np.stack([disc((64, 64), 20 - 3 * k) for k in range(6)], axis=-1)  # each slice differs
    volume[..., 1::2] *= 0  # alternate empty slices: halving that axis merges them
    assert frozen_axes([volume], 2, 3) == [2]
    assert frozen_axes([disc((64, 64, 64), 20)], 2, 3) == []
    assert frozen_axes([disc((128, 128), 3)], 2, 2) == []  # 2D has no slice axis, however small the object


def test_plan_latent_takes_the_coarsest_latent_that_holds_every_class():
    big = disc((128, 128), 40)
    latent = plan_latent([big], 2, [128, 128], [1.0, 1.0], threshold=0.95, min_downsamplings=2)
    assert latent["decoder_skips"] is False and latent["num_downsamplings"] >= 3
    assert set(latent["ceilings"]) == {1, 2, 3, 4}
    small = disc((128, 128), 3)  # a structure a coarse latent cannot hold: skips, at the coarsest latent
    latent = plan_latent([small], 2, [128, 128], [1.0, 1.0], threshold=0.98, min_downsamplings=3)
    assert latent["decoder_skips"] is True and latent["num_downsamplings"] == 4
    assert min(latent["ceilings"][4]) < 0.98
    # skips refused: the workable latent that keeps the most of the structure, not the coarsest
    medium = disc((128, 128), 8)  # ceiling 0.91 at 1/8, lost at 1/16
    latent = plan_latent([medium], 2, [128, 128], [1.0, 1.0], threshold=0.98, min_downsamplings=3, skips=False)
    assert latent["decoder_skips"] is False and latent["num_downsamplings"] == 3
    assert min(latent["ceilings"][3]) > 0.9 > min(latent["ceilings"][4])


@pytest.mark.parametrize(
    "setting", ["model.num_downsamplings=2", "model.decoder_skips=false", "model.decoder_fuse_kernel=3"]
)
def test_the_planned_latent_can_be_overridden(tmp_path, data2d, setting):
    import json

    from latentseg.cli import main
    from tests.conftest import TINY_2D

    out = tmp_path / "m"
    settings = [s for s in TINY_2D if "channels" not in s]
    assert main(["train", "--data", str(data2d["train"]), "--out", str(out), *settings, setting]) == 0
    plan = json.loads((out / "plans.json").read_text())
    key, value = setting.split("=")[0].split(".")[1], setting.split("=")[1]
    assert str(plan["model"][key]).lower() == value
    assert plan["latent"]["ceilings"]  # the measured ceilings are kept either way
    assert "1" in plan["latent"]["ceilings"]


def test_attention_only_where_the_tokens_are_few():
    from latentseg.data.prepare import attention_stages_within

    assert attention_stages_within([256, 256], [[2, 2]] * 4, 2) == 2  # 32^2 = 1024 and 16^2 tokens
    assert attention_stages_within([128, 128, 8], [[2, 2, 1]] * 4, 3) == 1  # 16x16x8 = 2048 is too many


def test_attention_tokens_are_counted_on_the_patch_the_network_sees():
    """ACDC's plan: 9 slices rounded up to 10, so the 1/8 stage holds 16x16x5 = 1280 tokens (too
    many); counted on the 9 slices before rounding it held 16x16x4 = 1024 and kept attention."""
    from latentseg.config import load_config
    from latentseg.data.prepare import plan_network

    config = load_config(None, ["model.num_downsamplings=4", "model.decoder_skips=true"])
    config.model.spatial_dims = 3
    plan_network(config, [(216, 256, 9)], [1.5, 1.5, 10.0])
    assert config.data.patch_size == [128, 128, 10]
    assert config.model.strides == [[2, 2, 1], [2, 2, 1], [2, 2, 2], [2, 2, 1]]
    assert config.model.attention_stages == 1


def test_thin_slices_are_halved_late_when_the_decoder_has_skips():
    """Alternate empty slices: halving the slice axis alone loses the class, so with skips it is
    halved only in the coarse half of the stages (the decoder's fine skips keep the slices apart)."""
    volume = np.stack([disc((96, 96), 30 - 2 * k) for k in range(10)], axis=-1)
    volume[..., 1::2] = 0
    latent = plan_latent([volume], 2, [96, 96, 10], [1.0, 1.0, 1.0], threshold=0.98, min_downsamplings=3)
    assert latent["decoder_skips"] is True and latent["thin_axes"] == [2]
    strides = plan_strides([96, 96, 10], [1.0, 1.0, 1.0], 4, latent["frozen_axes"], latent["thin_axes"])
    assert [s[2] for s in strides] == [1, 1, 2, 1]
    assert plan_strides([96, 96, 10], [1.0, 1.0, 1.0], 4)[0] == [2, 2, 2]  # without: halved first


def test_short_time_budgets_take_smaller_2d_patches():
    shapes = [(512, 512)] * 3
    assert plan_patch([], shapes, 2) == [256, 256]  # by steps: as before
    assert plan_patch([], shapes, 2, budget_minutes=10) == [128, 128]  # more steps in the same minutes
    assert plan_patch([], shapes, 2, budget_minutes=120) == [256, 256]
    assert plan_patch([], [(200, 200, 60)], 3, budget_minutes=10) == [96, 96, 60]  # 3D as planned
    assert plan_patch([192, 192], shapes, 2, budget_minutes=10) == [192, 192]  # asked for: kept


def test_volumes_of_few_slices_take_them_whole_and_128_in_plane():
    assert plan_patch([], [(216, 256, 9)], 3) == [128, 128, 9]  # ACDC's median shape
    assert plan_patch([], [(10, 300, 280)], 3) == [10, 128, 128]  # the slice axis first
    assert plan_patch([], [(100, 120, 9)], 3) == [100, 120, 9]  # in-plane still capped by the image
    assert plan_patch([], [(188, 139, 88)], 3) == [96, 96, 88]  # LA2018: near-isotropic, as before
    assert plan_patch([], [(200, 200, 60)], 3) == [96, 96, 60]  # 60 slices: more than a quarter of 200
    assert plan_patch([96, 96, 9], [(216, 256, 9)], 3) == [96, 96, 9]  # asked for: kept


def test_label_encoder_training_is_planned_from_the_decoder_skips():
    from latentseg.config import ModelConfig
    from latentseg.data.prepare import plan_label_encoder_training

    def planned(multi_rater=True, **kw) -> tuple:
        m = ModelConfig(**kw)
        plan_label_encoder_training(m, multi_rater)
        return m.latent_reconstruction, m.diffusion_trains_label_encoder

    assert planned(decoder_skips=True) == (True, False)  # annotators + skips: it learns from its own latent
    assert planned(decoder_skips=True, multi_rater=False) == (False, True)  # one mask per case: 003
    assert planned(decoder_skips=False) == (False, True)  # no skips: 003 end to end
    assert planned(decoder_skips=True, diffusion_trains_label_encoder=True) == (False, True)
    assert planned(decoder_skips=False, diffusion_trains_label_encoder=False) == (True, False)
    assert planned(decoder_skips=True, latent_reconstruction=False) == (False, True)


def test_sampling_is_planned_from_the_annotators_and_kept_when_set():
    from latentseg.config import SampleConfig, concrete_sampling
    from latentseg.data.prepare import plan_sampling

    single, multi, fixed, eps = SampleConfig(), SampleConfig(), SampleConfig(steps=3), SampleConfig()
    plan_sampling(single, multi_rater=False)
    plan_sampling(multi, multi_rater=True)
    plan_sampling(fixed, multi_rater=True)
    plan_sampling(eps, multi_rater=False, prediction_type="eps")
    assert (single.steps, single.eta) == (1, 0.0)  # x0 prediction, one annotator: one step
    assert (eps.steps, eps.eta) == (2, 0.0)
    assert (multi.steps, multi.eta, multi.num_samples) == (10, 1.0, 4)  # several annotators: always sampled
    assert single.num_samples == "auto"  # one annotator: planned from the validation samples at the end
    assert (fixed.steps, fixed.eta) == (3, 1.0)
    unplanned = concrete_sampling(SampleConfig())  # a model saved before sampling was planned
    assert (unplanned.steps, unplanned.eta, unplanned.num_samples) == (2, 0.0, 4)


def test_the_decoder_fuses_skips_pointwise_unless_told():
    from latentseg.config import load_config
    from latentseg.data.prepare import plan_network

    def planned(*overrides) -> object:
        config = load_config(None, ["model.decoder_skips=true", *overrides])
        config.model.spatial_dims, config.data.patch_size = 2, [64, 64]
        plan_network(config, [(64, 64)], [1.0, 1.0])
        return config.model.decoder_fuse_kernel

    assert planned() == 1
    assert planned("model.decoder_fuse_kernel=3") == 3


# --- the grid: coarser than the images' own where the structures outgrow the patch -----------

from latentseg.data.planning import grid_ceiling, plan_grid_factor, structure_extent  # noqa: E402


def _disc(size: int, radius: float, centre: tuple[float, float] | None = None) -> np.ndarray:
    yy, xx = np.mgrid[:size, :size]
    cy, cx = centre or (size / 2, size / 2)
    return ((yy - cy) ** 2 + (xx - cx) ** 2 <= radius**2).astype(np.int64)


def test_structure_extent_takes_each_case_largest_component_and_the_median_over_cases():
    a = np.zeros((64, 64), np.int64)
    a[2:12, 3:33] = 1  # 10 x 30, the largest
    a[40:45, 40:45] = 1  # 5 x 5
    b = np.zeros((64, 64), np.int64)
    b[5:25, 5:15] = 2  # 20 x 10, any foreground class
    c = np.zeros((64, 64), np.int64)
    c[0:40, 0:50] = 1  # 40 x 50
    assert structure_extent([a, b, c], 2) == [20.0, 30.0]
    assert structure_extent([np.zeros((8, 8), np.int64)], 2) == [0.0, 0.0]


def test_grid_ceiling_scores_the_background_too():
    # thin background lines between large foreground blocks (EM membranes): the foreground survives
    # halving, the background lines do not
    label = np.ones((64, 64), np.int64)
    label[::16, :] = 0
    label[:, ::16] = 0
    background, foreground = grid_ceiling([label], 2, 2, 2)
    assert foreground > 0.95 and background < 0.8
    assert grid_ceiling([label], 2, 2, 2)[1:] == label_ceiling([label], 2, [2, 2])


def _patch_of(size: int, patch: int):
    return lambda f: [min(patch, size // f)] * 2


def test_grid_stays_where_structures_fit_in_two_patches():
    labels = [_disc(128, 30)] * 3  # 61 pixels across, patch 32: 1.9 patches
    grid = plan_grid_factor(labels, 2, _patch_of(128, 32))
    assert grid["factor"] == 1 and grid["ceilings"] == {}


def test_grid_coarsens_until_a_large_structure_fits():
    labels = [_disc(256, 100, (128 + d, 128 - d)) for d in (-3, 0, 3)]  # 201 across, patch 32: 6.3 patches
    grid = plan_grid_factor(labels, 2, _patch_of(256, 32))
    assert grid["factor"] == 4 and set(grid["ceilings"]) == {2, 4}  # 1/2: 3.1 patches; 1/4: 1.6
    assert min(grid["ceilings"][4]) >= 0.98
    assert plan_grid_factor(labels, 2, _patch_of(256, 64))["factor"] == 2  # 1/2: 1.6 patches of 64


def test_grid_keeps_thin_structures_whole():
    # a large structure of thin lines (a vessel tree's span): coarser grids would lose the lines
    label = np.zeros((256, 256), np.int64)
    label[20:230:12, 20:230] = 1
    label[20:230, 20] = 1
    grid = plan_grid_factor([label] * 2, 2, _patch_of(256, 32))
    assert grid["factor"] == 1 and min(grid["ceilings"][2]) < 0.98 and 4 not in grid["ceilings"]
