"""Real-data benchmark (issue "Real medical data"): latentseg against a MONAI UNet trained for the
same wall-clock minutes on the same split, patches and augmentation, on ACDC (3D cine MRI, split by
patient), LA2018 (3D LGE-MRI, first 16 / last 4) and MoNuSeg (2D H&E, its given split).

latentseg runs twice: the plain LDSeg decoder, and with `model.decoder_skips=true` (image-side
skips into the label decoder, NOTES.md's remedy for structures a 1/16 latent cannot hold).
Per dataset and method: Dice, NSD (tolerance 1 mm; 1 voxel/pixel where spacing is unknown) and
HD95 per class from `latentseg evaluate`, training minutes and inference seconds per case.
Writes benchmarks/results/realdata.json. Run: python -m benchmarks.realdata [--datasets acdc,la2018]
[--minutes acdc=15,la2018=15,monuseg=10] [--methods latentseg,unet]
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import time
from pathlib import Path

import torch

from benchmarks.unet_baseline import predict_unet_image, train_unet
from latentseg.config import load_config
from latentseg.data.datasets import discover_dataset, load_image
from latentseg.data.io import output_name, write_label
from latentseg.data.prepare import prepare_training_data
from latentseg.data.preprocess import Preprocessing
from latentseg.infer import predict
from latentseg.metrics import evaluate
from latentseg.training import train

ROOT = Path(__file__).resolve().parent
SHARED = ROOT.parent.parent / "shared" / "data"
WORK = ROOT / "work" / "realdata"

# settings shared by both methods (patch, batch, split) plus latentseg's own
DATASETS = {
    "acdc": {"settings": ["data.patch_size=[128,128,8]", "train.batch_size=2"], "minutes": 15},
    "la2018": {"settings": ["data.patch_size=[96,96,64]", "train.batch_size=2"], "minutes": 15},
    "monuseg": {
        "settings": ["data.patch_size=[128,128]", "train.batch_size=8", "model.num_downsamplings=3"],
        "minutes": 10,
    },
}
COMMON = ["train.steps=1000000", "train.val_every=0", "train.checkpoint_every=1000000", "train.log_every=50"]
# latentseg variants: the plain LDSeg decoder, and the decoder that also takes image-side skips
VARIANTS = {"latentseg": [], "latentseg_skips": ["model.decoder_skips=true"]}


def test_cases(name: str) -> list[str]:
    root = SHARED / name
    if name == "acdc":
        return json.loads((root / "dataset.json").read_text())["suggested_split_by_patient"]["test"]
    if name == "la2018":
        return [c.case_id for c in discover_dataset(root).cases][16:]
    with open(root / "metadata.csv") as fh:
        return [r["filename"][:-4] for r in csv.DictReader(fh) if r["split"] == "test"]


def write_split(name: str, work: Path) -> Path:
    spec = discover_dataset(SHARED / name)
    test = set(test_cases(name))
    path = work / "split.csv"
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["case", "split"])
        w.writerows((c.case_id, "test" if c.case_id in test else "train") for c in spec.cases)
    return path


def link_test_files(name: str, work: Path) -> tuple[Path, Path]:
    """Folders of links to the test images and labels, named as `predict` names its outputs."""
    spec = discover_dataset(SHARED / name)
    test = set(test_cases(name))
    images, labels = work / "test_images", work / "test_labels"
    for folder in (images, labels):
        folder.mkdir(parents=True, exist_ok=True)
    for case in spec.cases:
        if case.case_id in test:
            for p in case.image_paths:
                link = images / p.name
                if not link.exists():
                    link.symlink_to(p)
            link = labels / case.label_path.name
            if not link.exists():
                link.symlink_to(case.label_path)
    return images, labels


def run_latentseg(name: str, work: Path, settings: list[str], minutes: float, variant: str = "latentseg") -> dict:
    model_dir = work / f"{variant}_model"
    config = load_config(None, settings + [f"train.max_minutes={minutes}"])
    t0 = time.time()
    train(SHARED / name, model_dir, config)
    train_minutes = (time.time() - t0) / 60
    log = json.loads((model_dir / "training_log.json").read_text())
    images, labels = link_test_files(name, work)
    pred = work / f"{variant}_pred"
    t0 = time.time()
    predict(model_dir, images, pred, progress=False)
    n = len(list(labels.iterdir()))
    seconds = (time.time() - t0) / n
    summary = evaluate(pred, labels)
    return {
        "train_minutes": train_minutes,
        "train_loop_minutes": log["train_seconds"] / 60,
        "steps": log["step"][-1],
        "inference_seconds_per_case": seconds,
        "summary": _means(summary),
    }


def run_unet(name: str, work: Path, settings: list[str], minutes: float) -> dict:
    config = load_config(None, settings)
    data = prepare_training_data([SHARED / name], config)
    net, info = train_unet(data.train, config, minutes * 60)
    prep = Preprocessing.from_dict(data.fingerprint["preprocessing"])
    mask_values = data.fingerprint["mask_values"]
    images, labels = link_test_files(name, work)
    pred = work / "unet_pred"
    pred.mkdir(exist_ok=True)
    from latentseg.data.datasets import discover_inputs

    t0 = time.time()
    cases = discover_inputs(images)
    for case in cases:
        image, meta = load_image(case)
        label = predict_unet_image(net, image, meta, prep, config.data.patch_size)
        if mask_values:
            label = torch.as_tensor(mask_values)[torch.from_numpy(label).long()].numpy()
        write_label(pred / output_name(meta, case.case_id), label, meta)
    seconds = (time.time() - t0) / len(cases)
    summary = evaluate(pred, labels)
    return {
        "train_minutes": info["train_seconds"] / 60,
        "steps": info["steps"],
        "inference_seconds_per_case": seconds,
        "summary": _means(summary),
    }


def _means(summary: dict) -> dict:
    return {
        "foreground_mean": summary["foreground_mean"],
        "mean": summary["mean"],
        "cases": len(summary["metric_per_case"]),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datasets", default=",".join(DATASETS))
    parser.add_argument("--methods", default="latentseg,latentseg_skips,unet")
    parser.add_argument("--minutes", default="", help="per dataset, e.g. acdc=60,monuseg=10")
    parser.add_argument("--out", default=str(ROOT / "results" / "realdata.json"))
    args = parser.parse_args()
    minutes = {k: float(v) for k, v in (item.split("=") for item in args.minutes.split(",") if item)}
    out = Path(args.out)
    results = json.loads(out.read_text()) if out.is_file() else {}
    results["machine"] = {
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
    }
    for name in args.datasets.split(","):
        work = WORK / name
        work.mkdir(parents=True, exist_ok=True)
        settings = COMMON + DATASETS[name]["settings"] + [f"data.split={write_split(name, work)}"]
        budget = minutes.get(name, DATASETS[name]["minutes"])
        for method in args.methods.split(","):
            print(f"== {name} / {method}: {budget} minutes", flush=True)
            if method == "unet":
                result = run_unet(name, work, settings, budget)
            else:
                result = run_latentseg(name, work, settings + VARIANTS[method], budget, method)
            result["budget_minutes"] = budget
            results.setdefault(name, {})[method] = result
            print(json.dumps(result["summary"]["foreground_mean"]), flush=True)
            out.write_text(json.dumps(results, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
