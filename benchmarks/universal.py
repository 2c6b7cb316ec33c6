"""One prompted model against specialists (issue "Text-guided and prompted universal segmentation",
002 section 2): does one model for several datasets, asked for its target by a prompt, come within
0.03 Dice of a specialist per dataset trained with the same compute?

Data (2D, grey, so that one model reads both):
- phantoms: the demo's 200 training / 20 test phantoms (targets "organ" and "lesion");
- ISBI 2012 EM (`../shared/data/isbi2012_em`): 30 consecutive slices, the first 24 to train and
  the last 6 to test (contiguous blocks: neighbouring slices are alike); target "cell interior".

Specialists: an LDSeg model per dataset, `--minutes` each. Universal: `--config universal` (class
prompts, x0, a pre-trained mask autoencoder, importance-sampled t), or `--prompt text`, trained on
both datasets for the specialists' minutes summed (the same total compute). Each target is scored
by Dice against the reference binarized to that target, DDIM-2, 4 samples.

The issue names ACDC + LA2018 + phantoms; that is a 3D run of an hour or more per model on this
CPU, so this 2D pair asks the same question at a size that fits here.

Writes benchmarks/results/universal.json.
Run: python -m benchmarks.universal [--minutes 5] [--models specialists,universal_class,universal_text] [--steps N]
     (each model's result goes to benchmarks/work/universal/runs/NAME/result.json; --collect gathers)
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from benchmarks.realdata import SHARED
from latentseg.config import load_config
from latentseg.data.phantoms import write_phantom_dataset
from latentseg.demo import DEMOS
from latentseg.infer import predict
from latentseg.metrics import evaluate
from latentseg.training import train

ROOT = Path(__file__).resolve().parent
WORK = ROOT / "work" / "universal"
RESULTS = ROOT / "results" / "universal.json"
EM = SHARED / "isbi2012_em"
EM_TEST = [f"{i:02d}" for i in range(24, 30)]
TARGETS = {"phantoms": {1: "organ", 2: "lesion"}, "isbi2012_em": {1: "cell interior"}}
COMMON = ["data.patch_size=[128,128]", "train.batch_size=8", "train.steps=1000000", "train.val_every=0"]
COMMON += ["train.checkpoint_every=1000000", "train.log_every=50"]
UNIVERSAL = {
    "universal_class": ["model.prompt=class"],
    "universal_text": ["model.prompt=text"],
    # what moved the lesion between 2026-12-01 and 2026-12-07: the image encoder's second attention
    # stage (one since 2026-12-06) and augmentation (planned off for short runs since 2026-12-04)
    "universal_class_attention2": ["model.prompt=class", "model.attention_stages=2"],
    "universal_class_aug": ["model.prompt=class", "data.augmentation=on"],
    "universal_class_posneg": ["model.prompt=class", "data.patch_sampling=posneg"],  # the sampling before 2026-12-02
    # run-to-run spread of the lesion: the defaults with another seed (with --steps: at equal steps)
    "universal_class_seed1": ["model.prompt=class", "train.seed=1"],
    "universal_class_seed2": ["model.prompt=class", "train.seed=2"],
}
SAMPLING = {"steps": 2, "num_samples": 4}


def prepare_data() -> dict:
    """Training folders, test inputs, binarized references per target, the split and label map."""
    n_train, n_test, size, _ = DEMOS[2]
    phantoms, phantoms_test = WORK / "phantoms", WORK / "phantoms_test"
    if not (phantoms / "text.csv").is_file():
        write_phantom_dataset(phantoms, n_train, 2, size, seed=1)
    if not (phantoms_test / "text.csv").is_file():
        write_phantom_dataset(phantoms_test, n_test, 2, size, seed=2)
    em_test = WORK / "em_test_images"
    em_test.mkdir(parents=True, exist_ok=True)
    for case in EM_TEST:
        if not (em_test / f"{case}.png").exists():
            (em_test / f"{case}.png").symlink_to(EM / "images" / f"{case}.png")
    split = WORK / "split.csv"
    with open(split, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["case", "split"])
        w.writerows((p.stem, "train") for p in sorted((phantoms / "images").glob("*.png")))
        w.writerows((p.stem, "test" if p.stem in EM_TEST else "train") for p in sorted((EM / "images").glob("*.png")))
    label_map = WORK / "labels.yaml"
    label_map.write_text("phantoms: {1: organ, 2: lesion}\nisbi2012_em: {1: cell interior}\n")
    references = {
        "organ": binarized(phantoms_test / "masks", WORK / "ref_organ", lambda a: a == 1),
        "lesion": binarized(phantoms_test / "masks", WORK / "ref_lesion", lambda a: a == 2),
        "cell interior": binarized(EM / "masks", WORK / "ref_cell_interior", lambda a: a == 255, EM_TEST),
    }
    inputs = {"organ": phantoms_test / "images", "lesion": phantoms_test / "images", "cell interior": em_test}
    return {
        "roots": {"phantoms": phantoms, "isbi2012_em": EM},
        "inputs": inputs,
        "references": references,
        "split": split,
        "label_map": label_map,
    }


def binarized(masks: Path, out: Path, is_target, cases: list[str] | None = None) -> Path:
    """0/1 PNG references of one target, named like the predictions."""
    out.mkdir(parents=True, exist_ok=True)
    for path in sorted(masks.glob("*.png")):
        if cases is None or path.stem in cases:
            Image.fromarray(is_target(np.array(Image.open(path))).astype(np.uint8)).save(out / path.name)
    return out


def dice(pred: Path, reference: Path) -> float:
    return evaluate(pred, reference, labels=[1])["foreground_mean"]["Dice"]


def budget(minutes: float, steps: int) -> list[str]:
    """The training budget: `minutes` of training, or with `steps` that many steps whatever they take."""
    return [f"train.steps={steps}", "train.max_minutes=0"] if steps else [f"train.max_minutes={minutes}"]


def train_model(
    name: str, roots: list[Path], settings: list[str], minutes: float, preset: str | None = None, steps: int = 0
):
    out = WORK / "runs" / name
    config = load_config(preset, COMMON + settings + budget(minutes, steps))
    model_dir = train(roots, out / "model", config)
    log = json.loads((model_dir / "training_log.json").read_text())
    spent = {"minutes": 0 if steps else minutes, "steps": log["step"][-1], "train_seconds": log.get("train_seconds")}
    return model_dir, spent


def run_specialist(dataset: str, data: dict, minutes: float) -> dict:
    """An LDSeg model of one dataset; each of its classes is scored as a binary mask."""
    name = f"specialist_{dataset}"
    model_dir, result = train_model(name, [data["roots"][dataset]], [f"data.split={data['split']}"], minutes)
    values = json.loads((model_dir / "fingerprint.json").read_text()).get("mask_values") or []
    pred = WORK / "runs" / name / "pred"
    predict(model_dir, data["inputs"][TARGETS[dataset][1]], pred, SAMPLING, progress=False, overlays=False)
    result["dice"] = {}
    for label_id, target in TARGETS[dataset].items():
        value = values[label_id] if values else label_id  # 0/255 datasets write 255
        binary = binarized(pred, WORK / "runs" / name / f"pred_{label_id}", lambda a, v=value: a == v)
        result["dice"][target] = dice(binary, data["references"][target])
    return result


def run_universal(name: str, data: dict, minutes: float, steps: int = 0) -> dict:
    """The `universal` preset on both datasets, asked for each target by its name."""
    settings = UNIVERSAL[name] + [f"data.split={data['split']}", f"data.label_map={data['label_map']}"]
    roots = list(data["roots"].values())
    model_dir, result = train_model(name, roots, settings, minutes, preset="universal", steps=steps)
    result["dice"] = {}
    for target, inputs in data["inputs"].items():
        pred = WORK / "runs" / name / f"pred_{target.replace(' ', '_')}"
        predict(model_dir, inputs, pred, SAMPLING, progress=False, overlays=False, prompt=target)
        result["dice"][target] = dice(pred, data["references"][target])
    return result


def summarise(results: dict) -> dict:
    specialists = {t: d for r in results.values() if r.get("kind") == "specialist" for t, d in r["dice"].items()}
    table = {}
    for name, r in results.items():
        if r.get("kind") != "universal":
            continue
        gaps = {t: r["dice"][t] - specialists[t] for t in r["dice"] if t in specialists}
        table[name] = {
            "mean_dice": float(np.mean(list(r["dice"].values()))),
            "specialists_mean_dice": float(np.mean(list(specialists.values()))) if specialists else None,
            "gap_per_target": gaps,
            "within_0.03": bool(gaps) and all(g >= -0.03 for g in gaps.values()),
        }
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=5.0, help="per specialist; a universal model gets the sum")
    parser.add_argument("--models", default="specialists,universal_class,universal_text")
    parser.add_argument("--steps", type=int, default=0, help="universal models: this many steps instead of minutes")
    parser.add_argument("--collect", action="store_true")
    args = parser.parse_args()
    if not args.collect:
        data = prepare_data()
        for name in args.models.split(","):
            if name == "specialists":
                for dataset in TARGETS:
                    print(f"== specialist {dataset}: {args.minutes} minutes", flush=True)
                    result = {"kind": "specialist", **run_specialist(dataset, data, args.minutes)}
                    (WORK / "runs" / f"specialist_{dataset}" / "result.json").write_text(json.dumps(result, indent=1))
            else:
                minutes = args.minutes * len(TARGETS)
                print(f"== {name}: " + (f"{args.steps} steps" if args.steps else f"{minutes} minutes"), flush=True)
                result = {"kind": "universal", **run_universal(name, data, minutes, args.steps)}
                (WORK / "runs" / name / "result.json").write_text(json.dumps(result, indent=1))
    results = {p.parent.name: json.loads(p.read_text()) for p in sorted((WORK / "runs").glob("*/result.json"))}
    out = {
        "runs": results,
        "summary": summarise(results),
        "minutes_per_specialist": args.minutes,
        "command": "python -m benchmarks.universal " + " ".join(sys.argv[1:]),
    }
    RESULTS.write_text(json.dumps(out, indent=1))
    for name, row in out["summary"].items():
        print(
            f"{name}: mean Dice {row['mean_dice']:.3f} (specialists {row['specialists_mean_dice']}), "
            f"gaps {row['gap_per_target']}"
        )
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
