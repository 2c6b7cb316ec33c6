"""Issue 2 section 7: each bad input gets one clear line naming the file, a non-zero exit, no outputs."""

import shutil

import nibabel as nib
import numpy as np
import pytest
from PIL import Image

from latentseg.cli import main
from latentseg.data.phantoms import write_phantom_dataset


def run_fails(capsys, argv, *expected, cases=1):
    """`cases` is how many inputs fail: one error line each."""
    assert main(argv) == 2
    lines = [x for x in capsys.readouterr().err.splitlines() if x.strip() and not x.startswith(("train:", "predict:"))]
    assert len(lines) == cases, lines  # progress bars aside, one line per failure
    assert all(line.startswith("latentseg: error: ") for line in lines)
    err = lines[0]
    for text in expected:
        assert text in err, err
    return err


def predict_args(model, inputs, out, *extra):
    return ["predict", "--model", str(model), "--input", str(inputs), "--output", str(out), *extra]


def test_shape_mismatch_in_training_data(tmp_path, capsys):
    root = write_phantom_dataset(tmp_path / "ds", 3, 2, 32)
    Image.fromarray(np.zeros((30, 32), np.uint8)).save(root / "masks" / "phantom_001.png")
    run_fails(
        capsys,
        ["train", "--data", str(root), "--out", str(tmp_path / "m")],
        "phantom_001.png",
        "label shape (30, 32) differs from image shape (32, 32)",
    )
    assert not (tmp_path / "m").exists()


def test_label_values_outside_declared_classes(tmp_path, capsys):
    root = write_phantom_dataset(tmp_path / "ds", 2, 3, 32)
    path = root / "labelsTr" / "phantom_000.nii.gz"
    lab = nib.load(str(path))
    data = np.asanyarray(lab.dataobj).copy()
    data[:2] = 5
    nib.save(nib.Nifti1Image(data, lab.affine), str(path))
    run_fails(
        capsys,
        ["train", "--data", str(root), "--out", str(tmp_path / "m")],
        "phantom_000.nii.gz",
        "label values [5] are outside 0..2",
    )
    assert not (tmp_path / "m").exists()


def test_float_labels(tmp_path, capsys):
    root = write_phantom_dataset(tmp_path / "ds", 2, 3, 32)
    path = root / "labelsTr" / "phantom_001.nii.gz"
    lab = nib.load(str(path))
    nib.save(nib.Nifti1Image(np.asanyarray(lab.dataobj) * 0.5, lab.affine), str(path))
    run_fails(
        capsys,
        ["train", "--data", str(root), "--out", str(tmp_path / "m")],
        "phantom_001.nii.gz",
        "labels must be integers",
    )


def test_nan_in_image_for_train_and_predict(tmp_path, capsys, model3d):
    root = write_phantom_dataset(tmp_path / "ds", 2, 3, 32)
    path = root / "imagesTr" / "phantom_000_0000.nii.gz"
    img = nib.load(str(path))
    data = img.get_fdata().astype(np.float32)
    data[3, 3, 3] = np.inf
    nib.save(nib.Nifti1Image(data, img.affine), str(path))
    run_fails(
        capsys, ["train", "--data", str(root), "--out", str(tmp_path / "m")], "phantom_000_0000.nii.gz", "NaN or Inf"
    )
    run_fails(capsys, predict_args(model3d, root / "imagesTr", tmp_path / "out"), "phantom_000_0000.nii.gz", "NaN")
    # the good case is still segmented; the bad one has no output at all
    assert sorted(p.name for p in (tmp_path / "out").iterdir() if "phantom_000" in p.name) == []
    assert (tmp_path / "out" / "phantom_001.nii.gz").is_file()


