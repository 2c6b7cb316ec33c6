"""The uncertainty baselines of `benchmarks.uncertainty`, trained on latentseg's patches (the same
pipeline, split and annotator draws) and written in `latentseg predict`'s format, so that one
`latentseg evaluate` scores every method alike."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from monai.inferers import sliding_window_inference
from monai.losses import DiceCELoss
from monai.networks.nets import DiffusionModelUNet, UNet

from benchmarks.unet_baseline import as_train_plans, bar_network
from latentseg.config import Config
from latentseg.data.datasets import discover_inputs, load_image
from latentseg.data.preprocess import Preprocessing, complete_background, prepare_image, restore
from latentseg.diffusion import DDIMSampler, DiffusionSchedule, as_batch
from latentseg.fusion import entropy_map, uncertainty_map
from latentseg.infer import Prediction, _write_case
from latentseg.training import batches
from latentseg.uncertainty import fit_temperature

PASSES = 8  # MC-dropout passes
# the pixel-space diffusion peer's samples: DDIM-50 of its UNet costs 1.7 s a step for 8 samples of
# a 128^2 window on one thread here (2026-12-05), about 13 minutes per BU-BIL test image with 8
DIFFUSION_SAMPLES = 4
MEMBERS = 4  # deep-ensemble members
DDIM_STEPS = 50


@dataclass
class Models:
    nets: list[torch.nn.Module]
    kind: str
    steps: int = 0
    temperature: float = 1.0
    extra: dict = field(default_factory=dict)


def _unet(config: Config, dropout: float = 0.0) -> UNet:
    m = config.model
    channels, strides = bar_network(m.spatial_dims, m.strides)
    return UNet(m.spatial_dims, m.in_channels, m.num_classes, channels, strides, num_res_units=2, dropout=dropout)


def _train_loop(net, loss_fn: Callable, samples, config: Config, seconds: float, seed: int) -> int:
    torch.manual_seed(seed)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3, weight_decay=1e-4)
    stream = batches(samples, as_train_plans(config, seconds), total=None, seed=seed)
    start, steps = time.time(), 0
    net.train()
    while time.time() - start < seconds:
        batch = next(stream)
        loss = loss_fn(net, batch["image"], batch["label"])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        steps += 1
    return steps


def _seg_loss():
    dice_ce = DiceCELoss(to_onehot_y=True, softmax=True)
    return lambda net, image, label: dice_ce(net(image), label)


def train_method(method: str, samples, config: Config, seconds: float) -> Models:
    if method == "unet":
        net = _unet(config)
        return Models([net], "softmax", _train_loop(net, _seg_loss(), samples, config, seconds, 0))
    if method == "mc_dropout":
        net = _unet(config, dropout=0.1)
        return Models([net], "mc_dropout", _train_loop(net, _seg_loss(), samples, config, seconds, 0))
    if method == "ensemble":
        nets = [_unet(config) for _ in range(MEMBERS)]
        steps = sum(_train_loop(n, _seg_loss(), samples, config, seconds / MEMBERS, k) for k, n in enumerate(nets))
        return Models(nets, "ensemble", steps)
    if method == "pixel_diffusion":
        return _train_diffusion(samples, config, seconds)
    raise ValueError(f"unknown baseline {method!r}")


# --- a MedSegDiff-kind pixel-space diffusion segmenter ---------------------------------------


def _diffusion_net(config: Config) -> DiffusionModelUNet:
    m = config.model
    return DiffusionModelUNet(
        spatial_dims=m.spatial_dims,
        in_channels=m.in_channels + m.num_classes,
        out_channels=m.num_classes,
        num_res_blocks=1,
        channels=(32, 64, 64, 128),
        attention_levels=(False, False, False, True),
        norm_num_groups=16,
        num_head_channels=32,
    )


def _onehot_pm1(label: torch.Tensor, classes: int) -> torch.Tensor:
    """(B, 1, *S) labels -> (B, C, *S) one-hot in {-1, 1}: the clean sample x0."""
    return F.one_hot(label[:, 0].long(), classes).movedim(-1, 1).float() * 2 - 1


def _train_diffusion(samples, config: Config, seconds: float) -> Models:
    net = _diffusion_net(config)
    schedule = DiffusionSchedule("linear", 1000)
    classes = config.model.num_classes

    def loss_fn(model, image, label):
        x0 = _onehot_pm1(label, classes)
        t = torch.randint(0, 1000, (x0.shape[0],))
        noise = torch.randn_like(x0)
        eps = model(torch.cat([image, schedule.q_sample(x0, t, noise)], 1), t)
        return F.mse_loss(eps, noise)

    steps = _train_loop(net, loss_fn, samples, config, seconds, 0)
    return Models([net], "diffusion", steps, extra={"schedule": schedule})


@torch.no_grad()
def _diffusion_sample(net, schedule, window: torch.Tensor, classes: int, generator: torch.Generator) -> torch.Tensor:
    """(N, B, C, *S) class probabilities of DIFFUSION_SAMPLES DDIM-50 samples (eps prediction)."""
    b = window.shape[0]
    image = window.repeat(DIFFUSION_SAMPLES, *[1] * (window.ndim - 1))
    x = torch.randn((DIFFUSION_SAMPLES * b, classes, *window.shape[2:]), generator=generator)
    sampler = DDIMSampler(schedule, "eps", 0.0)
    sampler.set_timesteps(DDIM_STEPS)
    for t in sampler.timesteps:
        eps = net(torch.cat([image, x], 1), as_batch(t, x))
        x = sampler.step(eps, t, x).prev_sample
    probs = F.one_hot(x.argmax(1), classes).movedim(-1, 1).float()  # each sample's mask
    return probs.reshape(DIFFUSION_SAMPLES, b, classes, *x.shape[2:])


# --- prediction ---------------------------------------------------------------------------------


def _fit_temperature(net, val, config: Config) -> float:
    """The temperature minimising the validation cases' NLL (Guo et al. 2017): latentseg's own fit,
    on the softmax of the logits (log softmax differs from them by a constant per voxel)."""
    probabilities, labels = [], []
    with torch.no_grad():
        for s in val:
            x = torch.from_numpy(s["image"])[None]
            out = sliding_window_inference(x, config.data.patch_size, 4, net.eval(), overlap=0.5, mode="gaussian")
            probabilities.append(torch.softmax(out[0], 0).numpy())
            labels.append(s["label"][0])
    return fit_temperature(probabilities, labels, max_voxels=10**9)  # every voxel, as before


def _dropout_on(net: torch.nn.Module) -> torch.nn.Module:
    net.eval()
    for module in net.modules():
        if isinstance(module, torch.nn.Dropout):
            module.train()
    return net


def segmenter(output: str, models: Models, val, config: Config) -> Callable[[torch.Tensor], torch.Tensor]:
    """window (B, C_in, *roi) -> (N, B, C, *roi) probabilities of N samples (N = 1: deterministic)."""
    classes = config.model.num_classes
    if output == "unet_temperature":
        models.temperature = _fit_temperature(models.nets[0], val, config)
    generator = torch.Generator().manual_seed(0)
    nets = [n.eval() for n in models.nets]
    kinds = {
        "softmax": lambda w: torch.softmax(nets[0](w) / models.temperature, 1)[None],
        "mc_dropout": lambda w: torch.stack([torch.softmax(_dropout_on(nets[0])(w), 1) for _ in range(PASSES)]),
        "ensemble": lambda w: torch.stack([torch.softmax(n(w), 1) for n in nets]),
        "diffusion": lambda w: _diffusion_sample(nets[0], models.extra.get("schedule"), w, classes, generator),
    }
    return kinds[models.kind]


@torch.no_grad()
def predict_case(segment, image: torch.Tensor, roi: list[int]) -> torch.Tensor:
    """(N*C, *S) every sample's class probabilities over one image, stitched by a sliding window."""

    def predictor(window):
        return segment(window).transpose(0, 1).flatten(1, 2)  # (N, b, C, *roi) -> (b, N*C, *roi)

    return sliding_window_inference(image[None], roi, 1, predictor, overlap=0.5, mode="gaussian")[0]


