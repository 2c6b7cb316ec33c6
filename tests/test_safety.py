"""Nothing is unpickled, nothing is half-written, nothing is overwritten: resume, faults and signals."""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from latentseg.checkpoint import LEGACY_STATE_FILE, STATE_FILE, read_train_state
from latentseg.cli import main
from tests.conftest import TINY_2D

ROOT = Path(__file__).resolve().parents[1]


def error_lines(capsys) -> list[str]:
    return [line for line in capsys.readouterr().err.splitlines() if line.startswith("latentseg: ")]


class Exploit:
    """A pickle that creates a file when it is loaded."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def legacy_run(model2d, tmp_path) -> Path:
    """A model folder as latentseg < 0.2 left it: `train_state.pt` instead of the safetensors state."""
    run = tmp_path / "run"
    shutil.copytree(model2d, run)
    (run / STATE_FILE).unlink()
    return run


def test_no_pickle_in_the_package():
    for path in (ROOT / "latentseg").rglob("*.py"):
        text = path.read_text()
        assert "import pickle" not in text and "pickle.load" not in text, path
        assert "weights_only=False" not in text, path


def test_crafted_legacy_state_runs_no_code(model2d, data2d, tmp_path, capsys):
    run = legacy_run(model2d, tmp_path)
    marker = tmp_path / "pwned"
    torch.save({"step": Exploit(marker), "optimizer": {}, "history": {}}, run / LEGACY_STATE_FILE)
    resume = ["train", "--data", str(data2d["train"]), "--out", str(run), "--resume", "train.steps=35"]
    assert main(resume) == 2
    (line,) = error_lines(capsys)
    assert "is a pickle and is not loaded" in line and "--legacy-state" in line
    assert main([*resume, "--legacy-state"]) == 2
    (line,) = error_lines(capsys)
    assert "refused to load this legacy training state" in line
    assert not marker.exists()


def test_a_plain_legacy_state_resumes_with_the_flag(model2d, data2d, tmp_path):
    run = legacy_run(model2d, tmp_path)
    state = read_train_state(model2d / STATE_FILE)
    legacy = {"optimizer": state.optimizer, "step": state.step, "history": state.history, "torch_rng": state.torch_rng}
    torch.save(legacy, run / LEGACY_STATE_FILE)
    args = ["train", "--data", str(data2d["train"]), "--out", str(run), "--resume", "--legacy-state", "train.steps=32"]
    assert main(args) == 0
    assert read_train_state(run / STATE_FILE).step == 32


def test_truncated_state_is_one_line(model2d, data2d, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(model2d, run)
    data = (run / STATE_FILE).read_bytes()
    (run / STATE_FILE).write_bytes(data[: len(data) // 2])
    assert main(["train", "--data", str(data2d["train"]), "--out", str(run), "--resume", "train.steps=35"]) == 2
    (line,) = error_lines(capsys)
    assert f"{STATE_FILE}: cannot read the training state" in line


def test_resume_keeps_the_importance_history(data2d, tmp_path):
    out = tmp_path / "m"
    args = [*TINY_2D, "train.timesteps=importance", "train.importance_bins=2", "train.importance_history=3"]
    assert main(["train", "--data", str(data2d["train"]), "--out", str(out), *args]) == 0
    state = read_train_state(out / STATE_FILE)
    assert int(state.extra["importance/counts"].sum()) == 30 * 4  # every sample of every step was recorded


def test_train_refuses_an_existing_model_or_a_file(model2d, data2d, tmp_path, capsys):
    before = (model2d / "model.safetensors").read_bytes()
    assert main(["train", "--data", str(data2d["train"]), "--out", str(model2d), *TINY_2D]) == 2
    (line,) = error_lines(capsys)
    assert "already holds a model" in line and "--resume" in line
    assert (model2d / "model.safetensors").read_bytes() == before
    afile = tmp_path / "notes.txt"
    afile.write_text("mine")
    assert main(["train", "--data", str(data2d["train"]), "--out", str(afile), *TINY_2D]) == 2
    (line,) = error_lines(capsys)
    assert "exists and is not a folder" in line and afile.read_text() == "mine"


def _enospc(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device", "/disk/file")


def test_full_disk_at_the_first_checkpoint_leaves_no_model_folder(data2d, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("latentseg.checkpoint.save_file", _enospc)
    out = tmp_path / "m"
    assert main(["train", "--data", str(data2d["train"]), "--out", str(out), *TINY_2D]) == 1
    (line,) = error_lines(capsys)
    assert line == "latentseg: error: /disk/file: no space left on device " + (
        "(nothing was left half-written; free some space and rerun)"
    )
    assert not out.exists()


def test_full_disk_later_keeps_the_last_good_checkpoint(model2d, data2d, tmp_path, capsys, monkeypatch):
    run = tmp_path / "run"
    shutil.copytree(model2d, run)
    saved = {name: (run / name).read_bytes() for name in ("model.safetensors", STATE_FILE, "config.json")}
    monkeypatch.setattr("latentseg.checkpoint.save_file", _enospc)
    assert main(["train", "--data", str(data2d["train"]), "--out", str(run), "--resume", "train.steps=45"]) == 1
    assert "no space left on device" in error_lines(capsys)[0]
    assert {name: (run / name).read_bytes() for name in saved} == saved
    assert not [p for p in run.iterdir() if p.name.startswith(".tmp-")]


def test_full_disk_during_predict_leaves_no_partial_output(model2d, data2d, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("PIL.Image.Image.save", _enospc)
    out = tmp_path / "out"
    assert main(["predict", "--model", str(model2d), "--input", str(data2d["test"] / "images"), "--output", str(out)])
    assert "no space left on device" in error_lines(capsys)[0]
    assert not out.exists() or not list(out.iterdir())


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


def _wait_for(predicate, proc: subprocess.Popen, seconds: float) -> None:
    deadline = time.time() + seconds
    while time.time() < deadline:
        if predicate():
            return
        if proc.poll() is not None:
            pytest.fail(f"the process ended first ({proc.returncode}): {proc.stderr.read()[-2000:]}")
        time.sleep(0.05)
    proc.kill()
    pytest.fail("timed out")


def test_kill_9_during_train_then_resume_continues_the_step_count(data2d, tmp_path):
    out = tmp_path / "m"
    settings = [s for s in TINY_2D if not s.startswith(("train.steps", "train.checkpoint_every", "train.val"))]
    cmd = [sys.executable, "-m", "latentseg", "train", "--data", str(data2d["train"]), "--out", str(out), *settings]
    proc = subprocess.Popen(
        [*cmd, "train.steps=100000", "train.checkpoint_every=5", "train.val_every=0"],
        env=_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        _wait_for(lambda: (out / STATE_FILE).is_file() and read_train_state(out / STATE_FILE).step >= 10, proc, 300)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.communicate()
    saved = read_train_state(out / STATE_FILE).step  # every file is whole: the state reads back
    assert saved % 5 == 0 and saved >= 10
    resume = [*cmd[:8], "--resume", f"train.steps={saved + 3}"]  # the saved run's settings, more steps
    done = subprocess.run(resume, env=_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert read_train_state(out / STATE_FILE).step == saved + 3
    assert json.loads((out / "training_log.json").read_text())["step"][-1] == saved + 3


def _predict_cmd(model, inputs, out, *extra):
    cmd = [sys.executable, "-m", "latentseg", "predict", "--model", str(model), "--input", str(inputs)]
    return [*cmd, "--output", str(out), *extra]


def _many_inputs(data2d, tmp_path, copies: int = 8) -> Path:
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    source = sorted((data2d["test"] / "images").iterdir())
    for i in range(copies):
        shutil.copyfile(source[i % len(source)], inputs / f"case_{i:02d}.png")
    return inputs


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM])
def test_killed_predict_leaves_whole_cases_and_continue_finishes(model2d, data2d, tmp_path, sig):
    inputs, out = _many_inputs(data2d, tmp_path), tmp_path / "out"
    proc = subprocess.Popen(
        _predict_cmd(model2d, inputs, out, "--samples", "8"),
        env=_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        _wait_for(lambda: out.is_dir() and (out / "case_00.png").exists(), proc, 300)
    finally:
        proc.send_signal(sig)
        _, stderr = proc.communicate(timeout=60)
    if sig == signal.SIGTERM:
        assert proc.returncode == 143 and "latentseg: terminated" in stderr
        assert not list(out.glob(".latentseg-partial-*"))  # cleaned up on the way out
    finished = {p.name for p in out.glob("case_*.png") if p.name.count("_") == 1}
    for name in finished:  # a label map means every output of its case is there
        stem = name[:-4]
        assert all((out / f"{stem}{s}.png").stat().st_size > 0 for s in ("_prob", "_std", "_entropy", "_overlay"))
    assert len(finished) < 8
    again = subprocess.run(_predict_cmd(model2d, inputs, out), env=_env(), capture_output=True, text=True)
    assert again.returncode == 2 and "--continue" in again.stderr  # nothing is overwritten by default
    again = subprocess.run(_predict_cmd(model2d, inputs, out, "--continue"), env=_env(), capture_output=True, text=True)
    assert again.returncode == 0, again.stderr
    assert f"wrote {5 * (8 - len(finished))} files" in again.stdout  # the finished cases were skipped
    assert not list(out.glob(".latentseg-partial-*"))  # the killed run's staging folder is gone too
    assert len(list(out.glob("case_*_overlay.png"))) == 8


def test_internal_error_is_one_line_with_a_trace_file(tmp_path, capsys, monkeypatch):
    def boom(args):
        raise ZeroDivisionError("division by zero")

    monkeypatch.setattr("latentseg.cli.cmd_phantoms", boom)
    assert main(["phantoms", "--out", str(tmp_path / "p")]) == 1
    (line,) = error_lines(capsys)
    assert line.startswith("latentseg: error: internal error, ZeroDivisionError: division by zero (full trace in ")
    trace = Path(line.split("full trace in ")[1].split(";")[0])
    assert "Traceback" in trace.read_text() and "boom" in trace.read_text()
    assert main(["--debug", "phantoms", "--out", str(tmp_path / "p")]) == 1
    assert "Traceback (most recent call last)" in capsys.readouterr().err
