"""`latentseg demo`: phantoms -> train -> predict -> evaluate, with no data to download.

The 2D demo takes about 11 minutes on two CPU cores (README, measured 2026-12-07).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from latentseg.checkpoint import load_config as load_model_config
from latentseg.config import concrete_sampling, load_config
from latentseg.data.phantoms import LABELS, write_phantom_dataset
from latentseg.infer import predict
from latentseg.metrics import evaluate, format_table
from latentseg.training import train

# (train cases, test cases, phantom size, settings)
DEMOS: dict[int, tuple[int, int, int, list[str]]] = {
    2: (200, 20, 128, ["train.steps=2000", "train.batch_size=8", "train.val_every=500"]),
    # 64^3 phantoms: three downsamplings keep an 8^3 latent, so small lesions survive
    3: (
        40,
        6,
        64,
        [
            "train.steps=1000",
            "train.batch_size=2",
            "train.val_every=500",
            "train.val_cases=2",
            "model.num_downsamplings=3",
        ],
    ),
}


def run_demo(out: Path, dims: int = 2, overrides: list[str] | None = None) -> dict[str, Any]:
    """Run the whole path on synthetic phantoms; returns the evaluation summary."""
    n_train, n_test, size, settings = DEMOS[dims]
    config = load_config(None, settings + list(overrides or []))
    print(f"[1/4] writing {n_train} training and {n_test} test {dims}D phantoms ({size} px) to {out / 'data'}")
    train_dir = write_phantom_dataset(out / "data" / "train", n_train, dims, size, seed=1)
    test_dir = write_phantom_dataset(out / "data" / "test", n_test, dims, size, seed=2)
    print(f"[2/4] training for {config.train.steps} steps (batch {config.train.batch_size})")
    model_dir = train(train_dir, out / "model", config)
    planned = concrete_sampling(load_model_config(model_dir).sample)
    print(f"[3/4] predicting the held-out phantoms with DDIM-{planned.steps}, {planned.num_samples} sample(s) each")
    inputs = test_dir / ("images" if dims == 2 else "imagesTr")
    predict(model_dir, inputs, out / "predictions")
    print("[4/4] evaluating")
    summary = evaluate(out / "predictions", test_dir)
    names = {str(v): k for k, v in LABELS.items()}
    print(format_table(summary, names))
    print(f"overlays: {out / 'predictions'}/*_overlay.png   metrics: {out / 'predictions' / 'summary.json'}")
    return summary
