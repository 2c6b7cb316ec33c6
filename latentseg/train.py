"""Training: 003 Algorithm 1 as a short loop over `train_step` and `validate`.

Reads one or more dataset folders (`latentseg.data.prepare` checks, plans, splits and
preprocesses them), then trains with AdamW and a warmup + cosine learning-rate schedule,
validating with DDIM-K sampling and writing a checkpoint directory that `predict` and `--resume`
read. Under `torchrun` every process trains on its own share of the batches in
DistributedDataParallel (`latentseg.distributed`); rank 0 alone logs, validates and writes.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from monai.data import DataLoader, Dataset
from monai.metrics import compute_dice
from monai.transforms import Compose
from monai.utils import set_determinism
from torch.utils.data import DistributedSampler, WeightedRandomSampler

from latentseg.checkpoint import (
    LEGACY_STATE_FILE,
    REQUIRED,
    STATE_FILE,
    TrainState,
    load_train_state,
    save_checkpoint,
    weights,
)
from latentseg.config import Config
from latentseg.data.prepare import prepare_training_data
from latentseg.data.targets import ClassIds, read_label_map, select_target, target_names, target_tasks
from latentseg.data.transforms import flip_word_pairs, train_transforms
from latentseg.diffusion import ImportanceTimesteps
from latentseg.distributed import World, barrier, from_rank0, lost_peer_message, setup, teardown, wrap
from latentseg.errors import LatentSegError, one_line
from latentseg.infer import predict_array, sampling_problems
from latentseg.models import LatentSegmenter, build_model
from latentseg.models.segmenter import TIMESTEP_RULES, Losses, check_model_config
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


def batches(
    samples: list[dict[str, Any]], config: Config, total: int, seed: int, world: World | None = None
) -> Iterator[dict[str, torch.Tensor]]:
    """`total` batches of random augmented patches for this rank; every dataset is drawn equally often.

    One stream of case indices is drawn with the same seed on every rank and dealt out by
    `DistributedSampler`, so N ranks see N different batches per step; the augmentation seed
    differs per rank. With one process the stream is the whole of it.
    """
    world = world or World()
    data = [{"image": s["image"], "label": s["label"], "text": s.get("text") or ""} for s in samples]
    for entry, s in zip(data, samples, strict=True):
        if "target" in s:  # a prompted task: the label becomes that target's mask, per batch
            entry["target"] = s["target"]
    per_dataset = Counter(s.get("dataset", "") for s in samples)
    weights = [1.0 / per_dataset[s.get("dataset", "")] for s in samples]
    draws = WeightedRandomSampler(
        weights,
        num_samples=total * config.train.batch_size * world.size,
        replacement=True,
        generator=torch.Generator().manual_seed(seed),
    )
    # a prompt names a structure (not a side of the image): flips leave it as it is
    describes = config.model.prompt == "none"
    transform = Compose([select_target, train_transforms(config.data.patch_size, config.data, swap_text=describes)])
    transform.set_random_state(seed=seed + 100_003 * world.rank)
    dataset = Dataset([data[i] for i in draws], transform)
    sampler = DistributedSampler(dataset, num_replicas=world.size, rank=world.rank, shuffle=False)
    yield from DataLoader(dataset, batch_size=config.train.batch_size, sampler=sampler, num_workers=0)


class TrainingLosses(torch.nn.Module):
    """A training step's losses as a module's forward: DistributedDataParallel synchronises the
    gradients of what runs through `forward`, so the losses must be computed there."""

    def __init__(self, model: LatentSegmenter, config: Config, importance: ImportanceTimesteps | None = None):
        super().__init__()
        self.model, self.config, self.importance = model, config, importance

    def forward(self, image: torch.Tensor, label: torch.Tensor, text=None, pretrain: tuple[str, ...] = ()) -> Losses:
        t = self.config.train
        if pretrain:  # pre-training the condition network and / or the mask autoencoder
            return self.model.pretrain_losses(image, label, pretrain, t.gamma_dice, t.autoencoder_weight_decay)
        return self.model.training_losses(
            image,
            label,
            t.gamma_dice,
            t.lambda_noise,
            timesteps=t.timesteps,
            last_stage_t=t.last_stage_t,
            text=text,
            importance=self.importance,
        )


def train_step(
    losses_fn: torch.nn.Module,
    optimizer,
    batch,
    device,
    pretrain: tuple[str, ...] = (),
    encoder: TextEncoder | ClassIds | None = None,
) -> dict[str, float]:
    """One optimizer step; `losses_fn` is a `TrainingLosses`, wrapped in DDP when distributed."""
    losses_fn.train()
    image, label = batch["image"].to(device), batch["label"].to(device)
    text = encoder.encode(list(batch["text"])).to(device) if encoder is not None else None
    losses = losses_fn(image, label, text, pretrain)
    optimizer.zero_grad(set_to_none=True)
    losses.total.backward()
    torch.nn.utils.clip_grad_norm_(losses_fn.parameters(), 1.0)
    optimizer.step()
    return {"loss": losses.total.item(), "seg": losses.segmentation.item(), "diff": losses.diffusion.item()}


@torch.no_grad()
def validate(
    model: LatentSegmenter, samples: list[dict[str, Any]], config: Config, encoder: TextEncoder | None = None
) -> float:
    """Mean foreground Dice of one sample per validation case (two for staged sampling, one per head)."""
    model.eval()
    device = next(model.parameters()).device
    scores = []  # compute_dice, not DiceMetric: its aggregate() gathers from every rank, and only rank 0 validates
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
            text=encoder.encode([s["text"]]).to(device) if encoder is not None else None,
        )
        onehot = lambda a: torch.nn.functional.one_hot(torch.as_tensor(a).long(), c).movedim(-1, 0)[None]  # noqa: E731
        scores.append(
            compute_dice(onehot(pred.label), onehot(s["label"][0]), include_background=False, ignore_empty=False)
        )
    return float(torch.cat(scores).mean().item())


def check_train_config(config: Config) -> None:
    """Settings that can be refused before any data is read."""
    t = config.train
    problems = []
    if t.steps < 1:
        problems.append(f"train.steps must be >= 1, got {t.steps}")
    if t.timesteps not in TIMESTEP_RULES:
        problems.append(f"train.timesteps must be one of {', '.join(TIMESTEP_RULES)}, got {t.timesteps!r}")
    if config.model.mode == "textdiff" and t.timesteps != "uniform":
        problems.append("train.timesteps: model.mode=textdiff trains no diffusion (its feature timesteps are fixed)")
    if t.timesteps == "importance":
        try:
            ImportanceTimesteps(config.model.num_timesteps, t.importance_bins, t.importance_history)
        except ValueError as err:
            problems.append(f"train.importance_*: {err}")
    if t.last_stage_t not in ("zero", "sampled"):
        problems.append(f"train.last_stage_t must be zero or sampled, got {t.last_stage_t!r}")
    try:
        flip_word_pairs(config.data.text_flip_words)  # the axes are checked once the data is read
    except ValueError as err:
        problems.append(str(err))
    for key in ("condition_pretrain_fraction", "autoencoder_pretrain_fraction"):
        if not 0 <= getattr(t, key) < 1:
            problems.append(f"train.{key} must be in [0, 1), got {getattr(t, key)}")
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
    legacy_state: bool = False,
) -> Path:
    """Train an LDSeg model on one or more dataset folders; returns the model directory.

    Under torchrun (RANK / WORLD_SIZE set) this is one of the training processes; see
    `latentseg.distributed`. `legacy_state` lets `resume` read a `train_state.pt` of latentseg < 0.2
    (with `torch.load(weights_only=True)`).
    """
    data_dirs = [Path(d) for d in (data_dirs if isinstance(data_dirs, list) else [data_dirs])]
    out_dir = Path(out_dir)
    check_out_dir(out_dir, resume)
    m = config.model
    if m.prompt != "none" and m.text_fusion == "none":
        m.text_fusion = "attention"  # 002: the prompt needs a way into the image latent
    encoder = None
    if m.text_fusion in ("attention", "concat") and m.prompt != "class":  # 000 II-B: a frozen text encoder
        encoder = load_text_encoder(m.text_encoder, m.text_max_length)
        m.text_dim = encoder.dim
    if m.prompt == "class" and m.text_dim < 1:
        m.text_dim = 64  # width of the learned class embeddings
    backbone = _textdiff_backbone(config) if config.model.mode == "textdiff" and not resume else None
    check_train_config(config)
    data = prepare_training_data(data_dirs, config)
    try:
        flip_word_pairs(config.data.text_flip_words, m.spatial_dims)
    except ValueError as err:
        raise LatentSegError(str(err)) from None
    if backbone is not None:
        _check_backbone_fits(backbone, config)
    if m.prompt != "none":
        encoder = _prompt_tasks(data, config, encoder)
    elif encoder is not None:
        for subset, name in ((data.train, "training"), (data.val, "validation")):
            for sample, text in zip(subset, case_texts(subset, config.data.allow_missing_text, name), strict=True):
                sample["text"] = text
    world, device = setup(config.train.device, config.train.distributed_timeout_minutes)
    if not world.is_main:
        log.setLevel(logging.WARNING)
    created = not out_dir.exists()
    try:
        out_dir.mkdir(parents=True, exist_ok=True)  # a folder that cannot be written fails now, not in an hour
        return _train(
            data, out_dir, config, resume, progress and world.is_main, encoder, world, device, backbone, legacy_state
        )
    except (RuntimeError, torch.distributed.DistError) as err:
        if world.distributed and _is_lost_peer(err):
            raise LatentSegError(lost_peer_message(world, err, out_dir)) from err
        raise
    except BaseException:
        if created and world.is_main:
            remove_incomplete(out_dir)
        raise
    finally:
        teardown(world)


def check_out_dir(out_dir: Path, resume: bool) -> None:
    """`--out` must be a folder that holds no model (or, with `resume`, the model to continue)."""
    if out_dir.exists() and not out_dir.is_dir():
        raise LatentSegError(f"{out_dir}: exists and is not a folder; choose another --out")
    held = [name for name in (*REQUIRED, STATE_FILE, LEGACY_STATE_FILE) if (out_dir / name).exists()]
    if resume and not out_dir.is_dir():
        raise LatentSegError(f"{out_dir}: no model to resume (the folder does not exist)")
    if not resume and held:
        raise LatentSegError(
            f"{out_dir}: already holds a model ({', '.join(held)}); continue it with --resume, "
            f"or choose another --out (nothing is overwritten)"
        )


def remove_incomplete(out_dir: Path) -> None:
    """A model folder this run created but could not complete (a full disk, a crash before the
    first checkpoint) is removed rather than left half-written."""
    if out_dir.is_dir() and not all((out_dir / name).is_file() for name in REQUIRED):
        shutil.rmtree(out_dir, ignore_errors=True)


def _is_lost_peer(err: BaseException) -> bool:
    """A collective that failed because another rank died or stopped answering."""
    text = str(err).lower()
    return isinstance(err, torch.distributed.DistError) or any(
        word in text for word in ("gloo", "nccl", "connection", "timed out", "timeout", "peer")
    )


def _prompt_tasks(data, config: Config, encoder: TextEncoder | None):
    """002: every (case, target) becomes a binary task prompted by the target's shared name.
    Returns what turns prompts into the model's input (the text encoder, or class ids)."""
    m = config.model
    label_map = read_label_map(config.data.label_map) if config.data.label_map else {}
    targets = target_names(data.labels_by_dataset, label_map)
    names = sorted({name for t in targets.values() for name in t.values()})
    if not names:
        raise LatentSegError("model.prompt: the datasets have no foreground labels to prompt for")
    data.train = target_tasks(data.train, targets)
    data.val = target_tasks(data.val, targets, binarize=True)
    m.num_classes, m.prompt_names = 2, names
    data.fingerprint.update(
        labels={"0": "background", "1": "target"},
        mask_values=[],
        targets={ds: {str(i): n for i, n in t.items()} for ds, t in targets.items()},
    )
    log.info("%d targets (%s): %d training tasks", len(names), ", ".join(names), len(data.train))
    return ClassIds(names) if m.prompt == "class" else encoder


