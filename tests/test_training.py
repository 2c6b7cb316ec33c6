"""The training loop through its own API (the CLI path is in test_cli.py): the protocol, phases,
validation settings, the learning-rate schedule and the saved plan."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from latentseg.config import load_config
from latentseg.errors import LatentSegError
from latentseg.models import LatentSegmenter, Segmenter, build_model
from latentseg.plan import Plan, resolve
from latentseg.training import Clock, learning_rate, train, validate, validation_options
from tests.conftest import TINY_2D


def test_learning_rate_warms_up_then_follows_the_larger_of_step_and_time_shares():
    config = load_config(None, ["train.lr=0.01", "train.warmup_steps=10", "train.min_lr_ratio=0.1"])
    assert learning_rate(config, 5, 0.0) == pytest.approx(0.005)
    assert learning_rate(config, 11, 0.0) == pytest.approx(0.01)
    assert learning_rate(config, 11, 1.0) == pytest.approx(0.001)
    assert learning_rate(config, 11, 0.5) == pytest.approx(0.001 + 0.009 * 0.5)


def test_auto_steps_are_the_default_without_a_budget_and_unlimited_with_one():
    from latentseg.config import DEFAULT_TRAIN_STEPS, step_limit

    assert step_limit(load_config(None, []).train) == DEFAULT_TRAIN_STEPS == 2000
    assert step_limit(load_config(None, ["train.max_minutes=60"]).train) is None  # the clock ends it
    assert step_limit(load_config(None, ["train.max_minutes=60", "train.steps=500"]).train) == 500


def test_an_unlimited_batch_stream_goes_on_past_its_chunks_with_fresh_draws(monkeypatch):
    import numpy as np

    import latentseg.training
    from latentseg.training import batches

    monkeypatch.setattr(latentseg.training, "UNLIMITED_CHUNK", 3)
    config = load_config(None, ["data.patch_size=[4,4]", "train.batch_size=2", "data.augmentation=off"])
    samples = [
        {"image": np.full((1, 4, 4), float(i), np.float32), "label": np.zeros((1, 4, 4), np.int64)} for i in range(50)
    ]
    stream = batches(samples, config, total=None, seed=0)
    drawn = [tuple(next(stream)["image"][:, 0, 0, 0].tolist()) for _ in range(9)]  # three chunks
    assert len(drawn) == 9 and len(set(drawn[:3]) | set(drawn[3:6])) > 3  # the second chunk is not the first again
    finite = [tuple(b["image"][:, 0, 0, 0].tolist()) for b in batches(samples, config, total=3, seed=0)]
    assert finite == drawn[:3]  # a limited run draws the same stream as before


def test_clock_leaves_out_paused_time():
    clock = Clock(before=10.0)
    clock.paused = 1e6
    assert clock.elapsed() < 0  # the pause is subtracted: only training time counts


def test_models_satisfy_the_protocol_and_list_their_phases():
    config = load_config(None, ["model.condition=pretrained", "model.label_autoencoder=pretrained"])
    config.model.num_classes = 3
    model = build_model(config.model)
    assert isinstance(model, Segmenter) and isinstance(model, LatentSegmenter)
    phases = model.phases(config.train)
    assert [(p.name, p.until) for p in phases] == [("condition", 0.3), ("autoencoder", 0.3)]
    assert build_model(load_config(None, []).model).phases(config.train) == []


def test_validation_uses_the_configured_overlap_and_the_fewest_samples(model2d, data2d, monkeypatch):
    import latentseg.infer as infer
    from latentseg.checkpoint import load_model

    model, config, _ = load_model(model2d)
    seen = []
    real = infer.sliding_window_inference

    def spy(*args, **kwargs):
        seen.append(kwargs["overlap"])
        return real(*args, **kwargs)

    monkeypatch.setattr(infer, "sliding_window_inference", spy)
    config.sample.overlap = 0.125
    resolved = resolve(load_config(None, TINY_2D), [data2d["train"]])
    dice = validate(model, resolved.data.val[:1], config)
    assert seen == [0.125] and 0 <= dice <= 1
    assert validation_options(model, config).num_samples == 1


def test_train_writes_the_user_settings_and_the_plan_apart(tmp_path, data2d):
    out = train(data2d["train"], tmp_path / "m", load_config(None, TINY_2D), progress=False)
    settings = json.loads((out / "config.json").read_text())
    plan = Plan.load(out / "plans.json")
    assert "spatial_dims" not in settings["model"] and "num_classes" not in settings["model"]
    assert settings["model"]["strides"] == [] and settings["data"]["patch_size"] == []  # the user's: planned
    assert plan.model["num_classes"] == 3 and plan.model["strides"] and plan.data["patch_size"] == [64, 64]
    assert (out / "train_state.safetensors").is_file()


def test_resume_refuses_a_plan_the_data_no_longer_gives(tmp_path, model2d, data2d):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(model2d, run)
    plan = json.loads((run / "plans.json").read_text())
    plan["model"]["num_classes"] = 5
    (run / "plans.json").write_text(json.dumps(plan))
    config = load_config(None, [*TINY_2D, "train.steps=35"])
    with pytest.raises(LatentSegError, match="plans a different model"):
        train(data2d["train"], run, config, resume=True, progress=False)


def test_one_training_step_through_the_objective(data2d):
    from latentseg.training import TrainingLosses, train_step

    resolved = resolve(load_config(None, TINY_2D), [data2d["train"]])
    model = build_model(resolved.config.model)
    objective = model.objective(resolved.config)
    losses_fn = TrainingLosses(model, objective)
    sample = resolved.data.train[0]
    batch = {"image": torch.from_numpy(sample["image"])[None], "label": torch.from_numpy(sample["label"])[None]}
    batch["text"] = [""]
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    stats = train_step(losses_fn, optimizer, batch, torch.device("cpu"))
    assert stats["loss"] > 0 and stats["seg"] > 0 and stats["diff"] > 0
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_cases_past_the_memory_budget_train_from_files_that_are_then_removed(data3d, tmp_path, caplog):
    """With `data.memory_gb` below one case, every case is kept in .npy files and memory-mapped;
    batches are read patch by patch from them, and the folder is gone when training ends."""
    from latentseg.cli import main
    from latentseg.config import load_config
    from latentseg.data.prepare import prepare_training_data
    from tests.conftest import TINY_3D

    config = load_config(None, ["data.memory_gb=0.000001", f"data.cache_dir={tmp_path}"])
    data = prepare_training_data([data3d["train"]], config)
    cases = data.train + data.val
    assert all(isinstance(s["image"], np.memmap) and isinstance(s["label"], np.memmap) for s in cases)
    assert all(len(s["foreground"]) and s["label"][0][tuple(s["foreground"][0])] > 0 for s in cases)
    in_memory = prepare_training_data([data3d["train"]], load_config(None, []))
    for a, b in zip(in_memory.train, data.train, strict=True):
        assert np.array_equal(a["image"], b["image"]) and np.array_equal(a["label"], b["label"])
    folder = Path(data.store.folder.name)
    assert folder.parent == tmp_path and len(list(folder.glob("*_image.npy"))) == len(cases)
    del data
    caplog.set_level("INFO", logger="latentseg")
    out = tmp_path / "model"
    argv = ["train", "--data", str(data3d["train"]), "--out", str(out), *TINY_3D]
    assert main([*argv, "data.memory_gb=0.000001", f"data.cache_dir={tmp_path}"]) == 0
    assert "kept in" in caplog.text and "read patch by patch" in caplog.text
    assert not list(tmp_path.glob("latentseg-cache-*"))  # removed with the run


def _large_discs(root: Path, cases: int = 6, size: int = 96, radius: int = 35) -> Path:
    """A PNG folder with one structure per image, a bright disc (by default 71 pixels across: more
    than two 32-pixel patches)."""
    from PIL import Image

    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:size, :size]
    for i in range(cases):
        cy, cx = size / 2 + rng.integers(-4, 5, 2)
        disc = (yy - cy) ** 2 + (xx - cx) ** 2 <= radius**2
        image = (60 + 120 * disc + rng.normal(0, 10, disc.shape)).clip(0, 255).astype(np.uint8)
        Image.fromarray(image).save(root / "images" / f"c{i}.png")
        Image.fromarray(disc.astype(np.uint8) * 255).save(root / "masks" / f"c{i}.png")
    return root


def test_structures_larger_than_two_patches_train_and_predict_on_a_coarser_grid(tmp_path):
    from PIL import Image

    from latentseg.infer import predict

    data = _large_discs(tmp_path / "discs")
    small = [*TINY_2D, "train.steps=4", "train.val_every=0", "data.patch_size=[32,32]"]
    model = tmp_path / "model"
    train(data, model, load_config(None, small), progress=False)
    fingerprint = json.loads((model / "fingerprint.json").read_text())
    assert fingerprint["grid"]["factor"] == 2 and fingerprint["preprocessing"]["spacing"] == [2.0, 2.0]
    assert json.loads((model / "plans.json").read_text())["data"]["grid_factor"] == 2
    predict(model, data / "images", tmp_path / "out", {"num_samples": 1}, overlays=False, progress=False)
    assert np.asarray(Image.open(tmp_path / "out" / "c0.png")).shape == (96, 96)  # back on the image's grid

    own = tmp_path / "own"  # the user's grid factor wins; so does a spacing
    train(data, own, load_config(None, [*small, "data.grid_factor=1"]), progress=False)
    assert json.loads((own / "fingerprint.json").read_text())["preprocessing"]["spacing"] is None
    spaced = tmp_path / "spaced"
    train(data, spaced, load_config(None, [*small, "data.spacing=[3.0,3.0]"]), progress=False)
    fingerprint = json.loads((spaced / "fingerprint.json").read_text())
    assert fingerprint["grid"] == {} and fingerprint["preprocessing"]["spacing"] == [3.0, 3.0]


def test_check_dataset_prints_the_planned_grid_for_a_budget(tmp_path, capsys):
    from latentseg.cli import main

    data = _large_discs(tmp_path / "discs", cases=3, size=320, radius=140)  # 281 pixels across
    assert main(["check-dataset", str(data)]) == 0  # no budget: 256^2 patches
    assert "grid: the images' own (the largest structures span 281x281 voxels, the patch [256, 256])" in (
        capsys.readouterr().out
    )
    assert main(["check-dataset", str(data), "--minutes", "10"]) == 0  # a short run: 128^2 patches
    out = capsys.readouterr().out
    assert "grid: 1/2 of the images' (the largest structures span 281x281 voxels, the patch [128, 128]" in out
    assert "latent: " in out


def test_the_grid_is_planned_for_ldseg_only():
    from types import SimpleNamespace

    from latentseg.data.prepare import plan_grid

    yy, xx = np.mgrid[:96, :96]
    disc = ((yy - 48) ** 2 + (xx - 48) ** 2 <= 35**2).astype(np.uint8)
    samples = [{"label": disc[None], "meta": SimpleNamespace(spatial_dims=2)}] * 3
    for mode, factor in (("ldseg", 2), ("textdiff", 1)):  # TextDiff's backbone learned the images' scale
        config = load_config(None, [f"model.mode={mode}", "data.patch_size=[32,32]"])
        config.model.num_classes = 2
        assert plan_grid(config, samples)["factor"] == factor == config.data.grid_factor


def test_a_volume_trains_and_predicts_on_a_coarser_grid_and_comes_back_on_its_own(tmp_path):
    import nibabel as nib

    from latentseg.infer import predict
    from tests.conftest import TINY_3D

    root = tmp_path / "balls"
    for folder in ("imagesTr", "labelsTr"):
        (root / folder).mkdir(parents=True)
    rng = np.random.default_rng(0)
    zz, yy, xx = np.mgrid[:48, :48, :40]
    affine = np.diag([1.5, 1.5, 2.0, 1.0])
    for i in range(4):  # a ball 37 voxels across, in patches of 16: 2.3 patches
        ball = (zz - 24) ** 2 + (yy - 24 - i) ** 2 + (xx - 20) ** 2 <= 18**2
        image = (ball + rng.normal(0, 0.2, ball.shape)).astype(np.float32)
        nib.save(nib.Nifti1Image(image, affine), root / "imagesTr" / f"ball_{i:03d}_0000.nii.gz")
        nib.save(nib.Nifti1Image(ball.astype(np.uint8), affine), root / "labelsTr" / f"ball_{i:03d}.nii.gz")
    dataset = {"channel_names": {"0": "MRI"}, "labels": {"background": 0, "ball": 1}, "numTraining": 4,
               "file_ending": ".nii.gz"}  # fmt: skip
    (root / "dataset.json").write_text(json.dumps(dataset))
    model = tmp_path / "model"
    settings = [*TINY_3D, "train.steps=2", "train.val_every=0", "data.patch_size=[16,16,16]"]
    train(root, model, load_config(None, settings), progress=False)
    fingerprint = json.loads((model / "fingerprint.json").read_text())
    assert fingerprint["grid"]["factor"] == 2
    assert fingerprint["preprocessing"]["spacing"] == [3.0, 3.0, 4.0]  # twice the median spacing
    predict(model, root / "imagesTr", tmp_path / "out", {"num_samples": 1}, overlays=False, progress=False)
    out = nib.load(tmp_path / "out" / "ball_000.nii.gz")
    assert out.shape == (48, 48, 40) and np.allclose(out.affine, affine)
