from __future__ import annotations

import shutil

import pytest
import torch
from safetensors.torch import load_file

from latentseg.averaging import WeightAverage, decay_at
from latentseg.checkpoint import MODEL_FILE, STATE_FILE, read_train_state
from latentseg.cli import main
from tests.conftest import TINY_2D


def test_decay_warms_up_then_is_capped():
    assert decay_at(0, 0.999) == pytest.approx(0.1)
    assert decay_at(80, 0.999) == pytest.approx(81 / 90)  # about the last ninth of 80 steps
    assert decay_at(10**6, 0.999) == 0.999
    assert decay_at(10**6, 0.99) == 0.99


def test_update_is_the_moving_average_computed_by_hand():
    layer = torch.nn.Linear(1, 1, bias=False)
    layer.weight.data.fill_(2.0)
    average = WeightAverage(layer, 0.5)
    expected = 2.0
    for step, value in enumerate([4.0, -1.0, 3.0, 10.0], start=1):
        layer.weight.data.fill_(value)
        average.update(step)
        d = min(0.5, (1 + step) / (10 + step))
        expected = d * expected + (1 - d) * value
        assert average.average["weight"].item() == pytest.approx(expected)


def test_applied_swaps_the_average_in_and_the_trained_weights_back():
    torch.manual_seed(0)
    layer = torch.nn.Linear(3, 2)
    average = WeightAverage(layer, 0.9)
    trained = {k: v.clone() for k, v in layer.state_dict().items()}
    taken_before = layer.state_dict()
    average.average = {k: torch.randn_like(v) for k, v in average.average.items()}
    x = torch.randn(4, 3)
    with average.applied():
        inside = layer(x)
    expected = x @ average.average["weight"].T + average.average["bias"]
    torch.testing.assert_close(inside, expected)
    for key, value in layer.state_dict().items():
        assert torch.equal(value, trained[key]) and torch.equal(taken_before[key], trained[key])
    with pytest.raises(RuntimeError, match="inside"), average.applied():
        raise RuntimeError("inside")
    assert torch.equal(layer.weight, trained["weight"])  # restored after an error too


def test_only_trainable_parameters_are_averaged_and_a_foreign_average_is_refused():
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 1))
    model[0].requires_grad_(False)
    average = WeightAverage(model, 0.9)
    assert sorted(average.average) == ["1.bias", "1.weight"]
    with pytest.raises(ValueError, match="does not match the model"):
        average.load({"0.weight": torch.zeros(2, 2)})
    with pytest.raises(ValueError, match="decay"):
        WeightAverage(model, 1.0)


def test_the_model_file_holds_the_average_and_the_training_state_both(data2d, tmp_path):
    averaged, last = tmp_path / "averaged", tmp_path / "last"
    args = [*TINY_2D, "train.steps=12", "train.val_every=0"]
    assert main(["train", "--data", str(data2d["train"]), "--out", str(averaged), *args]) == 0
    assert main(["train", "--data", str(data2d["train"]), "--out", str(last), *args, "train.ema_decay=0"]) == 0
    state, saved = read_train_state(averaged / STATE_FILE), load_file(str(averaged / MODEL_FILE))
    assert state.average and all(torch.equal(saved[k], v) for k, v in state.average.items())
    assert any(not torch.equal(saved[k], state.model[k]) for k in state.average)
    state0, saved0 = read_train_state(last / STATE_FILE), load_file(str(last / MODEL_FILE))
    assert state0.average == {} and all(torch.equal(saved0[k], v) for k, v in state0.model.items())
    assert all(torch.equal(state.model[k], v) for k, v in state0.model.items())  # the same training either way


def test_resume_continues_the_saved_average(model2d, data2d, tmp_path, monkeypatch):
    run = tmp_path / "run"
    shutil.copytree(model2d, run)
    saved = read_train_state(run / STATE_FILE).average
    loaded = []
    original = WeightAverage.load
    monkeypatch.setattr(WeightAverage, "load", lambda self, tensors: (loaded.append(tensors), original(self, tensors)))
    assert main(["train", "--data", str(data2d["train"]), "--out", str(run), "--resume", "train.steps=33"]) == 0
    (tensors,) = loaded
    assert tensors.keys() == saved.keys() and all(torch.equal(tensors[k], v) for k, v in saved.items())


def test_resuming_a_state_without_an_average_starts_it_from_the_saved_weights(data2d, tmp_path, caplog):
    run = tmp_path / "run"
    train = ["train", "--data", str(data2d["train"]), "--out", str(run)]
    assert main([*train, *TINY_2D, "train.val_every=0", "train.steps=12", "train.ema_decay=0"]) == 0
    before = read_train_state(run / STATE_FILE)
    assert before.average == {}
    with caplog.at_level("INFO", logger="latentseg.training"):
        assert main([*train, "--resume", "train.val_every=0", "train.steps=13", "train.ema_decay=0.999"]) == 0
    assert "starts from the saved weights" in caplog.text
    after = read_train_state(run / STATE_FILE)
    weight = 1 - decay_at(13, 0.999)  # one step (13) moved the average from the saved weights
    for name, average in after.average.items():
        expected = before.model[name].lerp(after.model[name], weight)
        assert torch.allclose(average, expected, atol=1e-6), name
    assert any(not torch.equal(before.model[k], after.model[k]) for k in after.average)
