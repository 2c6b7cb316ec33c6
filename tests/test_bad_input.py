"""Issue 2 section 7: each bad input gets one clear line naming the file, a non-zero exit, no outputs."""

import json
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


@pytest.mark.parametrize("eta", ["1.5", "-0.1", "x"])
def test_eta_outside_zero_to_one(tmp_path, capsys, model2d, data2d, eta):
    with pytest.raises(SystemExit) as exc:
        main(predict_args(model2d, data2d["test"] / "images", tmp_path / "o", "--eta", eta))
    assert exc.value.code == 2
    assert "--eta:" in capsys.readouterr().err
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


# --- issue 14: crafted files, malformed settings, odd folders --------------------------------


def png_claiming(width: int, height: int) -> bytes:
    """A PNG whose header claims `width` x `height` pixels, with almost no data."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 8)) + chunk(b"IEND", b"")
    )


def test_decompression_bomb_png_is_refused_from_its_header(tmp_path, capsys, model2d):
    inputs = tmp_path / "in"
    inputs.mkdir()
    (inputs / "bomb.png").write_bytes(png_claiming(100_000, 100_000))
    run_fails(capsys, predict_args(model2d, inputs, tmp_path / "o"), "bomb.png", "the header claims")
    assert not (tmp_path / "o").exists()


def test_nifti_header_claiming_a_huge_grid_is_refused_before_reading(tmp_path, capsys, model2d):
    import tracemalloc

    inputs = tmp_path / "in"
    inputs.mkdir()
    img = nib.Nifti1Image(np.zeros((2, 2), np.uint8), np.eye(4))
    img.header.set_data_shape((32767, 32767))
    (inputs / "liar.nii").write_bytes(img.header.binaryblock + b"\0" * 600)  # about 1 KB
    tracemalloc.start()
    run_fails(capsys, predict_args(model2d, inputs, tmp_path / "o"), "liar.nii", "over the limit")
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 200 * 2**20  # nothing of the claimed 1 GB was allocated


@pytest.mark.parametrize(
    "argv, expected",
    [
        (["phantoms", "--out", "x", "--size", "0"], "--size: must be >= 1"),
        (["phantoms", "--out", "x", "--size", "-4"], "--size: must be >= 1"),
        (["phantoms", "--out", "x", "--seed", str(2**64)], "--seed: must be in [0, 2^63)"),
        (["check-dataset", "x", "--max-voxels", "0"], "--max-voxels: must be >= 1"),
    ],
)
def test_bad_arguments_are_one_line(capsys, argv, expected):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith("latentseg: error: ") and expected in line, line


def test_predict_seed_above_2_63_is_one_line(tmp_path, capsys, model2d, data2d):
    with pytest.raises(SystemExit):
        main(predict_args(model2d, data2d["test"] / "images", tmp_path / "o", "--seed", str(2**63 + 5)))
    assert "--seed: must be in [0, 2^63)" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize(
    "setting, expected",
    [
        ("model.num_heads=0", "model.num_heads must be >= 1, got 0"),
        ("train.batch_size=0", "train.batch_size must be >= 1, got 0"),
        ("train.lr=-0.001", "train.lr must be > 0, got -0.001"),
        ("data.val_fraction=2.0", "data.val_fraction must be in [0, 1), got 2.0"),
        ("sample.overlap=1.0", "sample.overlap must be in [0, 1), got 1.0"),
        ("train.max_minutes=nan", "train.max_minutes must be a finite number"),
        ("model.prediction_type=noise", "model.prediction_type must be one of eps, x0, v, got 'noise'"),
        ("model.decoder_fuse_kernel=5", "model.decoder_fuse_kernel must be one of auto, 1, 3, got 5"),
        ("data.patch_size=[4,4]", "data.patch_size [4, 4] is too small for the network"),
        ("data.patch_size=[64,64,64]", "data.patch_size [64, 64, 64] must have 2 entries"),
    ],
)
def test_settings_out_of_range_are_refused_before_training(tmp_path, capsys, data2d, setting, expected):
    run_fails(capsys, ["train", "--data", str(data2d["train"]), "--out", str(tmp_path / "m"), setting], expected)
    assert not (tmp_path / "m").exists()


@pytest.mark.parametrize("name", ["config.json", "fingerprint.json"])
def test_model_json_that_is_a_list_is_one_line(tmp_path, capsys, model2d, data2d, name):
    broken = tmp_path / "model"
    shutil.copytree(model2d, broken)
    (broken / name).write_text("[1, 2, 3]")
    run_fails(capsys, predict_args(broken, data2d["test"] / "images", tmp_path / "o"), name, "JSON object")
    (broken / name).write_text('{"labels": 3}' if name == "fingerprint.json" else '{"model": {"num_heads": 0}}')
    run_fails(capsys, predict_args(broken, data2d["test"] / "images", tmp_path / "o"), name)
    assert not (tmp_path / "o").exists()


def _nnunet_json(root, **changes):
    meta = json.loads((root / "dataset.json").read_text())
    meta.update(changes)
    (root / "dataset.json").write_text(json.dumps(meta))


@pytest.mark.parametrize(
    "changes, expected",
    [
        ({"labels": {"background": 0, "organ": "one"}}, "labels['organ'] must be a non-negative integer id"),
        ({"labels": {"background": 0, "organ": 1.5}}, "labels['organ'] must be a non-negative integer id"),
        ({"channel_names": {"zero": "MRI"}}, "channel_names key 'zero' is not a non-negative integer"),
        ({"channel_names": ["MRI"]}, "channel_names must be an object"),
        ({"file_ending": 7}, "file_ending must be a suffix"),
    ],
)
def test_malformed_nnunet_dataset_json(tmp_path, capsys, changes, expected):
    root = write_phantom_dataset(tmp_path / "ds", 2, 3, 32)
    _nnunet_json(root, **changes)
    run_fails(capsys, ["check-dataset", str(root)], "dataset.json", expected)
    run_fails(capsys, ["train", "--data", str(root), "--out", str(tmp_path / "m")], "dataset.json", expected)
    assert not (tmp_path / "m").exists()


def _msd(tmp_path, training):
    root = write_phantom_dataset(tmp_path / "ds", 2, 3, 32)
    meta = {"labels": {"0": "background", "1": "organ", "2": "lesion"}, "modality": {"0": "MRI"}, "training": training}
    (root / "dataset.json").write_text(json.dumps(meta))
    return root


@pytest.mark.parametrize(
    "entry, expected",
    [
        ({"image": "imagesTr/phantom_000_0000.nii.gz"}, "training[0] has no label path"),
        ("imagesTr/phantom_000_0000.nii.gz", "training[0] must be an object with image and label"),
        ({"image": 3, "label": "labelsTr/phantom_000.nii.gz"}, "training[0] has no image path"),
    ],
)
def test_malformed_msd_training_entries(tmp_path, capsys, entry, expected):
    root = _msd(tmp_path, [entry])
    run_fails(capsys, ["check-dataset", str(root)], "dataset.json", expected)


def test_paths_leaving_the_dataset_are_refused_unless_allowed(tmp_path, capsys):
    outside = write_phantom_dataset(tmp_path / "elsewhere", 2, 3, 32)
    root = _msd(tmp_path, [{"image": "imagesTr/phantom_000_0000.nii.gz", "label": "labelsTr/phantom_000.nii.gz"}])
    meta = json.loads((root / "dataset.json").read_text())
    meta["training"].append(
        {"image": "../elsewhere/imagesTr/phantom_001_0000.nii.gz", "label": "../elsewhere/labelsTr/phantom_001.nii.gz"}
    )
    (root / "dataset.json").write_text(json.dumps(meta))
    run_fails(
        capsys, ["check-dataset", str(root)], "phantom_001_0000.nii.gz", "leads out of the dataset folder", cases=3
    )
    assert main(["check-dataset", str(root), "--allow-outside-paths"]) == 0
    capsys.readouterr()
    folder = write_phantom_dataset(tmp_path / "pngs", 2, 2, 32)
    (folder / "images" / "phantom_000.png").unlink()
    (folder / "images" / "phantom_000.png").symlink_to(outside.parent / "x.png")
    Image.fromarray(np.zeros((32, 32), np.uint8)).save(outside.parent / "x.png")
    run_fails(capsys, ["check-dataset", str(folder)], "phantom_000.png", "a symlink that leads out", cases=2)


def test_one_mask_stored_0_255_among_class_ids_is_an_error(tmp_path, capsys):
    root = write_phantom_dataset(tmp_path / "ds", 3, 2, 32)  # masks hold 0/1/2
    Image.fromarray(np.where(np.arange(32 * 32).reshape(32, 32) % 7 == 0, 255, 0).astype(np.uint8)).save(
        root / "masks" / "phantom_001.png"
    )
    err = run_fails(
        capsys, ["check-dataset", str(root)], "mixed mask encodings", "phantom_001.png", "store 0/255", cases=2
    )
    assert "phantom_000.png" in err
    run_fails(capsys, ["train", "--data", str(root), "--out", str(tmp_path / "m")], "mixed mask encodings")
    assert not (tmp_path / "m").exists()


def test_label_spacing_unlike_the_image_is_an_error(tmp_path, capsys):
    root = write_phantom_dataset(tmp_path / "ds", 2, 3, 32)
    path = root / "labelsTr" / "phantom_000.nii.gz"
    lab = nib.load(str(path))
    header = lab.header.copy()
    header.set_zooms((3.0, 3.0, 8.0))  # the header's pixdim, with the same affine (sform)
    nib.save(nib.Nifti1Image(np.asanyarray(lab.dataobj), lab.affine, header), str(path))
    assert nib.load(str(path)).header.get_zooms() == (3.0, 3.0, 8.0)
    run_fails(capsys, ["check-dataset", str(root)], "phantom_000.nii.gz", "label spacing (3, 3, 8) differs", cases=2)


def test_grey_alpha_palette_and_hx1_nifti_read_as_one_channel_2d(tmp_path):
    from latentseg.data.io import read_image, read_label

    grey = (np.arange(64 * 64).reshape(64, 64) % 251).astype(np.uint8)
    Image.fromarray(grey).convert("LA").save(tmp_path / "la.png")
    Image.fromarray(grey).convert("P").save(tmp_path / "palette.png")  # a grey palette
    Image.fromarray(np.stack([grey, grey // 2, grey], -1)).convert("P").save(tmp_path / "colour.png")
    for name in ("la.png", "palette.png"):
        image, meta = read_image(tmp_path / name)
        assert image.shape == (1, 64, 64) and np.array_equal(image[0], grey), name
    assert read_image(tmp_path / "colour.png")[0].shape == (3, 64, 64)
    nib.save(nib.Nifti1Image(grey[:, :, None].astype(np.float32), np.diag([0.5, 0.5, 4, 1])), str(tmp_path / "s.nii"))
    image, meta = read_image(tmp_path / "s.nii")
    assert image.shape == (1, 64, 64) and meta.spatial_dims == 2 and meta.spacing == (0.5, 0.5)
    nib.save(
        nib.Nifti1Image((grey[:, :, None] > 100).astype(np.uint8), np.diag([0.5, 0.5, 4, 1])), str(tmp_path / "l.nii")
    )
    assert read_label(tmp_path / "l.nii")[0].shape == (64, 64)


def test_bubil_palette_image_reads_as_grey():
    from tests.data.test_datasets import SHARED

    path = SHARED / "bubil_cells" / "images" / "B02.png"
    if not path.is_file():
        pytest.skip("shared bubil_cells data not present")
    from latentseg.data.io import read_image

    assert read_image(path)[0].shape[0] == 1


def test_2d_nifti_slice_predicts_back_onto_its_hx1_grid(tmp_path, model2d, data2d):
    png = data2d["test"] / "images" / "phantom_000.png"
    grey = np.asarray(Image.open(png).convert("L"), dtype=np.float32)
    inputs = tmp_path / "in"
    inputs.mkdir()
    nib.save(nib.Nifti1Image(grey[:, :, None], np.eye(4)), str(inputs / "slice.nii.gz"))
    assert main(predict_args(model2d, inputs, tmp_path / "o", "--samples", "1")) == 0
    assert nib.load(str(tmp_path / "o" / "slice.nii.gz")).shape == (64, 64, 1)


@pytest.mark.parametrize("names", [("x.png", "x_prob.png"), ("a.png", "a.jpg")])
def test_inputs_whose_outputs_collide_are_refused_before_writing(tmp_path, capsys, model2d, data2d, names):
    inputs = tmp_path / "in"
    inputs.mkdir()
    source = Image.open(data2d["test"] / "images" / "phantom_000.png")
    for name in names:
        source.save(inputs / name)
    err = run_fails(capsys, predict_args(model2d, inputs, tmp_path / "o"))
    assert all(name in err for name in names), err
    assert not (tmp_path / "o").exists()


def test_numbered_png_slices_are_separate_cases(tmp_path, model2d, data2d):
    from latentseg.data.datasets import discover_inputs

    inputs = tmp_path / "in"
    inputs.mkdir()
    for i in (1, 2):
        shutil.copyfile(data2d["test"] / "images" / "phantom_000.png", inputs / f"NAME_{i:04d}.png")
    cases = discover_inputs(inputs, num_channels=1)
    assert [(c.case_id, len(c.image_paths)) for c in cases] == [("NAME_0001", 1), ("NAME_0002", 1)]
    assert main(predict_args(model2d, inputs, tmp_path / "o", "--samples", "1")) == 0
    assert (tmp_path / "o" / "NAME_0001.png").is_file() and (tmp_path / "o" / "NAME_0002.png").is_file()


def test_output_that_is_a_file_or_cannot_be_created(tmp_path, capsys, model2d, data2d):
    afile = tmp_path / "result.png"
    afile.write_bytes(b"keep me")
    run_fails(capsys, predict_args(model2d, data2d["test"] / "images", afile), "exists and is not a folder")
    assert afile.read_bytes() == b"keep me"
    run_fails(capsys, predict_args(model2d, data2d["test"] / "images", "/proc/latentseg-out"), "/proc/latentseg-out")
    run_fails(capsys, predict_args(model2d, data2d["test"] / "images", afile / "sub"), "result.png")


def test_existing_outputs_are_not_overwritten_without_asking(tmp_path, capsys, model2d, data2d):
    out = tmp_path / "o"
    out.mkdir()
    (out / "phantom_001_prob.png").write_bytes(b"mine")
    run_fails(capsys, predict_args(model2d, data2d["test"] / "images", out), "phantom_001_prob.png", "--overwrite")
    assert (out / "phantom_001_prob.png").read_bytes() == b"mine" and len(list(out.iterdir())) == 1
    assert main(predict_args(model2d, data2d["test"] / "images", out, "--overwrite", "--samples", "1")) == 0
    assert (out / "phantom_001_prob.png").read_bytes() != b"mine"
