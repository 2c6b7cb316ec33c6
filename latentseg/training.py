"""Training: 003 Algorithm 1 as a short loop over `train_step` and `validate`.

Reads one or more dataset folders and finishes the config from them (`latentseg.plan.resolve`),
then trains the model's objective with AdamW and a warmup + cosine learning-rate schedule,
validating with the model's sampler and writing a checkpoint directory that `predict` and
`--resume` read. The model is used through the `Segmenter` protocol only. Under `torchrun` every
process trains on its own share of the batches in DistributedDataParallel
(`latentseg.distributed`); rank 0 alone logs, validates and writes.
"""

from __future__ import annotations

import itertools
import json
import logging
import math
import shutil
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from monai.data import DataLoader, Dataset
from monai.metrics import compute_dice
from monai.transforms import Compose
from monai.utils import set_determinism
from torch.utils.data import DistributedSampler, WeightedRandomSampler

from latentseg.averaging import WeightAverage
from latentseg.checkpoint import (
    LEGACY_STATE_FILE,
    REQUIRED,
    STATE_FILE,
    TrainState,
    load_train_state,
    save_checkpoint,
    weights,
)
from latentseg.config import AUTO_SAMPLES, Config, SampleConfig, step_limit
from latentseg.data.targets import select_target
from latentseg.data.transforms import RandRaterd, train_transforms
from latentseg.distributed import World, barrier, from_rank0, lost_peer_message, setup, teardown, wrap
from latentseg.errors import LatentSegError, LostPeerError, one_line
from latentseg.infer import predict_array
from latentseg.models import Segmenter, build_model
from latentseg.models.losses import Losses
from latentseg.models.objective import Objective, Phase
from latentseg.plan import PLAN_FILE, Plan, Resolved, resolve
from latentseg.progress import progress_bar
from latentseg.prompts import encode
from latentseg.sampler_fit import describe as describe_sampler_fit
from latentseg.sampler_fit import fit_sampler
from latentseg.uncertainty import fit_temperature

log = logging.getLogger("latentseg.training")


def learning_rate(config: Config, step: int, progress: float) -> float:
    """Linear warmup over `warmup_steps`, then cosine decay to `lr * min_lr_ratio` as `progress`
    (the larger of the step and time fractions of the run) goes from 0 to 1."""
    t = config.train
    if step <= t.warmup_steps:
        return t.lr * step / t.warmup_steps
    floor = t.min_lr_ratio
    return t.lr * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


# batches drawn at a time when a run has no step limit (a time budget ends it)
UNLIMITED_CHUNK = 10_000


def batches(
    samples: list[dict[str, Any]], config: Config, total: int | None, seed: int, world: World | None = None
) -> Iterator[dict[str, torch.Tensor]]:
    """`total` batches (None: without end) of random augmented patches for this rank; every
    dataset is drawn equally often.

    One stream of case indices is drawn with the same seed on every rank and dealt out by
    `DistributedSampler`, so N ranks see N different batches per step; the augmentation seed
    differs per rank. With one process the stream is the whole of it. Without a `total` the
    stream is drawn UNLIMITED_CHUNK batches at a time, each chunk from its own seed.
    """
    sizes = [total] if total is not None else itertools.repeat(UNLIMITED_CHUNK)
    for chunk, size in enumerate(sizes):  # chunk 0 draws from `seed` itself: a limited run's stream
        yield from _batch_stream(samples, config, size, seed + 7_919 * chunk, world)


def _batch_stream(
    samples: list[dict[str, Any]], config: Config, total: int, seed: int, world: World | None = None
) -> Iterator[dict[str, torch.Tensor]]:
    world = world or World()
    data = [{"image": s["image"], "label": s["label"], "text": s.get("text") or ""} for s in samples]
    for entry, s in zip(data, samples, strict=True):
        if "target" in s:  # a prompted task: the label becomes that target's mask, per batch
            entry["target"] = s["target"]
        if "raters" in s and config.data.raters in ("auto", "random"):
            entry["raters"] = s["raters"]  # one annotator's mask per draw, see RandRaterd
        if "foreground" in s and config.data.patch_sampling == "uniform":
            entry["foreground"] = s["foreground"]  # a case kept on disk: where its foreground is
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
    transform = Compose(
        [RandRaterd(), select_target, train_transforms(config.data.patch_size, config.data, swap_text=describes)]
    )
    transform.set_random_state(seed=seed + 100_003 * world.rank)
    dataset = Dataset([data[i] for i in draws], transform)
    sampler = DistributedSampler(dataset, num_replicas=world.size, rank=world.rank, shuffle=False)
    yield from DataLoader(dataset, batch_size=config.train.batch_size, sampler=sampler, num_workers=0)


