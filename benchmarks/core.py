"""Core benchmark (issue "latentseg core", section 6), on the demo's 2D phantom split.

- Dice against DDIM steps K in {1, 2, 5, 10, 50} and the full 1000-step DDPM, for the default
  model and for the options issue 2 asks to compare (eps / v prediction, 003 Eq. 12 as printed,
  re-standardizing the latent after each step).
- A MONAI UNet trained for the same wall-clock seconds as the default model, on the same split.
- Inference seconds per case of latentseg DDIM-2 against that UNet on 2D 256^2 and 3D 96^3
  inputs, measured interleaved in one process, reported as ratios.

Writes benchmarks/results/core.json and core.png. Trained models are cached under
benchmarks/work/core/ (delete it to retrain). Run: python -m benchmarks.core [--variants x0,eps]
"""

from __future__ import annotations

import argparse
import json
import os
import time
from dataclasses import replace
from pathlib import Path
from statistics import median

import numpy as np
import torch

from benchmarks.unet_baseline import make_unet, predict_unet, predict_unet_image, train_unet
from latentseg.checkpoint import load_model
from latentseg.config import ModelConfig, SampleConfig, load_config
from latentseg.data.datasets import discover_dataset, load_case
from latentseg.data.phantoms import write_phantom_dataset
from latentseg.data.prepare import prepare_training_data
from latentseg.data.preprocess import Preprocessing, prepare_image
from latentseg.demo import DEMOS
from latentseg.infer import predict_array, predict_image, preprocessing_of
from latentseg.metrics import label_metrics
from latentseg.models import LatentSegmenter
from latentseg.training import train

ROOT = Path(__file__).resolve().parent
WORK = ROOT / "work" / "core"
VARIANTS = {
    "x0": [],  # the default: x0 prediction, exact x0
    "eps": ["model.prediction_type=eps"],
    "eps_paper_eq12": ["model.prediction_type=eps", "model.x0_estimate=paper"],
    "v": ["model.prediction_type=v"],
}
STEPS = [1, 2, 5, 10, 50, None]  # None: DDPM, all 1000 steps


def phantom_split() -> tuple[Path, Path]:
    n_train, n_test, size, _ = DEMOS[2]
    train_dir = WORK / "data" / "train"
    test_dir = WORK / "data" / "test"
    if not (train_dir / "text.csv").is_file():
        write_phantom_dataset(train_dir, n_train, 2, size, seed=1)
    if not (test_dir / "text.csv").is_file():
        write_phantom_dataset(test_dir, n_test, 2, size, seed=2)
    return train_dir, test_dir


def load_test_set(test_dir: Path) -> list[dict]:
    """Raw test images and labels; each method applies its own saved preprocessing."""
    return [load_case(case) for case in discover_dataset(test_dir).cases]


def dice_scores(preds: list[np.ndarray], samples: list[dict], classes: int) -> dict[str, float]:
    per_label = {}
    for lab in range(1, classes):
        values = [
            label_metrics(p == lab, s["label"][0] == lab, (1.0, 1.0), 1.0)["Dice"]
            for p, s in zip(preds, samples, strict=True)
        ]
        per_label[str(lab)] = float(np.mean([v for v in values if v is not None]))
    per_label["foreground"] = float(np.mean(list(per_label.values())))
    return per_label


def trained_variant(name: str, train_dir: Path) -> Path:
    out = WORK / name
    if not (out / "training_log.json").is_file():
        settings = DEMOS[2][3] + VARIANTS[name]
        print(f"training {name}: {settings}", flush=True)
        train(train_dir, out, load_config(None, settings))
    return out


def sweep_steps(model_dir: Path, test: list[dict], restandardize: bool = False, steps=STEPS) -> dict[str, dict]:
    model, config, fingerprint = load_model(model_dir)
    model.config.restandardize = restandardize
    prep = preprocessing_of(fingerprint, config)
    results = {}
    for k in steps:
        t0 = time.time()
        preds = [
            predict_image(model, config, prep, s["image"], s["meta"], replace(config.sample, steps=k), seed=0).label
            for s in test
        ]
        key = "ddpm1000" if k is None else f"ddim{k}"
        results[key] = dice_scores(preds, test, config.model.num_classes) | {
            "seconds_per_case": (time.time() - t0) / len(test)
        }
        print(f"  {model_dir.name} restandardize={restandardize} {key}: {results[key]}", flush=True)
    return results


@torch.no_grad()
def label_autoencoder_ceiling(model_dir: Path, test: list[dict]) -> dict[str, float]:
    """Dice of decode(encode(ground truth)), no diffusion: the ceiling of the whole method. A decoder
    with skips also takes the image's features, from the image preprocessed as the model saw it."""
    model, config, fingerprint = load_model(model_dir)
    prep = preprocessing_of(fingerprint, config)
    preds = []
    for s in test:
        label = torch.from_numpy(s["label"])[None]
        x, _ = prepare_image(s["image"], s["meta"], prep)
        if tuple(x.shape[1:]) != tuple(label.shape[2:]):
            raise ValueError(f"preprocessing changed the grid ({tuple(label.shape[2:])} -> {tuple(x.shape[1:])})")
        cond = model.conditioning(x.as_tensor()[None])
        preds.append(model.decode(model.encode_label(label), cond)[0].argmax(0).numpy())
    return dice_scores(preds, test, config.model.num_classes)


