"""Staged diffusion benchmark (issue "Staged diffusion and STAPLE fusion", 004 Tables 4-5).

Methods, each trained for the same wall-clock minutes on the same split:
- uniform_eps_ddim100: one eps head, t uniform (003 Algorithm 1), DDIM with 100 steps;
- onestep_x0: one x0 head, t uniform, one DDIM step from t = 999;
- staged: eps and x0 heads, staged training with t <= low set to 0 (004 section 2.2), staged
  sampling (20 masks) fused by STAPLE; the same samples are also fused by mean and by vote;
- staged_sampled_t: as staged, but t <= low kept as drawn (the issue's alternative);
- unisegdiff: as staged, with the condition network pre-trained for segmentation, frozen and
  injected by dual cross-attention (004 section 2.3).

Per method: mean foreground Dice, sequential network calls and latents evaluated per case
(counted on the denoiser), and the training epoch where validation Dice first reaches 98% of
its best (the plateau, as in 004 Table 4).

Each run writes benchmarks/work/staged/<dataset>/<method>/result.json, so runs may go in
parallel processes; the results are collected into benchmarks/results/staged.json.
Run: python -m benchmarks.staged [--datasets phantoms,monuseg] [--methods ...] [--minutes 6]
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import time
from pathlib import Path

import torch

from benchmarks.realdata import DATASETS, SHARED, link_test_files, write_split
from latentseg.config import load_config
from latentseg.data.datasets import discover_inputs
from latentseg.data.phantoms import write_phantom_dataset
from latentseg.demo import DEMOS
from latentseg.infer import predict
from latentseg.metrics import evaluate
from latentseg.train import train

ROOT = Path(__file__).resolve().parent
WORK = ROOT / "work" / "staged"
RESULTS = ROOT / "results" / "staged.json"

TWO_HEADS = ["model.denoiser_heads=2", "train.timesteps=staged", "sample.sampler=staged"]
# (training settings, [(label, predict settings)])
METHODS: dict[str, tuple[list[str], list[tuple[str, dict]]]] = {
    "uniform_eps_ddim100": (
        ["model.prediction_type=eps", "sample.steps=100", "sample.num_samples=1"],
        [("ddim100", {"steps": 100, "num_samples": 1})],
    ),
    "onestep_x0": (
        ["model.prediction_type=x0", "sample.steps=1", "sample.num_samples=1"],
        [("ddim1", {"steps": 1, "num_samples": 1})],
    ),
    "staged": (
        [*TWO_HEADS, "train.last_stage_t=zero"],
        [(f"staged20_{f}", {"num_samples": 20, "fusion": f}) for f in ("staple", "mean", "vote")],
    ),
    "staged_sampled_t": (
        [*TWO_HEADS, "train.last_stage_t=sampled"],
        [("staged20_staple", {"num_samples": 20, "fusion": "staple"})],
    ),
    # the whole of UniSegDiff: also CFENet pre-trained (30% of the minutes), frozen, injected by DCA
    "unisegdiff": (
        [*TWO_HEADS, "train.last_stage_t=zero", "model.condition=pretrained"],
        [(f"staged20_{f}", {"num_samples": 20, "fusion": f}) for f in ("staple", "mean")],
    ),
}


def phantom_data() -> tuple[Path, Path, Path, list[str]]:
    """(training root, test images, reference root, settings): the demo's 2D split."""
    n_train, n_test, size, settings = DEMOS[2]
    train_dir, test_dir = WORK / "phantoms" / "data" / "train", WORK / "phantoms" / "data" / "test"
    if not (train_dir / "text.csv").is_file():
        write_phantom_dataset(train_dir, n_train, 2, size, seed=1)
    if not (test_dir / "text.csv").is_file():
        write_phantom_dataset(test_dir, n_test, 2, size, seed=2)
    return train_dir, test_dir / "images", test_dir, [s for s in settings if "steps" not in s]


def real_data(name: str) -> tuple[Path, Path, Path, list[str]]:
    """The real-data benchmark's split, with validation cases for the plateau curve (MoNuSeg's own
    `val` images; elsewhere every 8th training case)."""
    work = WORK / name
    work.mkdir(parents=True, exist_ok=True)
    images, labels = link_test_files(name, work)
    split = write_split(name, work)
    given = {}
    if (SHARED / name / "metadata.csv").is_file():
        with open(SHARED / name / "metadata.csv") as fh:
            given = {r["filename"].rsplit(".", 1)[0]: r["split"] for r in csv.DictReader(fh)}
    with open(split) as fh:
        rows = list(csv.DictReader(fh))
    train_rows = [r for r in rows if r["split"] == "train"]
    for i, r in enumerate(train_rows):
        if given.get(r["case"]) == "val" or (not given and i % 8 == 7):
            r["split"] = "val"
    with open(split, "w", newline="") as fh:
        w = csv.DictWriter(fh, ["case", "split"])
        w.writeheader()
        w.writerows(rows)
    return SHARED / name, images, labels, DATASETS[name]["settings"] + [f"data.split={split}"]


