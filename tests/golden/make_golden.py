"""Writes the golden models and their predictions that `tests/test_golden.py` checks.

Run once, with the code whose behaviour the fixtures pin (they were written before the redesign of
issue 15, at commit 35080b7): `python -m tests.golden.make_golden`. Each folder holds a tiny
trained model (config.json, model.safetensors, fingerprint.json), the input it is given and
`expected.npz` (probabilities, uncertainty, entropy and labels of `predict_image` at seed 7).
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from diffusers import UNet2DModel

from latentseg.checkpoint import load_model
from latentseg.cli import main
from latentseg.data.datasets import Case, load_image
from latentseg.data.phantoms import write_phantom_dataset
from latentseg.infer import predict_image, preprocessing_of
from latentseg.text import load_text_encoder

HERE = Path(__file__).resolve().parent
SMALL_2D = [
    "train.steps=6",
    "train.batch_size=2",
    "train.val_every=0",
    "train.checkpoint_every=6",
    "data.val_fraction=0.2",
    "model.image_encoder_channels=[4,8,8,8,8]",
    "model.decoder_channels=[4,8,8,8,8]",
    "model.label_encoder_channels=[4,4,4,8,8]",
    "model.denoiser_channels=[8,16]",
    "model.image_latent_channels=4",
]
SMALL_3D = [
    "train.steps=4",
    "train.batch_size=1",
    "train.val_every=0",
    "train.checkpoint_every=4",
    "data.val_fraction=0.25",
    "model.strides=[2,2,2]",
    "model.image_encoder_channels=[4,4,8,8]",
    "model.decoder_channels=[4,4,8,8]",
    "model.label_encoder_channels=[4,4,4,4]",
    "model.denoiser_channels=[8,8]",
    "model.image_latent_channels=4",
    "model.attention_stages=1",
]
TINY_UNET = {
    "sample_size": 32,
    "in_channels": 1,
    "out_channels": 1,
    "block_out_channels": [8, 8, 8],
    "layers_per_block": 1,
    "down_block_types": ["DownBlock2D", "DownBlock2D", "AttnDownBlock2D"],
    "up_block_types": ["AttnUpBlock2D", "UpBlock2D", "UpBlock2D"],
    "norm_num_groups": 4,
    "attention_head_dim": 8,
}
# name -> (dims, training settings, sampling: num_samples, steps, prompt)
MODELS = {
    "ldseg2d": (2, SMALL_2D, (3, 2, None)),
    "ldseg3d": (3, SMALL_3D, (2, 2, None)),
    "staged2d": (
        2,
        [*SMALL_2D, "model.denoiser_heads=2", "train.timesteps=staged", "sample.sampler=staged"]
        + ["model.condition=pretrained", "sample.staged_middle_steps=3", "sample.fusion=staple"],
        (4, 2, None),
    ),
    "text2d": (2, [*SMALL_2D, "model.text_fusion=attention", "model.text_in_denoiser=true"], (2, 2, "upper left")),
    "class2d": (
        2,
        [*SMALL_2D, "model.prompt=class", "model.label_autoencoder=pretrained", "train.timesteps=importance"]
        + ["model.prediction_type=eps", "sample.eta=0.5", "train.importance_bins=4", "train.importance_history=2"],
        (2, 3, "2"),
    ),
    "textdiff2d": (
        2,
        ["--mode", "textdiff", "train.steps=4", "train.batch_size=2", "train.val_every=0", "data.val_fraction=0.2"]
        + ["model.feature_blocks=[1,3,5]", "model.feature_timesteps=[50,150]", "model.feature_channels=8"],
        (2, 2, "upper left"),
    ),
}


def _text(model, config, prompt):
    if prompt is None:
        return None
    if config.model.prompt == "class":
        from latentseg.data.targets import ClassIds

        return ClassIds(config.model.prompt_names).encode([prompt])
    return load_text_encoder(config.model.text_encoder, config.model.text_max_length).encode([prompt])


def _train(name: str, dims: int, settings: list[str], work: Path) -> Path:
    data = write_phantom_dataset(work / f"data{dims}", 5 if dims == 2 else 4, dims, 32, seed=3)
    args = list(settings)
    if "--mode" in args:  # TextDiff: a tiny diffusers backbone of our own
        torch.manual_seed(0)
        backbone = work / "unet"
        UNet2DModel.from_config(TINY_UNET).save_pretrained(str(backbone))
        args = ["--backbone", str(backbone), *args, "model.text_fusion=attention"]
    out = work / name
    assert main(["train", "--data", str(data), "--out", str(out), *args]) == 0
    return out


def make(name: str, work: Path) -> None:
    dims, settings, (samples, steps, prompt) = MODELS[name]
    trained = _train(name, dims, settings, work)
    target = HERE / name
    shutil.rmtree(target, ignore_errors=True)
    target.mkdir()
    for file in ("config.json", "model.safetensors", "fingerprint.json"):
        shutil.copyfile(trained / file, target / file)
    source = write_phantom_dataset(work / f"input{dims}", 1, dims, 32, seed=11)
    image_file = next((source / ("images" if dims == 2 else "imagesTr")).iterdir())
    shutil.copyfile(image_file, target / ("input.png" if dims == 2 else "input.nii.gz"))
    model, config, fingerprint = load_model(target)
    image, meta = load_image(Case("input", [target / ("input.png" if dims == 2 else "input.nii.gz")]))
    pred = predict_image(
        model,
        config,
        preprocessing_of(fingerprint, config),
        image,
        meta,
        samples,
        steps,
        7,
        _text(model, config, prompt),
    )
    np.savez_compressed(
        target / "expected.npz",
        probabilities=pred.probabilities,
        uncertainty=pred.uncertainty,
        entropy=pred.entropy,
        label=pred.label,
    )
    (target / "sampling.json").write_text(json.dumps({"samples": samples, "steps": steps, "prompt": prompt}))


if __name__ == "__main__":
    names = sys.argv[1:] or list(MODELS)
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            make(name, Path(tmp))
            print(f"{name}: written")
