"""`latentseg pretrain-ddpm`: an unconditional 2D DDPM UNet trained on a dataset's images, without
labels, as the frozen backbone of TextDiff (001 section 2.1). The paper uses a DDPM pretrained on
natural images, which cannot be downloaded here; this trains one on the user's own images.

The UNet predicts eps: L = ||eps - eps_theta(x_t, t)||^2 with x_t = q_sample(x_0, t, eps) (001 Eq. 1;
t uniform over the schedule). Images are z-scored per channel (the preprocessing `train` applies to
non-CT images), and training draws random `size`^2 crops with flips. The result is a diffusers
`UNet2DModel` folder (config.json + diffusion_pytorch_model.safetensors) plus `pretrain_log.json`.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from monai.utils import set_determinism

from latentseg.data.datasets import discover_inputs, load_image
from latentseg.data.preprocess import Preprocessing, prepare_image
from latentseg.diffusion import DiffusionSchedule, uniform_timesteps
from latentseg.errors import LatentSegError
from latentseg.infer import resolve_device
from latentseg.models.backbone import build_unet, default_unet_config
from latentseg.progress import progress_bar

log = logging.getLogger("latentseg.pretrain")
LOG_FILE = "pretrain_log.json"


def load_images(path: str | Path, spacing: list[float] | None = None) -> list[torch.Tensor]:
    """Every image under `path` (a folder, or a dataset root's images/ or imagesTs/), z-scored, and
    resampled to `spacing` when given (as `train` does with data.spacing)."""
    cases = discover_inputs(path)
    prep = Preprocessing(2, spacing, None, crop_foreground=False, ct_channels={})
    images = []
    for case in cases:
        image, meta = load_image(case)
        if meta.spatial_dims != 2:
            raise LatentSegError(f"{case.image_paths[0]}: pretrain-ddpm trains a 2D UNet; this image is 3D")
        images.append(torch.as_tensor(prepare_image(image, meta, prep)[0]).float())
    if len({im.shape[0] for im in images}) > 1:
        raise LatentSegError(f"{path}: the images have different channel counts")
    return images


def random_crop(image: torch.Tensor, size: int, generator: torch.Generator) -> torch.Tensor:
    """A random size^2 crop (reflect-padded when the image is smaller), flipped at random."""
    h, w = image.shape[1:]
    if h < size or w < size:
        image = F.pad(image[None], (0, max(0, size - w), 0, max(0, size - h)), mode="replicate")[0]
        h, w = image.shape[1:]
    y = int(torch.randint(0, h - size + 1, (1,), generator=generator))
    x = int(torch.randint(0, w - size + 1, (1,), generator=generator))
    crop = image[:, y : y + size, x : x + size]
    flips = torch.rand(2, generator=generator) < 0.5
    dims = [d for d, flip in zip((1, 2), flips.tolist(), strict=True) if flip]
    return crop.flip(dims) if dims else crop


def save_unet(unet: torch.nn.Module, out_dir: Path, log_data: dict) -> None:
    """Write the diffusers folder in a temporary sibling and move the files in: never half-written."""
    out_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".partial-", dir=out_dir))
    try:
        unet.save_pretrained(str(staging), safe_serialization=True)
        (staging / LOG_FILE).write_text(json.dumps(log_data, indent=1))
        for path in staging.iterdir():
            os.replace(path, out_dir / path.name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def pretrain_ddpm(
    data: str | Path,
    out_dir: str | Path,
    size: int = 256,
    steps: int = 5000,
    batch_size: int = 4,
    lr: float = 2e-4,
    max_minutes: float = 0.0,
    seed: int = 0,
    device: str = "auto",
    unet_config: dict | None = None,
    spacing: list[float] | None = None,
    progress: bool = True,
) -> Path:
    """Train an eps-predicting UNet2DModel on the images under `data`; returns `out_dir`.

    Args:
        size: side of the square training crops (the UNet is fully convolutional; features can be
            taken from larger windows later). Must be a multiple of the UNet's total downsampling.
        max_minutes: stop after this many minutes even before `steps` (0: no limit).
        unet_config: a diffusers UNet2DModel config; default: `default_unet_config`.
        spacing: resample the images to this pixel spacing first (e.g. [2.0, 2.0] halves a PNG);
            train the segmenter with the same data.spacing so that both see one scale.
    """
    out_dir = Path(out_dir)
    set_determinism(seed)
    images = load_images(data, spacing)
    config = unet_config or default_unet_config(images[0].shape[0], size)
    multiple = 2 ** (len(config["block_out_channels"]) - 1)
    if size % multiple:
        raise LatentSegError(f"--size {size} must be a multiple of {multiple}, the UNet's total downsampling")
    dev = resolve_device(device)
    unet = build_unet(config).to(dev)
    schedule = DiffusionSchedule("linear", 1000)
    optimizer = torch.optim.AdamW(unet.parameters(), lr=lr, weight_decay=0.0)
    generator = torch.Generator().manual_seed(seed)
    millions = sum(p.numel() for p in unet.parameters()) / 1e6
    log.info("%d images, %d^2 crops, %.2fM parameters, %s", len(images), size, millions, dev)
    history: dict = {"step": [], "loss": [], "data": str(data), "size": size, "spacing": spacing}
    history["batch_size"] = batch_size
    start, step, running = time.time(), 0, []
    bar = progress_bar(total=steps, desc="pretrain-ddpm", unit="step", disable=not progress)
    while step < steps and not (max_minutes and time.time() - start >= max_minutes * 60):
        x0 = sample_crops(images, batch_size, size, generator).to(dev)
        loss = ddpm_step(unet, optimizer, schedule, x0, generator)
        step += 1
        running.append(loss)
        bar.update(1)
        bar.set_postfix(loss=f"{loss:.4f}", refresh=False)
        if step % 50 == 0 or step == steps:
            history["step"].append(step)
            history["loss"].append(round(sum(running) / len(running), 5))
            running = []
    bar.close()
    history["train_seconds"] = round(time.time() - start, 1)
    history["steps_done"] = step
    save_unet(unet.cpu(), out_dir, history)
    return out_dir


def sample_crops(images: list[torch.Tensor], batch_size: int, size: int, generator: torch.Generator) -> torch.Tensor:
    picks = torch.randint(0, len(images), (batch_size,), generator=generator).tolist()
    return torch.stack([random_crop(images[i], size, generator) for i in picks])


def ddpm_step(unet, optimizer, schedule: DiffusionSchedule, x0: torch.Tensor, generator: torch.Generator) -> float:
    """One step of the simple eps objective of DDPM; returns the loss."""
    t = uniform_timesteps(x0.shape[0], schedule.num_timesteps, x0.device, generator)
    noise = torch.randn(x0.shape, generator=generator).to(x0.device)
    loss = F.mse_loss(unet(schedule.q_sample(x0, t, noise), t).sample, noise)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
    optimizer.step()
    return loss.item()
