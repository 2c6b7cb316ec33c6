"""Weight averaging (`train.ema_decay`, latentseg.averaging) against the last step's weights, in
one training run, so both have the same steps and the machine's speed does not enter: latentseg
trains with its defaults as `benchmarks.realdata` runs it; the saved model (the average) and the
last step's weights (kept in the training state) are scored on the test split, and so are
averages with other decays, kept beside the run by an optimizer hook with the same rule.

    python -m benchmarks.averaging --dataset acdc --minutes 15 [--decays 0.99,0.995] [--seed 1]
    python -m benchmarks.averaging --collect   # results/averaging.json from benchmarks/work/averaging

One thread. Writes benchmarks/work/averaging/DATASET_MINUTES.json; `--collect` merges them.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

from benchmarks import realdata
from latentseg.averaging import decay_at
from latentseg.checkpoint import MODEL_FILE, STATE_FILE, load_model, read_train_state, read_weights
from latentseg.config import TrainConfig
from latentseg.infer import predict
from latentseg.metrics import evaluate

ROOT = Path(__file__).resolve().parent
WORK = ROOT / "work" / "averaging"


class ExtraAverages:
    """Moving averages with other decays, kept beside a run by global optimizer hooks: started
    from the weights before the first step, updated after every step."""

    def __init__(self, decays: list[float]):
        self.decays, self.params, self.averages, self.step = decays, None, {}, 0
        self.handles = []

    def __enter__(self) -> ExtraAverages:
        self.handles = [register_optimizer_step_pre_hook(self.before), register_optimizer_step_post_hook(self.after)]
        return self

    def __exit__(self, *exc) -> None:
        for handle in self.handles:
            handle.remove()

    def before(self, optimizer, args, kwargs) -> None:
        if self.params is None:
            self.params = [p for group in optimizer.param_groups for p in group["params"] if p.requires_grad]
            self.averages = {d: [p.detach().clone() for p in self.params] for d in self.decays}

    def after(self, optimizer, args, kwargs) -> None:
        self.step += 1
        with torch.no_grad():
            for decay, average in self.averages.items():
                for a, p in zip(average, self.params, strict=True):
                    a.lerp_(p.detach(), 1 - decay_at(self.step, decay))


def model_with(model_dir: Path, folder: Path, tensors: dict[str, torch.Tensor]) -> Path:
    """A copy of `model_dir` whose weights are `tensors` (over the saved ones of the same names)."""
    shutil.rmtree(folder, ignore_errors=True)
    shutil.copytree(model_dir, folder)
    state = read_weights(model_dir / MODEL_FILE) | tensors
    save_file({k: v.detach().cpu().contiguous() for k, v in state.items()}, str(folder / MODEL_FILE))
    (folder / STATE_FILE).unlink()
    return folder


def trained_names(model_dir: Path, average: dict[str, torch.Tensor]) -> list[str]:
    """The averaged parameters' names in the model's order, which is the optimizer's (a training
    state read back from safetensors lists its tensors sorted by name, not in that order)."""
    model, _, _ = load_model(model_dir)
    return [name for name, _ in model.named_parameters() if name in average]


def score(name: str, work: Path, model_dir: Path, label: str) -> dict:
    images, labels = realdata.link_test_files(name, work)
    pred = work / f"{label}_pred"
    predict(model_dir, images, pred, progress=False, overwrite=True)
    return scores(realdata._means(evaluate(pred, labels)))


def scores(means: dict) -> dict:
    """Mean foreground Dice, IoU, NSD, HD95 and the ECE of the probabilities."""
    return means["foreground_mean"] | {"ECE": (means["calibration"] or {}).get("ECE")}


def run(name: str, minutes: float, decays: list[float], seed: int = 0) -> dict:
    work = realdata.WORK / name
    work.mkdir(parents=True, exist_ok=True)
    settings = [f"data.split={realdata.write_split(name, work)}", f"train.seed={seed}"]
    with ExtraAverages(decays) as extra:
        trained = realdata.run_latentseg(name, work, settings, minutes, "averaging")
    model_dir = work / "averaging_model"
    state = read_train_state(model_dir / STATE_FILE)
    result = {"steps": trained["steps"], "default_decay": TrainConfig().ema_decay,
              "default": scores(trained["summary"])}  # fmt: skip
    last = model_with(model_dir, work / "averaging_last_model", state.model)
    result["last_step"] = score(name, work, last, "averaging_last")
    names = trained_names(model_dir, state.average)
    for decay, average in extra.averages.items():
        folder = model_with(model_dir, work / f"averaging_{decay}_model", dict(zip(names, average, strict=True)))
        result[f"decay_{decay}"] = score(name, work, folder, f"averaging_{decay}")
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", choices=sorted(realdata.DATASETS))
    parser.add_argument("--minutes", type=float)
    parser.add_argument("--decays", default="", help="other decays to score beside the default, e.g. 0.99,0.995")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--collect", action="store_true")
    args = parser.parse_args()
    if args.collect:
        rows = {p.stem: json.loads(p.read_text()) for p in sorted(WORK.glob("*.json"))}
        out = ROOT / "results" / "averaging.json"
        out.write_text(json.dumps(rows, indent=1) + "\n")
        print(f"wrote {out}")
        return
    from benchmarks.lanes import one_thread

    one_thread()
    minutes = args.minutes or realdata.DATASETS[args.dataset]["minutes"]
    decays = [float(d) for d in args.decays.split(",") if d]
    result = run(args.dataset, minutes, decays, args.seed)
    result |= {"dataset": args.dataset, "minutes": minutes, "seed": args.seed,
               "finished": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}  # fmt: skip
    WORK.mkdir(parents=True, exist_ok=True)
    (WORK / f"{args.dataset}_{minutes:g}_seed{args.seed}.json").write_text(json.dumps(result, indent=1))
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
