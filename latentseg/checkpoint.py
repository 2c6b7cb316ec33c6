"""Model directories: `config.json`, `model.safetensors`, `fingerprint.json` and, for `--resume`,
`train_state.safetensors`. Every file is written atomically, and nothing is ever unpickled.

The training state is one safetensors file: the model's and the optimizer's tensors, the RNG
state, and everything else (step, history, optimizer settings) as JSON in its metadata. Being one
file renamed into place, it is always consistent with itself, whatever kills the run.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from latentseg.config import Config
from latentseg.data.io import atomic_write
from latentseg.data.preprocess import check_preprocessing
from latentseg.errors import LatentSegError, one_line
from latentseg.models import build_model
from latentseg.plan import PLAN_FILE, Plan, load_plan, user_settings
from latentseg.schema import check_mapping

CONFIG_FILE = "config.json"
MODEL_FILE = "model.safetensors"
FINGERPRINT_FILE = "fingerprint.json"
STATE_FILE = "train_state.safetensors"
LEGACY_STATE_FILE = "train_state.pt"  # latentseg < 0.2: a pickle, read only on request (weights_only)
REQUIRED = (CONFIG_FILE, MODEL_FILE, FINGERPRINT_FILE)
STATE_FORMAT = "latentseg-train-state/1"


def weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}


def save_checkpoint(
    out_dir: Path,
    model: torch.nn.Module,
    config: Config,
    fingerprint: dict[str, Any],
    train_state: TrainState | None = None,
    plan: Plan | None = None,
) -> None:
    """The model directory; the training state first, so a model file never outruns it.

    `config` is what `config.json` keeps: the user's settings when a `plan` (`plans.json`) holds
    the derived ones, or a finished config (without a plan, as models before 0.2 were saved)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    if train_state is not None:
        save_train_state(out_dir / STATE_FILE, train_state)
    atomic_write(out_dir / MODEL_FILE, lambda tmp: save_file(weights(model), tmp))
    atomic_write(out_dir / FINGERPRINT_FILE, lambda tmp: Path(tmp).write_text(json.dumps(fingerprint, indent=2)))
    if plan is not None:
        atomic_write(out_dir / PLAN_FILE, lambda tmp: plan.save(Path(tmp)))
    settings = user_settings(config) if plan is not None else config.to_dict()
    atomic_write(out_dir / CONFIG_FILE, lambda tmp: Path(tmp).write_text(json.dumps(settings, indent=2)))


def load_config(model_dir: Path) -> Config:
    """A saved model's finished config: `config.json` with `plans.json` applied."""
    return load_plan(model_dir, Config.load(model_dir / CONFIG_FILE))


def check_model_dir(model_dir: Path) -> None:
    if not model_dir.is_dir():
        raise LatentSegError(f"{model_dir}: model directory not found")
    missing = [name for name in REQUIRED if not (model_dir / name).is_file()]
    if missing:
        raise LatentSegError(f"{model_dir}: incomplete model directory, missing {', '.join(missing)}")


@dataclass
class FingerprintSchema:
    """What `fingerprint.json` may hold; `labels` and `preprocessing` are what prediction reads."""

    labels: dict
    preprocessing: dict
    mask_values: list[int] = field(default_factory=list)
    datasets: list[dict] = field(default_factory=list)
    num_channels: int = 1
    channel_names: dict = field(default_factory=dict)
    spatial_dims: int = 2
    median_spacing: list[float] = field(default_factory=list)
    median_shape: list[int] = field(default_factory=list)
    train_cases: list[str] = field(default_factory=list)
    val_cases: list[str] = field(default_factory=list)
    targets: dict = field(default_factory=dict)
    raters: dict = field(default_factory=dict)
    grid: dict = field(default_factory=dict)  # how much coarser than the images' grid, and why
    plan: dict = field(default_factory=dict)


def read_fingerprint(path: Path) -> dict[str, Any]:
    """`fingerprint.json`, checked: an object with the expected keys and types."""
    try:
        raw = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise LatentSegError(f"{path}: cannot read the fingerprint ({one_line(err)})") from err
    problems = check_mapping(raw, FingerprintSchema, str(path), required=("labels",))
    if not problems and "preprocessing" in raw:
        problems = check_preprocessing(raw["preprocessing"], f"{path}: preprocessing")
    if problems:
        raise LatentSegError("\n".join(problems))
    return raw


def load_model(model_dir: str | Path, device: torch.device | str = "cpu") -> tuple[torch.nn.Module, Config, dict]:
    """The trained model in eval mode, its config and the dataset fingerprint."""
    model_dir = Path(model_dir)
    check_model_dir(model_dir)
    config = load_config(model_dir)
    fingerprint = read_fingerprint(model_dir / FINGERPRINT_FILE)
    state = read_weights(model_dir / MODEL_FILE)
    try:
        model = build_model(config.model)
        model.load_state_dict(state)
    except (RuntimeError, ValueError) as err:
        raise LatentSegError(
            f"{model_dir}: weights do not match config.json ({one_line(str(err).splitlines()[0])})"
        ) from err
    return model.to(device).eval(), config, fingerprint


