"""One model file to share: `latentseg export --model DIR --out NAME.zip` packs what prediction
needs (config, plan, weights, fingerprint, the training log) with a generated model card
(`MODEL.md`) and a manifest of SHA-256 checksums; `latentseg import NAME.zip --out DIR` unpacks
it, and `predict --model NAME.zip` reads it directly. Nothing in it is ever unpickled: weights are
safetensors, everything else JSON or text. A file from a newer latentseg whose format this one
cannot read is refused, naming both versions; a file whose contents do not match the manifest
(tampered or damaged) is refused, naming the file."""

from __future__ import annotations

import atexit
import hashlib
import json
import shutil
import tempfile
import zipfile
from dataclasses import asdict
from pathlib import Path
from typing import Any

from latentseg.checkpoint import CONFIG_FILE, FINGERPRINT_FILE, MODEL_FILE, check_model_dir
from latentseg.config import Config
from latentseg.data.io import atomic_write
from latentseg.errors import LatentSegError, one_line
from latentseg.plan import PLAN_FILE

MANIFEST = "latentseg-model.json"
CARD = "MODEL.md"
FORMAT = 1  # bumped when a model file's layout changes in a way older versions cannot read
PACKED = (CONFIG_FILE, PLAN_FILE, MODEL_FILE, FINGERPRINT_FILE, "training_log.json")
ONNX_FILES = ("onnx/onnx.json", "onnx/condition.onnx", "onnx/denoiser.onnx", "onnx/decoder.onnx")
MAX_UNPACKED_BYTES = 16 * 2**30  # a zip that claims more than this is refused before it is read


def version() -> str:
    from latentseg import __version__

    return __version__


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(2**20), b""):
            digest.update(block)
    return digest.hexdigest()


def reproduce_command(model_dir: Path) -> str:
    """`latentseg train ...` with the settings that differ from the defaults."""
    saved = json.loads((model_dir / CONFIG_FILE).read_text())
    defaults = asdict(Config())
    changed = []
    for section, values in saved.items():
        for key, value in values.items():
            if section in defaults and key in defaults[section] and defaults[section][key] != value:
                changed.append(f"{section}.{key}={json.dumps(value, separators=(',', ':'))}")
    fingerprint = json.loads((model_dir / FINGERPRINT_FILE).read_text())
    data = " ".join(f"--data {d['root']}" for d in fingerprint.get("datasets", [])) or "--data PATH"
    return f"latentseg train {data} --out {model_dir.name} " + " ".join(changed)


def model_card(model_dir: Path) -> str:
    """MODEL.md: the data, the training, the validation figures, the version and how to reproduce."""
    fp = json.loads((model_dir / FINGERPRINT_FILE).read_text())
    log_path = model_dir / "training_log.json"
    log = json.loads(log_path.read_text()) if log_path.is_file() else {}
    datasets = (
        ", ".join(f"{d['root']} ({d['layout']}, {d['cases']} cases)" for d in fp.get("datasets", [])) or "unknown"
    )
    labels = ", ".join(f"{k}: {v}" for k, v in fp.get("labels", {}).items())
    val = log.get("val_dice") or []
    seconds = float(log.get("train_seconds", 0))
    steps = log.get("step", [None])[-1] if log.get("step") else None
    lines = [
        f"# latentseg model `{model_dir.name}`",
        "",
        f"- latentseg {version()}, model file format {FORMAT}",
        f"- Data: {datasets}; {len(fp.get('train_cases', []))} training and "
        f"{len(fp.get('val_cases', []))} validation cases",
        f"- Labels: {labels}",
        f"- Dimensions: {fp.get('spatial_dims')}D, {fp.get('num_channels')} channel(s); median spacing "
        f"{fp.get('median_spacing')}, median shape {fp.get('median_shape')}",
        f"- Training: {steps} steps in {seconds / 60:.1f} minutes ({seconds:.0f} s)",
        f"- Validation Dice (sampled as configured): {val[-1] if val else 'not measured'}"
        + (f" at step {log['val_step'][-1]}" if val else ""),
        "",
        "Reproduce:",
        "",
        "```bash",
        reproduce_command(model_dir),
        "```",
    ]
    return "\n".join(lines) + "\n"