@torch.no_grad()
def count_network_calls(model_dir: Path, options: dict) -> dict:
    """Denoiser passes (sequential calls, and latents carried) to sample one patch-sized window."""
    from latentseg.checkpoint import load_model

    model, config, _ = load_model(model_dir)
    calls = {"network_calls": 0, "latent_evaluations": 0}
    forward_heads = model.denoiser.forward_heads  # every path through the denoiser ends here

    def counted(x_t, t, cond):
        calls["network_calls"] += 1
        calls["latent_evaluations"] += x_t.shape[0]
        return forward_heads(x_t, t, cond)

    model.denoiser.forward_heads = counted
    window = torch.randn(1, config.model.in_channels, *config.data.patch_size)
    model.sample(
        window,
        options["num_samples"],
        options.get("steps", config.sample.steps),
        sampler=config.sample.sampler,
        middle_steps=config.sample.staged_middle_steps,
    )
    return calls


def plateau_epoch(log: dict, batch_size: int, train_cases: int) -> float | None:
    """Epoch at which validation Dice first reaches 98% of its best."""
    dice, steps = log.get("val_dice", []), log.get("val_step", [])
    if not dice:
        return None
    best = max(dice)
    step = next(s for s, d in zip(steps, dice, strict=True) if d >= 0.98 * best)
    return step * batch_size / train_cases


def run(dataset: str, method: str, minutes: float) -> dict:
    train_root, images, labels, settings = phantom_data() if dataset == "phantoms" else real_data(dataset)
    work = WORK / dataset / method
    model_dir = work / "model"
    train_settings, evaluations = METHODS[method]
    config = load_config(
        None,
        settings
        + train_settings
        + ["train.steps=1000000", f"train.max_minutes={minutes}", "train.val_every=200", "train.val_cases=8"]
        + ["train.checkpoint_every=1000000", "train.log_every=50"],
    )
    t0 = time.time()
    train(train_root, model_dir, config)
    log = json.loads((model_dir / "training_log.json").read_text())
    fingerprint = json.loads((model_dir / "fingerprint.json").read_text())
    result = {
        "train_minutes": (time.time() - t0) / 60,
        "steps": log["step"][-1],
        "plateau_epoch": plateau_epoch(log, config.train.batch_size, len(fingerprint["train_cases"])),
        "epochs": log["step"][-1] * config.train.batch_size / len(fingerprint["train_cases"]),
        "val_curve": {"step": log["val_step"], "dice": log["val_dice"]},
        "evaluations": {},
    }
    for label, options in evaluations:
        pred = work / f"pred_{label}"
        t0 = time.time()
        predict(
            model_dir,
            images,
            pred,
            options.get("steps"),
            options["num_samples"],
            progress=False,
            fusion=options.get("fusion"),
        )
        seconds = (time.time() - t0) / len(discover_inputs(images))
        summary = evaluate(pred, labels)
        result["evaluations"][label] = {
            "dice": summary["foreground_mean"]["Dice"],
            "nsd": summary["foreground_mean"]["NSD"],
            "seconds_per_case": seconds,
            **count_network_calls(model_dir, options),
        }
        print(f"{dataset}/{method}/{label}: {json.dumps(result['evaluations'][label])}", flush=True)
    (work / "result.json").write_text(json.dumps(result, indent=1))
    return result


def collect() -> dict:
    results: dict = {
        "machine": {"cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__}
    }
    for path in sorted(WORK.glob("*/*/result.json")):
        results.setdefault(path.parent.parent.name, {})[path.parent.name] = json.loads(path.read_text())
    RESULTS.write_text(json.dumps(results, indent=1))
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datasets", default="phantoms,monuseg")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--minutes", type=float, default=6.0, help="training minutes per method")
    parser.add_argument("--collect-only", action="store_true")
    args = parser.parse_args()
    if not args.collect_only:
        for dataset in args.datasets.split(","):
            for method in args.methods.split(","):
                print(f"== {dataset} / {method}: {args.minutes} minutes", flush=True)
                run(dataset, method, args.minutes)
    collect()
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
