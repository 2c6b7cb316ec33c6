"""Inference speed (issue 18): seconds per case of latentseg's default network, with the DDIM steps
planned for one-annotator data (1 with x0 prediction; `--steps` sets them) and 1 and 4 samples, in
torch and in ONNX Runtime, against a same-size MONAI UNet (the planned strides, 16-256 channels) in
the same process, interleaved (UNet, torch-1, torch-4, ort-1, ort-4, UNet, ...) so the machine's
noise falls on all alike. A case is one patch-sized image (2D 256^2, 3D 96^3): one window of the
sliding window, untrained weights (speed does not depend on them).

A second measurement runs `predict` over a folder of 20 2D cases of 256^2 and compares its wall
time with the sum of the per-case network times (reading, preprocessing and writing hidden by the
prefetching loader, or not).

    python -m benchmarks.inference [--repeats 10] [--threads 1] [--steps N]   # results/inference.json
    python -m benchmarks.inference --overrides model.KEY=VALUE,... --out FILE   # another network
    python -m benchmarks.inference --breakdown   # also: the image encoder, denoiser and decoder's share
    python -m benchmarks.inference --decode-batch   # also: four samples decoded one at a time vs together
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

from benchmarks.step_cost import latentseg_model, split_overrides
from benchmarks.unet_baseline import make_unet
from latentseg.config import SampleConfig
from latentseg.data.prepare import plan_sampling
from latentseg.infer import sample_volume

ROOT = Path(__file__).resolve().parent
SETTINGS = {"2d_256": (2, [256, 256], [1.0, 1.0], 2), "3d_96": (3, [96, 96, 96], [1.0, 1.0, 1.0], 2)}


def against_unet(runs: dict[str, list[float]]) -> tuple[dict[str, float], dict[str, float]]:
    """Each run's median seconds, and the medians as multiples of the UNet's."""
    medians = {k: statistics.median(v) for k, v in runs.items()}
    return medians, {k: v / medians["unet"] for k, v in medians.items()}


def networks(dims: int, patch: list[int], spacing: list[float], classes: int, overrides: list[str], steps: int | None):
    """latentseg's default network and the same-size UNet, in eval mode, and the sampling options
    planned for one annotator (`steps` kept where set)."""
    model, _, strides = latentseg_model(dims, patch, spacing, classes, overrides)
    unet = make_unet(dims, 1, classes, strides=strides).eval()
    options = replace(SampleConfig(), overlap=0.5, steps=steps or "auto")
    plan_sampling(options, multi_rater=False, prediction_type=model.config.prediction_type)
    return model.eval(), unet, options


def engines(
    dims: int,
    patch: list[int],
    spacing: list[float],
    classes: int,
    folder: Path,
    overrides: list[str],
    steps: int | None = None,
) -> dict:
    """seconds-per-case callables: the UNet, latentseg in torch and in ONNX Runtime."""
    from monai.inferers import sliding_window_inference

    from latentseg.onnx_engine import OnnxSegmenter, _write_graphs

    model, unet, options = networks(dims, patch, spacing, classes, overrides, steps)
    _write_graphs(model, patch, folder)
    ort = OnnxSegmenter(folder, model.config, torch.device("cpu"))
    image = torch.randn(1, *patch)

    def timed(fn):
        def run() -> float:
            t0 = time.perf_counter()
            with torch.no_grad():
                fn()
            return time.perf_counter() - t0

        return run

    runs = {"unet": timed(lambda: sliding_window_inference(image[None], patch, 1, unet, overlap=0.5, mode="gaussian"))}
    for name, net in (("torch", model), ("onnxruntime", ort)):
        for n in (1, 4):
            runs[f"{name}_{n}"] = timed(
                lambda net=net, n=n: sample_volume(net, image, patch, replace(options, num_samples=n))
            )
    return runs


def measure(name: str, repeats: int, overrides: list[str], steps: int | None = None) -> dict:
    dims, patch, spacing, classes = SETTINGS[name]
    with tempfile.TemporaryDirectory() as tmp:
        runs = engines(dims, patch, spacing, classes, Path(tmp), overrides, steps)
        for fn in runs.values():  # warm-up
            fn()
        times: dict[str, list[float]] = {k: [] for k in runs}
        for _ in range(repeats):
            for key, fn in runs.items():
                times[key].append(fn())
    medians, ratios = against_unet(times)
    return {"seconds_per_case": medians, "ratio_to_unet": ratios}


PARTS = {"image encoder": ("image_encoder", "forward_features"), "denoiser": ("denoiser", "forward_heads"),
         "decoder": ("label_decoder", "forward")}  # fmt: skip


def timed_parts(model: torch.nn.Module) -> dict[str, float]:
    """Wraps, on this model instance, the methods that sampling calls in PARTS so that each adds its
    seconds to the returned dict (cleared by the caller between runs)."""
    seconds: dict[str, float] = {}
    for part, (child, method) in PARTS.items():
        module = getattr(model, child)
        original = getattr(module, method)

        def wrapped(*args, _original=original, _part=part, **kwargs):
            t0 = time.perf_counter()
            out = _original(*args, **kwargs)
            seconds[_part] = seconds.get(_part, 0.0) + time.perf_counter() - t0
            return out

        setattr(module, method, wrapped)
    return seconds


# (name, samples, sample.decode_batch): the defaults, and four samples decoded in one pass
BREAKDOWN_RUNS = (("torch_1", 1, "auto"), ("torch_4", 4, "auto"), ("torch_4_decoded_together", 4, 4))


def breakdown(name: str, repeats: int, overrides: list[str], steps: int | None = None) -> dict:
    """Where torch sampling's time goes with 1 and 4 samples: the image encoder, the denoiser and the
    decoder, each as a multiple of the same-size UNet's time on the same window (one process,
    interleaved; medians over `repeats`); four samples also decoded in one pass (BREAKDOWN_RUNS)."""
    dims, patch, spacing, classes = SETTINGS[name]
    model, unet, options = networks(dims, patch, spacing, classes, overrides, steps)
    seconds = timed_parts(model)
    image = torch.randn(1, 1, *patch)
    runs: dict[str, list[float]] = {}
    with torch.no_grad():
        for repeat in range(repeats + 1):  # the first is a warm-up
            t0 = time.perf_counter()
            unet(image)
            times = {"unet": time.perf_counter() - t0}
            for key, n, per_pass in BREAKDOWN_RUNS:
                seconds.clear()
                t0 = time.perf_counter()
                model.sample(image, replace(options, num_samples=n, decode_batch=per_pass))
                times[key] = time.perf_counter() - t0
                times |= {f"{key} {part}": s for part, s in seconds.items()}
            for key, value in times.items():
                runs.setdefault(key, []).extend([value] if repeat else [])
    medians, ratios = against_unet(runs)
    return {"seconds": medians, "ratio_to_unet": ratios}


def decode_batch_comparison(name: str, repeats: int, overrides: list[str], steps: int | None = None) -> dict:
    """Four samples with the decoder taking them one at a time against all together
    (`sample.decode_batch` 1 and 4), as multiples of the UNet's time; the order of the three
    alternates between repeats so that neither follows the other always (medians; the first two
    repeats warm up)."""
    dims, patch, spacing, classes = SETTINGS[name]
    model, unet, options = networks(dims, patch, spacing, classes, overrides, steps)
    image = torch.randn(1, 1, *patch)
    order = [("unet", 0), ("decoded_one_at_a_time", 1), ("decoded_together", 4)]
    runs: dict[str, list[float]] = {}
    with torch.no_grad():
        for repeat in range(repeats + 2):
            for key, per_pass in order if repeat % 2 else order[::-1]:
                t0 = time.perf_counter()
                if per_pass:
                    model.sample(image, replace(options, num_samples=4, decode_batch=per_pass))
                else:
                    unet(image)
                runs.setdefault(key, []).extend([time.perf_counter() - t0] if repeat >= 2 else [])
    medians, ratios = against_unet(runs)
    return {"seconds": medians, "ratio_to_unet": ratios}


def folder_run(cases: int = 20) -> dict:
    """`predict` over a folder of 2D cases against the sum of its per-case network times."""
    from latentseg.cli import main as cli
    from latentseg.data.phantoms import write_phantom_dataset

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        write_phantom_dataset(tmp / "train", 4, 2, 256, seed=1)
        write_phantom_dataset(tmp / "test", cases, 2, 256, seed=2)
        settings = ["train.steps=1", "train.val_every=0", "data.val_fraction=0.25", "data.patch_size=[256,256]"]
        assert cli(["train", "--data", str(tmp / "train"), "--out", str(tmp / "model"), *settings]) == 0
        import latentseg.infer as infer

        network = []
        original = infer.sample_volume

        def counted(*args, **kwargs):
            t0 = time.perf_counter()
            out = original(*args, **kwargs)
            network.append(time.perf_counter() - t0)
            return out

        infer.sample_volume = counted
        try:
            t0 = time.perf_counter()
            args = ["predict", "--model", str(tmp / "model"), "--input", str(tmp / "test" / "images")]
            assert cli([*args, "--output", str(tmp / "pred"), "--samples", "1"]) == 0
            total = time.perf_counter() - t0
        finally:
            infer.sample_volume = original
    return {"cases": cases, "total_seconds": total, "network_seconds": sum(network), "ratio": total / sum(network)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--settings", default=",".join(SETTINGS))
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--steps", type=int, help="DDIM steps (default: planned for one annotator)")
    parser.add_argument("--skip-folder", action="store_true")
    parser.add_argument("--breakdown", action="store_true", help="also time the torch model's parts (1 and 4 samples)")
    parser.add_argument("--decode-batch", action="store_true", help="four samples decoded 1 vs 4 at a time")
    parser.add_argument("--overrides", default="", help="latentseg settings, comma-separated key=value")
    parser.add_argument("--out", default=str(ROOT / "results" / "inference.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    overrides = split_overrides(args.overrides)
    results = {"threads": args.threads, "torch": torch.__version__, "device": "cpu", "overrides": overrides}
    results["steps"] = args.steps or "planned"
    for name in args.settings.split(","):
        results[name] = measure(name, args.repeats, overrides, args.steps)
        print(name, json.dumps(results[name]), flush=True)
        if args.breakdown:
            results[f"breakdown_{name}"] = breakdown(name, args.repeats, overrides, args.steps)
            print("breakdown", name, json.dumps(results[f"breakdown_{name}"]["ratio_to_unet"]), flush=True)
        if args.decode_batch:
            results[f"decode_batch_{name}"] = decode_batch_comparison(name, args.repeats, overrides, args.steps)
            print("decode_batch", name, json.dumps(results[f"decode_batch_{name}"]["ratio_to_unet"]), flush=True)
    if not args.skip_folder:
        results["folder_2d_256"] = folder_run()
        print("folder", json.dumps(results["folder_2d_256"]), flush=True)
    results["measured"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    out.write_text(json.dumps(results, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
