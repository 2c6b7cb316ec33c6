"""Peak memory of `latentseg predict` against volume size (issue "Real medical data"), and of
loading a training set against its number of cases.

Sliding-window sampling keeps network activations bounded by the window; only the input, the
stitched output maps and their inverse resampling grow with the volume. This script runs
`predict` in a fresh process on a volume and on one twice as large, and reports each peak RSS.

`--training` writes synthetic CT datasets (512x512x100 int16, one organ per case) of N and 2N
cases and measures, each in a fresh process, `check-dataset` and the loading and preprocessing
that `train` does before its first step (`prepare_training_data`): peak RSS, the bytes of the
training set held, and seconds.

Writes benchmarks/results/memory.json. Run: python -m benchmarks.memory [--training --cases 5]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import torch

from latentseg.checkpoint import save_checkpoint
from latentseg.config import load_config
from latentseg.data.preprocess import Preprocessing
from latentseg.models import LatentSegmenter

ROOT = Path(__file__).resolve().parent
PEAK = (
    "import resource, sys; from latentseg.cli import main; code = main(sys.argv[1:]); "
    "print('PEAK_KB', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss); sys.exit(code)"
)


def make_model(out: Path, patch: list[int]) -> None:
    config = load_config(None, ["model.spatial_dims=3", "model.num_classes=3"])
    config.data.patch_size = patch
    config.model.strides = [[2, 2, 2]] * 4
    model = LatentSegmenter(config.model)
    labels = {"0": "background", "1": "1", "2": "2"}
    fingerprint = {"labels": labels, "preprocessing": Preprocessing(3, spacing=None, crop_foreground=False).to_dict()}
    save_checkpoint(out, model, config, fingerprint)


def peak_rss_mb(model: Path, volume: Path, out: Path, samples: int) -> float:
    cmd = [
        sys.executable,
        "-c",
        PEAK,
        "predict",
        "--model",
        str(model),
        "--input",
        str(volume),
        "--output",
        str(out),
        "--samples",
        str(samples),
        "--device",
        "cpu",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"predict failed on {volume}:\n{proc.stderr[-3000:]}")
    kb = next(int(line.split()[1]) for line in proc.stdout.splitlines() if line.startswith("PEAK_KB"))
    return kb / 1024


PREPARE = (
    "import resource, sys, time; from pathlib import Path; from latentseg.config import load_config; "
    "from latentseg.data.prepare import prepare_training_data; t0 = time.perf_counter(); "
    "d = prepare_training_data([Path(sys.argv[1])], load_config(None, ['train.max_minutes=15', *sys.argv[2:]])); "
    "import numpy as np; held = sum(a.nbytes for s in d.train + d.val for a in (s['image'], s['label']) "
    "if not isinstance(a, np.memmap)); "
    "print('RESULT', time.perf_counter() - t0, held, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)"
)


def write_ct_dataset(root: Path, cases: int, size: int = 512, depth: int = 100) -> Path:
    """An nnU-Net CT folder: a body of soft tissue in air, one ellipsoidal organ per case."""
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir(parents=True)
    rng = np.random.default_rng(0)
    x, y, z = np.ogrid[0:size, 0:size, 0:depth]
    body = (x - size / 2) ** 2 + (y - size / 2) ** 2 < (0.4 * size) ** 2
    for i in range(cases):
        cx, cy, cz = size / 2 + rng.integers(-40, 40), size / 2 + rng.integers(-40, 40), depth / 2
        organ = ((x - cx) / 60) ** 2 + ((y - cy) / 50) ** 2 + ((z - cz) / (depth / 4)) ** 2 < 1
        image = np.where(body, 40, -1000) + 60 * organ + rng.normal(0, 20, (size, size, depth))
        affine = np.diag([0.8, 0.8, 2.5, 1.0])
        nib.save(nib.Nifti1Image(image.astype(np.int16), affine), str(root / "imagesTr" / f"ct_{i:03d}_0000.nii.gz"))
        nib.save(nib.Nifti1Image(organ.astype(np.uint8), affine), str(root / "labelsTr" / f"ct_{i:03d}.nii.gz"))
    meta = {"channel_names": {"0": "CT"}, "labels": {"background": 0, "organ": 1}, "file_ending": ".nii.gz"}
    (root / "dataset.json").write_text(json.dumps({**meta, "numTraining": cases}))
    return root


def training_memory(cases: int, budget_gb: float) -> list[dict]:
    """check-dataset and train's loading on N and 2N CT cases, each in a fresh process, and on 2N
    cases with `data.memory_gb=budget_gb` (the cases past it kept in files)."""
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        for n, overrides in ((cases, []), (2 * cases, []), (2 * cases, [f"data.memory_gb={budget_gb}"])):
            data = Path(tmp) / f"ct{n}"
            if not data.is_dir():
                write_ct_dataset(data, n)
            t0 = time.perf_counter()
            check = subprocess.run(
                [sys.executable, "-c", PEAK, "check-dataset", str(data)], capture_output=True, text=True
            )
            check_s = time.perf_counter() - t0
            prep = subprocess.run(
                [sys.executable, "-c", PREPARE, str(data), *overrides], capture_output=True, text=True
            )
            if check.returncode or prep.returncode:
                raise SystemExit(f"failed on {data}:\n{check.stderr[-2000:]}{prep.stderr[-2000:]}")
            kb = next(int(line.split()[1]) for line in check.stdout.splitlines() if line.startswith("PEAK_KB"))
            result = next(line for line in prep.stdout.splitlines() if line.startswith("RESULT"))
            seconds, held, peak = result.split()[1:]
            runs.append({
                "cases": n, "overrides": overrides,
                "check_dataset_peak_gib": round(kb / 2**20, 2), "check_dataset_seconds": round(check_s, 1),
                "train_loading_peak_gib": round(int(peak) / 2**20, 2), "train_held_gib": round(int(held) / 2**30, 2),
                "train_loading_seconds": round(float(seconds), 1),
            })  # fmt: skip
            print(json.dumps(runs[-1]), flush=True)
    return runs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--shape", default="192,192,96", help="the smaller volume; the larger doubles axis 0")
    parser.add_argument("--patch", default="96,96,96")
    parser.add_argument("--samples", type=int, default=4)
    parser.add_argument("--training", action="store_true", help="measure loading a training set instead")
    parser.add_argument("--cases", type=int, default=5, help="--training: N, the smaller dataset's cases")
    parser.add_argument("--budget-gb", type=float, default=0.2, help="--training: data.memory_gb of the last run")
    parser.add_argument("--out", default=str(ROOT / "results" / "memory.json"))
    args = parser.parse_args()
    if args.training:
        results = json.loads(Path(args.out).read_text()) if Path(args.out).is_file() else {}
        results["training"] = {
            "runs": training_memory(args.cases, args.budget_gb),
            "measured": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "command": f"python -m benchmarks.memory --training --cases {args.cases} --budget-gb {args.budget_gb}",
        }
        Path(args.out).write_text(json.dumps(results, indent=1) + "\n")
        return
    shape = [int(v) for v in args.shape.split(",")]
    patch = [int(v) for v in args.patch.split(",")]
    results = {"patch": patch, "samples": args.samples, "torch": torch.__version__, "runs": []}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        make_model(tmp / "model", patch)
        for factor in (1, 2):
            dims = [shape[0] * factor, *shape[1:]]
            volume = tmp / f"vol{factor}.nii.gz"
            data = np.random.default_rng(0).normal(size=dims).astype(np.float32)
            nib.save(nib.Nifti1Image(data, np.diag([0.8, 0.8, 1.5, 1.0])), str(volume))
            peak = peak_rss_mb(tmp / "model", volume, tmp / f"out{factor}", args.samples)
            results["runs"].append({"shape": dims, "voxels": int(np.prod(dims)), "peak_rss_mb": round(peak, 1)})
            print(f"volume {dims}: peak RSS {peak:.0f} MB", flush=True)
    small, large = results["runs"]
    results["peak_ratio_for_2x_volume"] = round(large["peak_rss_mb"] / small["peak_rss_mb"], 3)
    results["mb_per_extra_million_voxels"] = round(
        (large["peak_rss_mb"] - small["peak_rss_mb"]) / ((large["voxels"] - small["voxels"]) / 1e6), 1
    )
    Path(args.out).write_text(json.dumps(results, indent=1))
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
