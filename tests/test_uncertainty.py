"""Calibration, error detection and agreement with annotators (issue 17): the maths against
torchmetrics / scikit-learn and a hand-computed case, and the files `evaluate` reads."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from latentseg.cli import main
from latentseg.data.phantoms import write_phantom_dataset
from latentseg.sampler_fit import SAMPLER_CANDIDATES, SamplerScore, choose_sampler
from latentseg.uncertainty import (
    binary_calibration,
    boundary_band,
    calibrated,
    error_auroc,
    expected_calibration_error,
    fit_temperature,
    generalized_energy_distance,
    hungarian_iou,
    iou_distance,
    mean_pairwise_iou,
    qubiq_dice,
    top_label_ece,
)

torchmetrics = pytest.importorskip("torchmetrics")


def test_ece_equals_torchmetrics_binary_and_top_label():
    from torchmetrics.classification import BinaryCalibrationError, MulticlassCalibrationError

    rng = np.random.default_rng(0)
    p = rng.random(20_000)
    y = rng.random(20_000) < p**1.7
    p[:40], p[40:80], p[80:90] = 0.0, 1.0, 1 / 15  # bin edges, and exactly 1
    oracle = BinaryCalibrationError(n_bins=15, norm="l1")(torch.tensor(p), torch.tensor(y).long())
    assert expected_calibration_error(p, y) == pytest.approx(float(oracle), abs=1e-9)
    probs = rng.dirichlet([0.5, 1, 2], size=8000).T
    ref = rng.integers(0, 3, 8000)
    oracle = MulticlassCalibrationError(num_classes=3, n_bins=15, norm="l1")(torch.tensor(probs.T), torch.tensor(ref))
    assert top_label_ece(probs, ref) == pytest.approx(float(oracle), abs=1e-6)


def test_brier_and_auroc_are_scikit_learns():
    from sklearn.metrics import brier_score_loss, roc_auc_score

    rng = np.random.default_rng(1)
    p, y = rng.random(500), rng.random(500) < 0.3
    assert binary_calibration(p, y)["Brier"] == pytest.approx(brier_score_loss(y, p))
    u, wrong = rng.random(500), rng.random(500) < 0.2
    assert error_auroc(u, wrong) == pytest.approx(roc_auc_score(wrong, u))
    assert error_auroc(u, np.zeros(500, bool)) is None  # nothing wrong: undefined


def test_perfectly_calibrated_and_confidently_wrong():
    rng = np.random.default_rng(2)
    p = rng.random(200_000)
    assert expected_calibration_error(p, rng.random(200_000) < p) < 0.01
    assert expected_calibration_error(np.full(100, 0.99), np.zeros(100, bool)) == pytest.approx(0.99)


def test_ged_and_hungarian_iou_by_hand():
    """Two raters A (4 voxels) and B (2 of them); samples A and an empty mask.
    d(A, B) = 1 - 2/4 = 0.5; d(empty, A) = d(empty, B) = 1; d(x, x) = 0.
    E d(S, Y) = (0 + 0.5 + 1 + 1) / 4 = 0.625; E d(S, S') = (0 + 1 + 1 + 0) / 4 = 0.5;
    E d(Y, Y') = (0 + 0.5 + 0.5 + 0) / 4 = 0.25; GED^2 = 1.25 - 0.5 - 0.25 = 0.5.
    Best matching: S=A to Y=A (IoU 1), S=empty to Y=B (IoU 0): HM-IoU 0.5."""
    a = np.zeros((4, 4), bool)
    a[0, :4] = True
    b = np.zeros((4, 4), bool)
    b[0, :2] = True
    empty = np.zeros((4, 4), bool)
    assert iou_distance(empty, empty) == 0.0 and iou_distance(a, b) == 0.5
    assert generalized_energy_distance([a, empty], [a, b]) == pytest.approx(0.5)
    assert hungarian_iou([a, empty], [a, b]) == pytest.approx(0.5)
    assert generalized_energy_distance([a, b], [a, b]) == pytest.approx(0.0)  # the raters' own spread
    assert mean_pairwise_iou([a, b]) == pytest.approx(0.5) and mean_pairwise_iou([a]) is None


def test_qubiq_dice_thresholds_both_maps():
    raters = [np.array([1, 1, 0, 0]), np.array([1, 0, 0, 0])]  # mean 1, .5, 0, 0
    assert qubiq_dice(np.array([1.0, 0.5, 0.0, 0.0]), raters) == pytest.approx(1.0)
    assert qubiq_dice(np.array([1.0, 1.0, 1.0, 1.0]), raters) < 0.8


def test_boundary_band_surrounds_the_edges():
    ref = np.zeros((20, 20), np.int64)
    ref[5:15, 5:15] = 1
    band = boundary_band(ref, 2)
    assert band[5, 10] and band[3, 10] and not band[10, 10] and not band[0, 0]
    assert not boundary_band(np.zeros((5, 5), np.int64)).any()


@pytest.fixture(scope="module")
def rater_data(tmp_path_factory):
    return write_phantom_dataset(tmp_path_factory.mktemp("raters") / "ds", 6, 2, 64, seed=4, raters=4)


def test_phantom_raters_disagree_as_the_model_says(rater_data):
    from latentseg.data.datasets import discover_dataset, load_dataset

    spec = discover_dataset(rater_data)
    samples, problems = load_dataset(spec)
    assert not problems and all(s["raters"].shape == (4, 64, 64) for s in samples)
    organ_sizes = [(s["raters"] > 0).sum((1, 2)) for s in samples]
    assert all(size[1] > size[0] > size[2] for size in organ_sizes)  # rater 1 dilates, rater 2 erodes
    pair = [iou_distance(s["raters"][0] == 2, s["raters"][3] == 2) for s in samples]
    assert max(pair) > 0.05  # raters disagree on the lesions


def test_bad_annotator_folders_are_named(tmp_path, capsys, rater_data):
    import shutil

    root = tmp_path / "ds"
    shutil.copytree(rater_data, root)
    for path in (root / "raters").glob("*/phantom_002.png"):
        path.unlink()
    Image.fromarray(np.full((64, 64), 7, np.uint8)).save(root / "raters" / "rater_1" / "phantom_003.png")
    Image.fromarray(np.zeros((60, 64), np.uint8)).save(root / "raters" / "rater_2" / "phantom_004.png")
    assert main(["check-dataset", str(root)]) == 2
    err = capsys.readouterr().err
    assert "case phantom_002: no annotator mask" in err
    assert "phantom_003" in err and "[7]" in err
    assert "rater_2/phantom_004.png: annotator mask shape (60, 64)" in err


def test_training_on_random_raters_and_multirater_evaluation(tmp_path, capsys, caplog, rater_data):
    from tests.conftest import TINY_2D

    caplog.set_level("INFO", logger="latentseg")
    model = tmp_path / "m"
    settings = [*[s for s in TINY_2D if "channels" not in s], "data.raters=random"]
    assert main(["train", "--data", str(rater_data), "--out", str(model), *settings]) == 0
    fingerprint = json.loads((model / "fingerprint.json").read_text())
    assert fingerprint["raters"]["mode"] == "random" and fingerprint["raters"]["annotators_per_case"] == [4]
    plan = json.loads((model / "plans.json").read_text())
    fit = json.loads((model / "training_log.json").read_text())["sampler_fit"]  # every candidate, measured
    assert [(c["steps"], c["eta"]) for c in fit] == list(SAMPLER_CANDIDATES)
    chosen = choose_sampler([SamplerScore(**c) for c in fit])
    assert (plan["sample"]["steps"], plan["sample"]["eta"]) == (chosen.steps, chosen.eta)  # as the raters spread
    assert f"sampling: DDIM-{chosen.steps}, eta {chosen.eta:g}" in caplog.text
    assert plan["sample"]["temperature"] > 0  # fitted on the validation cases
    assert plan["sample"]["num_samples"] == 4  # several annotators: never cut to one sample
    assert "several annotators: the label encoder learns" in caplog.text
    assert "predicting 1 validation case(s) with 4 samples each" in caplog.text  # said before the wait
    assert "(ddim, 10 steps" in capsys.readouterr().out  # validation samples as predict will
    out = tmp_path / "pred"
    args = ["predict", "--model", str(model), "--input", str(rater_data / "images"), "--output", str(out)]
    assert main([*args, "--samples", "3", "--save-samples"]) == 0
    still = ["predict", "--model", str(model), "--input", str(rater_data / "images"), "--output", str(tmp_path / "p0")]
    assert main([*still, "--samples", "2", "--save-samples", "--eta", "0", "--steps", "2"]) == 0
    assert sorted(p.name for p in out.glob("phantom_000_sample*")) == [f"phantom_000_sample0{k}.png" for k in range(3)]
    refs = [arg for k in range(4) for arg in ("--ref", str(rater_data / "raters" / f"rater_{k}"))]
    assert main(["evaluate", "--pred", str(out), *refs]) == 0
    summary = json.loads((out / "summary.json").read_text())
    multi = summary["multirater"]["mean"]
    assert 0 <= multi["GED"] <= 2 and 0 <= multi["HM_IoU"] <= 1 and 0 <= multi["QUBIQ_Dice"] <= 1
    assert multi["rater_pairwise_IoU"] < 1  # the phantoms' raters disagree
    assert all(c["raters"] == 4 for c in summary["metric_per_case"])
    calibration = summary["calibration"]
    assert set(calibration["overall"]) >= {"AUROC_std", "AUROC_std_boundary", "AUROC_entropy", "error_rate"}
    # two labels in 8-bit PNGs: calibrated as foreground against background, checked against scikit-learn
    assert calibration["overall_ECE_of"] == "foreground against background"
    assert calibration["overall"]["ECE"] == calibration["foreground"]["ECE"]
    from sklearn.metrics import brier_score_loss

    from latentseg.fusion import majority

    cases = sorted(p.name for p in (rater_data / "raters" / "rater_0").iterdir())
    p_fg = np.concatenate([np.asarray(Image.open(out / c.replace(".png", "_prob.png"))).ravel() / 255 for c in cases])
    raters = [rater_data / "raters" / f"rater_{k}" for k in range(4)]
    y_fg = np.concatenate([majority([np.asarray(Image.open(r / c)) for r in raters]).ravel() != 0 for c in cases])
    assert calibration["foreground"]["Brier"] == pytest.approx(brier_score_loss(y_fg, p_fg))
    assert (out / "reliability.png").stat().st_size > 1000
    assert "annotators: GED" in capsys.readouterr().out


def test_several_references_need_the_samples(tmp_path, capsys, model2d, data2d, rater_data):
    out = tmp_path / "pred"
    images = rater_data / "images"
    assert (
        main(["predict", "--model", str(model2d), "--input", str(images), "--output", str(out), "--samples", "1"]) == 0
    )
    refs = [arg for k in range(2) for arg in ("--ref", str(rater_data / "raters" / f"rater_{k}"))]
    assert main(["evaluate", "--pred", str(out), *refs]) == 2
    assert "predict with --save-samples" in capsys.readouterr().err
    one = ["evaluate", "--pred", str(out), "--ref", str(rater_data)]
    assert main(one) == 0  # one reference: single-rater metrics and calibration only
    summary = json.loads((out / "summary.json").read_text())
    assert "multirater" not in summary and "calibration" in summary


def test_save_samples_with_one_sample_writes_one_mask(tmp_path, model2d, data2d):
    out = tmp_path / "pred"
    images = data2d["test"] / "images"
    args = ["predict", "--model", str(model2d), "--input", str(images), "--output", str(out), "--samples", "1"]
    assert main([*args, "--save-samples"]) == 0
    sample = np.asarray(Image.open(out / "phantom_000_sample00.png"))
    assert np.array_equal(sample, np.asarray(Image.open(out / "phantom_000.png")))
    assert not (out / "phantom_000_sample01.png").exists()


def test_noise_follows_eq_19_and_the_curve_falls(tmp_path, capsys, model2d, data2d):
    from latentseg.robustness import add_noise

    rng = np.random.default_rng(0)
    image = np.linspace(10, 20, 10_000, dtype=np.float32).reshape(1, 100, 100)
    noisy = add_noise(image, 0.1, rng)
    assert np.std((noisy - image) / 10.0) == pytest.approx(0.1, rel=0.05)  # sigma on the [0, 1] scale
    out = tmp_path / "curve"
    args = ["robustness", "--model", str(model2d), "--input", str(data2d["test"] / "images")]
    assert main([*args, "--ref", str(data2d["test"]), "--out", str(out), "--sigmas", "0,0.5"]) == 0
    result = json.loads((out / "robustness.json").read_text())
    assert [p["sigma"] for p in result["curve"]] == [0.0, 0.5] and result["cases"] == 3
    assert (out / "robustness.png").is_file() and "sigma 0.50: Dice" in capsys.readouterr().out
    assert main([*args, "--ref", str(data2d["test"]), "--out", str(out), "--sigmas", "2"]) == 2


def test_temperature_scaling_is_softmax_of_the_logits_over_t_and_the_fit_finds_t():
    rng = np.random.default_rng(0)
    logits = torch.from_numpy(rng.normal(0, 3, (3, 40000)))
    p = torch.softmax(logits, 0).numpy()
    np.testing.assert_allclose(calibrated(p, 2.0), torch.softmax(logits / 2.0, 0).numpy(), atol=1e-4)  # p >= 1e-8
    assert calibrated(p, 1.0) is p
    # labels drawn from softmax(logits / 2): the probabilities are over-confident by a temperature of 2
    truth = torch.softmax(logits / 2.0, 0).numpy()
    labels = (rng.random(truth.shape[1]) > truth.cumsum(0)).sum(0)
    assert fit_temperature([p], [labels]) == pytest.approx(2.0, rel=0.1)
    assert fit_temperature([truth], [labels]) == pytest.approx(1.0, rel=0.1)


def _count_run(fusion: str = "mean", sampler: str = "ddim"):
    from types import SimpleNamespace

    from latentseg.config import Config
    from latentseg.models import build_model
    from latentseg.plan import Plan

    config = Config()
    config.model.spatial_dims, config.model.in_channels, config.model.num_classes = 2, 1, 2
    if sampler == "staged":
        config.model.denoiser_heads = 2
    config.sample.fusion, config.sample.sampler = fusion, sampler
    run = SimpleNamespace(config=config, resolved=SimpleNamespace(plan=Plan()), history={})
    run.model = build_model(config.model)
    return run


@pytest.mark.parametrize(
    ("spread", "fusion", "sampler", "count"),
    [(0.0004, "mean", "ddim", 1), (0.2, "mean", "ddim", 4), (0.0, "vote", "ddim", 4), (0.0, "mean", "staged", 4)],
)
def test_the_sample_count_is_one_only_where_the_validation_samples_agree(spread, fusion, sampler, count):
    from dataclasses import replace

    from latentseg.training import plan_sample_count

    run = _count_run(fusion, sampler)
    plan_sample_count(run, spread, replace(run.config.sample, num_samples=4))
    assert run.config.sample.num_samples == run.resolved.plan.sample["num_samples"] == count
    assert run.history["validation_sample_spread"] == spread


def test_a_planned_single_sample_holds_only_for_the_planned_sampling():
    from dataclasses import replace

    from latentseg.infer import sample_options

    run = _count_run()
    planned = replace(run.config.sample, steps=1, eta=0.0, temperature=1.0, num_samples=1)
    count = lambda **o: sample_options(run.model, planned, o).num_samples  # noqa: E731
    assert count() == 1 and count(steps=1, overlap=0.25) == 1  # the plan's own sampling
    assert count(eta=1.0) == count(steps=4) == count(fusion="vote") == 4  # another sampling: the default count
    assert count(eta=1.0, num_samples=2) == 2  # the user's count wins


def test_predict_draws_the_planned_number_of_samples(tmp_path, model2d, data2d, caplog):
    caplog.set_level("INFO", logger="latentseg")
    plan = json.loads((model2d / "plans.json").read_text())
    history = json.loads((model2d / "training_log.json").read_text())
    planned = plan["sample"]["num_samples"]
    assert planned == (1 if history["validation_sample_spread"] < 0.01 else 4)
    out = tmp_path / "pred"
    images = data2d["test"] / "images"
    assert (
        main(["predict", "--model", str(model2d), "--input", str(images), "--output", str(out), "--save-samples"]) == 0
    )
    assert len(list(out.glob("phantom_000_sample*.png"))) == planned
    assert ("1 sample per image, as train planned" in caplog.text) == (planned == 1)
    caplog.clear()
    again = tmp_path / "again"
    args = ["predict", "--model", str(model2d), "--input", str(images), "--output", str(again), "--save-samples"]
    assert main([*args, "--samples", "3"]) == 0
    assert len(list(again.glob("phantom_000_sample*.png"))) == 3  # the user's count wins
    assert "as train planned" not in caplog.text


def test_training_fits_the_temperature_and_predict_applies_it(model2d, data2d):
    from latentseg.api import load_model

    plan = json.loads((model2d / "plans.json").read_text())
    fitted = plan["sample"]["temperature"]
    assert isinstance(fitted, float) and fitted > 0
    history = json.loads((model2d / "training_log.json").read_text())
    assert history["temperature"] == fitted  # fitted, not planned (one annotator: it was planned 1 before)
    model = load_model(model2d)
    image = sorted((data2d["test"] / "images").iterdir())[0]
    hot, cool = (model.predict(image, temperature=t, num_samples=2) for t in (0.5, 2.0))
    np.testing.assert_array_equal(hot.label, cool.label)  # a temperature never changes the argmax
    assert hot.probabilities.max(0).mean() > cool.probabilities.max(0).mean()