def unet_bar(train_dir: Path, test: list[dict], seconds: float) -> dict:
    config = load_config(None, DEMOS[2][3])
    data = prepare_training_data([train_dir], config)
    net, info = train_unet(data.train, config, seconds)
    prep = Preprocessing.from_dict(data.fingerprint["preprocessing"])
    preds = [predict_unet_image(net, s["image"], s["meta"], prep, config.data.patch_size) for s in test]
    return dice_scores(preds, test, config.model.num_classes) | info


def _params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def time_inference(dims: int, size: int, reps: int) -> dict:
    """Median seconds per case, interleaved: UNet, latentseg DDIM-2 with 1 sample, with 4 samples."""
    torch.manual_seed(0)
    model = LatentSegmenter(ModelConfig(spatial_dims=dims, in_channels=1, num_classes=3)).eval()
    unet = make_unet(dims, 1, 3).eval()
    image = np.random.default_rng(0).standard_normal((1, *[size] * dims)).astype(np.float32)
    roi = [size] * dims
    runs = {
        "unet": lambda: predict_unet(unet, image, roi),
        "latentseg_ddim2_1sample": lambda: predict_array(model, image, roi, SampleConfig(steps=2, num_samples=1)),
        "latentseg_ddim2_4samples": lambda: predict_array(model, image, roi, SampleConfig(steps=2, num_samples=4)),
    }
    times: dict[str, list[float]] = {k: [] for k in runs}
    for fn in runs.values():  # warm-up
        fn()
    for _ in range(reps):
        for name, fn in runs.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    med = {k: median(v) for k, v in times.items()}
    inference_params = _params(model) - _params(model.label_encoder)
    return {
        "input": [size] * dims,
        "seconds": med,
        "ratio_1sample_vs_unet": med["latentseg_ddim2_1sample"] / med["unet"],
        "ratio_4samples_vs_unet": med["latentseg_ddim2_4samples"] / med["unet"],
        "params": {
            "latentseg_inference_path": inference_params,
            "latentseg_total": _params(model),
            "unet": _params(unet),
        },
        "reps": reps,
    }


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    xs = [1, 2, 5, 10, 50, 1000]
    for name, sweep in results["dice_vs_steps"].items():
        ys = [sweep[k]["foreground"] for k in ("ddim1", "ddim2", "ddim5", "ddim10", "ddim50", "ddpm1000") if k in sweep]
        ax.plot(xs[: len(ys)], ys, marker="o", label=name)
    if "unet" in results:
        ax.axhline(results["unet"]["foreground"], color="k", ls="--", label="MONAI UNet, same minutes")
    ax.set_xscale("log")
    ax.set_xlabel("sampling steps (DDIM; 1000 = DDPM)")
    ax.set_ylabel("mean foreground Dice")
    ax.set_title("2D phantoms, 20 held-out cases")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--timing-reps", type=int, default=5)
    parser.add_argument("--out", default=str(ROOT / "results" / "core.json"))
    args = parser.parse_args()
    train_dir, test_dir = phantom_split()
    test = load_test_set(test_dir)
    results: dict = {
        "machine": {
            "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "cuda": torch.cuda.is_available(),
        },
        "data": {"train": str(train_dir), "test": str(test_dir), "test_cases": len(test)},
        "dice_vs_steps": {},
        "training": {},
    }
    for name in args.variants.split(","):
        model_dir = trained_variant(name, train_dir)
        log = json.loads((model_dir / "training_log.json").read_text())
        results["training"][name] = {
            "seconds": log["train_seconds"],
            "steps": log["step"][-1],
            "final_val_dice": log["val_dice"][-1] if log["val_dice"] else None,
        }
        results["dice_vs_steps"][name] = sweep_steps(model_dir, test)
        results.setdefault("label_autoencoder_ceiling", {})[name] = label_autoencoder_ceiling(model_dir, test)
    if "x0" in results["training"]:
        results["restandardize_x0"] = sweep_steps(WORK / "x0", test, restandardize=True, steps=[2, 10, 50])
        results["unet"] = unet_bar(train_dir, test, results["training"]["x0"]["seconds"])
        print("unet:", results["unet"], flush=True)
    results["timing"] = {
        "2d_256": time_inference(2, 256, args.timing_reps),
        "3d_96": time_inference(3, 96, max(2, args.timing_reps // 2)),
    }
    print("timing:", json.dumps(results["timing"], indent=1), flush=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1))
    plot(results, out.with_suffix(".png"))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