def read_weights(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path))
    except (OSError, SafetensorError, ValueError) as err:
        raise LatentSegError(f"{path.parent}: cannot read the model files ({path.name}: {one_line(err)})") from err


@dataclass
class TrainState:
    """What `--resume` needs beyond the config: weights, optimizer, step, history and RNG."""

    model: dict[str, torch.Tensor]
    optimizer: dict[str, Any]  # torch's optimizer.state_dict()
    step: int
    history: dict[str, Any]
    torch_rng: torch.Tensor
    extra: dict[str, torch.Tensor] = field(default_factory=dict)  # e.g. the importance sampler's history
    average: dict[str, torch.Tensor] = field(default_factory=dict)  # the weights' moving average (train.ema_decay)


def _flatten_optimizer(state: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """torch's optimizer state dict -> (tensors keyed `optimizer/PARAM/NAME`, the JSON-able rest)."""
    tensors, scalars = {}, {}
    for index, entry in state["state"].items():
        for name, value in entry.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optimizer/{index}/{name}"] = value.detach().cpu().contiguous()
            else:
                scalars[f"{index}/{name}"] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():  # PARAM/NAME
        index, name = key.split("/", 1)
        state.setdefault(int(index), {})[name] = value
    for key, value in meta.get("scalars", {}).items():
        index, name = key.split("/", 1)
        state.setdefault(int(index), {})[name] = value
    return {"state": state, "param_groups": meta["param_groups"]}


def save_train_state(path: Path, state: TrainState) -> None:
    opt_tensors, opt_meta = _flatten_optimizer(state.optimizer)
    tensors = {f"model/{k}": v.detach().cpu().contiguous() for k, v in state.model.items()}
    tensors.update(opt_tensors)
    tensors["rng/torch"] = state.torch_rng.cpu().contiguous()
    tensors.update({f"extra/{k}": v.detach().cpu().contiguous() for k, v in state.extra.items()})
    tensors.update({f"average/{k}": v.detach().cpu().contiguous() for k, v in state.average.items()})
    meta = {"step": state.step, "history": state.history, "optimizer": opt_meta}
    metadata = {"format": STATE_FORMAT, "state": json.dumps(meta)}
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))


def _split(tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}


def read_train_state(path: Path) -> TrainState:
    """A training state written by `save_train_state`; never runs code from the file."""
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            tensors = {key: f.get_tensor(key) for key in f.keys()}  # noqa: SIM118 (safe_open is not a dict)
        if metadata.get("format") != STATE_FORMAT:
            raise ValueError(f"not a latentseg training state (format {metadata.get('format')!r})")
        meta = json.loads(metadata["state"])
        optimizer = _unflatten_optimizer(_split(tensors, "optimizer/"), meta["optimizer"])
        return TrainState(
            _split(tensors, "model/"),
            optimizer,
            int(meta["step"]),
            dict(meta["history"]),
            tensors["rng/torch"],
            _split(tensors, "extra/"),
            _split(tensors, "average/"),
        )
    except (OSError, SafetensorError, ValueError, KeyError, TypeError, json.JSONDecodeError) as err:
        raise LatentSegError(f"{path}: cannot read the training state ({one_line(err)})") from err


def load_train_state(model_dir: Path, allow_legacy: bool = False) -> TrainState:
    """The state `--resume` continues from. A legacy `train_state.pt` (a pickle) is read only when
    `allow_legacy`, and then with `torch.load(weights_only=True)`, which runs no code."""
    path = model_dir / STATE_FILE
    if path.is_file():
        return read_train_state(path)
    legacy = model_dir / LEGACY_STATE_FILE
    if not legacy.is_file():
        raise LatentSegError(f"{model_dir}: cannot resume, {STATE_FILE} is missing")
    if not allow_legacy:
        raise LatentSegError(
            f"{legacy}: a training state from latentseg < 0.2 is a pickle and is not loaded by default; "
            f"to continue, rerun with --legacy-state (read with torch.load(weights_only=True), which runs no code), "
            f"or start a new run from {MODEL_FILE} with a new --out"
        )
    return _read_legacy_state(legacy, model_dir)


def _read_legacy_state(legacy: Path, model_dir: Path) -> TrainState:
    try:
        state = torch.load(legacy, map_location="cpu", weights_only=True)
        return TrainState(
            read_weights(model_dir / MODEL_FILE),
            state["optimizer"],
            int(state["step"]),
            dict(state["history"]),
            state["torch_rng"],
        )
    except LatentSegError:
        raise
    except Exception as err:  # noqa: BLE001 (an unpickling refusal has many types)
        raise LatentSegError(f"{legacy}: refused to load this legacy training state ({one_line(err)})") from err
