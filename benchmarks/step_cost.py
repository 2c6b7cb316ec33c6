"""What one training step costs: latentseg's default model against the benchmark's MONAI UNet at
the same patch and batch (issue 16, part 3), 2D and 3D, one torch thread, the two interleaved
(UNet, latentseg, UNet, ...) so that the machine's noise falls on both alike.

    python -m benchmarks.step_cost [--repeats 12] [--variants default,...]

Writes benchmarks/results/step_cost.json: median seconds per step and their ratio, per setting.
`--profile` also prints the top operators of one latentseg step (torch.profiler).
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import time
from pathlib import Path

import torch

from benchmarks.unet_baseline import bar_network, make_unet
from latentseg.config import load_config
from latentseg.data.prepare import plan_network
from latentseg.models import build_model
from latentseg.models.losses import dice_ce, soft_dice_loss

ROOT = Path(__file__).resolve().parent
# name -> (dims, patch, batch, spacing, classes); the ACDC-like one keeps its slice axis whole
SETTINGS = {
    "2d_128_b8": (2, [128, 128], 8, [1.0, 1.0], 2),
    "2d_256_b8": (2, [256, 256], 8, [1.0, 1.0], 2),
    "3d_acdc_128x128x8_b2": (3, [128, 128, 8], 2, [1.0, 1.0, 10.0], 4),
    "3d_96_b2": (3, [96, 96, 64], 2, [1.0, 1.0, 1.0], 2),
}


def split_overrides(text: str) -> list[str]:
    """`a=1,b=[2,3]` -> ["a=1", "b=[2,3]"]: commas inside brackets belong to a list value."""
    return [o for o in re.split(r",(?![^\[]*\])", text) if o]


def latentseg_model(dims: int, patch: list[int], spacing: list[float], classes: int, overrides: list[str]):
    """latentseg's default model for this patch as `train` plans it (`plan_network`), with decoder
    skips and 4 downsamplings (what the planner chose on ACDC, LA2018 and MoNuSeg) unless
    `overrides` say otherwise."""
    config = load_config(None, ["model.decoder_skips=true", "model.num_downsamplings=4", *overrides])
    m = config.model
    m.spatial_dims, m.in_channels, m.num_classes = dims, 1, classes
    config.data.patch_size = list(patch)
    plan_network(config, [tuple(patch)], spacing)
    model = build_model(m)
    return model, model.objective(config), m.strides


def step_fn(loss_fn, params, optimizer):
    def step():
        t0 = time.perf_counter()
        loss = loss_fn()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        return time.perf_counter() - t0

    return step


def measure(name: str, overrides: list[str], repeats: int) -> dict:
    dims, patch, batch, spacing, classes = SETTINGS[name]
    torch.manual_seed(0)
    image = torch.randn(batch, 1, *patch)
    label = torch.randint(0, classes, (batch, 1, *patch))
    model, objective, strides = latentseg_model(dims, patch, spacing, classes, overrides)
    unet = make_unet(dims, 1, classes, *bar_network(dims, strides))  # the benchmark's UNet
    dice = soft_dice_loss()
    runs = {
        "unet": step_fn(
            lambda: dice_ce(unet(image), label, 1.0, dice).mean(),
            list(unet.parameters()),
            torch.optim.AdamW(unet.parameters(), 1e-3),
        ),  # fmt: skip
        "latentseg": step_fn(
            lambda: objective.losses({"image": image, "label": label, "text": None}).total,
            list(model.parameters()),
            torch.optim.AdamW(model.parameters(), 1e-3),
        ),  # fmt: skip
    }
    times: dict[str, list[float]] = {k: [] for k in runs}
    for fn in runs.values():  # warm-up
        fn()
    for _ in range(repeats):
        for key, fn in runs.items():
            times[key].append(fn())
    medians = {k: statistics.median(v) for k, v in times.items()}
    params = {
        "unet": sum(p.numel() for p in unet.parameters()),
        "latentseg": sum(p.numel() for p in model.parameters()),
    }
    return {
        "seconds_per_step": medians,
        "ratio": medians["latentseg"] / medians["unet"],
        "parameters": params,
        "strides": strides,
        "overrides": overrides,
    }


def profile(name: str, overrides: list[str]) -> None:
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    dims, patch, batch, spacing, classes = SETTINGS[name]
    model, objective, _ = latentseg_model(dims, patch, spacing, classes, overrides)
    image, label = torch.randn(batch, 1, *patch), torch.randint(0, classes, (batch, 1, *patch))
    objective.losses({"image": image, "label": label, "text": None}).total.backward()
    with torch_profile(activities=[ProfilerActivity.CPU], record_shapes=False) as prof:
        objective.losses({"image": image, "label": label, "text": None}).total.backward()
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--settings", default=",".join(SETTINGS))
    parser.add_argument("--repeats", type=int, default=12)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--overrides", default="", help="latentseg settings, comma-separated key=value")
    parser.add_argument("--label", default="default")
    parser.add_argument("--profile", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    overrides = split_overrides(args.overrides)
    out = ROOT / "results" / "step_cost.json"
    results = json.loads(out.read_text()) if out.is_file() else {}
    for name in args.settings.split(","):
        if args.profile:
            profile(name, overrides)
            continue
        result = measure(name, overrides, args.repeats)
        result["measured"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
        results.setdefault(args.label, {})[name] = result
        print(name, json.dumps(result), flush=True)
        out.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