def export_model(model_dir: str | Path, out: str | Path) -> Path:
    """Pack a model directory into one zip; never overwrites an existing file."""
    model_dir, out = Path(model_dir), Path(out)
    check_model_dir(model_dir)
    if out.exists():
        raise LatentSegError(f"{out}: exists; choose another --out (nothing is overwritten)")
    if out.suffix != ".zip":
        raise LatentSegError(f"{out}: the model file must end in .zip")
    names = [n for n in (*PACKED, *ONNX_FILES) if (model_dir / n).is_file()]
    card = model_card(model_dir)
    manifest = {
        "format": FORMAT,
        "latentseg_version": version(),
        "files": {n: _sha256(model_dir / n) for n in names} | {CARD: hashlib.sha256(card.encode()).hexdigest()},
    }

    def write(tmp: Path) -> None:
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED) as zf:
            zf.writestr(MANIFEST, json.dumps(manifest, indent=2))
            zf.writestr(CARD, card)
            for n in names:
                zf.write(model_dir / n, n)

    atomic_write(out, write)
    return out


def _open(path: Path) -> tuple[zipfile.ZipFile, dict[str, Any]]:
    try:
        zf = zipfile.ZipFile(path)
        manifest = json.loads(zf.read(MANIFEST))
    except KeyError:
        raise LatentSegError(f"{path}: not a latentseg model file (no {MANIFEST} inside)") from None
    except (OSError, zipfile.BadZipFile, json.JSONDecodeError, UnicodeDecodeError) as err:
        raise LatentSegError(f"{path}: not a latentseg model file ({one_line(err)})") from err
    if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), dict):
        raise LatentSegError(f"{path}: not a latentseg model file ({MANIFEST} is malformed)")
    return zf, manifest


def _check(path: Path, zf: zipfile.ZipFile, manifest: dict[str, Any]) -> None:
    fmt, written_by = manifest.get("format"), manifest.get("latentseg_version", "unknown")
    if not isinstance(fmt, int) or fmt > FORMAT:
        raise LatentSegError(
            f"{path}: written by latentseg {written_by} (model file format {fmt}); this latentseg {version()} "
            f"reads format {FORMAT}: upgrade latentseg to use it"
        )
    allowed = {*PACKED, *ONNX_FILES, CARD}
    unexpected = [n for n in manifest["files"] if n not in allowed]
    if unexpected:
        raise LatentSegError(f"{path}: unexpected entries {unexpected} in the manifest")
    for name in (CONFIG_FILE, MODEL_FILE, FINGERPRINT_FILE):
        if name not in manifest["files"]:
            raise LatentSegError(f"{path}: incomplete model file, {name} is missing")
    if sum(i.file_size for i in zf.infolist()) > MAX_UNPACKED_BYTES:
        raise LatentSegError(f"{path}: unpacks to more than {MAX_UNPACKED_BYTES // 2**30} GB; refused")


def import_model(path: str | Path, out: str | Path) -> Path:
    """Unpack a model file into a new folder, every file checked against the manifest before any
    is written (a damaged file leaves nothing behind)."""
    path, out = Path(path), Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise LatentSegError(f"{out}: exists and is not empty; choose another --out (nothing is overwritten)")
    zf, manifest = _open(path)
    with zf:
        _check(path, zf, manifest)
        contents = {name: _checked(path, zf, name, expected) for name, expected in manifest["files"].items()}
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".tmp-import-", dir=out.parent))
    try:
        for name, data in contents.items():  # names come from the allow-list, never from the zip
            (staging / name).parent.mkdir(parents=True, exist_ok=True)
            (staging / name).write_bytes(data)
        if out.exists():
            out.rmdir()  # empty, checked above
        staging.rename(out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out


def _checked(path: Path, zf: zipfile.ZipFile, name: str, expected: str) -> bytes:
    try:
        data = zf.read(name)
    except KeyError:
        raise LatentSegError(f"{path}: {name} is listed but missing") from None
    if hashlib.sha256(data).hexdigest() != expected:
        raise LatentSegError(f"{path}: {name} does not match its checksum (damaged or tampered with); refused")
    return data


def unpacked(path: Path) -> Path:
    """A model file unpacked into a temporary folder, removed when the process ends."""
    folder = Path(tempfile.mkdtemp(prefix="latentseg-model-"))
    atexit.register(shutil.rmtree, folder, True)
    return import_model(path, folder / path.stem)


def model_folder(path: str | Path) -> Path:
    """A model directory as given, or a model file (`latentseg export`'s .zip) unpacked and checked."""
    path = Path(path)
    if path.suffix == ".zip" and path.is_file():
        return unpacked(path)
    return path
