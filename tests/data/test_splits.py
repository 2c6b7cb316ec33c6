import pytest

from latentseg.data.splits import kfold_split, make_split, patient_of, random_split
from latentseg.errors import LatentSegError

ACDC_LIKE = [f"patient{p:03d}_frame0{f}" for p in range(1, 31) for f in (1, 2)]


def test_patient_of_strips_time_points_only():
    assert patient_of("patient001_frame01") == "patient001"
    assert patient_of("case7_ED") == patient_of("case7_ES") == "case7"
    assert patient_of("sub-03_t2") == "sub-03"
    assert patient_of("la_ULHWPWKKLTE921LQLH1P") == "la_ULHWPWKKLTE921LQLH1P"
    assert patient_of("TCGA-21-5784-01Z-00-DX1") == "TCGA-21-5784-01Z-00-DX1"


@pytest.mark.parametrize("seed", range(5))
def test_random_split_keeps_patients_together(seed):
    train, val = random_split(ACDC_LIKE, 0.2, seed)
    assert {patient_of(c) for c in train}.isdisjoint({patient_of(c) for c in val})
    assert sorted(train + val) == sorted(ACDC_LIKE)
    assert len(val) == 12  # 6 patients x 2 frames


def test_kfold_covers_every_patient_once():
    seen = []
    for fold in range(5):
        train, val = kfold_split(ACDC_LIKE, fold, 5, seed=0)
        assert {patient_of(c) for c in train}.isdisjoint({patient_of(c) for c in val})
        seen += val
    assert sorted(seen) == sorted(ACDC_LIKE)
    with pytest.raises(LatentSegError, match="impossible"):
        kfold_split(ACDC_LIKE, 5, 5, 0)


def test_csv_split_rejects_a_patient_on_both_sides(tmp_path):
    rows = ["case,split"] + [f"{c},train" for c in ACDC_LIKE[:-1]] + [f"{ACDC_LIKE[-1]},test"]
    (tmp_path / "split.csv").write_text("\n".join(rows))
    with pytest.raises(LatentSegError, match="patient030"):
        make_split(ACDC_LIKE, str(tmp_path / "split.csv"), 0.1, 0)
    rows = ["case,split"] + [f"{c},{'test' if c.startswith('patient030') else 'train'}" for c in ACDC_LIKE]
    (tmp_path / "ok.csv").write_text("\n".join(rows))
    train, val = make_split(ACDC_LIKE, str(tmp_path / "ok.csv"), 0.1, 0)
    assert len(train) == 58 and val == []


def test_dataset_split_leaves_test_patients_out(tmp_path):
    import json

    test = [c for c in ACDC_LIKE if c.startswith(("patient001", "patient002"))]
    (tmp_path / "dataset.json").write_text(json.dumps({"suggested_split_by_patient": {"train": [], "test": test}}))
    train, val = make_split(ACDC_LIKE, "dataset", 0.1, 0, tmp_path)
    assert not set(test) & set(train + val) and len(train + val) == 56
