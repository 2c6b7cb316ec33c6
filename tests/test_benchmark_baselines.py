"""The benchmarks' UNet baselines see the augmentation `latentseg train` would plan for their budget."""

from benchmarks.unet_baseline import planned_augmentation
from latentseg.config import load_config


def test_auto_augmentation_follows_the_budget_as_train_plans_it() -> None:
    config = load_config(None, ["train.steps=1000000"])  # "auto": a step count alone would mean on
    assert planned_augmentation(config, 15 * 60).data.augmentation == "off"
    assert planned_augmentation(config, 90 * 60).data.augmentation == "on"
    assert config.data.augmentation == "auto"  # the caller's config is left as it was


def test_an_explicit_choice_is_kept() -> None:
    config = load_config(None, ["data.augmentation=on"])
    assert planned_augmentation(config, 60).data.augmentation == "on"
