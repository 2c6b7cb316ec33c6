"""The benchmarks' UNet baselines see the augmentation `latentseg train` would plan for their budget."""

from benchmarks.unet_baseline import as_train_plans, bar_network
from latentseg.config import load_config


def test_auto_augmentation_follows_the_budget_as_train_plans_it() -> None:
    config = load_config(None, ["train.steps=1000000"])  # "auto": a step count alone would mean on
    assert as_train_plans(config, 15 * 60).data.augmentation == "off"
    assert as_train_plans(config, 90 * 60).data.augmentation == "on"
    assert config.data.augmentation == "auto"  # the caller's config is left as it was


def test_an_explicit_choice_is_kept() -> None:
    config = load_config(None, ["data.augmentation=on"])
    assert as_train_plans(config, 60).data.augmentation == "on"


def test_report_fills_an_empty_table_block_without_eating_the_next(tmp_path, monkeypatch) -> None:
    from benchmarks import report

    readme = tmp_path / "README.md"
    readme.write_text("a\n<!-- table:x -->\n<!-- /table -->\nkept\n<!-- table:y -->\nold\n<!-- /table -->\n")
    monkeypatch.setattr(report, "rendered", lambda: {"x": "| x |", "y": "| y |"})
    assert report.update_readme(readme) == ["x", "y"]
    expected = "a\n<!-- table:x -->\n| x |\n<!-- /table -->\nkept\n<!-- table:y -->\n| y |\n<!-- /table -->\n"
    assert readme.read_text() == expected


def test_auto_batch_size_is_planned_per_dimension() -> None:
    config = load_config(None, [])
    config.model.spatial_dims = 3
    assert as_train_plans(config, 60).train.batch_size == 2
    config.model.spatial_dims = 2
    assert as_train_plans(config, 60).train.batch_size == 8


def test_rescoring_finds_each_methods_predictions() -> None:
    from benchmarks.uncertainty import WORK, _pred_folder

    assert _pred_folder("bubil", "latentseg_seed3_k5eta1") == WORK / "bubil" / "latentseg_seed3" / "pred_k5eta1"
    assert _pred_folder("bubil", "latentseg_seed3") == WORK / "bubil" / "latentseg_seed3" / "pred"
    assert _pred_folder("bubil", "latentseg") == WORK / "bubil" / "latentseg" / "pred"
    assert _pred_folder("bubil", "unet_temperature") == WORK / "bubil" / "unet_temperature" / "pred"


def test_collecting_keeps_the_rows_of_earlier_sessions(tmp_path) -> None:
    import json

    from benchmarks.lanes import merged_runs

    out = tmp_path / "r.json"
    out.write_text(json.dumps({"bubil": {"old": {"dataset": "bubil", "method": "old", "dice": 0.5}}}))
    runs = [{"dataset": "bubil", "method": "new", "dice": 0.6}, {"dataset": "phantoms", "method": "new", "dice": 0.7}]
    merged = merged_runs(out, runs)
    assert set(merged["bubil"]) == {"old", "new"} and merged["phantoms"]["new"]["dice"] == 0.7
    assert merged_runs(tmp_path / "none.json", runs[:1]) == {"bubil": {"new": runs[0]}}


def test_acdc_uncertainty_split_keeps_each_patient_on_one_side(tmp_path, monkeypatch) -> None:
    import csv

    import pytest

    from benchmarks import uncertainty
    from latentseg.data.splits import patient_of

    if not (uncertainty.SHARED / "acdc" / "dataset.json").is_file():
        pytest.skip("../shared/data/acdc not present")
    monkeypatch.setattr(uncertainty, "WORK", tmp_path)
    data = uncertainty.prepare("acdc")
    with open(data["split"]) as fh:
        side = {r["case"]: r["split"] for r in csv.DictReader(fh)}
    by_patient: dict[str, set[str]] = {}
    for case, split in side.items():
        by_patient.setdefault(patient_of(case), set()).add(split)
    assert all(len(sides) == 1 for sides in by_patient.values())
    assert sum(s == "val" for s in side.values()) == 4  # the last 3 training cases are 2 patients' 4 frames
    assert sorted(p.name for p in data["images"].iterdir()) == sorted(p.name for p in data["raters"][0].iterdir())
    assert data["cases"] == 20


def test_the_benchmark_unet_has_the_bars_depth() -> None:
    acdc = [[2, 2, 1], [2, 2, 1], [2, 2, 2], [2, 2, 1]]
    assert bar_network(3, acdc) == ((16, 32, 64, 128), acdc[:3])  # plain_unet.py: 4 levels in 3D
    assert bar_network(2, [[2, 2]] * 4) == ((16, 32, 64, 128, 256), [[2, 2]] * 4)
    assert bar_network(2, []) == ((16, 32, 64, 128, 256), [2, 2, 2, 2])
    assert bar_network(3, [[2, 2, 2]] * 2) == ((16, 32, 64), [[2, 2, 2]] * 2)  # a shallower plan stays so


def test_inference_breakdown_times_each_part_that_sampling_calls() -> None:
    import torch

    from benchmarks.inference import PARTS, timed_parts
    from benchmarks.step_cost import latentseg_model
    from latentseg.config import SampleConfig

    model, _, _ = latentseg_model(2, [32, 32], [1.0, 1.0], 2, [])
    seconds = timed_parts(model.eval())
    probs = model.sample(torch.randn(1, 1, 32, 32), SampleConfig(steps=1, num_samples=2))
    assert probs.shape == (2, 1, 2, 32, 32)  # the wrapped methods still return what they did
    assert set(seconds) == set(PARTS) and all(s > 0 for s in seconds.values())


