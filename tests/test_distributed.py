"""Multi-process training: torchrun with gloo on CPU, two processes, a tiny phantom model."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from latentseg.checkpoint import MODEL_FILE, STATE_FILE, read_train_state
from latentseg.cli import main
from latentseg.config import Config
from latentseg.distributed import World, world_from_environment
from latentseg.errors import LatentSegError
from latentseg.training import batches
from tests.conftest import TINY_2D

TINY_DDP = [*TINY_2D, "train.steps=6", "train.val_every=3", "train.checkpoint_every=2", "train.batch_size=2"]
LONG_RUN = [*TINY_2D, "train.steps=100000", "train.val_every=0", "train.checkpoint_every=2", "train.batch_size=2"]

# Runs `latentseg train` as one torchrun worker and saves the weights this rank ends with, taken
# from the module that train_step received (so the test sees each rank's own copy).
WORKER = """
import os, sys
from safetensors.torch import save_file
import latentseg.training as train_module
from latentseg.checkpoint import MODEL_FILE, STATE_FILE, read_train_state
from latentseg.cli import main

seen = {}
original = train_module.train_step
def spy(losses_fn, *args, **kwargs):
    seen["module"] = losses_fn
    return original(losses_fn, *args, **kwargs)
train_module.train_step = spy
code = main(sys.argv[2:])
module = seen["module"]
model = module.module.model if hasattr(module, "module") else module.model
state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
rank = os.environ["RANK"]
save_file(state, os.path.join(sys.argv[1], f"rank{rank}.safetensors"), metadata={"wrapper": type(module).__name__})
sys.exit(code)
"""


def _env() -> dict[str, str]:
    root = str(Path(__file__).resolve().parents[1])
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": root + os.pathsep + os.environ.get("PYTHONPATH", "")}


def _torchrun(*args: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", *args]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_for(path: Path, proc: subprocess.Popen, seconds: float) -> None:
    deadline = time.time() + seconds
    while not path.exists():
        assert proc.poll() is None, f"training ended early:\n{proc.stdout.read() if proc.stdout else ''}"
        assert time.time() < deadline, f"{path} did not appear within {seconds} s"
        time.sleep(0.2)


def test_world_from_environment(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    assert world_from_environment() == World(0, 1, 0)
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    world = world_from_environment()
    assert world.distributed and not world.is_main
    monkeypatch.setenv("RANK", "2")
    with pytest.raises(LatentSegError, match="RANK=2 does not fit WORLD_SIZE=2"):
        world_from_environment()
    monkeypatch.setenv("WORLD_SIZE", "two")
    with pytest.raises(LatentSegError, match="WORLD_SIZE='two' is not an integer"):
        world_from_environment()


def test_ranks_share_out_one_stream_of_cases():
    """Two ranks see disjoint halves of the stream one process would see for twice the batches."""
    config = Config()
    config.data.patch_size = [16, 16]
    config.data.augmentation = "on"
    config.train.batch_size = 3
    samples = [
        {"image": torch.rand(1, 16, 16), "label": (torch.rand(1, 16, 16) > 0.5).float(), "text": f"case {i}"}
        for i in range(7)
    ]

    def texts(world: World, total: int) -> list[list[str]]:
        return [list(b["text"]) for b in batches(samples, config, total, seed=5, world=world)]

    one = [t for batch in texts(World(0, 1), 8) for t in batch]
    rank0, rank1 = texts(World(0, 2), 4), texts(World(1, 2), 4)
    assert len(rank0) == len(rank1) == 4
    dealt = [t for batch in rank0 for t in batch], [t for batch in rank1 for t in batch]
    assert dealt[0] == one[0::2] and dealt[1] == one[1::2]  # DistributedSampler deals in turn
    assert dealt[0] != dealt[1]


def test_two_processes_train_identical_weights_and_one_checkpoint(tmp_path, data2d):
    out, dumps = tmp_path / "model", tmp_path / "ranks"
    dumps.mkdir()
    (tmp_path / "worker.py").write_text(WORKER)
    args = ["train", "--data", str(data2d["train"]), "--out", str(out), *TINY_DDP]
    run = subprocess.run(
        _torchrun(str(tmp_path / "worker.py"), str(dumps), *args),
        env=_env(),
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    rank0, rank1 = (load_file(str(dumps / f"rank{r}.safetensors")) for r in (0, 1))
    assert rank0.keys() == rank1.keys()
    for key in rank0:
        assert torch.equal(rank0[key], rank1[key]), f"{key} differs between ranks"
    state, saved = read_train_state(out / STATE_FILE), load_file(str(out / MODEL_FILE))
    assert all(torch.equal(state.model[k], rank0[k]) for k in rank0)  # the training state: the ranks' weights
    assert all(torch.equal(saved[k], v) for k, v in state.average.items())  # the model file: their average
    with open(dumps / "rank0.safetensors", "rb") as f:
        assert b"DistributedDataParallel" in f.read(4096)
    lines = (run.stdout + run.stderr).splitlines()
    written = [line for line in lines if "checkpoint written" in line]
    assert len(written) == 3 and all("(rank 0 of 2)" in line for line in written)  # steps 2, 4, 6
    assert run.stdout.count("model written to") == 1
    assert sum("validation Dice" in line for line in lines) == 2  # steps 3 and 6, rank 0 only

    # the checkpoint continues in one process, as any single-process checkpoint does
    assert main(["train", "--data", str(data2d["train"]), "--out", str(out), "--resume", "train.steps=8"]) == 0
    assert read_train_state(out / "train_state.safetensors").step == 8


def test_torchrun_stops_when_a_worker_is_killed(tmp_path, data2d):
    out = tmp_path / "model"
    args = ["-m", "latentseg", "train", "--data", str(data2d["train"]), "--out", str(out), *LONG_RUN]
    proc = subprocess.Popen(_torchrun(*args), env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        _wait_for(out / "train_state.safetensors", proc, 180)
        workers = [int(p) for p in Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()]
        assert len(workers) == 2
        os.kill(workers[1], signal.SIGKILL)
        killed = time.time()
        output, _ = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode != 0
    assert time.time() - killed < 60
    assert "FAILED" in output and "SIGKILL" in output  # torchrun's summary names the dead worker


def test_survivor_reports_lost_peer(tmp_path, data2d):
    """Without torchrun's agent to stop it (e.g. a node lost in a multi-node run), the surviving
    rank fails with one clear line instead of waiting for the dead one."""
    out = tmp_path / "model"
    port = str(_free_port())
    procs = []
    for rank in (0, 1):
        env = {**_env(), "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2", "PYTHONFAULTHANDLER": "1"}
        env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
        cmd = [sys.executable, "-m", "latentseg", "train", "--data", str(data2d["train"]), "--out", str(out), *LONG_RUN]
        procs.append(subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    try:
        _wait_for(out / "train_state.safetensors", procs[0], 180)
        procs[1].kill()
        killed = time.time()
        try:
            _, stderr = procs[0].communicate(timeout=60)
        except subprocess.TimeoutExpired:
            procs[0].send_signal(signal.SIGABRT)  # faulthandler prints where each thread waits
            raise AssertionError("rank 0 still alive 60 s after its peer died:\n" + procs[0].communicate()[1]) from None
    finally:
        for p in procs:
            p.kill()
    assert time.time() - killed < 60
    assert procs[0].returncode == 2
    errors = [line for line in stderr.splitlines() if line.startswith("latentseg: error:")]
    assert len(errors) == 1 and "rank 0 of 2: lost contact with the other training processes" in errors[0]
    assert "continue with --resume" in errors[0]
    assert load_file(str(out / "model.safetensors"))  # the last checkpoint is readable


# --- prediction spread over processes (--num-parts / --part-id, torchrun) ------------------------


def _label_files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.glob("phantom_*[0-9].png"))}


def test_parts_cover_every_case_once_and_match_one_process(tmp_path, model2d, data2d):
    images = str(data2d["train"] / "images")  # 10 cases: parts of 4, 3 and 3
    whole = tmp_path / "whole"
    assert main(["predict", "--model", str(model2d), "--input", images, "--output", str(whole), "--samples", "1"]) == 0
    parts = tmp_path / "parts"
    cmd = [sys.executable, "-m", "latentseg", "predict", "--model", str(model2d), "--input", images]
    cmd += ["--output", str(parts), "--samples", "1", "--num-parts", "3"]
    procs = [
        subprocess.Popen([*cmd, "--part-id", str(k)], env=_env(), stdout=subprocess.PIPE, text=True) for k in range(3)
    ]
    outs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0]
    assert [int(o.split()[1]) // 5 for o in outs] == [4, 3, 3]  # "wrote N files": 5 files a case
    assert _label_files(parts) == _label_files(whole)  # every case once, as one process writes it
    assert not [p for p in parts.iterdir() if p.name.startswith(".")]


def test_torchrun_deals_the_cases_across_ranks(tmp_path, model2d, data2d):
    out = tmp_path / "pred"
    args = ["-m", "latentseg", "predict", "--model", str(model2d), "--input", str(data2d["train"] / "images")]
    done = subprocess.run(
        _torchrun(*args, "--output", str(out), "--samples", "1"),
        env=_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    wrote = sorted(int(line.split()[1]) // 5 for line in done.stdout.splitlines() if line.startswith("wrote"))
    assert wrote == [5, 5] and len(_label_files(out)) == 10


def test_a_part_id_beyond_the_parts_is_refused(tmp_path, model2d, data2d, capsys):
    argv = ["predict", "--model", str(model2d), "--input", str(data2d["test"] / "images"), "--output", str(tmp_path)]
    assert main([*argv, "--num-parts", "2", "--part-id", "2"]) == 2
    assert "--part-id must be in [0, --num-parts), got part 2 of 2" in capsys.readouterr().err
