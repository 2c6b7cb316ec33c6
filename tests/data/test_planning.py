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
    shapes = [(200, 180, 9), (220, 200, 11), (240, 210, 10)]
    patch = plan_patch([], shapes, 3)
    assert patch == [96, 96, 10]
    assert round_up([96, 96, 9], [16, 16, 2]) == [96, 96, 10]


def test_denoiser_strides_skip_short_latent_axes():
    assert plan_denoiser_strides([8, 8, 5], 2) == [[2, 2, 2]]
    assert plan_denoiser_strides([8, 8, 2], 2) == [[2, 2, 1]]