def _textdiff_backbone(config: Config) -> torch.nn.Module:
    """The pretrained DDPM UNet of a textdiff model; its settings are recorded in the config."""
    from latentseg.models.backbone import check_feature_settings, load_backbone

    if not config.model.backbone:
        raise LatentSegError("model.mode=textdiff needs model.backbone=FOLDER, a diffusers UNet2DModel (pretrain-ddpm)")
    unet = load_backbone(config.model.backbone)
    m = config.model
    check_feature_settings(unet, m.feature_blocks, m.feature_timesteps, m.num_timesteps)
    config.model.backbone_config = dict(unet.config)
    return unet


def _check_backbone_fits(unet: torch.nn.Module, config: Config) -> None:
    m = config.model
    if m.spatial_dims != 2:
        raise LatentSegError(f"model.mode=textdiff needs 2D images; the data is {m.spatial_dims}D")
    if unet.config.in_channels != m.in_channels:
        raise LatentSegError(
            f"{m.backbone}: the UNet takes {unet.config.in_channels} image channels, the data has {m.in_channels}"
        )


def _train(
    data,
    out_dir: Path,
    config: Config,
    resume: bool,
    progress: bool,
    encoder,
    world: World,
    device,
    backbone=None,
    legacy_state: bool = False,
) -> Path:
    train_set, val_set = data.train, data.val[: config.train.val_cases]
    set_determinism(config.train.seed)  # the same initial weights on every rank
    model = build_model(config.model)
    if backbone is not None:  # textdiff: the pretrained DDPM UNet, frozen inside the model
        model.features.unet.load_state_dict(backbone.state_dict())
    model = model.to(device)
    if config.train.feature_cache_mb > 0 and hasattr(model, "cache_features"):
        model.cache_features(config.train.feature_cache_mb)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.train.lr, weight_decay=config.train.weight_decay)
    history: dict[str, Any] = {"step": [], "loss": [], "seg": [], "diff": [], "val_step": [], "val_dice": []}
    start, elapsed_before = 0, 0.0
    saved = None
    if resume:  # every rank reads the one checkpoint, whatever the number of processes that wrote it
        saved = load_train_state(out_dir, legacy_state)
        try:
            model.load_state_dict(saved.model)
            optimizer.load_state_dict(saved.optimizer)
        except (RuntimeError, ValueError, KeyError) as err:
            raise LatentSegError(f"{out_dir}: the training state does not match config.json ({one_line(err)})") from err
        start, history = saved.step, saved.history
        elapsed_before = history.get("train_seconds", 0.0)
        torch.set_rng_state(saved.torch_rng)
    if world.distributed:  # each rank draws its own noise and timesteps
        torch.manual_seed(config.train.seed + start + 100_003 * world.rank)
    fp = data.fingerprint
    log.info("config: %s", json.dumps(config.to_dict()))
    log.info(
        "%d training / %d validation cases, patch %s, %s, %.2fM parameters%s",
        len(train_set),
        len(data.val),
        config.data.patch_size,
        device,
        sum(p.numel() for p in model.parameters()) / 1e6,
        f", {world.size} processes of batch {config.train.batch_size}" if world.distributed else "",
    )
    t0 = time.time()
    budget = config.train.max_minutes * 60
    not_training = 0.0  # seconds spent validating: outside the budget, so samplers of any cost train alike

    def elapsed() -> float:
        return elapsed_before + time.time() - t0 - not_training

    def checkpoint(step: int) -> None:
        if not world.is_main:
            return
        history["train_seconds"] = elapsed()
        extra = importance.state() if importance is not None else {}
        state = TrainState(weights(model), optimizer.state_dict(), step, history, torch.get_rng_state(), extra)
        save_checkpoint(out_dir, model, config, fp, state)
        log.info("step %d: checkpoint written to %s (rank %d of %d)", step, out_dir, world.rank, world.size)

    total = config.train.steps
    bar = progress_bar(total=total, initial=start, desc="train", unit="step", disable=not progress)
    stream = batches(train_set, config, total - start, config.train.seed + start, world)
    step = start
    t = config.train
    importance = None
    if t.timesteps == "importance":  # 002 section 3.1; the loss history restarts with each run
        importance = ImportanceTimesteps(config.model.num_timesteps, t.importance_bins, t.importance_history)
        if saved is not None and saved.extra:
            importance.load_state(saved.extra)
    parts = getattr(model, "pretrain_parts", ())
    fractions = {"condition": t.condition_pretrain_fraction, "autoencoder": t.autoencoder_pretrain_fraction}
    losses_fn = wrap(TrainingLosses(model, config, importance), world, find_unused_parameters=bool(parts))
    frozen: set[str] = set()
    while step < total:
        now = from_rank0(world, elapsed(), device) if budget else 0.0  # one clock for all ranks: same LR, same stop
        if budget and now >= budget:
            break
        step += 1
        progress_now = max(step / total, now / budget if budget else 0.0)
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(config, step, progress_now)
        pretraining = tuple(p for p in parts if progress_now < fractions[p])
        done = [p for p in parts if p not in pretraining and p not in frozen]
        for part in done:  # 004 section 2.3 / 002 section 2.1: a pre-trained part is frozen from here on
            model.freeze(part)
            frozen.add(part)
            if world.is_main:
                what = {"condition": "condition network", "autoencoder": "mask autoencoder"}[part]
                bar.write(f"step {step}: {what} pre-trained; frozen for the rest of the run")
        if done:  # DDP over the parameters still trained
            losses_fn = wrap(TrainingLosses(model, config, importance), world, find_unused_parameters=bool(pretraining))
        stats = train_step(losses_fn, optimizer, next(stream), device, pretraining, encoder)
        bar.update(1)
        postfix = {key: f"{stats[key]:.3f}" for key in ("loss", "seg", "diff")}
        bar.set_postfix(postfix, refresh=False)  # refresh=True would print a line per step into log files
        last = step == total or bool(budget and from_rank0(world, elapsed(), device) >= budget)
        if step % config.train.log_every == 0 or last:
            history["step"].append(step)
            for key in ("loss", "seg", "diff"):
                history[key].append(round(stats[key], 5))
        validating = config.train.val_every and (step % config.train.val_every == 0 or last)
        if world.is_main and val_set and validating and not pretraining:
            v0 = time.time()
            dice = validate(model, val_set, config, encoder)
            not_training += time.time() - v0
            history["val_step"].append(step)
            history["val_dice"].append(round(dice, 4))
            how = "staged" if config.sample.sampler == "staged" else f"DDIM-{config.sample.steps}"
            bar.write(f"step {step}: validation Dice {dice:.4f} ({how}, {len(val_set)} cases)")
        if step % config.train.checkpoint_every == 0 and not last:
            checkpoint(step)
    bar.close()
    checkpoint(step)
    if world.is_main:
        (out_dir / "training_log.json").write_text(json.dumps(history, indent=1))
    barrier(world)  # every rank returns once the model directory is complete
    return out_dir