class TrainingLosses(torch.nn.Module):
    """A training step's losses as a module's forward: DistributedDataParallel synchronises the
    gradients of what runs through `forward`, so the losses must be computed there."""

    def __init__(self, model: Segmenter, objective: Objective):
        super().__init__()
        self.model, self.objective = model, objective

    def forward(self, batch: dict[str, Any], phases: tuple[str, ...] = ()) -> Losses:
        return self.objective.losses(batch, phases)


def train_step(
    losses_fn: torch.nn.Module, optimizer, batch, device, phases: tuple[str, ...] = (), encoder=None
) -> dict:
    """One optimizer step; `losses_fn` is a `TrainingLosses`, wrapped in DDP when distributed."""
    losses_fn.train()
    label = batch["label"] if batch["label"].is_floating_point() else batch["label"].long()  # stored compact
    inputs = {"image": batch["image"].to(device), "label": label.to(device)}
    inputs["text"] = encode(encoder, batch["text"], device)
    losses = losses_fn(inputs, phases)
    optimizer.zero_grad(set_to_none=True)
    losses.total.backward()
    torch.nn.utils.clip_grad_norm_(losses_fn.parameters(), 1.0)
    optimizer.step()
    return {"loss": losses.total.item(), "seg": losses.segmentation.item(), "diff": losses.diffusion.item()}


def validation_options(model: Segmenter, config: Config):
    """The run's sampling settings with the fewest samples the sampler takes (one; staged: one per head)."""
    options = replace(config.sample, num_samples=1)
    return options if not model.sampling_problems(options) else replace(options, num_samples=2)


def _predicted(model: Segmenter, samples: list[dict[str, Any]], config: Config, options, encoder):
    """(sample, its prediction) of each preprocessed validation case, sampled with `options`."""
    model.eval()
    device = next(model.parameters()).device
    for s in samples:
        text = encode(encoder, [s["text"]], device)
        yield s, predict_array(model, s["image"], config.data.patch_size, options, text=text)


@torch.no_grad()
def validate(model: Segmenter, samples: list[dict[str, Any]], config: Config, encoder=None) -> float:
    """Mean foreground Dice of the validation cases, sampled as `sample.*` says (with
    `validation_options`' number of samples)."""
    scores = []  # compute_dice, not DiceMetric: its aggregate() gathers from every rank, and only rank 0 validates
    c = config.model.num_classes

    def onehot(labels) -> torch.Tensor:  # a copy: the label may be a read-only memmap (data.memory_gb)
        return torch.nn.functional.one_hot(torch.tensor(labels, dtype=torch.long), c).movedim(-1, 0)[None]

    for s, pred in _predicted(model, samples, config, validation_options(model, config), encoder):
        scores.append(
            compute_dice(onehot(pred.label), onehot(s["label"][0]), include_background=False, ignore_empty=False)
        )
    return float(torch.cat(scores).mean().item())


SAMPLES_AGREE = 0.01  # below this largest per-voxel std of the probabilities the samples are one mask


@torch.no_grad()
def fit_from_validation(run: Run) -> None:
    """What `train` fits on the validation cases at its end, sampled as `predict` samples, into the
    saved plan: `sample.temperature` left to "auto", the temperature of the fused probabilities that
    minimises their NLL (Guo et al. 2017); `sample.num_samples` left to "auto", 1 where the
    validation cases' AUTO_SAMPLES samples agree (largest std below SAMPLES_AGREE: one annotator
    and a deterministic sampler draw the same mask every time), else AUTO_SAMPLES. Without
    validation cases both stay "auto", read as 1 and AUTO_SAMPLES."""
    config, sample = run.config, run.config.sample
    val_set = run.resolved.data.val[: config.train.val_cases]
    if val_set and run.resolved.data.fit_sampler:
        fit_multi_rater_sampler(run, val_set)
    fit_t, plan_count = sample.temperature == "auto", sample.num_samples == "auto"
    if not val_set or not (fit_t or plan_count):
        return
    count = AUTO_SAMPLES if plan_count else sample.num_samples
    options = replace(sample, temperature=1.0, num_samples=count)
    log.info("predicting %d validation case(s) with %d samples each, to plan predict's sampling", len(val_set), count)
    predicted = list(_predicted(run.model, val_set, config, options, run.resolved.encoder))
    if plan_count:
        plan_sample_count(run, max(float(p.uncertainty.max()) for _, p in predicted), options)
    if fit_t:
        temperature = fit_temperature([p.probabilities for _, p in predicted], [s["label"][0] for s, _ in predicted])
        sample.temperature = run.resolved.plan.sample["temperature"] = temperature
        run.history["temperature"] = temperature
        log.info("calibration: temperature %.2f, fitted on %d validation cases", temperature, len(val_set))


