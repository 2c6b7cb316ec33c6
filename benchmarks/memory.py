"""Peak memory of `latentseg predict` against volume size (issue "Real medical data").

Sliding-window sampling keeps network activations bounded by the window; only the input, the
stitched output maps and their inverse resampling grow with the volume. This script runs
`predict` in a fresh process on a volume and on one twice as large, and reports each peak RSS.

Writes benchmarks/results/memory.json. Run: python -m benchmarks.memory
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--shape", default="192,192,96", help="the smaller volume; the larger doubles axis 0")
    parser.add_argument("--patch", default="96,96,96")
    parser.add_argument("--samples", type=int, default=4)
    parser.add_argument("--out", default=str(ROOT / "results" / "memory.json"))
    args = parser.parse_args()
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
