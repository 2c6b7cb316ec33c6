import numpy as np
import pytest

from latentseg.config import SampleConfig, load_config
from latentseg.data.prepare import plan_postprocessing
from latentseg.errors import LatentSegError
from latentseg.infer import postprocessed
from latentseg.postprocess import keep_largest_component, single_component_classes


def _two_blobs(shape=(20, 20)) -> np.ndarray:
    label = np.zeros(shape, np.uint8)
    label[2:8, 2:8] = 1  # 36 voxels
    label[12:14, 12:14] = 1  # 4 voxels, apart from the first
    label[15:18, 2:5] = 2  # class 2 in two pieces too
    label[0, 19] = 2
    return label


def test_only_the_largest_component_of_the_named_classes_is_kept() -> None:
    label = _two_blobs()
    out = keep_largest_component(label, [1])
    assert (out == 1).sum() == 36 and out[12, 12] == 0
    assert np.array_equal(out == 2, label == 2)  # class 2 not named: as predicted
    assert (label == 1).sum() == 40  # the input is not changed
    both = keep_largest_component(label, [1, 2])
    assert (both == 2).sum() == 9 and both[0, 19] == 0


def test_components_touching_at_a_corner_are_one_3d_too() -> None:
    label = np.zeros((6, 6, 6), np.uint8)
    label[1, 1, 1] = label[2, 2, 2] = 3  # corner neighbours: one component
    label[5, 5, 5] = 3
    out = keep_largest_component(label, [3])
    assert out[1, 1, 1] == out[2, 2, 2] == 3 and out[5, 5, 5] == 0


def test_a_class_is_planned_when_it_is_one_piece_in_most_training_labels() -> None:
    one = np.zeros((20, 20), np.uint8)
    one[2:8, 2:8] = 1
    one[10:12, 10:12] = 2
    labels = [one] * 9 + [_two_blobs()]  # class 1 in one piece in 9 of 10, class 2 in 9 of 10
    classes, shares = single_component_classes(labels, 4)
    assert classes == [1, 2] and shares == {1: 0.9, 2: 0.9}  # class 3 is in no label: left out
    assert single_component_classes([_two_blobs()] * 2 + [one], 3)[0] == []  # one piece in 1 of 3


def test_planning_fills_auto_and_keeps_a_choice() -> None:
    one = np.zeros((10, 10), np.uint8)
    one[2:5, 2:5] = 1
    sample = SampleConfig()
    plan_postprocessing(sample, [one], 2)
    assert sample.largest_component == [1]
    chosen = SampleConfig(largest_component=[])
    plan_postprocessing(chosen, [one], 2)
    assert chosen.largest_component == []
    assert postprocessed(_two_blobs(), SampleConfig()).sum() == _two_blobs().sum()  # unplanned: none


def test_the_setting_is_read_and_checked_from_the_command_line() -> None:
    assert load_config(None, ["sample.largest_component=[1,3]"]).sample.largest_component == [1, 3]
    assert load_config(None, ["sample.largest_component=[]"]).sample.largest_component == []
    with pytest.raises(LatentSegError, match="largest_component"):
        load_config(None, ["sample.largest_component=[0]"])


def test_predict_keeps_the_named_classes_largest_component(model2d, data2d, tmp_path, capsys) -> None:
    import json

    from PIL import Image

    from latentseg.cli import main
    from latentseg.postprocess import connected_components

    plan = json.loads((model2d / "plans.json").read_text())
    assert isinstance(plan["sample"]["largest_component"], list)  # planned by train
    image = sorted((data2d["test"] / "images").iterdir())[0]
    outputs = {}
    for flag in ("1", "none"):
        out = tmp_path / flag
        args = ["predict", "--model", str(model2d), "--input", str(image), "--output", str(out)]
        assert main([*args, "--largest-component", flag, "--samples", "1"]) == 0
        outputs[flag] = np.asarray(Image.open(out / image.name))
    one, raw = outputs["1"], outputs["none"]
    # the untrained tiny model: many pieces
    assert connected_components(one == 1)[1] <= 1 < connected_components(raw == 1)[1]
    assert ((one == raw) | (one == 0)).all()  # it only sets voxels of class 1 to background
    assert np.array_equal(one == 2, raw == 2)  # class 2 not named
    with pytest.raises(SystemExit):
        main(["predict", "--model", str(model2d), "--input", str(image), "--output", str(tmp_path / "x"),
              "--largest-component", "0"])  # fmt: skip
    assert "label values must be >= 1" in capsys.readouterr().err
