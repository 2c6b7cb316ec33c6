"""Model directories: `config.json`, `model.safetensors`, `fingerprint.json` and, for `--resume`,
`train_state.pt`. Every file is written atomically."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from latentseg.config import Config
from latentseg.errors import LatentSegError, one_line
from latentseg.models import LatentSegmenter, build_model

CONFIG_FILE = "config.json"
MODEL_FILE = "model.safetensors"
FINGERPRINT_FILE = "fingerprint.json"
STATE_FILE = "train_state.pt"
REQUIRED = (CONFIG_FILE, MODEL_FILE, FINGERPRINT_FILE)


def _replace_into(path: Path, write) -> None:
    fd, tmp = tempfile.mkstemp(prefix="tmp-", suffix=path.suffix, dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_checkpoint(
    out_dir: Path,
    model: torch.nn.Module,
    config: Config,
    fingerprint: dict[str, Any],
    train_state: dict[str, Any] | None = None,
) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    _replace_into(out_dir / MODEL_FILE, lambda tmp: save_file(state, tmp))
    if train_state is not None:
        _replace_into(out_dir / STATE_FILE, lambda tmp: torch.save(train_state, tmp))
    _replace_into(out_dir / FINGERPRINT_FILE, lambda tmp: Path(tmp).write_text(json.dumps(fingerprint, indent=2)))
    _replace_into(out_dir / CONFIG_FILE, lambda tmp: config.save(Path(tmp)))


def check_model_dir(model_dir: Path) -> None:
    if not model_dir.is_dir():
        raise LatentSegError(f"{model_dir}: model directory not found")
    missing = [name for name in REQUIRED if not (model_dir / name).is_file()]
    if missing:
        raise LatentSegError(f"{model_dir}: incomplete model directory, missing {', '.join(missing)}")


def load_model(model_dir: str | Path, device: torch.device | str = "cpu") -> tuple[LatentSegmenter, Config, dict]:
    """The trained model in eval mode, its config and the dataset fingerprint."""
    model_dir = Path(model_dir)
    check_model_dir(model_dir)
    config = Config.load(model_dir / CONFIG_FILE)
    try:
        fingerprint = json.loads((model_dir / FINGERPRINT_FILE).read_text())
        state = load_file(str(model_dir / MODEL_FILE))
    except Exception as err:
        raise LatentSegError(f"{model_dir}: cannot read the model files ({one_line(err)})") from err
    try:
        model = build_model(config.model)
        model.load_state_dict(state)
    except (RuntimeError, ValueError) as err:
        raise LatentSegError(f"{model_dir}: weights do not match config.json ({str(err).splitlines()[0]})") from err
    return model.to(device).eval(), config, fingerprint


def load_train_state(model_dir: Path) -> dict[str, Any]:
    path = model_dir / STATE_FILE
    if not path.is_file():
        raise LatentSegError(f"{model_dir}: cannot resume, {STATE_FILE} is missing")
    return torch.load(path, map_location="cpu", weights_only=False)