def test_dimension_mismatch_both_ways(tmp_path, capsys, model2d, model3d, data2d, data3d):
    run_fails(
        capsys,
        predict_args(model2d, data3d["test"] / "imagesTr", tmp_path / "a"),
        "phantom_000_0000.nii.gz",
        "a 3D input given to a 2D model",
        cases=2,
    )
    run_fails(
        capsys,
        predict_args(model3d, data2d["test"] / "images", tmp_path / "b"),
        "phantom_000.png",
        "a 2D input given to a 3D model",
        cases=3,
    )


def test_corrupt_input_file_is_listed_and_the_others_are_segmented(tmp_path, capsys, model2d, data2d):
    inputs = tmp_path / "inputs"
    shutil.copytree(data2d["test"] / "images", inputs)
    (inputs / "phantom_002.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    out = tmp_path / "out"
    run_fails(capsys, predict_args(model2d, inputs, out), "phantom_002.png", "cannot read")
    names = sorted(p.name for p in out.iterdir())
    assert names == sorted(
        f"phantom_00{i}{s}.png" for i in (0, 1) for s in ("", "_prob", "_std", "_entropy", "_overlay")
    )


def test_missing_or_incomplete_model_dir(tmp_path, capsys, model2d, data2d):
    inputs = data2d["test"] / "images"
    run_fails(capsys, predict_args(tmp_path / "nomodel", inputs, tmp_path / "o"), "model directory not found")
    partial = tmp_path / "partial"
    shutil.copytree(model2d, partial)
    (partial / "model.safetensors").unlink()
    run_fails(capsys, predict_args(partial, inputs, tmp_path / "o"), "incomplete model directory", "model.safetensors")
    (partial / "model.safetensors").write_bytes(b"truncated")
    run_fails(capsys, predict_args(partial, inputs, tmp_path / "o"), "cannot read the model files")
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("steps", ["0", "-3"])
def test_non_positive_steps(tmp_path, capsys, model2d, data2d, steps):
    with pytest.raises(SystemExit) as exc:
        main(predict_args(model2d, data2d["test"] / "images", tmp_path / "o", "--steps", steps))
    assert exc.value.code == 2
    assert f"--steps: must be >= 1, got {steps}" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_output_dir_is_input_dir(tmp_path, capsys, model2d, data2d):
    inputs = tmp_path / "inputs"
    shutil.copytree(data2d["test"] / "images", inputs)
    before = {p.name: p.read_bytes() for p in inputs.iterdir()}
    run_fails(capsys, predict_args(model2d, inputs, inputs), "the output directory is the input directory")
    run_fails(capsys, predict_args(model2d, inputs / "phantom_000.png", inputs), "refusing to overwrite inputs")
    assert {p.name: p.read_bytes() for p in inputs.iterdir()} == before


def test_fusion_needs_two_samples(tmp_path, capsys, model2d, data2d):
    args = predict_args(model2d, data2d["test"] / "images", tmp_path / "o", "--fusion", "staple", "--samples", "1")
    run_fails(capsys, args, "--fusion staple needs at least 2 samples")
    assert not (tmp_path / "o").exists()


def test_staged_sampling_needs_a_two_head_model(tmp_path, capsys, model2d, data2d):
    args = predict_args(model2d, data2d["test"] / "images", tmp_path / "o", "--sampler", "staged")
    run_fails(capsys, args, "needs a model trained with model.denoiser_heads=2")
    assert not (tmp_path / "o").exists()


def test_staged_thresholds_out_of_order(tmp_path, capsys, data2d):
    args = ["train", "--data", str(data2d["train"]), "--out", str(tmp_path / "m"), "model.stage_high=200"]
    run_fails(capsys, args, "0 < low < high")
    assert not (tmp_path / "m").exists()


def test_prompt_to_a_model_trained_without_text(tmp_path, capsys, model2d, data2d):
    args = predict_args(model2d, data2d["test"] / "images", tmp_path / "o", "--prompt", "the lesion")
    run_fails(capsys, args, "trained without text")
    assert not (tmp_path / "o").exists()
