"""The whole path through the command line, on tiny phantoms: train -> predict -> evaluate."""

import json
import shutil
import subprocess
import sys
import time
from dataclasses import replace

import nibabel as nib
import numpy as np
from PIL import Image

from latentseg.checkpoint import load_model, read_train_state, save_checkpoint
from latentseg.cli import main
from latentseg.data.datasets import discover_inputs, load_image
from latentseg.infer import predict_image, preprocessing_of
from tests.conftest import TINY_2D


def test_2d_train_predict_evaluate(model2d, data2d, tmp_path):
    assert {p.name for p in model2d.iterdir()} >= {
        "config.json",
        "model.safetensors",
        "fingerprint.json",
        "train_state.safetensors",
        "training_log.json",
    }
    log = json.loads((model2d / "training_log.json").read_text())
    assert log["step"][-1] == 30 and len(log["val_dice"]) == 2
    out = tmp_path / "pred"
    assert (
        main(
            [
                "predict",
                "--model",
                str(model2d),
                "--input",
                str(data2d["test"] / "images"),
                "--output",
                str(out),
                "--steps",
                "2",
                "--samples",
                "3",
            ]
        )
        == 0
    )
    for case in ("phantom_000", "phantom_001", "phantom_002"):
        label = np.asarray(Image.open(out / f"{case}.png"))
        assert label.shape == (64, 64) and label.max() <= 2
        assert (out / f"{case}_prob.png").is_file() and (out / f"{case}_std.png").is_file()
        assert (out / f"{case}_entropy.png").is_file()
        assert (out / f"{case}_overlay.png").stat().st_size > 1000
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no staging leftovers
    assert main(["evaluate", "--pred", str(out), "--ref", str(data2d["test"])]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert len(summary["metric_per_case"]) == 3 and summary["foreground_mean"]["Dice"] is not None


def test_3d_train_predict_evaluate_keeps_geometry(model3d, data3d, tmp_path):
    out = tmp_path / "pred"
    inputs = data3d["test"] / "imagesTr"
    assert (
        main(["predict", "--model", str(model3d), "--input", str(inputs), "--output", str(out), "--samples", "2"]) == 0
    )
    src = nib.load(str(inputs / "phantom_000_0000.nii.gz"))
    lab = nib.load(str(out / "phantom_000.nii.gz"))
    np.testing.assert_array_equal(lab.affine, src.affine)
    assert lab.shape == src.shape
    assert nib.load(str(out / "phantom_000_prob.nii.gz")).shape == (*src.shape, 3)
    std = nib.load(str(out / "phantom_000_std.nii.gz")).get_fdata()
    assert std.shape == src.shape and std.min() >= 0 and std.max() <= 0.5
    entropy = nib.load(str(out / "phantom_000_entropy.nii.gz")).get_fdata()
    assert entropy.shape == src.shape and entropy.min() >= 0 and entropy.max() <= 1
    assert main(["evaluate", "--pred", str(out), "--ref", str(data3d["test"])]) == 0
    assert json.loads((out / "summary.json").read_text())["settings"]["labels"]


def test_checkpoint_round_trip_gives_identical_predictions(model2d, data2d, tmp_path):
    model, config, fp = load_model(model2d)
    prep = preprocessing_of(fp, config)
    image, meta = load_image(discover_inputs(data2d["test"] / "images")[0])
    options = replace(config.sample, num_samples=3, steps=2)
    before = predict_image(model, config, prep, image, meta, options, seed=5)
    save_checkpoint(tmp_path / "copy", model, config, fp)
    again, config2, fp2 = load_model(tmp_path / "copy")
    after = predict_image(again, config2, preprocessing_of(fp2, config2), image, meta, options, seed=5)
    np.testing.assert_array_equal(before.probabilities, after.probabilities)
    np.testing.assert_array_equal(before.uncertainty, after.uncertainty)
    other = predict_image(again, config2, prep, image, meta, options, seed=6)
    assert not np.array_equal(other.probabilities, after.probabilities)


def test_resume_continues_from_the_saved_step(model2d, data2d, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(model2d, run)
    assert read_train_state(run / "train_state.safetensors").step == 30
    assert main(["train", "--data", str(data2d["train"]), "--out", str(run), "--resume", "train.steps=35"]) == 0
    log = json.loads((run / "training_log.json").read_text())
    assert log["step"][-1] == 35 and log["step"][:6] == [5, 10, 15, 20, 25, 30]
    assert json.loads((run / "config.json").read_text())["train"]["steps"] == 35


def test_console_script_prints_one_line_and_exits_nonzero(tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "latentseg",
            "predict",
            "--model",
            str(tmp_path / "none"),
            "--input",
            str(tmp_path),
            "--output",
            str(tmp_path / "out"),
        ],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [f"latentseg: error: {tmp_path / 'none'}: model directory not found"]
    assert not (tmp_path / "out").exists()


def test_time_budget_stops_training_early(data2d, tmp_path):
    from tests.conftest import TINY_2D

    out = tmp_path / "m"
    settings = [s for s in TINY_2D if not s.startswith("train.steps")] + [
        "train.steps=100000",
        "train.max_minutes=0.01",
    ]
    assert main(["train", "--data", str(data2d["train"]), "--out", str(out), *settings]) == 0
    log = json.loads((out / "training_log.json").read_text())
    assert 0 < log["step"][-1] < 100000
    assert 0.6 <= log["train_seconds"] < 30


def test_a_time_budget_alone_is_not_cut_at_the_default_step_count(data2d, tmp_path):
    """`train.max_minutes=M` with no step setting: the clock ends the run (it was cut at 2000 steps,
    17 of 60 minutes on ACDC) and drives the learning rate to its floor."""
    from tests.conftest import TINY_2D

    out = tmp_path / "m"
    settings = [s for s in TINY_2D if not s.startswith(("train.steps", "train.val_every", "train.checkpoint"))]
    settings += ["train.max_minutes=0.01", "train.val_every=0", "train.warmup_steps=1"]
    assert main(["train", "--data", str(data2d["train"]), "--out", str(out), *settings]) == 0
    assert json.loads((out / "config.json").read_text())["train"]["steps"] == "auto"
    log = json.loads((out / "training_log.json").read_text())
    assert log["step"][-1] > 0 and 0.6 <= log["train_seconds"] < 30


def test_validation_time_is_outside_the_budget(data2d, tmp_path, monkeypatch):
    """A 5 s validation after the first step does not use up a 2.4 s training budget (the first
    step alone took 4.9 s once on a loaded machine, so a smaller budget could end after it)."""
    import latentseg.training

    calls = []

    def slow_first_validation(*args, **kwargs) -> float:
        calls.append(1)
        if len(calls) == 1:
            time.sleep(5.0)
        return 0.5

    monkeypatch.setattr(latentseg.training, "validate", slow_first_validation)
    settings = [s for s in TINY_2D if not s.startswith(("train.steps", "train.val_every"))]
    settings += ["train.steps=100000", "train.max_minutes=0.04", "train.val_every=1"]
    t0 = time.time()
    assert main(["train", "--data", str(data2d["train"]), "--out", str(tmp_path / "m"), *settings]) == 0
    wall = time.time() - t0
    log = json.loads((tmp_path / "m" / "training_log.json").read_text())
    assert log["step"][-1] >= 2 and len(calls) == log["step"][-1]
    assert wall > 5.0 + 2.4  # the validation's sleep and the budget both passed
    # the clock stopped at the budget plus at most a step or two, slow on a loaded machine; had the
    # 5 s sleep been counted, the clock would read over 5 s
    assert 2.4 <= log["train_seconds"] < 5.0


def test_batches_draw_every_dataset_equally_often():
    from collections import Counter

    from latentseg.config import load_config
    from latentseg.training import batches

    settings = ["data.patch_size=[8,8]", "train.batch_size=4", "data.rotation_degrees=0", "data.augmentation=on"]
    config = load_config(None, settings)
    samples = [
        {
            "image": np.full((1, 8, 8), float(d == "big"), np.float32),
            "label": np.ones((1, 8, 8), np.int64),
            "dataset": d,
        }
        for d in ["small"] * 2 + ["big"] * 8
    ]
    drawn = Counter()
    for batch in batches(samples, config, total=250, seed=0):
        drawn.update("big" if v > 0.5 else "small" for v in batch["image"].mean(dim=(1, 2, 3)).tolist())
    assert abs(drawn["big"] / sum(drawn.values()) - 0.5) < 0.05


def run_predict(model, inputs, out, *extra) -> int:
    return main(["predict", "--model", str(model), "--input", str(inputs), "--output", str(out), *extra])


def test_staged_two_head_model_with_staple_fusion(data2d, tmp_path, capsys):
    """UniSegDiff end to end: CFENet pre-trained then frozen, staged training and sampling, fusion."""
    model = tmp_path / "model"
    staged = ["model.denoiser_heads=2", "train.timesteps=staged", "sample.sampler=staged", "model.condition=pretrained"]
    assert main(["train", "--data", str(data2d["train"]), "--out", str(model), *TINY_2D, *staged]) == 0
    for fusion in ("staple", "vote", "mean"):
        out = tmp_path / f"pred_{fusion}"
        assert run_predict(model, data2d["test"] / "images", out, "--samples", "4", "--fusion", fusion) == 0
        label = np.asarray(Image.open(out / "phantom_000.png"))
        assert label.shape == (64, 64) and label.max() <= 2
        assert (out / "phantom_000_std.png").is_file()
    args = ["--sampler", "staged", "--staged-final-head", "x0", "--samples", "2", "--staged-middle-steps", "9"]
    assert run_predict(model, data2d["test"] / "images", tmp_path / "x0final", *args) == 0
    assert run_predict(model, data2d["test"] / "images", tmp_path / "none", "--staged-middle-steps", "0") == 2
    assert "--staged-middle-steps must be >= 1, got 0" in capsys.readouterr().err
    assert not (tmp_path / "none").exists()


def test_text_guided_model_reads_case_text_or_a_prompt(data2d, tmp_path, capsys):
    model = tmp_path / "model"
    train_args = ["train", "--data", str(data2d["train"]), "--out", str(model), *TINY_2D, "model.text_fusion=attention"]
    assert main(train_args) == 0
    config = json.loads((model / "plans.json").read_text())  # what training derived
    assert config["model"]["text_dim"] == 384  # from the shipped all-MiniLM-L6-v2
    images = data2d["test"] / "images"
    # each case's sentence from the text.csv of the dataset root
    assert run_predict(model, data2d["test"], tmp_path / "a") == 0
    # one prompt for every input
    assert run_predict(model, images, tmp_path / "b", "--prompt", "the lesion in the upper left of the organ") == 0
    assert {p.name for p in (tmp_path / "a").iterdir()} == {p.name for p in (tmp_path / "b").iterdir()}
    # no text.csv beside bare images: the missing cases are listed, unless allowed
    out = tmp_path / "c"
    assert run_predict(model, images, out) == 2
    assert "no text for 3 case(s): phantom_000, phantom_001, phantom_002" in capsys.readouterr().err
    assert not out.exists()
    assert run_predict(model, images, out, "--allow-missing-text") == 0
    assert run_predict(model, images, tmp_path / "d", "--prompt", " ") == 2
    assert "--prompt is empty" in capsys.readouterr().err
