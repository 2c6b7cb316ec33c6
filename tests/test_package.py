"""`latentseg export` / `import` and `predict --model NAME.zip`: one model file, checked on the way in."""

from __future__ import annotations

import json
import zipfile

import numpy as np
from PIL import Image

from latentseg.cli import main
from latentseg.package import CARD, MANIFEST


def _export(tmp_path, model2d):
    path = tmp_path / "model.zip"
    assert main(["export", "--model", str(model2d), "--out", str(path)]) == 0
    return path


def test_a_model_file_predicts_as_its_folder_does(tmp_path, model2d, data2d):
    path = _export(tmp_path, model2d)
    images = str(data2d["test"] / "images")
    assert main(["predict", "--model", str(model2d), "--input", images, "--output", str(tmp_path / "a")]) == 0
    assert main(["predict", "--model", str(path), "--input", images, "--output", str(tmp_path / "b")]) == 0
    for case in sorted((tmp_path / "a").glob("phantom_*[0-9].png")):
        assert np.array_equal(np.asarray(Image.open(case)), np.asarray(Image.open(tmp_path / "b" / case.name)))


def test_the_card_says_what_the_model_was_trained_on(tmp_path, model2d):
    with zipfile.ZipFile(_export(tmp_path, model2d)) as zf:
        card = zf.read(CARD).decode()
        manifest = json.loads(zf.read(MANIFEST))
    assert (
        "8 training and 2 validation cases" in card
        and "Labels: 0: 0, 1: 1, 2: 2" in card
        and "latentseg train --data" in card
    )
    assert "30 steps in" in card and "Validation Dice" in card and "2D, 1 channel(s)" in card
    assert set(manifest["files"]) >= {"config.json", "model.safetensors", "fingerprint.json", CARD}


def test_import_unpacks_and_refuses_to_overwrite(tmp_path, model2d, capsys):
    path = _export(tmp_path, model2d)
    out = tmp_path / "unpacked"
    assert main(["import", str(path), "--out", str(out)]) == 0
    assert (out / "model.safetensors").read_bytes() == (model2d / "model.safetensors").read_bytes()
    assert main(["import", str(path), "--out", str(out)]) == 2
    assert "exists and is not empty" in capsys.readouterr().err
    assert main(["export", "--model", str(model2d), "--out", str(path)]) == 2  # the file exists: not overwritten


def _rewrite(src, dst, change):
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        for item in zin.infolist():
            zout.writestr(item, change(item.filename, zin.read(item.filename)))


def test_tampered_weights_and_newer_formats_are_refused(tmp_path, model2d, capsys):
    path = _export(tmp_path, model2d)
    tampered = tmp_path / "tampered.zip"
    _rewrite(path, tampered, lambda n, d: d[:-8] + b"\0" * 8 if n == "model.safetensors" else d)
    assert main(["import", str(tampered), "--out", str(tmp_path / "t")]) == 2
    assert "model.safetensors does not match its checksum" in capsys.readouterr().err
    assert not (tmp_path / "t" / "model.safetensors").exists()

    def newer(name, data):
        if name != MANIFEST:
            return data
        return json.dumps({**json.loads(data), "format": 99, "latentseg_version": "9.0.0"}).encode()

    future = tmp_path / "future.zip"
    _rewrite(path, future, newer)
    assert main(["import", str(future), "--out", str(tmp_path / "f")]) == 2
    err = capsys.readouterr().err
    assert "latentseg 9.0.0" in err and "upgrade latentseg" in err and err.count("\n") == 1


def test_a_zip_that_is_not_a_model_is_refused(tmp_path, capsys):
    other = tmp_path / "photos.zip"
    with zipfile.ZipFile(other, "w") as zf:
        zf.writestr("a.txt", "hello")
    assert main(["predict", "--model", str(other), "--input", str(tmp_path), "--output", str(tmp_path / "o")]) == 2
    assert "not a latentseg model file" in capsys.readouterr().err
    (tmp_path / "junk.zip").write_bytes(b"not a zip")
    assert main(["import", str(tmp_path / "junk.zip"), "--out", str(tmp_path / "j")]) == 2
