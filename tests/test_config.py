import json

import pytest

from latentseg.config import Config, load_config
from latentseg.errors import LatentSegError


def test_overrides_match_their_defaults_types(tmp_path):
    cfg = load_config(None, ["train.steps=12", "lr=0.01", "model.strides=[2,2,1]", "data.flips=false"])
    assert cfg.train.steps == 12 and cfg.train.lr == 0.01 and cfg.model.strides == [2, 2, 1]
    assert cfg.data.flips is False
    assert load_config(None, ["lr=1"]).train.lr == 1.0  # an int is a fine float
    assert load_config(None, ["lr=1e-4"]).train.lr == 1e-4  # YAML 1.1 reads this as text
    for bad in ["model.latent_channels=1.5", "model.latent_channels=abc", "data.flips=3", "train.lr=fast"]:
        with pytest.raises(LatentSegError, match="must be a"):
            load_config(None, [bad])
    for bad in ["train.steps=1.5", "train.steps=abc"]:
        with pytest.raises(LatentSegError, match="train.steps must be 'auto' or int"):
            load_config(None, [bad])


def test_unknown_ambiguous_and_malformed_keys():
    with pytest.raises(LatentSegError, match="unknown setting 'train.stepz'"):
        load_config(None, ["train.stepz=3"])
    with pytest.raises(LatentSegError, match="ambiguous setting 'steps'"):
        load_config(None, ["steps=3"])  # train.steps and sample.steps
    with pytest.raises(LatentSegError, match="key=value"):
        load_config(None, ["steps"])


def test_yaml_file_then_overrides_and_json_round_trip(tmp_path):
    (tmp_path / "c.yaml").write_text("train:\n  steps: 7\n  lr: 0.002\nmodel:\n  latent_channels: 8\n")
    cfg = load_config(tmp_path / "c.yaml", ["train.steps=9"])
    assert (cfg.train.steps, cfg.train.lr, cfg.model.latent_channels) == (9, 0.002, 8)
    cfg.save(tmp_path / "c.json")
    assert Config.load(tmp_path / "c.json") == cfg
    assert json.loads((tmp_path / "c.json").read_text())["model"]["latent_channels"] == 8


def test_bad_yaml_names_the_file(tmp_path):
    (tmp_path / "bad.yaml").write_text("train: [unclosed\n")
    with pytest.raises(LatentSegError, match=r"bad\.yaml"):
        load_config(tmp_path / "bad.yaml")
