"""`latentseg export --onnx` and `predict --engine onnxruntime`: the same labels as torch and
probabilities within 1e-4, for 2D and 3D, text and class-prompt models and the staged sampler; the
pinned tiny models of `tests/golden` are exported from copies."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")

from latentseg.checkpoint import load_model  # noqa: E402
from latentseg.cli import main  # noqa: E402
from latentseg.data.datasets import Case, load_image  # noqa: E402
from latentseg.infer import predict_image, preprocessing_of  # noqa: E402
from latentseg.onnx_engine import export_onnx, load_onnx_model  # noqa: E402
from tests.golden.make_golden import _text  # noqa: E402

GOLDEN = Path(__file__).parent / "golden"


def _copy(name: str, tmp_path: Path) -> Path:
    folder = tmp_path / name
    shutil.copytree(GOLDEN / name, folder)
    return folder


def _both(folder: Path, sampler_settings: dict | None = None):
    """The golden input predicted by the torch model and by its exported graphs, same seed."""
    sampling = json.loads((folder / "sampling.json").read_text())
    source = next(p for p in folder.iterdir() if p.name.startswith("input."))
    image, meta = load_image(Case("input", [source]))
    out = []
    for loader in (load_model, load_onnx_model):
        model, config, fingerprint = loader(folder, "cpu")
        torch_model = load_model(folder)[0]
        text = _text(torch_model, config, sampling["prompt"])
        options = replace(config.sample, num_samples=4, steps=sampling["steps"], **(sampler_settings or {}))
        prep = preprocessing_of(fingerprint, config)
        out.append(predict_image(model, config, prep, image, meta, options, 7, text))
    return out


@pytest.mark.parametrize("name", ["ldseg2d", "ldseg3d", "text2d", "class2d", "staged2d"])
def test_onnxruntime_matches_torch(name, tmp_path):
    folder = _copy(name, tmp_path)
    export_onnx(folder)
    settings = {"sampler": "staged", "staged_middle_steps": 2} if name == "staged2d" else None
    torch_pred, onnx_pred = _both(folder, settings)
    assert np.abs(torch_pred.probabilities - onnx_pred.probabilities).max() < 1e-4
    assert np.array_equal(torch_pred.label, onnx_pred.label)
    assert np.abs(torch_pred.uncertainty - onnx_pred.uncertainty).max() < 1e-4


def test_predict_engine_onnxruntime_from_the_command_line(tmp_path, model2d, data2d):
    folder = tmp_path / "model"
    shutil.copytree(model2d, folder)
    images = str(data2d["test"] / "images")
    assert main(["export", "--model", str(folder), "--onnx", "--out", str(tmp_path / "m.zip")]) == 0
    assert main(["predict", "--model", str(folder), "--input", images, "--output", str(tmp_path / "t")]) == 0
    args = ["--input", images, "--engine", "onnxruntime"]
    assert main(["predict", "--model", str(tmp_path / "m.zip"), *args, "--output", str(tmp_path / "o")]) == 0
    for label in sorted((tmp_path / "t").glob("phantom_*[0-9].png")):
        assert label.read_bytes() == (tmp_path / "o" / label.name).read_bytes()


def test_missing_or_changed_graphs_are_refused(tmp_path, model2d, data2d, capsys):
    folder = tmp_path / "model"
    shutil.copytree(model2d, folder)
    argv = ["predict", "--model", str(folder), "--input", str(data2d["test"] / "images"), "--engine", "onnxruntime"]
    assert main([*argv, "--output", str(tmp_path / "a")]) == 2
    assert "latentseg export --model" in capsys.readouterr().err
    export_onnx(folder)
    assert main(["export", "--model", str(folder), "--onnx"]) == 2  # exists: not replaced without --overwrite
    assert "--overwrite" in capsys.readouterr().err
    graph = folder / "onnx" / "decoder.onnx"
    graph.write_bytes(graph.read_bytes()[:-16] + b"\0" * 16)
    assert main([*argv, "--output", str(tmp_path / "b")]) == 2
    assert "does not match its checksum" in capsys.readouterr().err
    assert not (tmp_path / "b").exists()


def test_a_textdiff_model_is_not_exported(tmp_path, capsys):
    folder = _copy("textdiff2d", tmp_path)
    assert main(["export", "--model", str(folder), "--onnx"]) == 2
    assert "ONNX export covers LDSeg models" in capsys.readouterr().err
    assert not (folder / "onnx").exists()
