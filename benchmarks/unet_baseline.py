"""The accuracy and speed bar: a plain MONAI UNet trained for a fixed number of CPU seconds on the
same patches, augmentations and split as latentseg, scored with the same metrics."""

from __future__ import annotations

import copy
import time
from typing import Any

import numpy as np
import torch
from monai.inferers import sliding_window_inference
from monai.losses import DiceCELoss
from monai.networks.nets import UNet

from latentseg.config import Config
from latentseg.plan import plan_batches
from latentseg.training import batches


def make_unet(
    spatial_dims: int, in_channels: int, num_classes: int, channels=(16, 32, 64, 128, 256), strides=None
) -> UNet:
    """5 levels, 2 residual units per level (the NOTES.md bar); per-axis strides for anisotropic patches."""
    strides = strides or [2] * (len(channels) - 1)
    return UNet(spatial_dims, in_channels, num_classes, channels[: len(strides) + 1], strides, num_res_units=2)


def bar_network(spatial_dims: int, strides: list | None) -> tuple[tuple[int, ...], list]:
    """The depth of `plain_unet.py`, the bar: 5 levels (16-256 channels) in 2D, 4 (16-128) in 3D, on
    the planned strides (the finest ones in 3D).

    Through the same pipeline on ACDC at 15 minutes the 5-level UNet scored 0.674 where the 4-level
    one scored 0.759, beside the script's 0.747 (`python -m benchmarks.pipeline --variants
    plain_script,defaults,defaults_net4 --lanes 3`, 2026-12-06): the depth was the pipeline's gap.
    """
    levels = 5 if spatial_dims == 2 else 4
    strides = list(strides or [2] * (levels - 1))[: levels - 1]
    return (16, 32, 64, 128, 256)[: len(strides) + 1], strides


def as_train_plans(config: Config, seconds: float) -> Config:
    """A copy of `config` whose "auto" augmentation and batch size are decided as `latentseg train`
    decides them for a run of `seconds` (augmentation off up to 60 minutes), so the baselines see
    what latentseg sees."""
    config = copy.deepcopy(config)
    config.train.max_minutes = seconds / 60  # the baselines' loops stop on `seconds`, not on this
    plan_batches(config)
    return config


def train_unet(
    samples: list[dict[str, Any]], config: Config, seconds: float, seed: int = 0, network: tuple | None = None
) -> tuple[UNet, dict[str, float]]:
    """AdamW 1e-3 with Dice + CE on the same augmented patches as latentseg, for `seconds` of wall time.
    `network` = (channels, strides) replaces `bar_network` on the planned strides."""
    torch.manual_seed(seed)
    config = as_train_plans(config, seconds)
    m = config.model
    channels, strides = network or bar_network(m.spatial_dims, m.strides)
    net = make_unet(m.spatial_dims, m.in_channels, m.num_classes, channels, strides)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3, weight_decay=1e-4)
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
    start, steps = time.time(), 0
    stream = batches(samples, config, total=None, seed=seed)
    net.train()
    while time.time() - start < seconds:
        batch = next(stream)
        loss = loss_fn(net(batch["image"]), batch["label"])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        steps += 1
    return net.eval(), {"train_seconds": time.time() - start, "steps": steps}


@torch.no_grad()
def predict_unet(net: UNet, image: np.ndarray, roi_size: list[int], overlap: float = 0.5) -> np.ndarray:
    """Argmax labels of one normalized (C, *S) image, with the same sliding window as latentseg."""
    x = torch.from_numpy(image)[None]
    logits = sliding_window_inference(x, roi_size, 1, net, overlap=overlap, mode="gaussian")
    return logits[0].argmax(0).numpy().astype(np.uint8)


@torch.no_grad()
def predict_unet_image(net: UNet, image: np.ndarray, meta, prep, roi_size: list[int], overlap: float = 0.5):
    """Labels on the image's own grid, through the same preprocessing and inversion as latentseg."""
    from latentseg.data.preprocess import complete_background, prepare_image, restore

    x, transform = prepare_image(image, meta, prep)
    probs = torch.softmax(
        sliding_window_inference(x.as_tensor()[None], roi_size, 1, net, overlap=overlap, mode="gaussian")[0], 0
    )
    back = restore({"prob": probs}, x, transform)["prob"]
    return complete_background(back, back.shape[0]).argmax(0).astype(np.uint8)