def fit_multi_rater_sampler(run: Run, val_set: list[dict[str, Any]]) -> None:
    """DDIM steps and eta planned for several annotators, fitted on the validation cases
    (`latentseg.sampler_fit`)."""
    sample = run.config.sample
    log.info("fitting the sampler to the annotators' spread on %d validation case(s)", len(val_set))
    fitted = fit_sampler(run.model, val_set, run.config.data.patch_size, sample, run.resolved.encoder)
    if fitted is None:
        return
    chosen, scores = fitted
    for key, value in (("steps", chosen.steps), ("eta", chosen.eta)):
        setattr(sample, key, value)
        run.resolved.plan.sample[key] = value
    run.history["sampler_fit"] = [asdict(s) for s in scores]
    log.info("%s", describe_sampler_fit(chosen, scores))


def plan_sample_count(run: Run, spread: float, options: SampleConfig) -> None:
    """`sample.num_samples` from the validation samples' largest per-voxel std (`fit_from_validation`)."""
    one = replace(options, num_samples=1)
    agree = spread < SAMPLES_AGREE and options.fusion == "mean" and not run.model.sampling_problems(one)
    count = 1 if agree else AUTO_SAMPLES
    run.config.sample.num_samples = run.resolved.plan.sample["num_samples"] = count
    run.history["validation_sample_spread"] = spread
    why = "agree" if agree else "differ"
    log.info(
        "sampling: %d sample%s per image (the validation cases' %d samples %s: largest per-voxel std %.4f; "
        "predict --samples N sets another count)",
        count, "" if count == 1 else "s", options.num_samples, why, spread,
    )  # fmt: skip


def train(
    data_dirs: str | Path | list[str | Path],
    out_dir: str | Path,
    config: Config,
    resume: bool = False,
    progress: bool = True,
    legacy_state: bool = False,
) -> Path:
    """Train a model on one or more dataset folders; returns the model directory.

    Under torchrun (RANK / WORLD_SIZE set) this is one of the training processes; see
    `latentseg.distributed`. `legacy_state` lets `resume` read a `train_state.pt` of latentseg < 0.2
    (with `torch.load(weights_only=True)`).
    """
    data_dirs = [Path(d) for d in (data_dirs if isinstance(data_dirs, list) else [data_dirs])]
    out_dir = Path(out_dir)
    check_out_dir(out_dir, resume)
    resolved = resolve(config, data_dirs)
    if resume:
        check_same_plan(out_dir, resolved.plan)
    world, device = setup(config.train.device, config.train.distributed_timeout_minutes)
    if not world.is_main:
        log.setLevel(logging.WARNING)
    created = not out_dir.exists()
    try:
        out_dir.mkdir(parents=True, exist_ok=True)  # a folder that cannot be written fails now, not in an hour
        run = start_run(resolved, config, out_dir, world, device, resume, legacy_state)
        return run_loop(run, progress and world.is_main)
    except (RuntimeError, torch.distributed.DistError) as err:
        if world.distributed and _is_lost_peer(err):
            raise LostPeerError(lost_peer_message(world, err, out_dir)) from err
        raise
    except BaseException:
        if created and world.is_main:
            remove_incomplete(out_dir)
        raise
    finally:
        teardown(world)
        if resolved.data.store is not None:  # the files of the cases past data.memory_gb
            resolved.data.store.folder.cleanup()


def check_same_plan(out_dir: Path, plan: Plan) -> None:
    """A resumed run must plan what the saved one planned (the data or the code have not changed it)."""
    path = out_dir / PLAN_FILE
    if not path.is_file():
        return
    saved = Plan.load(path)  # the network must be the same; augmentation may follow a longer budget
    if saved.model != plan.model or saved.data.get("patch_size") != plan.data.get("patch_size"):
        raise LatentSegError(f"{path}: the data now plans a different model than the saved run; start a new run")


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