def write_predictions(segment, images: Path, out: Path, fingerprint: dict, config: Config) -> None:
    prep = Preprocessing.from_dict(fingerprint["preprocessing"])
    classes = config.model.num_classes
    mask_values = fingerprint.get("mask_values") or []
    out.mkdir(parents=True, exist_ok=True)
    for case in discover_inputs(images):
        image, meta = load_image(case)
        x, transform = prepare_image(image, meta, prep)
        flat = predict_case(segment, x.as_tensor(), config.data.patch_size)
        n = flat.shape[0] // classes
        samples = flat.reshape(n, classes, *flat.shape[1:])  # (N, C, *S)
        mean = samples.mean(0)
        maps = {"prob": mean, "std": uncertainty_map(samples[:, None])[0], "entropy": entropy_map(samples[:, None])[0]}
        maps["samples"] = flat
        back = restore(maps, x, transform)
        per_sample = complete_background(back["samples"], classes).reshape(n, classes, *back["prob"].shape[1:])
        per_sample = per_sample.argmax(1).astype(np.uint8)
        probabilities = complete_background(back["prob"], classes)
        pred = Prediction(probabilities, back["std"][0], probabilities.argmax(0).astype(np.uint8), back["entropy"][0],
                          per_sample)  # fmt: skip
        _write_case(out, case, image, meta, pred, mask_values, overlay=False)
