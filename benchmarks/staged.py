"""Staged diffusion benchmark (issue "Staged diffusion and STAPLE fusion", 004 Tables 4-5).

Methods, each trained for the same wall-clock minutes on the same split:
- uniform_eps_ddim100: one eps head, t uniform (003 Algorithm 1), DDIM with 100 steps;
- onestep_x0: one x0 head, t uniform, one DDIM step from t = 999;
- staged: eps and x0 heads, staged training with t <= low set to 0 (004 section 2.2), staged
  sampling (20 masks) fused by STAPLE; the same samples are also fused by their mean;
- staged_sampled_t: as staged, but t <= low kept as drawn (the issue's alternative);
- unisegdiff: as staged, with the condition network pre-trained for segmentation, frozen and
  injected by dual cross-attention (004 section 2.3);
- unisegdiff_eps_seg: as unisegdiff, with `model.eps_head_seg_loss` (the eps head's estimate is
  decoded into the segmentation loss too, as 003 trains its eps denoiser; not in 004).
Evaluations named staged11_* take 9 middle steps (11 network calls), staged20_* 004's 10 (12).

Per method: mean foreground Dice, sequential network calls and latents evaluated per case
(counted on the denoiser), and the training epoch where validation Dice first reaches 98% of
its best (the plateau, as in 004 Table 4).

Each run writes benchmarks/work/staged/<dataset>/<method>/result.json, so runs may go in
parallel processes; the results are collected into benchmarks/results/staged.json.
Run: python -m benchmarks.staged [--datasets phantoms,monuseg] [--methods ...] [--minutes 6]
"""

from __future__ import annotations

import argparse
import json
from dataclasses import replace
from pathlib import Path

import torch

from benchmarks.runs import collect, phantom_data, real_data, train_and_score

ROOT = Path(__file__).resolve().parent
WORK = ROOT / "work" / "staged"
RESULTS = ROOT / "results" / "staged.json"

TWO_HEADS = ["model.denoiser_heads=2", "train.timesteps=staged", "sample.sampler=staged"]
STAGED_EVALUATIONS = [(f"staged20_{f}", {"num_samples": 20, "fusion": f}) for f in ("staple", "mean")]
# the last step with the x0 head (not 004's choice; see latentseg.diffusion.staged)
X0_FINAL = {"num_samples": 20, "fusion": "staple", "staged_final_head": "x0"}
X0_FINAL_MEAN = {"num_samples": 20, "fusion": "mean", "staged_final_head": "x0"}
# staged-11: 9 middle steps (interval 33.3 instead of 004's 30), so 1 + 9 + 1 = 11 network calls
ELEVEN = {"staged_middle_steps": 9}
STAGED11_EVALUATIONS = [
    ("staged11_staple", {"num_samples": 20, "fusion": "staple"} | ELEVEN),
    ("staged11_x0final_staple", X0_FINAL | ELEVEN),
    ("staged11_x0final_mean", X0_FINAL_MEAN | ELEVEN),
]
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
        [*STAGED_EVALUATIONS, ("staged20_x0final_staple", X0_FINAL)],
    ),
    "staged_sampled_t": (
        [*TWO_HEADS, "train.last_stage_t=sampled"],
        [STAGED_EVALUATIONS[0], ("staged20_x0final_staple", X0_FINAL)],
    ),
    # the whole of UniSegDiff: also CFENet pre-trained (30% of the minutes), frozen, injected by DCA
    "unisegdiff": (
        [*TWO_HEADS, "train.last_stage_t=zero", "model.condition=pretrained"],
        [
            *STAGED_EVALUATIONS,
            ("staged20_x0final_staple", X0_FINAL),
            ("staged20_x0final_mean", X0_FINAL_MEAN),
            *STAGED11_EVALUATIONS,
        ],
    ),
    # as unisegdiff, with the eps head's estimate also decoded into the segmentation loss (not 004)
    "unisegdiff_eps_seg": (
        [*TWO_HEADS, "train.last_stage_t=zero", "model.condition=pretrained", "model.eps_head_seg_loss=true"],
        [*STAGED11_EVALUATIONS, STAGED_EVALUATIONS[0]],
    ),
    # CFENet as a UNet (skips into its decoder): its bottleneck need not hold the mask
    "unisegdiff_unet_cfenet": (
        [*TWO_HEADS, "train.last_stage_t=zero", "model.condition=pretrained", "model.condition_head_skips=true"],
        STAGED_EVALUATIONS,
    ),
}


@torch.no_grad()
def count_network_calls(model_dir: Path, options: dict) -> dict:
    """Denoiser passes (sequential calls, and latents carried) to sample one patch-sized window."""
    from latentseg.checkpoint import load_model

    model, config, _ = load_model(model_dir)
    calls = {"network_calls": 0, "latent_evaluations": 0}
    forward_heads = model.denoiser.forward_heads  # every path through the denoiser ends here

    def counted(x_t, t, cond, heads=None):
        calls["network_calls"] += 1
        calls["latent_evaluations"] += x_t.shape[0]
        return forward_heads(x_t, t, cond, heads)

    model.denoiser.forward_heads = counted
    window = torch.randn(1, config.model.in_channels, *config.data.patch_size)
    sample = {k: v for k, v in options.items() if k in ("num_samples", "steps", "staged_middle_steps")}
    model.sample(window, replace(config.sample, **sample))
    return calls


