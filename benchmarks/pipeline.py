"""What latentseg's data pipeline costs a plain UNet (issue 16, part 1).

`../shared/baselines/plain_unet.py` (the accuracy bar, outside latentseg) runs beside a MONAI UNet
trained and scored through latentseg's pipeline (`benchmarks.unet_baseline`: latentseg's
preprocessing, patches, augmentation, sliding window, inversion and `evaluate`), and beside that
UNet with one step of the pipeline changed at a time. Every run is one process of one torch
thread, two at a time on the two cores, for the same minutes on the same split.

    python -m benchmarks.pipeline --dataset acdc --minutes 15 --variants plain_script,pipeline,net4
    python -m benchmarks.pipeline --collect     # benchmarks/results/pipeline.json

Variants (each relative to `pipeline`, the benchmark's UNet as it was):
- plain_script: the shared script itself;
- net4: the script's network (4 levels, 16-128 channels; ACDC strides (2,2,1), (2,2,2), (2,2,1));
- noaug / noflip / norot / nointensity: augmentation off, or one kind of it off;
- noprep: no resampling / reorientation and no crop to the foreground;
- randcrop: the script's patch placement (uniform, one in three centred on foreground) in place of
  MONAI's positive / negative crop;
- defaults: the UNet with latentseg's current default data settings (whatever `DataConfig` says and
  `train` plans for the budget: augmentation off up to 60 minutes);
- defaults_aug: the same with augmentation on (flips, rotations, intensity);
- defaults_net4 / defaults_noprep: `defaults` with the script's network, or without resampling,
  reorientation and the foreground crop.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent
WORK = ROOT / "work" / "pipeline"
PLAIN = ROOT.parent.parent / "shared" / "baselines" / "plain_unet.py"
NO_AUG = ["data.flips=false", "data.rotation_degrees=0", "data.intensity_augmentation=false"]
# today's benchmark UNet saw flips, 15 degree rotations and intensity jitter, MONAI's pos/neg crops
PIPELINE = ["data.flips=true", "data.rotation_degrees=15", "data.intensity_augmentation=true"]
PIPELINE += ["data.resample=true", "data.crop_foreground=true", "data.patch_sampling=posneg"]
VARIANTS: dict[str, dict] = {
    "pipeline": {},
    "net4": {"net": "plain4"},
    "noaug": {"settings": NO_AUG},
    "net4_noaug": {"net": "plain4", "settings": NO_AUG},
    "noflip": {"settings": ["data.flips=false"]},
    "norot": {"settings": ["data.rotation_degrees=0"]},
    "nointensity": {"settings": ["data.intensity_augmentation=false"]},
    "noprep": {"settings": ["data.resample=false", "data.crop_foreground=false"]},
    "randcrop": {"settings": ["data.patch_sampling=uniform"]},
    "net4_noaug_randcrop": {"net": "plain4", "settings": [*NO_AUG, "data.patch_sampling=uniform"]},
    "defaults": {"defaults": True},
    "defaults_aug": {"defaults": True, "settings": ["data.augmentation=on"]},
    "defaults_net4": {"defaults": True, "net": "plain4"},
    "defaults_noprep": {"defaults": True, "settings": ["data.resample=false", "data.crop_foreground=false"]},
}
PLAIN4 = {  # plain_unet.py's networks
    "acdc": ((16, 32, 64, 128), ((2, 2, 1), (2, 2, 2), (2, 2, 1))),
    "la2018": ((16, 32, 64, 128), (2, 2, 2)),
    "monuseg": ((16, 32, 64, 128, 256), (2, 2, 2, 2)),
}


def run_plain(dataset: str, minutes: float) -> dict:
    env = {**os.environ, "THREADS": "1", "OMP_NUM_THREADS": "1"}
    shared = ROOT.parent.parent / "shared" / "data" / dataset
    done = subprocess.run(
        [sys.executable, str(PLAIN), dataset, str(shared), str(minutes)], env=env, capture_output=True, text=True
    )
    if done.returncode:
        raise RuntimeError(done.stderr[-2000:])
    out = json.loads(done.stdout.strip().splitlines()[-1])
    return {"dice": out["test_dice"], "dice_per_class": out.get("per_class"), "steps": out["iters"], "raw": out}


def run_variant(dataset: str, variant: str, minutes: float) -> dict:
    """The benchmark's UNet with one variant's changes, trained and scored through latentseg."""
    import torch

    torch.set_num_threads(1)
    from benchmarks import realdata

    spec = VARIANTS[variant]
    work = WORK / dataset / variant
    work.mkdir(parents=True, exist_ok=True)
    base = [] if spec.get("defaults") else PIPELINE
    settings = realdata.COMMON + realdata.DATASETS[dataset]["settings"] + base + spec.get("settings", [])
    settings += [f"data.split={realdata.write_split(dataset, work)}"]
    net = PLAIN4[dataset] if spec.get("net") == "plain4" else None
    result = realdata.run_unet(dataset, work, settings, minutes, net=net)
    per_class = {k: v["Dice"] for k, v in result["summary"]["mean"].items()}
    return {"dice": result["summary"]["foreground_mean"]["Dice"], "dice_per_class": per_class, **result}


def one(args: argparse.Namespace) -> None:
    t0 = time.time()
    if args.one == "plain_script":
        result = run_plain(args.dataset, args.minutes)
    else:
        result = run_variant(args.dataset, args.one, args.minutes)
    result |= {"variant": args.one, "dataset": args.dataset, "minutes": args.minutes, "wall_s": time.time() - t0}
    result["finished"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    path = WORK / args.dataset / f"{args.one}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1))
    print(json.dumps({k: result[k] for k in ("variant", "dice", "steps")}), flush=True)


def lanes(args: argparse.Namespace) -> None:
    """Every variant in its own process, `--lanes` at a time."""
    queue = args.variants.split(",")
    running: list[subprocess.Popen] = []
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    while queue or running:
        while queue and len(running) < args.lanes:
            cmd = [sys.executable, "-m", "benchmarks.pipeline", "--one", queue.pop(0)]
            running.append(subprocess.Popen([*cmd, "--dataset", args.dataset, "--minutes", str(args.minutes)], env=env))
        time.sleep(5)
        running = [p for p in running if p.poll() is None]


def collect(out: Path) -> None:
    results: dict = {}
    for path in sorted(WORK.glob("*/*.json")):
        r = json.loads(path.read_text())
        keep = ("dice", "dice_per_class", "steps", "minutes", "finished", "inference_seconds_per_case")
        results.setdefault(r["dataset"], {})[r["variant"]] = {k: r.get(k) for k in keep}
    out.write_text(json.dumps(results, indent=1))
    print(f"wrote {out}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default="acdc")
    parser.add_argument("--minutes", type=float, default=15.0)
    parser.add_argument("--variants", default="plain_script,pipeline")
    parser.add_argument("--lanes", type=int, default=2)
    parser.add_argument("--one", help="run one variant in this process")
    parser.add_argument("--collect", action="store_true")
    args = parser.parse_args()
    if args.collect:
        collect(ROOT / "results" / "pipeline.json")
    elif args.one:
        one(args)
    else:
        lanes(args)


if __name__ == "__main__":
    main()
