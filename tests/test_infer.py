"""Prediction through its own API (the CLI path is in test_cli.py): sampling options travel whole,
output names, clashes and resumption, and the notebook API."""

from __future__ import annotations

import re
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from latentseg.checkpoint import load_model
from latentseg.config import SampleConfig
from latentseg.data.datasets import Case
from latentseg.errors import LatentSegError
from latentseg.infer import PredictOptions, output_names, plan_outputs, predict, predict_array, sample_options

README = Path(__file__).resolve().parents[1] / "README.md"


def test_sample_options_reach_the_model_whole(model2d, monkeypatch):
    model, config, _ = load_model(model2d)
    seen = []
    real = model.sample

    def spy(window, options, text=None, generator=None):
        seen.append(options)
        return real(window, options, text, generator)

    monkeypatch.setattr(model, "sample", spy)
    options = sample_options(model, config.sample, {"num_samples": 3, "steps": 1, "eta": 0.5, "overlap": 0.25})
    pred = predict_array(model, np.zeros((1, 64, 64), np.float32), [64, 64], options)
    assert pred.probabilities.shape == (3, 64, 64) and pred.uncertainty.shape == (64, 64)
    assert seen and all(o is options for o in seen)  # the same object, not unpacked arguments
    assert (options.num_samples, options.steps, options.eta, options.overlap) == (3, 1, 0.5, 0.25)


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"steps": 0}, "--steps must be >= 1, got 0"),
        ({"num_samples": 1, "fusion": "vote"}, "--fusion vote needs at least 2 samples"),
        ({"sampler": "staged"}, "--sampler staged needs a model trained with model.denoiser_heads=2"),
        ({"fusion": "median"}, "--fusion must be one of mean, vote, staple"),
        ({"guidance": 2}, "unknown sampling settings: guidance"),
    ],
)
def test_sample_options_are_refused_in_the_command_lines_words(model2d, overrides, message):
    model, config, _ = load_model(model2d)
    with pytest.raises(LatentSegError, match=re.escape(message)):
        sample_options(model, config.sample, overrides)


def test_output_names_put_the_label_map_last():
    names = output_names(Case("a", [Path("a.png")]))
    assert names == ["a_prob.png", "a_std.png", "a_entropy.png", "a_overlay.png", "a.png"]
    assert output_names(Case("v", [Path("v.nii.gz")]), overlay=False)[-1] == "v.nii.gz"


def test_plan_outputs_skips_finished_cases_only_when_resuming(tmp_path):
    cases = [Case("a", [Path("a.png")]), Case("b", [Path("b.png")])]
    for name in output_names(cases[0]):
        (tmp_path / name).write_bytes(b"done")
    (tmp_path / "b_prob.png").write_bytes(b"half")
    assert [c.case_id for c in plan_outputs(cases, tmp_path, True, resume=True, overwrite=False)] == ["b"]
    assert len(plan_outputs(cases, tmp_path, True, resume=False, overwrite=True)) == 2
    with pytest.raises(LatentSegError, match="a_prob.png: exists"):
        plan_outputs(cases, tmp_path, True, resume=False, overwrite=False)


def test_predict_takes_options_as_an_object_or_as_keywords(tmp_path, model2d, data2d):
    images = data2d["test"] / "images"
    a = predict(model2d, images, tmp_path / "a", {"num_samples": 2}, PredictOptions(seed=4, overlays=False))
    b = predict(model2d, images, tmp_path / "b", {"num_samples": 2}, seed=4, overlays=False, progress=False)
    assert [p.name for p in a] == [p.name for p in b] and len(a) == 3 * 4
    assert all(x.read_bytes() == y.read_bytes() for x, y in zip(a, b, strict=True))


def test_notebook_api_matches_predict(tmp_path, model2d, data2d):
    import latentseg

    image = data2d["test"] / "images" / "phantom_000.png"
    model = latentseg.load_model(model2d, device="cpu")
    from_file = model.predict(image, num_samples=2, seed=1)
    array = np.asarray(__import__("PIL.Image").Image.open(image).convert("L"), dtype=np.float32)
    from_array = model.predict(array, num_samples=2, seed=1)
    np.testing.assert_allclose(from_file.probabilities, from_array.probabilities, atol=1e-6)
    predict(model2d, image, tmp_path / "p", {"num_samples": 2}, seed=1, overlays=False, progress=False)
    from latentseg.data.io import read_label

    assert np.array_equal(read_label(tmp_path / "p" / "phantom_000.png")[0], from_file.label)
    assert model.labels[0] == "0" and latentseg.__version__
    with pytest.raises(LatentSegError, match="an array of shape"):
        model.predict(np.zeros((2, 3, 4, 5)))


def test_readme_python_example_runs(tmp_path, data2d, monkeypatch):
    """The README's Python example, as written, with a tiny budget in place of its 10 minutes."""
    from tests.conftest import TINY_2D

    block = README.read_text().split("## Python API", 1)[1].split("```python", 1)[1].split("```", 1)[0]
    assert '"train.max_minutes=10"' in block
    code = block.replace('"train.max_minutes=10"', ", ".join(f'"{s}"' for s in TINY_2D))
    shutil.copytree(data2d["train"], tmp_path / "my_dataset")
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(code, "README.md", "exec"), namespace)  # noqa: S102 (our own README)
    assert namespace["prediction"].label.shape == (64, 64)
    assert torch.is_tensor(torch.as_tensor(namespace["prediction"].uncertainty))


def test_replace_keeps_sample_config_a_plain_dataclass():
    options = replace(SampleConfig(), num_samples=6)
    assert options.num_samples == 6 and SampleConfig().num_samples == "auto"


def test_a_png_border_cut_away_by_the_foreground_crop_is_background_in_every_map(tmp_path, model2d, data2d):
    from PIL import Image

    from latentseg.data.io import read_label

    image = np.asarray(Image.open(data2d["test"] / "images" / "phantom_000.png").convert("L"))
    framed = np.zeros((image.shape[0] + 12, image.shape[1] + 12), np.uint8)
    framed[6:-6, 6:-6] = np.maximum(image, 1)  # a black frame, as around a fundus photograph
    inputs = tmp_path / "in"
    inputs.mkdir()
    Image.fromarray(framed).save(inputs / "framed.png")
    predict(model2d, inputs, tmp_path / "out", {"num_samples": 2}, overlays=False, progress=False)
    prob = np.asarray(Image.open(tmp_path / "out" / "framed_prob.png"))
    border = np.ones(framed.shape, bool)
    border[6:-6, 6:-6] = False
    assert prob.shape == framed.shape and prob[border].max() == 0  # foreground probability 0, not 1
    assert read_label(tmp_path / "out" / "framed.png")[0][border].max() == 0
