"""Training: 003 Algorithm 1 as a short loop over `train_step` and `validate`.

Reads one or more dataset folders (`latentseg.data.prepare` checks, plans, splits and
preprocesses them), then trains with AdamW and a warmup + cosine learning-rate schedule,
validating with DDIM-K sampling and writing a checkpoint directory that `predict` and `--resume`
read.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from monai.data import DataLoader, Dataset
from monai.metrics import DiceMetric
from monai.utils import set_determinism
from safetensors.torch import load_file
from torch.utils.data import WeightedRandomSampler

from latentseg.checkpoint import MODEL_FILE, load_train_state, save_checkpoint
from latentseg.config import Config
from latentseg.data.prepare import prepare_training_data
from latentseg.data.transforms import train_transforms
from latentseg.errors import LatentSegError
from latentseg.infer import predict_array, resolve_device, sampling_problems
from latentseg.models import LatentSegmenter
from latentseg.models.segmenter import check_model_config
from latentseg.progress import progress_bar
from latentseg.text import TextEncoder, case_texts, load_text_encoder

log = logging.getLogger("latentseg.train")


def learning_rate(config: Config, step: int, progress: float) -> float:
    """Linear warmup over `warmup_steps`, then cosine decay to `lr * min_lr_ratio` as `progress`
    (the larger of the step and time fractions of the run) goes from 0 to 1."""
    t = config.train
    if step <= t.warmup_steps:
        return t.lr * step / t.warmup_steps
    floor = t.min_lr_ratio
    return t.lr * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def batches(samples: list[dict[str, Any]], config: Config, total: int, seed: int) -> Iterator[dict[str, torch.Tensor]]:
    """`total` batches of random augmented patches; every dataset is drawn equally often."""
    data = [{"image": s["image"], "label": s["label"], "text": s.get("text") or ""} for s in samples]
    per_dataset = Counter(s.get("dataset", "") for s in samples)
    weights = [1.0 / per_dataset[s.get("dataset", "")] for s in samples]
    transform = train_transforms(config.data.patch_size, config.data)
    transform.set_random_state(seed=seed)
    sampler = WeightedRandomSampler(
        weights,
        num_samples=total * config.train.batch_size,
        replacement=True,
        generator=torch.Generator().manual_seed(seed),
    )
    loader = DataLoader(Dataset(data, transform), batch_size=config.train.batch_size, sampler=sampler, num_workers=0)
    yield from loader


def train_step(
    model, optimizer, batch, config: Config, device, condition_only: bool = False, encoder: TextEncoder | None = None
) -> dict[str, float]:
    model.train()
    image, label = batch["image"].to(device), batch["label"].to(device)
    text = encoder.encode(list(batch["text"])).to(device) if encoder is not None else None
    t = config.train
    if condition_only:  # pre-training the condition network (model.condition=pretrained)
        losses = model.condition_losses(image, label, t.gamma_dice)
    else:
        losses = model.training_losses(
            image, label, t.gamma_dice, t.lambda_noise, timesteps=t.timesteps, last_stage_t=t.last_stage_t, text=text
        )
    optimizer.zero_grad(set_to_none=True)
    losses.total.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    return {"loss": losses.total.item(), "seg": losses.segmentation.item(), "diff": losses.diffusion.item()}


@torch.no_grad()
def validate(
    model: LatentSegmenter, samples: list[dict[str, Any]], config: Config, encoder: TextEncoder | None = None
) -> float:
    """Mean foreground Dice of one sample per validation case (two for staged sampling, one per head)."""
    model.eval()
    metric = DiceMetric(include_background=False, ignore_empty=False)
    c = config.model.num_classes
    for s in samples:
        pred = predict_array(
            model,
            s["image"],
            config.data.patch_size,
            num_samples=2 if config.sample.sampler == "staged" else 1,
            steps=config.sample.steps,
            overlap=0.25,
            sampler=config.sample.sampler,
            middle_steps=config.sample.staged_middle_steps,
            final_head=config.sample.staged_final_head,
            text=encoder.encode([s["text"]]) if encoder is not None else None,
        )
        onehot = lambda a: torch.nn.functional.one_hot(torch.as_tensor(a).long(), c).movedim(-1, 0)[None]  # noqa: E731
        metric(onehot(pred.label), onehot(s["label"][0]))
    return float(metric.aggregate().item())


def check_train_config(config: Config) -> None:
    """Settings that can be refused before any data is read."""
    t = config.train
    problems = []
    if t.steps < 1:
        problems.append(f"train.steps must be >= 1, got {t.steps}")
    if t.timesteps not in ("uniform", "staged"):
        problems.append(f"train.timesteps must be uniform or staged, got {t.timesteps!r}")
    if t.last_stage_t not in ("zero", "sampled"):
        problems.append(f"train.last_stage_t must be zero or sampled, got {t.last_stage_t!r}")
    if not 0 <= t.condition_pretrain_fraction < 1:
        problems.append(f"train.condition_pretrain_fraction must be in [0, 1), got {t.condition_pretrain_fraction}")
    problems += sampling_problems(config.sample, config.model.denoiser_heads)
    try:
        check_model_config(config.model)
    except ValueError as err:
        problems.append(f"model: {err}")
    if problems:
        raise LatentSegError("\n".join(problems))


def train(
    data_dirs: str | Path | list[str | Path],
    out_dir: str | Path,
    config: Config,
    resume: bool = False,
    progress: bool = True,
) -> Path:
    """Train an LDSeg model on one or more dataset folders; returns the model directory."""
    data_dirs = [Path(d) for d in (data_dirs if isinstance(data_dirs, list) else [data_dirs])]
    out_dir = Path(out_dir)
    encoder = None
    if config.model.text_fusion in ("attention", "concat"):  # 000 section II-B: a frozen text encoder
        encoder = load_text_encoder(config.model.text_encoder, config.model.text_max_length)
        config.model.text_dim = encoder.dim
    check_train_config(config)
    data = prepare_training_data(data_dirs, config)
    train_set, val_set = data.train, data.val[: config.train.val_cases]
    if encoder is not None:
        for subset, name in ((data.train, "training"), (data.val, "validation")):
            for sample, text in zip(subset, case_texts(subset, config.data.allow_missing_text, name), strict=True):
                sample["text"] = text

    set_determinism(config.train.seed)
    device = resolve_device(config.train.device)
    model = LatentSegmenter(config.model).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.train.lr, weight_decay=config.train.weight_decay)
    history: dict[str, Any] = {"step": [], "loss": [], "seg": [], "diff": [], "val_step": [], "val_dice": []}
    start, elapsed_before = 0, 0.0
    if resume:
        state = load_train_state(out_dir)
        model.load_state_dict(load_file(str(out_dir / MODEL_FILE)))
        optimizer.load_state_dict(state["optimizer"])
        start, history = state["step"], state["history"]
        elapsed_before = history.get("train_seconds", 0.0)
        torch.set_rng_state(state["torch_rng"])
    fp = data.fingerprint
    log.info("config: %s", json.dumps(config.to_dict()))
    log.info(
        "%d training / %d validation cases, patch %s, %s, %.2fM parameters",
        len(train_set),
        len(data.val),
        config.data.patch_size,
        device,
        sum(p.numel() for p in model.parameters()) / 1e6,
    )
    t0 = time.time()
    budget = config.train.max_minutes * 60

    def elapsed() -> float:
        return elapsed_before + time.time() - t0

    def checkpoint(step: int) -> None:
        history["train_seconds"] = elapsed()
        state = {
            "optimizer": optimizer.state_dict(),
            "step": step,
            "history": history,
            "torch_rng": torch.get_rng_state(),
        }
        save_checkpoint(out_dir, model, config, fp, state)

    total = config.train.steps
    bar = progress_bar(total=total, initial=start, desc="train", unit="step", disable=not progress)
    stream = batches(train_set, config, total - start, config.train.seed + start)
    step = start
    pretrain = config.model.condition == "pretrained"
    frozen = False
    while step < total and not (budget and elapsed() >= budget):
        step += 1
        progress_now = max(step / total, elapsed() / budget if budget else 0.0)
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(config, step, progress_now)
        condition_only = pretrain and progress_now < config.train.condition_pretrain_fraction
        if pretrain and not condition_only and not frozen:  # 004 section 2.3: CFENet is frozen from here on
            model.freeze_condition()
            frozen = True
            bar.write(f"step {step}: condition network pre-trained; frozen for the diffusion training")
        stats = train_step(model, optimizer, next(stream), config, device, condition_only, encoder)
        bar.update(1)
        bar.set_postfix(loss=f"{stats['loss']:.3f}", seg=f"{stats['seg']:.3f}", diff=f"{stats['diff']:.3f}")
        last = step == total or bool(budget and elapsed() >= budget)
        if step % config.train.log_every == 0 or last:
            history["step"].append(step)
            for key in ("loss", "seg", "diff"):
                history[key].append(round(stats[key], 5))
        if val_set and config.train.val_every and (step % config.train.val_every == 0 or last) and not condition_only:
            dice = validate(model, val_set, config, encoder)
            history["val_step"].append(step)
            history["val_dice"].append(round(dice, 4))
            how = "staged" if config.sample.sampler == "staged" else f"DDIM-{config.sample.steps}"
            bar.write(f"step {step}: validation Dice {dice:.4f} ({how}, {len(val_set)} cases)")
        if step % config.train.checkpoint_every == 0 and not last:
            checkpoint(step)
    bar.close()
    checkpoint(step)
    (out_dir / "training_log.json").write_text(json.dumps(history, indent=1))
    return out_dir