@dataclass
class Run:
    """Everything one training run holds."""

    model: Segmenter
    objective: Objective
    optimizer: torch.optim.Optimizer
    config: Config  # finished
    user_config: Config  # as config.json keeps it
    resolved: Resolved
    out_dir: Path
    world: World
    device: torch.device
    start: int = 0
    history: dict[str, Any] = field(default_factory=dict)
    clock: Clock = field(default_factory=lambda: Clock())
    frozen: set[str] = field(default_factory=set)
    average: WeightAverage | None = None  # train.ema_decay > 0

    def averaged(self):
        """A context in which the model holds the weights that are validated and saved: the
        moving average, or (ema_decay 0) its own."""
        return self.average.applied() if self.average else nullcontext()


class Clock:
    """Seconds of training: validation time is left out, so samplers of any cost train alike."""

    def __init__(self, before: float = 0.0):
        self.before, self.t0, self.paused = before, time.time(), 0.0

    def elapsed(self) -> float:
        return self.before + time.time() - self.t0 - self.paused


def start_run(resolved: Resolved, user: Config, out_dir: Path, world: World, device, resume: bool, legacy: bool) -> Run:
    """The model, its objective and optimizer, fresh or restored from the saved state."""
    config = resolved.config
    set_determinism(config.train.seed)  # the same initial weights on every rank
    model = build_model(config.model)
    if not resume:
        model.load_pretrained()
    model = model.to(device)
    model.prepare_training(config.train)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.train.lr, weight_decay=config.train.weight_decay)
    run = Run(model, model.objective(config), optimizer, config, user, resolved, out_dir, world, device)
    run.history = {"step": [], "loss": [], "seg": [], "diff": [], "val_step": [], "val_dice": []}
    if config.train.ema_decay > 0:
        run.average = WeightAverage(model, config.train.ema_decay)
    if resume:  # every rank reads the one checkpoint, whatever the number of processes that wrote it
        restore(run, load_train_state(out_dir, legacy))
    if world.distributed:  # each rank draws its own noise and timesteps
        torch.manual_seed(config.train.seed + run.start + 100_003 * world.rank)
    return run


def restore(run: Run, saved: TrainState) -> None:
    try:
        run.model.load_state_dict(saved.model)
        run.optimizer.load_state_dict(saved.optimizer)
    except (RuntimeError, ValueError, KeyError) as err:
        raise LatentSegError(f"{run.out_dir}: the training state does not match config.json ({one_line(err)})") from err
    if run.average and saved.average:
        try:
            run.average.load(saved.average)
        except ValueError as err:
            raise LatentSegError(f"{run.out_dir}: {err}") from err
    elif run.average:  # a state saved without one (ema_decay 0, or before latentseg kept it)
        log.info("resume: no weight average in the training state; it starts from the saved weights")
        run.average = WeightAverage(run.model, run.config.train.ema_decay)
    run.start, run.history = saved.step, saved.history
    run.clock = Clock(run.history.get("train_seconds", 0.0))
    torch.set_rng_state(saved.torch_rng)
    run.objective.load_state(saved.extra)


def checkpoint(run: Run, step: int) -> None:
    if not run.world.is_main:
        return
    run.history["train_seconds"] = run.clock.elapsed()
    average = run.average.tensors() if run.average else {}
    state = TrainState(
        weights(run.model), run.optimizer.state_dict(), step, run.history, torch.get_rng_state(), run.objective.state(),
        average,
    )  # fmt: skip
    fingerprint, plan = run.resolved.data.fingerprint, run.resolved.plan
    with run.averaged():  # the model file holds the averaged weights, the training state both
        save_checkpoint(run.out_dir, run.model, run.user_config, fingerprint, state, plan)
    log.info("step %d: checkpoint written to %s (rank %d of %d)", step, run.out_dir, run.world.rank, run.world.size)


def log_start(run: Run) -> None:
    data, config = run.resolved.data, run.config
    log.info("config: %s", json.dumps(config.to_dict()))
    log.info(
        "%d training / %d validation cases, patch %s, %s, %.2fM parameters%s",
        len(data.train),
        len(data.val),
        config.data.patch_size,
        run.device,
        sum(p.numel() for p in run.model.parameters()) / 1e6,
        f", {run.world.size} processes of batch {config.train.batch_size}" if run.world.distributed else "",
    )


