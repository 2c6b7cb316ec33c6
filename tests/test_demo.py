import json

from latentseg.cli import main


def test_demo_runs_the_whole_path_on_phantoms(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "train.steps=3", "train.val_every=0", "sample.num_samples=1"]) == 0
    printed = capsys.readouterr().out
    assert "[4/4] evaluating" in printed and "foreground mean" in printed and "overlays:" in printed
    assert len(list((out / "data" / "train" / "images").glob("*.png"))) == 200
    assert len(list((out / "predictions").glob("*_overlay.png"))) == 20
    summary = json.loads((out / "predictions" / "summary.json").read_text())
    assert len(summary["metric_per_case"]) == 20


def test_phantoms_command_writes_ambiguous_cases(tmp_path, capsys):
    assert main(["phantoms", "--out", str(tmp_path / "p"), "--cases", "3", "--size", "48", "--ambiguous"]) == 0
    rows = (tmp_path / "p" / "text.csv").read_text().splitlines()
    assert rows[0] == "filename,text" and all(r.split(",", 1)[1].startswith("the lesion in the ") for r in rows[1:])