def test_path_swap_puts_back_the_clean_windows_entry_in_order() -> None:
    import torch

    from benchmarks.robustness import PATHS, PathSwap, one_noisy_level

    class Fake:
        def conditioning(self, image, text=None):
            return {"z_image": image * 2, "image_features": [image * 3]}

    model = Fake()
    swap = PathSwap(model)
    clean = [torch.full((1,), float(i)) for i in range(3)]
    swap.set("record")
    for window in clean:
        model.conditioning(window)
    swap.set(PATHS["noisy skips, clean latent"])
    noisy = [model.conditioning(w + 10) for w in clean]
    assert [c["z_image"].item() for c in noisy] == [0.0, 2.0, 4.0]  # the clean windows', in order
    assert [c["image_features"][0].item() for c in noisy] == [30.0, 33.0, 36.0]  # the noisy ones
    swap.set(one_noisy_level(0))
    mixed = model.conditioning(clean[0] + 10)  # the first window again: clean but for its skip
    assert (mixed["z_image"].item(), mixed["image_features"][0].item()) == (0.0, 30.0)
    swap.set("plain")
    assert model.conditioning(clean[1] + 10)["z_image"].item() == 22.0


def test_path_dice_without_noise_scores_every_variant_alike(tmp_path, data2d) -> None:
    from benchmarks.robustness import PATHS, path_dice
    from latentseg.cli import main
    from tests.conftest import TINY_2D

    out = tmp_path / "model"
    settings = [*TINY_2D, "train.steps=4", "model.decoder_skips=true", "model.num_downsamplings=2"]
    assert main(["train", "--data", str(data2d["train"]), "--out", str(out), *settings]) == 0
    result = path_dice(out, data2d["test"] / "images", data2d["test"] / "masks", sigma=0.0, levels=True, cases=2)
    levels = {k for k in result["dice"] if k.startswith("noisy skip level")}
    assert set(result["dice"]) == {"clean", "noisy", *PATHS, *levels} and levels and result["cases"] == 2
    assert len(set(result["dice"].values())) == 1


def test_the_benchmarks_extra_averages_follow_the_training_rule() -> None:
    """benchmarks.averaging keeps its other decays by an optimizer hook; they must equal what
    `WeightAverage` (what training saves) gives with the same decay."""
    import torch

    from benchmarks.averaging import ExtraAverages
    from latentseg.averaging import WeightAverage

    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    reference = WeightAverage(model, 0.5)
    with ExtraAverages([0.5]) as extra:
        for step in range(1, 6):
            optimizer.zero_grad()
            model(torch.randn(4, 3)).square().sum().backward()
            optimizer.step()
            reference.update(step)
    for mine, (name, theirs) in zip(extra.averages[0.5], reference.average.items(), strict=True):
        torch.testing.assert_close(mine, theirs, msg=name)
    assert not torch.equal(reference.average["weight"], model.weight)


def test_the_benchmarks_extra_average_with_the_default_decay_is_the_saved_one(data2d, tmp_path) -> None:
    """End to end through `train`: an extra average kept with the default decay, mapped to names
    as benchmarks.averaging maps them, equals the average that training saved."""
    import torch

    from benchmarks.averaging import ExtraAverages, trained_names
    from latentseg.checkpoint import STATE_FILE, read_train_state
    from latentseg.cli import main
    from latentseg.config import TrainConfig
    from tests.conftest import TINY_2D

    out = tmp_path / "m"
    with ExtraAverages([TrainConfig().ema_decay]) as extra:
        assert main(["train", "--data", str(data2d["train"]), "--out", str(out), *TINY_2D, "train.steps=8"]) == 0
    saved = read_train_state(out / STATE_FILE).average
    names = trained_names(out, saved)
    assert sorted(names) == sorted(saved) and names != sorted(names)  # the model's order, not the file's
    for name, mine in zip(names, extra.averages[TrainConfig().ema_decay], strict=True):
        torch.testing.assert_close(mine, saved[name], msg=name)


def test_uncertainty_variants_on_their_own_grid_drop_the_pinned_spacing() -> None:
    from benchmarks.uncertainty import BASELINE_VARIANTS, COMMON, DATASETS, LATENTSEG

    pinned = COMMON + DATASETS["bubil"]["settings"]
    assert load_config(None, pinned).data.spacing == [4.0, 4.0]
    unet = load_config(None, pinned + BASELINE_VARIANTS["mc_dropout_g1"][1]).data
    assert unet.spacing == [] and unet.grid_factor == 1 and unet.patch_size == [128, 128]
    planned = load_config(None, pinned + LATENTSEG["latentseg_planned"]).data
    assert planned.spacing == [] and planned.grid_factor == "auto" and planned.patch_size == []


def test_uncertainty_lanes_linking_the_same_test_files_do_not_clash(tmp_path) -> None:
    from benchmarks.uncertainty import _links

    source = tmp_path / "a.png"
    source.write_bytes(b"x")
    _links(tmp_path / "links", [source])
    _links(tmp_path / "links", [source])  # a second lane, after the first made the link
    assert (tmp_path / "links" / "a.png").resolve() == source
