"""Behaviour pinned across refactors: tiny models of every family, trained and predicted before the
redesign (issue 15, `tests/golden/make_golden.py` at 35080b7), give the same outputs to 5e-5 and the
same labels exactly. (float32 noise differs between CPUs: up to 1.2e-5 was measured on an AMD EPYC
host on 2026-12-05, against fixtures made on another.)

The folders are model directories in the format of that time (no `plans.json`), so these tests
also prove that old models still load."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from latentseg.checkpoint import load_model
from latentseg.data.datasets import Case, load_image
from latentseg.infer import predict_image, preprocessing_of
from tests.golden.make_golden import MODELS, _text

GOLDEN = Path(__file__).parent / "golden"


@pytest.mark.parametrize("name", sorted(MODELS))
def test_same_checkpoint_gives_the_same_outputs(name):
    folder = GOLDEN / name
    sampling = json.loads((folder / "sampling.json").read_text())
    expected = np.load(folder / "expected.npz")
    model, config, fingerprint = load_model(folder)
    source = next(p for p in folder.iterdir() if p.name.startswith("input."))
    image, meta = load_image(Case("input", [source]))
    text = _text(model, config, sampling["prompt"])
    options = replace(config.sample, num_samples=sampling["samples"], steps=sampling["steps"])
    pred = predict_image(model, config, preprocessing_of(fingerprint, config), image, meta, options, 7, text)
    for key in ("probabilities", "uncertainty", "entropy"):
        np.testing.assert_allclose(getattr(pred, key), expected[key], atol=5e-5, rtol=0, err_msg=f"{name}: {key}")
    assert np.array_equal(pred.label, expected["label"]), name
