"""Shared fixtures: tiny phantom datasets and tiny trained models, built once per session."""

from __future__ import annotations

import pytest

from latentseg.cli import main
from latentseg.data.phantoms import write_phantom_dataset

TINY_2D = [
    "train.steps=30",
    "train.batch_size=4",
    "train.val_every=15",
    "train.log_every=5",
    "train.checkpoint_every=15",
    "data.val_fraction=0.2",
    "model.image_encoder_channels=[8,16,16,32,32]",
    "model.decoder_channels=[8,16,16,32,32]",
    "model.label_encoder_channels=[4,8,8,16,16]",
    "model.denoiser_channels=[16,32]",
    "model.image_latent_channels=8",
]
TINY_3D = [
    "train.steps=6",
    "train.batch_size=2",
    "train.val_every=3",
    "train.checkpoint_every=3",
    "data.val_fraction=0.25",
    "model.strides=[2,2,2]",
    "model.image_encoder_channels=[4,8,8,16]",
    "model.decoder_channels=[4,8,8,16]",
    "model.label_encoder_channels=[4,4,8,8]",
    "model.denoiser_channels=[8,16]",
    "model.image_latent_channels=4",
    "model.attention_stages=1",
]


@pytest.fixture(scope="session")
def data2d(tmp_path_factory):
    root = tmp_path_factory.mktemp("data2d")
    return {
        "train": write_phantom_dataset(root / "train", 10, 2, 64, seed=1),
        "test": write_phantom_dataset(root / "test", 3, 2, 64, seed=2),
    }


@pytest.fixture(scope="session")
def data3d(tmp_path_factory):
    root = tmp_path_factory.mktemp("data3d")
    return {
        "train": write_phantom_dataset(root / "train", 4, 3, 32, seed=1),
        "test": write_phantom_dataset(root / "test", 2, 3, 32, seed=2),
    }


@pytest.fixture(scope="session")
def model2d(tmp_path_factory, data2d):
    out = tmp_path_factory.mktemp("model2d") / "model"
    assert main(["train", "--data", str(data2d["train"]), "--out", str(out), *TINY_2D]) == 0
    return out


@pytest.fixture(scope="session")
def model3d(tmp_path_factory, data3d):
    out = tmp_path_factory.mktemp("model3d") / "model"
    assert main(["train", "--data", str(data3d["train"]), "--out", str(out), *TINY_3D]) == 0
    return out
