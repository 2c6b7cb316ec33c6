"""Robustness to noise (issue 17 part 4; 003 section IV-C, Eq. 19, Fig. 8): the test images plus
Gaussian noise I + N(0, sigma) on images scaled to [0, 1], sigma in {0, 0.05, 0.1, 0.2}, segmented
by latentseg and by a MONAI UNet trained for the same minutes on clean images.

The real-data models are the ones `benchmarks.realdata` trained (`latentseg` and `unet` of its
work folder: run it first); the 2D phantoms get their own pair here (5 minutes each, one thread,
side by side). Each (dataset, method) curve is one process of one thread.

    python -m benchmarks.robustness [--datasets acdc,monuseg,phantoms] [--methods latentseg,unet,latentseg_noskips]
        # results/robustness.json, .png
    python -m benchmarks.robustness --paths acdc:latentseg [--levels] [--cases N]   # which path carries
        # the damage at sigma 0.2 (results/robustness_paths.json)
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from benchmarks import realdata
from latentseg.robustness import SIGMAS, noise_curve, plot_curves

ROOT = Path(__file__).resolve().parent
WORK = ROOT / "work" / "robustness"
METHODS = ("latentseg", "unet")
PHANTOM_MINUTES = 5.0
# latentseg variants (e.g. latentseg_noskips), to find what makes it lose more Dice to noise than the
# UNet: benchmarks.realdata's, whose real-data models carry the same names
VARIANTS = realdata.VARIANTS


def phantoms() -> dict[str, Path]:
    """2D phantoms: 200 to train, 20 to test (as the demo)."""
    from latentseg.data.phantoms import write_phantom_dataset

    root = WORK / "phantoms"
    if not (root / "train" / "images").is_dir():
        write_phantom_dataset(root / "train", 200, 2, 128, seed=1)
        write_phantom_dataset(root / "test", 20, 2, 128, seed=2)
    return {"train": root / "train", "images": root / "test" / "images", "labels": root / "test" / "masks"}


def train_phantom_model(method: str) -> Path:
    """The phantom model of `method`, trained once (5 minutes)."""
    from benchmarks.unet_baseline import train_unet
    from latentseg.config import load_config
    from latentseg.data.prepare import prepare_training_data
    from latentseg.training import train

    data, work = phantoms(), WORK / "phantoms"
    common = [*realdata.COMMON, f"train.max_minutes={PHANTOM_MINUTES}"]
    if method in VARIANTS:
        folder = work / f"{method}_model"
        if not (folder / "model.safetensors").is_file():
            train(data["train"], folder, load_config(None, common + VARIANTS[method]), progress=False)
        return folder
    if not (work / "unet_model" / "model.safetensors").is_file():
        config = load_config(None, common)
        prepared = prepare_training_data([data["train"]], config)
        net, _ = train_unet(prepared.train, config, PHANTOM_MINUTES * 60)
        realdata.save_unet(work / "unet_model", net, config, prepared.fingerprint)
    return work / "unet_model"


def unet_segmenter(folder: Path):
    from safetensors.torch import load_file

    from benchmarks.unet_baseline import make_unet, predict_unet_image
    from latentseg.data.preprocess import Preprocessing

    spec = json.loads((folder / "unet.json").read_text())
    net = make_unet(spec["spatial_dims"], spec["in_channels"], spec["num_classes"], spec["channels"], spec["strides"])
    net.load_state_dict(load_file(str(folder / "model.safetensors")))
    net.eval()
    prep = Preprocessing.from_dict(spec["fingerprint"]["preprocessing"])

    def segment(image: np.ndarray, meta) -> np.ndarray:
        return predict_unet_image(net, image, meta, prep, spec["patch_size"])

    return segment, spec["fingerprint"].get("mask_values") or []


def curve(dataset: str, method: str) -> dict:
    from latentseg.robustness import model_segmenter

    if dataset == "phantoms":
        folder, data = train_phantom_model(method), phantoms()
        images, labels = data["images"], data["labels"]
    else:
        work = realdata.WORK / dataset
        folder = work / f"{method}_model"
        if not folder.is_dir():
            raise SystemExit(f"{folder}: run `python -m benchmarks.realdata --datasets {dataset}` first")
        images, labels = realdata.link_test_files(dataset, work)
    segment, mask_values = model_segmenter(folder, device="cpu") if method in VARIANTS else unet_segmenter(folder)
    t0 = time.time()
    result = noise_curve(segment, images, labels, SIGMAS, mask_values=mask_values)
    return result | {"seconds": time.time() - t0, "model": str(folder)}


Mix = Callable[[dict, dict], dict]  # (noisy window's conditioning, clean window's) -> what the model gets
PATHS: dict[str, Mix] = {
    "noisy skips, clean latent": lambda noisy, clean: noisy | {"z_image": clean["z_image"]},
    "noisy latent, clean skips": lambda noisy, clean: noisy | {"image_features": clean["image_features"]},
}


def one_noisy_level(level: int) -> Mix:
    """Everything clean but the decoder skip of `level` (0: the finest)."""

    def mix(noisy: dict, clean: dict) -> dict:
        features = [
            n if i == level else c
            for i, (n, c) in enumerate(zip(noisy["image_features"], clean["image_features"], strict=True))
        ]
        return clean | {"image_features": features}

    return mix


class PathSwap:
    """Wraps a model's `conditioning`: in mode "record" it keeps each window's conditioning (of the
    clean image); in a `Mix` mode it hands back mix(noisy window's conditioning, the recorded clean
    one of the same window); in mode "plain" it does nothing. The sliding window visits the windows
    in the same order each time."""

    def __init__(self, model) -> None:
        self.original, self.recorded, self.mode, self.at = model.conditioning, [], "plain", 0
        model.conditioning = self

    def set(self, mode: str | Mix) -> None:
        self.mode, self.at = mode, 0
        if mode == "record":
            self.recorded.clear()

    def __call__(self, image, text=None):
        cond = self.original(image, text)
        if self.mode == "record":
            self.recorded.append(cond)
        elif self.mode != "plain":
            cond = self.mode(cond, self.recorded[self.at])
            self.at += 1
        return cond


def path_dice(
    folder: Path, images: Path, labels: Path, sigma: float = 0.2, seed: int = 0, levels: bool = False, cases: int = 0
) -> dict:
    """Which of the image's two ways into a latentseg model carries the noise's damage: each test case
    is segmented clean, with noise (as `curve`), and with noise on one path only (PATHS: the image
    latent z_image, which conditions the denoiser and which a skip model's decoder also reads beside
    the label latent, or the image features that the decoder's skips take; the other path gets the
    clean image's). With `levels`, also with noise on one skip level only.
    `cases`: the first so many (0: all)."""
    from latentseg.data.datasets import load_image
    from latentseg.infer import predict_image
    from latentseg.robustness import add_noise, foreground_dice, loaded_for_prediction, referenced_cases

    model, config, prep, options, mask_values = loaded_for_prediction(folder, device="cpu")
    if not model.skips:
        raise SystemExit(f"{folder}: the model has no decoder skips, so the image has one path only")
    swap = PathSwap(model)
    found, truth, label_ids = referenced_cases(images, labels, mask_values, limit=cases)
    variants: dict[str, str | Mix] = {"noisy": "plain", **PATHS}
    rng, scores = np.random.default_rng(seed), {}

    def score(name: str, mode: str | Mix, image: np.ndarray, meta, reference: np.ndarray) -> None:
        swap.set(mode)
        pred = predict_image(model, config, prep, image, meta, options, seed).label
        scores.setdefault(name, []).append(foreground_dice(pred, reference, label_ids))

    for case in found:
        image, meta = load_image(case)
        noisy = add_noise(image, sigma, rng)  # the same draws as `curve`'s at this sigma
        score("clean", "record", image, meta, truth[case.case_id])
        if levels and case is found[0]:  # the skip levels, counted in the first clean pass
            count = len(swap.recorded[0]["image_features"])
            variants |= {f"noisy skip level {i} only": one_noisy_level(i) for i in range(count)}
        for name, mode in variants.items():
            score(name, mode, noisy, meta, truth[case.case_id])
    return {"sigma": sigma, "cases": len(found),
            "dice": {k: float(np.mean([s for s in v if s is not None])) for k, v in scores.items()}}  # fmt: skip


def paths(spec: str, levels: bool = False, cases: int = 0) -> None:
    """`path_dice` on a real-data model of benchmarks.realdata (one thread); results/robustness_paths.json."""
    from benchmarks.lanes import merged_runs, one_thread

    one_thread()
    dataset, method = spec.split(":")
    work = realdata.WORK / dataset
    images, labels = realdata.link_test_files(dataset, work)
    t0 = time.time()
    result = path_dice(work / f"{method}_model", images, labels, levels=levels, cases=cases)
    result |= {"dataset": dataset, "method": method + ("_levels" if levels else "")}
    result |= {"seconds": time.time() - t0, "finished": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    out = ROOT / "results" / "robustness_paths.json"
    out.write_text(json.dumps(merged_runs(out, [result]), indent=1))
    print(json.dumps(result), flush=True)


def one(spec: str) -> None:
    from benchmarks.lanes import one_thread

    one_thread()
    dataset, method = spec.split(":")
    result = curve(dataset, method) | {"dataset": dataset, "method": method}
    result["finished"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    WORK.mkdir(parents=True, exist_ok=True)
    (WORK / f"{dataset}_{method}.json").write_text(json.dumps(result, indent=1))
    print(json.dumps({"dataset": dataset, "method": method, "curve": result["curve"]}), flush=True)


def collect() -> dict:
    """Every finished curve of the work folder, added to (or replacing its row of) the results."""
    from benchmarks.lanes import merged_runs

    out = ROOT / "results" / "robustness.json"
    results = merged_runs(out, [json.loads(p.read_text()) for p in sorted(WORK.glob("*_*.json"))])
    for dataset, by_method in results.items():
        plot_curves(by_method, ROOT / "results" / f"robustness_{dataset}.png", title=dataset)
        for r in by_method.values():
            dice = {p["sigma"]: p["dice"] for p in r["curve"]}
            r["dice_loss_at_0.2"] = dice[0.0] - dice[0.2]
    out.write_text(json.dumps(results, indent=1))
    print(f"wrote {out}")
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datasets", default="acdc,monuseg,phantoms")
    parser.add_argument("--methods", default=",".join(METHODS), help="unet or benchmarks.realdata.VARIANTS")
    parser.add_argument("--one")
    parser.add_argument("--paths", help="DATASET:METHOD: Dice at sigma 0.2 with noise on one path only")
    parser.add_argument("--levels", action="store_true", help="with --paths: also one skip level at a time")
    parser.add_argument("--cases", type=int, default=0, help="with --paths: the first N test cases (0: all)")
    parser.add_argument("--collect", action="store_true")
    parser.add_argument("--lanes", type=int, default=2)
    args = parser.parse_args()
    if args.one:
        one(args.one)
        return
    if args.paths:
        paths(args.paths, args.levels, args.cases)
        return
    if not args.collect:
        from benchmarks.lanes import run_in_lanes

        datasets, methods = args.datasets.split(","), args.methods.split(",")
        if "phantoms" in datasets:  # the phantom models train side by side first
            run_in_lanes([["benchmarks.robustness", "--one", f"phantoms:{m}"] for m in methods], args.lanes)
            datasets.remove("phantoms")
        run_in_lanes([["benchmarks.robustness", "--one", f"{d}:{m}"] for d in datasets for m in methods], args.lanes)
    collect()


if __name__ == "__main__":
    torch.set_num_threads(1)
    main()