def _foreground_dice(pred: torch.Tensor, label: torch.Tensor, num_classes: int) -> float:
    dice = [
        2 * ((pred == c) & (label == c)).sum() / ((pred == c).sum() + (label == c).sum())
        for c in range(1, num_classes)
        if (label == c).any() or (pred == c).any()
    ]
    return float(torch.stack(dice).mean()) if dice else 1.0


def _staged_parts(model, cond: dict, z: torch.Tensor, middle_steps: int) -> dict[str, torch.Tensor]:
    """The latents staged sampling passes through, per branch (see latentseg.diffusion.staged)."""
    from latentseg.diffusion import middle_timesteps
    from latentseg.diffusion.samplers import _as_batch, ddim_jump

    sched = model.schedule

    def heads(x, t):
        return model.denoiser.forward_heads(x, _as_batch(t, x), cond)

    top = sched.num_timesteps - 1
    x0, eps = sched.split("x0", heads(z, top)[1], z, _as_batch(top, z))
    parts = {"x0_head_from_T": x0}
    ts = middle_timesteps(model.stages, middle_steps)
    xa = xb = ddim_jump(sched, x0, eps, top, ts[0])
    for t, s in zip(ts[:-1], ts[1:], strict=True):
        a0, ae = sched.split("x0", heads(xa, t)[1], xa, _as_batch(t, xa))
        b0, be = sched.split("eps", heads(xb, t)[0], xb, _as_batch(t, xb))
        xa, xb = ddim_jump(sched, a0, ae, t, s), ddim_jump(sched, b0, be, t, s)
    parts |= {"x0_branch_middle": a0, "eps_branch_middle": b0}
    for name, xl in (("x0_branch_final", xa), ("eps_branch_final", xb)):
        parts[name] = sched.split("eps", heads(xl, ts[-1])[0], xl, _as_batch(ts[-1], xl))[0]
    return parts


@torch.no_grad()
def branch_dice(model_dir: Path, test_root: Path, seed: int = 0) -> dict:
    """Mean foreground Dice (phantoms: one window per case) of what each part of staged sampling
    decodes to: the x0 head's jump from T-1, each branch's x0 estimate at the end of the middle
    stage, and each branch after the final eps-head step."""
    from latentseg.checkpoint import load_model
    from latentseg.data.datasets import discover_dataset, load_case
    from latentseg.data.preprocess import prepare_image
    from latentseg.infer import preprocessing_of

    model, config, fingerprint = load_model(model_dir)
    prep = preprocessing_of(fingerprint, config)
    g = torch.Generator().manual_seed(seed)
    scores: dict[str, list[float]] = {}
    for case in discover_dataset(test_root).cases:
        sample = load_case(case)
        x, _ = prepare_image(sample["image"], sample["meta"], prep)
        cond = model.conditioning(torch.as_tensor(x)[None])
        z = torch.randn(1, config.model.latent_channels, *cond["z_image"].shape[2:], generator=g)
        label = torch.from_numpy(sample["label"][0])
        for name, latent in _staged_parts(model, cond, z, config.sample.staged_middle_steps).items():
            pred = model.decode(latent, cond).argmax(1)[0]
            scores.setdefault(name, []).append(_foreground_dice(pred, label, config.model.num_classes))
    return {k: sum(v) / len(v) for k, v in scores.items()}


def run(dataset: str, method: str, minutes: float, reuse: bool = False, only: list[str] | None = None) -> dict:
    work = WORK / dataset
    data = phantom_data(work) if dataset == "phantoms" else real_data(dataset, work)
    train_settings, evaluations = METHODS[method]
    evaluations = [e for e in evaluations if not only or e[0] in only]
    return train_and_score(work / method, data, train_settings, evaluations, minutes, count_network_calls, reuse)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datasets", default="phantoms,monuseg")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--minutes", type=float, default=6.0, help="training minutes per method")
    parser.add_argument("--collect-only", action="store_true")
    parser.add_argument("--diagnose", action="store_true", help="score each branch of the trained phantom models")
    parser.add_argument("--reuse", action="store_true", help="re-evaluate already trained models, do not retrain")
    parser.add_argument("--evaluations", default="", help="only these sampling labels, e.g. staged20_x0final_staple")
    args = parser.parse_args()
    if args.diagnose:
        for path in sorted((WORK / "phantoms").glob("*/result.json")):
            config = json.loads((path.parent / "model" / "config.json").read_text())
            if config["model"]["denoiser_heads"] == 2:
                result = json.loads(path.read_text())
                result["branches"] = branch_dice(path.parent / "model", WORK / "phantoms" / "data" / "test")
                print(path.parent.name, json.dumps(result["branches"]), flush=True)
                path.write_text(json.dumps(result, indent=1))
    elif not args.collect_only:
        for dataset in args.datasets.split(","):
            for method in args.methods.split(","):
                print(f"== {dataset} / {method}: {args.minutes} minutes", flush=True)
                run(dataset, method, args.minutes, args.reuse, [e for e in args.evaluations.split(",") if e])
    collect(WORK, RESULTS)
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
