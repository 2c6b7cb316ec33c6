"""Training throughput with 2 torchrun processes against 1 (issue "Scale out").

Every run trains the demo's 2D model on the demo's phantoms for the same number of steps, in a
fresh process started the same way (`python -m latentseg train`, or torchrun with 2 workers).
Throughput is training images per second of the training loop: steps x batch x processes over
`train_seconds` from training_log.json, which leaves out start-up and data preparation. The
variants take turns, `--repeats` times, so that machine noise falls on all of them alike.

Writes benchmarks/results/ddp.json. Run: python -m benchmarks.ddp [--steps 60] [--repeats 2]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from latentseg.data.phantoms import write_phantom_dataset
from latentseg.demo import DEMOS

RESULTS = Path(__file__).resolve().parent / "results"
# name: (processes, torch threads per process, batch per process)
VARIANTS = {
    "1 process x 2 threads, batch 8": (1, 2, 8),
    "2 processes x 1 thread, batch 4 each": (2, 1, 4),
    "2 processes x 1 thread, batch 8 each": (2, 1, 8),
}


def run_variant(data: Path, out: Path, processes: int, threads: int, batch: int, steps: int) -> dict:
    settings = [
        f"train.steps={steps}",
        f"train.batch_size={batch}",
        "train.val_every=0",
        f"train.checkpoint_every={steps}",
    ]
    train = ["-m", "latentseg", "train", "--data", str(data), "--out", str(out), *settings]
    if processes == 1:
        command = [sys.executable, *train]
    else:
        command = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc_per_node={processes}",
            *train,
        ]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    start = time.time()
    subprocess.run(command, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wall = time.time() - start
    seconds = json.loads((out / "training_log.json").read_text())["train_seconds"]
    return {"train_seconds": seconds, "wall_seconds": wall, "images_per_second": steps * batch * processes / seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    n_train, _, size, _ = DEMOS[2]
    runs: dict[str, list[dict]] = {name: [] for name in VARIANTS}
    with tempfile.TemporaryDirectory() as tmp:
        data = write_phantom_dataset(Path(tmp) / "data", n_train, 2, size, seed=1)
        for repeat in range(args.repeats):
            for name, (processes, threads, batch) in VARIANTS.items():
                result = run_variant(data, Path(tmp) / f"run{repeat}", processes, threads, batch, args.steps)
                runs[name].append(result)
                print(f"{name}: {result['images_per_second']:.1f} images/s ({result['train_seconds']:.1f} s)")
    baseline = statistics.median(r["images_per_second"] for r in runs[next(iter(VARIANTS))])
    summary = {}
    for name, results in runs.items():
        rate = statistics.median(r["images_per_second"] for r in results)
        summary[name] = {
            "processes": VARIANTS[name][0],
            "threads_per_process": VARIANTS[name][1],
            "batch_per_process": VARIANTS[name][2],
            "images_per_second": round(rate, 2),
            "ratio_to_one_process": round(rate / baseline, 3),
            "runs": results,
        }
        print(f"{name}: median {rate:.1f} images/s, x{rate / baseline:.2f} of one process")
    report = {
        "command": "python -m benchmarks.ddp " + " ".join(sys.argv[1:]),
        "data": f"{n_train} 2D phantoms of {size}^2 (the demo's training set)",
        "steps": args.steps,
        "repeats": args.repeats,
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}",
        "variants": summary,
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "ddp.json").write_text(json.dumps(report, indent=1))
    print(f"wrote {RESULTS / 'ddp.json'}")


if __name__ == "__main__":
    main()
