"""TextDiff with k labelled MoNuSeg images (issue "Label-efficient segmentation from diffusion
features with text"; 001 Tables 1-2).

1. Backbone: `latentseg pretrain-ddpm` on the 30 train + val images of MoNuSeg, without labels,
   resampled to half size (256^2, the paper's input size), 128^2 crops, for --ddpm-minutes.
2. Per seed, k images are drawn from the 24 training images. Every method trains on those k for
   the same --minutes and is scored on the 14 test images (on their own 512^2 grid):
   - textdiff: 001, each decoder block's features attend to the sentence's tokens (Eq. 3);
   - textdiff_concat: 001 Table 2 zeta_2, without the multi-scale attention (the pooled sentence
     joined to every pixel);
   - textdiff_notext: 001 Table 2 zeta_1, without text;
   - ldseg: latentseg's LDSeg (with decoder skips, no text) on the same k images;
   - unet: a MONAI UNet on the same k images.
   All see the images at spacing 2 (256^2) in one 256^2 window, the whole image, as in the paper.
3. Mean and standard deviation over the seeds of Dice and IoU.

Writes benchmarks/results/textdiff.json.
Run: python -m benchmarks.textdiff [--seeds 0,1,2] [--methods ...] [--minutes 4] [--k 5]
     (runs of one seed and method go to benchmarks/work/textdiff/seedS/METHOD/result.json, so
     several processes may share the work; --collect only gathers them)
"""

from __future__ import annotations

import argparse
import csv
import json
import random
import statistics
import subprocess
import sys
from pathlib import Path

from benchmarks.realdata import SHARED, link_test_files, run_unet
from benchmarks.runs import DataSplit, collect, train_and_score

ROOT = Path(__file__).resolve().parent
WORK = ROOT / "work" / "textdiff"
RESULTS = ROOT / "results" / "textdiff.json"
MONUSEG = SHARED / "monuseg"
COMMON = ["data.spacing=[2.0,2.0]", "data.patch_size=[256,256]"]
# textdiff: the backbone's features of each of the k images are computed once (fixed noise per image,
# as Baranchuk et al.) and only the head trains per step; that needs the images to repeat exactly,
# so no augmentation (the other methods keep theirs)
TEXTDIFF = ["model.mode=textdiff", "train.batch_size=2", "train.lr=1e-3", "train.feature_cache_mb=4000"]
TEXTDIFF += ["data.flips=false", "data.rotation_degrees=0", "data.intensity_augmentation=false"]
METHODS = {
    "textdiff": [*TEXTDIFF, "model.text_fusion=attention"],
    "textdiff_concat": [*TEXTDIFF, "model.text_fusion=concat"],
    "textdiff_notext": [*TEXTDIFF, "model.text_fusion=none"],
    "ldseg": ["model.decoder_skips=true", "model.num_downsamplings=3", "train.batch_size=4"],
    "unet": ["train.batch_size=4"],
}


def labelled_cases(k: int, seed: int) -> list[str]:
    with open(MONUSEG / "metadata.csv") as fh:
        train = sorted(r["filename"][:-4] for r in csv.DictReader(fh) if r["split"] == "train")
    return sorted(random.Random(seed).sample(train, k))


def write_k_split(work: Path, chosen: list[str]) -> Path:
    """k training cases; every other case is marked test, which leaves it out of training."""
    with open(MONUSEG / "metadata.csv") as fh:
        cases = [r["filename"][:-4] for r in csv.DictReader(fh)]
    path = work / "split.csv"
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["case", "split"])
        w.writerows((c, "train" if c in chosen else "test") for c in cases)
    return path


def pretrain_backbone(minutes: float) -> Path:
    out = WORK / "ddpm"
    if (out / "config.json").is_file():
        return out
    images = WORK / "ddpm_images" / "images"
    images.mkdir(parents=True, exist_ok=True)
    with open(MONUSEG / "metadata.csv") as fh:
        for r in csv.DictReader(fh):
            if r["split"] in ("train", "val") and not (images / r["filename"]).exists():
                (images / r["filename"]).symlink_to(MONUSEG / "images" / r["filename"])
    command = ["latentseg", "pretrain-ddpm", "--data", str(images.parent), "--out", str(out), "--size", "128"]
    command += ["--spacing", "2,2", "--steps", "1000000", "--minutes", str(minutes), "--batch-size", "4"]
    subprocess.run(command, check=True)
    return out


def run(method: str, seed: int, k: int, minutes: float, backbone: Path) -> dict:
    work = WORK / f"seed{seed}" / method
    work.mkdir(parents=True, exist_ok=True)
    chosen = labelled_cases(k, seed)
    settings = COMMON + [f"data.split={write_k_split(work, chosen)}"] + METHODS[method]
    images, labels = link_test_files("monuseg", work)
    if method == "unet":
        result = run_unet("monuseg", work, settings, minutes)
        scores = result["summary"]["foreground_mean"]
        result["evaluations"] = {"default": {"dice": scores["Dice"], "iou": scores["IoU"], "nsd": scores["NSD"]}}
    else:
        if method.startswith("textdiff"):
            settings.append(f"model.backbone={backbone}")
        data = DataSplit(MONUSEG, images, labels, settings, MONUSEG / "text_annotations.csv")
        result = train_and_score(work, data, [], [("default", {"num_samples": 1})], minutes)
    result["labelled_cases"] = chosen
    (work / "result.json").write_text(json.dumps(result, indent=1))
    return result


def summarise(results: dict) -> dict:
    table = {}
    seeds = [key for key in results if key.startswith("seed")]
    for method in METHODS:
        runs = [results[s][method]["evaluations"]["default"] for s in seeds if method in results[s]]
        if not runs:
            continue
        row = {"seeds": len(runs)}
        for metric in ("dice", "iou"):
            values = [r[metric] for r in runs]
            row[metric] = statistics.mean(values)
            row[f"{metric}_std"] = statistics.stdev(values) if len(values) > 1 else 0.0
        table[method] = row
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--k", type=int, default=5)
    parser.add_argument("--minutes", type=float, default=4.0, help="training minutes per method and seed")
    parser.add_argument("--ddpm-minutes", type=float, default=15.0)
    parser.add_argument("--collect", action="store_true", help="only gather finished runs into the results")
    args = parser.parse_args()
    if not args.collect:
        backbone = pretrain_backbone(args.ddpm_minutes)
        for seed in (int(s) for s in args.seeds.split(",")):
            for method in args.methods.split(","):
                print(f"== seed {seed} / {method}: {args.minutes} minutes on {args.k} images", flush=True)
                run(method, seed, args.k, args.minutes, backbone)
    results = collect(WORK, RESULTS)
    results["summary"] = summarise(results)
    ddpm_log = WORK / "ddpm" / "pretrain_log.json"
    if ddpm_log.is_file():
        log = json.loads(ddpm_log.read_text())
        results["backbone"] = {k: log[k] for k in ("steps_done", "train_seconds", "size", "spacing", "batch_size")}
        results["backbone"]["final_loss"] = log["loss"][-1]
    results["command"] = "python -m benchmarks.textdiff " + " ".join(sys.argv[1:])
    results["k"], results["minutes"] = args.k, args.minutes
    RESULTS.write_text(json.dumps(results, indent=1))
    for method, row in results["summary"].items():
        dice, iou = f"{row['dice']:.3f} +- {row['dice_std']:.3f}", f"{row['iou']:.3f} +- {row['iou_std']:.3f}"
        print(f"{method}: Dice {dice}, IoU {iou}")
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
