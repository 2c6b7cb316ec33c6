"""Side-by-side runs: each job is its own process of one torch thread, `lanes` at a time (two on
this two-core machine), so that runs compared with each other share the machine's noise."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path


def run_in_lanes(jobs: list[list[str]], lanes: int = 2, poll_seconds: float = 5.0) -> list[int]:
    """Run `python -m ARGS...` for each job, `lanes` at a time, in order; returns the exit codes."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "LATENTSEG_THREADS": "1"}
    queue = list(enumerate(jobs))
    running: dict[int, subprocess.Popen] = {}
    codes = [0] * len(jobs)
    while queue or running:
        while queue and len(running) < lanes:
            index, args = queue.pop(0)
            running[index] = subprocess.Popen([sys.executable, "-m", *args], env=env)
        time.sleep(poll_seconds)
        for index, proc in list(running.items()):
            if proc.poll() is not None:
                codes[index] = proc.returncode
                del running[index]
    return codes


def one_thread() -> None:
    """Inside a lane: one torch thread (OMP_NUM_THREADS is set too, for the libraries torch calls)."""
    import torch

    torch.set_num_threads(int(os.environ.get("LATENTSEG_THREADS", "1")))


def merged_runs(out: Path, runs: list[dict]) -> dict:
    """The results file `out` as it was (rows from earlier sessions, whose work folders are gone),
    with each (dataset, method) of `runs` added or replaced: {dataset: {method: run}, ...}."""
    results = json.loads(out.read_text()) if out.is_file() else {}
    for r in runs:
        results.setdefault(r["dataset"], {})[r["method"]] = r
    return results