def run_loop(run: Run, progress: bool) -> Path:
    """Steps until `train.steps` or `train.max_minutes`, with checkpoints and validations on the way."""
    config, world = run.config, run.world
    log_start(run)
    total, budget = step_limit(config.train), config.train.max_minutes * 60  # total None: the clock alone
    bar = progress_bar(total=total, initial=run.start, desc="train", unit="step", disable=not progress)
    data = run.resolved.data
    remaining = None if total is None else total - run.start
    stream = batches(data.train, config, remaining, config.train.seed + run.start, world)
    phases = run.model.phases(config.train)
    losses_fn, step = wrap_losses(run, phases, ()), run.start
    while total is None or step < total:
        now = from_rank0(world, run.clock.elapsed(), run.device) if budget else 0.0  # one clock: same LR, same stop
        if budget and now >= budget:
            break
        step += 1
        share = max(step / total if total else 0.0, now / budget if budget else 0.0)
        for group in run.optimizer.param_groups:
            group["lr"] = learning_rate(config, step, share)
        pretraining = tuple(p.name for p in phases if share < p.until)
        if freeze_finished(run, phases, pretraining, step, bar):
            losses_fn = wrap_losses(run, phases, pretraining)  # DDP over the parameters still trained
        stats = train_step(losses_fn, run.optimizer, next(stream), run.device, pretraining, run.resolved.encoder)
        if run.average:
            run.average.update(step)
        last = step == total or bool(budget and from_rank0(world, run.clock.elapsed(), run.device) >= budget)
        after_step(run, step, stats, last, pretraining, bar)
    bar.close()
    if world.is_main:
        with run.averaged():
            fit_from_validation(run)
    checkpoint(run, step)
    if world.is_main:
        (run.out_dir / "training_log.json").write_text(json.dumps(run.history, indent=1))
    barrier(world)  # every rank returns once the model directory is complete
    return run.out_dir


def wrap_losses(run: Run, phases: list[Phase], pretraining: tuple[str, ...]) -> torch.nn.Module:
    unused = bool(pretraining) if run.frozen else bool(phases)  # a part left out of the graph needs DDP's search
    return wrap(TrainingLosses(run.model, run.objective), run.world, find_unused_parameters=unused)


def freeze_finished(run: Run, phases: list[Phase], pretraining: tuple[str, ...], step: int, bar) -> bool:
    """004 section 2.3 / 002 section 2.1: a pre-trained part is frozen once its share is over."""
    done = [p for p in phases if p.name not in pretraining and p.name not in run.frozen]
    for phase in done:
        run.model.freeze(phase.name)
        run.frozen.add(phase.name)
        if run.world.is_main:
            bar.write(f"step {step}: {phase.description} pre-trained; frozen for the rest of the run")
    return bool(done)


def after_step(run: Run, step: int, stats: dict, last: bool, pretraining: tuple[str, ...], bar) -> None:
    """Progress, the log, validation and checkpoints of one step."""
    config, history = run.config, run.history
    bar.update(1)
    bar.set_postfix(
        {key: f"{stats[key]:.3f}" for key in ("loss", "seg", "diff")}, refresh=False
    )  # one line per refresh
    if step % config.train.log_every == 0 or last:
        history["step"].append(step)
        for key in ("loss", "seg", "diff"):
            history[key].append(round(stats[key], 5))
    val_set = run.resolved.data.val[: config.train.val_cases]
    validating = config.train.val_every and (step % config.train.val_every == 0 or last)
    if run.world.is_main and val_set and validating and not pretraining:
        v0 = time.time()
        bar.set_description(f"train (validating {len(val_set)} cases)")  # on large volumes this takes minutes
        with run.averaged():
            dice = validate(run.model, val_set, config, run.resolved.encoder)
        bar.set_description("train", refresh=False)
        run.clock.paused += time.time() - v0
        history["val_step"].append(step)
        history["val_dice"].append(round(dice, 4))
        s = config.sample
        bar.write(f"step {step}: validation Dice {dice:.4f} ({s.sampler}, {s.steps} steps, {len(val_set)} cases)")
    if step % config.train.checkpoint_every == 0 and not last:
        checkpoint(run, step)
