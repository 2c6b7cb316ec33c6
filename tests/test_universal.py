"""Universal prompted segmentation (002): label map, (case, target) tasks, class and text prompts."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
import torch

from latentseg.cli import main, prompt_folder
from latentseg.data.targets import ClassIds, read_label_map, select_target, target_names, target_tasks
from latentseg.errors import LatentSegError
from tests.conftest import TINY_2D, TINY_3D


def predict_one_sample(model, images, output, prompt) -> int:
    return main(["predict", "--model", str(model), "--input", images, "--output", str(output), "--samples", "1",
                 "--prompt", prompt])  # fmt: skip


def test_label_map_and_target_names(tmp_path):
    path = tmp_path / "map.yaml"
    path.write_text("ACDC: {1: right ventricle, 3: left ventricle}\n")
    table = read_label_map(path)
    assert table == {"ACDC": {1: "right ventricle", 3: "left ventricle"}}
    own = {"ACDC": {0: "background", 1: "RV", 2: "MLV", 3: "LVC"}, "phantoms": {0: "bg", 1: "organ", 2: "lesion"}}
    targets = target_names(own, table)
    assert targets == {"ACDC": {1: "right ventricle", 3: "left ventricle"}, "phantoms": {1: "organ", 2: "lesion"}}
    with pytest.raises(LatentSegError, match="names dataset\\(s\\) LA2018 that are not being trained on"):
        target_names(own, {"LA2018": {1: "left atrium"}})
    for bad, message in [
        ("ACDC: {one: RV}", "label ids must be integers"),
        ("ACDC: {0: background}", "0 \\(background\\) is not a target"),
        ("- a list", "a label map is a mapping"),
        ("ACDC: {1: [unclosed", "cannot read the label map"),
    ]:
        path.write_text(bad)
        with pytest.raises(LatentSegError, match=message):
            read_label_map(path)


def test_tasks_are_binary_per_target():
    label = np.array([[[0, 1, 2, 2]]], dtype=np.float32)
    samples = [{"image": np.zeros((1, 1, 4)), "label": label, "dataset": "d", "case_id": "c"}]
    tasks = target_tasks(samples, {"d": {1: "organ", 2: "lesion"}})
    assert [(t["target"], t["text"]) for t in tasks] == [(1, "organ"), (2, "lesion")]
    assert tasks[0]["label"] is label  # not copied for training
    assert select_target(tasks[1])["label"].tolist() == [[[0, 0, 1, 1]]]
    val = target_tasks(samples, {"d": {1: "organ", 2: "lesion"}}, binarize=True)
    assert val[0]["label"].tolist() == [[[0, 1, 0, 0]]] and "target" not in val[0]
    assert ClassIds(["lesion", "organ"]).encode(["organ", "lesion"]).tolist() == [1, 0]
    with pytest.raises(LatentSegError, match="unknown class 'liver'; this model knows: lesion, organ"):
        ClassIds(["lesion", "organ"]).encode(["liver"])


@pytest.fixture(scope="module")
def label_map(tmp_path_factory):
    path = tmp_path_factory.mktemp("map") / "labels.yaml"
    path.write_text("train: {1: organ, 2: lesion}\n")  # the phantom folder is called train
    return path


@pytest.fixture(scope="module")
def class_model(tmp_path_factory, data2d, label_map):
    out = tmp_path_factory.mktemp("universal") / "model"
    args = ["train", "--data", str(data2d["train"]), "--out", str(out), *TINY_2D]
    assert main([*args, "model.prompt=class", f"data.label_map={label_map}"]) == 0
    return out


def test_class_prompt_model_trains_on_binary_tasks(class_model):
    config = json.loads((class_model / "plans.json").read_text())["model"]  # what training derived
    assert config["prompt_names"] == ["lesion", "organ"] and config["num_classes"] == 2
    assert config["text_fusion"] == "attention"  # the prompt's way into the image latent
    fingerprint = json.loads((class_model / "fingerprint.json").read_text())
    assert fingerprint["targets"] == {"train": {"1": "organ", "2": "lesion"}}


def test_predict_with_prompts(class_model, data2d, tmp_path, capsys):
    images = str(data2d["test"] / "images")
    base = ["predict", "--model", str(class_model), "--input", images, "--samples", "1"]
    assert main([*base, "--output", str(tmp_path / "one"), "--prompt", "lesion"]) == 0
    labels = list((tmp_path / "one").glob("phantom_00?.png"))
    assert len(labels) == 3 and set(np.unique(np.array(__import__("PIL.Image").Image.open(labels[0])))) <= {0, 1}
    assert main([*base, "--output", str(tmp_path / "many"), "--prompts", "organ, lesion"]) == 0
    assert sorted(p.name for p in (tmp_path / "many").iterdir()) == ["lesion", "organ"]
    capsys.readouterr()
    assert main([*base, "--output", str(tmp_path / "bad"), "--prompts", "organ,liver"]) == 2
    assert "unknown class 'liver'; this model knows: lesion, organ" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()  # refused before anything was written
    assert main([*base, "--output", str(tmp_path / "none")]) == 2
    assert "segments what a prompt names" in capsys.readouterr().err
    assert main([*base, "--output", str(tmp_path / "empty"), "--prompt", " "]) == 2
    assert "--prompt is empty" in capsys.readouterr().err


def test_prompt_lands_in_the_output(class_model, data2d):
    """Different prompts give different masks for the same image and seed."""
    from latentseg.checkpoint import load_model
    from latentseg.data.datasets import discover_inputs, load_image
    from latentseg.data.preprocess import Preprocessing
    from latentseg.infer import predict_image

    model, config, fingerprint = load_model(class_model)
    case = discover_inputs(data2d["test"] / "images")[0]
    image, meta = load_image(case)
    prep = Preprocessing.from_dict(fingerprint["preprocessing"])
    options = replace(config.sample, num_samples=1, steps=2)
    masks = [
        predict_image(model, config, prep, image, meta, options, 0, torch.tensor([i])).probabilities for i in (0, 1)
    ]
    assert not np.allclose(masks[0], masks[1])


def test_text_prompt_model_takes_any_words(tmp_path, data2d, label_map):
    out = tmp_path / "model"
    args = ["train", "--data", str(data2d["train"]), "--out", str(out), *TINY_2D, "train.steps=4"]
    assert main([*args, "model.prompt=text", f"data.label_map={label_map}"]) == 0
    images = str(data2d["test"] / "images")
    base = ["predict", "--model", str(out), "--input", images, "--samples", "1", "--output"]
    assert main([*base, str(tmp_path / "p"), "--prompt", "the small läsion, 病变"]) == 0  # unicode works
    assert len(list((tmp_path / "p").glob("*_overlay.png"))) == 3


def test_prompt_folder_names():
    assert prompt_folder("left ventricle") == "left_ventricle"
    assert prompt_folder("../../etc") == "etc" and prompt_folder("///") == "prompt"


def test_universal_preset_pretrains_the_mask_autoencoder_and_samples_t_by_loss(tmp_path, data2d, label_map, capfd):
    """The `universal` preset (002): class prompts, x0, a mask autoencoder trained first then frozen,
    importance-sampled t."""
    out = tmp_path / "model"
    args = ["train", "--config", "universal", "--data", str(data2d["train"]), "--out", str(out), *TINY_2D]
    extra = ["train.steps=20", f"data.label_map={label_map}", "train.importance_bins=4", "train.importance_history=2"]
    assert main([*args, *extra]) == 0
    log = capfd.readouterr()
    assert "step 6: mask autoencoder pre-trained; frozen for the rest of the run" in log.out + log.err
    config = json.loads((out / "config.json").read_text())
    assert config["model"]["label_autoencoder"] == "pretrained" and config["train"]["timesteps"] == "importance"
    history = json.loads((out / "training_log.json").read_text())
    # the autoencoder's steps have no diffusion loss; the diffusion's have no segmentation loss
    assert history["diff"][0] == 0 and history["seg"][-1] == 0 and history["diff"][-1] > 0
    images = str(data2d["test"] / "images")
    assert predict_one_sample(out, images, tmp_path / "p", "organ") == 0


def test_presets_and_the_3d_text_preset(tmp_path, data3d, capsys):
    from latentseg.config import load_config, presets

    assert presets() == ["ldseg", "textdiffseg3d", "unisegdiff", "universal"]
    c = load_config("textdiffseg3d")  # 000 section III-B
    assert (c.data.patch_size, c.sample.steps, c.sample.overlap, c.model.text_fusion) == (
        [96] * 3,
        10,
        0.5,
        "attention",
    )
    assert (c.train.lr, c.train.weight_decay) == (1e-4, 1e-5)
    u = load_config("unisegdiff")
    assert u.model.eps_head_seg_loss and u.model.condition == "pretrained"
    assert (u.model.denoiser_heads, u.sample.sampler, u.sample.num_samples, u.sample.fusion) == (
        2,
        "staged",
        20,
        "staple",
    )
    with pytest.raises(LatentSegError, match="not a preset \\(presets: ldseg, textdiffseg3d, unisegdiff, universal\\)"):
        load_config("textdiffseg")
    out = tmp_path / "model"
    args = ["train", "--config", "textdiffseg3d", "--data", str(data3d["train"]), "--out", str(out), *TINY_3D]
    phantom_words = "data.text_flip_words=[0:upper/lower,1:left/right]"  # not RAS: see README
    assert main([*args, "data.patch_size=[32,32,32]", "model.text_in_denoiser=true", phantom_words]) == 0
    assert json.loads((out / "config.json").read_text())["data"]["text_flip_words"] == ["0:upper/lower", "1:left/right"]
    images = str(data3d["test"] / "imagesTr")
    assert predict_one_sample(out, images, tmp_path / "p", "the lesion in the upper left") == 0
    assert len(list((tmp_path / "p").glob("*.nii.gz"))) >= 2
