"""The thesis split and the grouped (leakage-safe) split, and their CSV files."""

from __future__ import annotations

import csv
from collections import Counter, defaultdict
from dataclasses import dataclass

import pytest

from training.split import (
    SPLITS,
    assign,
    grouped_split,
    main as split_main,
    patient_group_key,
    read_split_csv,
    split_rows,
    thesis_split,
    write_split_csv,
)
from training.synthetic import generate_dataset

# Strata sized like BTXRD-256's tumor types (a few of them), plus a tiny one.
SIZES = {"osteochondroma": 677, "osteosarcoma": 267, "simple bone cyst": 184, "osteofibroma": 36, "other mt": 3}
STRATA = [t for t, n in SIZES.items() for _ in range(n)]


def _counts(strata, assigned):
    out = defaultdict(Counter)
    for key, name in zip(strata, assigned):
        out[key][name] += 1
    return out


def test_thesis_split_is_72_18_10_within_every_tumor_type():
    assigned = thesis_split(STRATA, seed=0)
    assert set(assigned) == set(SPLITS)
    counts = _counts(STRATA, assigned)
    for key, n in SIZES.items():
        for name, fraction in zip(SPLITS, (0.72, 0.18, 0.10)):
            assert abs(counts[key][name] - fraction * n) < 1, (key, name, counts[key])
    # 10 % of 267 osteosarcomas is 26.7: largest-remainder rounding gives 27
    assert counts["osteosarcoma"] == {"train": 192, "val": 48, "test": 27}


def test_thesis_split_depends_only_on_its_inputs_and_seed():
    a = thesis_split(STRATA, seed=3)
    assert thesis_split(STRATA, seed=3) == a
    assert thesis_split(STRATA, seed=4) != a
    # the order strata first appear in does not matter, only which item has which key
    reordered = sorted(range(len(STRATA)), key=lambda i: STRATA[i][::-1])
    b = thesis_split([STRATA[i] for i in reordered], seed=3)
    assert Counter(zip([STRATA[i] for i in reordered], b)) == Counter(zip(STRATA, a))


def test_splits_reject_bad_fractions():
    with pytest.raises(ValueError, match="fractions"):
        thesis_split(STRATA, fractions=(0.8, 0.3, 0.1))
    with pytest.raises(ValueError, match="fractions"):
        grouped_split(STRATA, STRATA, fractions=(0.5, 0.5))
    with pytest.raises(ValueError, match="same length"):
        grouped_split(STRATA, STRATA[:-1])


def _patients(seed_sizes=(1, 2, 2, 3, 1, 4, 2, 1, 6, 2)):
    """(strata, groups): per tumor type, patients with 1-6 views each."""
    strata, groups = [], []
    for t, n_patients in (("osteochondroma", 300), ("osteosarcoma", 120), ("giant cell tumor", 40)):
        for p in range(n_patients):
            for _ in range(seed_sizes[p % len(seed_sizes)]):
                strata.append(t)
                groups.append(f"{t}-{p}")
    return strata, groups


def test_grouped_split_never_puts_one_patient_in_two_splits():
    strata, groups = _patients()
    assigned = grouped_split(strata, groups, seed=0)
    where = defaultdict(set)
    for g, name in zip(groups, assigned):
        where[g].add(name)
    assert all(len(names) == 1 for names in where.values())
    # and it is still close to 72/18/10 within every tumor type, at image level
    counts = _counts(strata, assigned)
    for key, c in counts.items():
        n = sum(c.values())
        for name, fraction in zip(SPLITS, (0.72, 0.18, 0.10)):
            assert abs(c[name] / n - fraction) < 0.03, (key, name, c)
    assert grouped_split(strata, groups, seed=0) == assigned
    assert grouped_split(strata, groups, seed=1) != assigned


def test_image_level_split_of_the_same_patients_straddles_groups():
    """Why the grouped split exists: the thesis split puts views of one patient on both sides."""
    strata, groups = _patients()
    assigned = thesis_split(strata, seed=0)
    where = defaultdict(set)
    for g, name in zip(groups, assigned):
        where[g].add(name)
    assert sum(len(names) > 1 for names in where.values()) > 50


@dataclass(frozen=True)
class _Rec:
    image_id: str
    center: str
    age: int | None
    gender: str
    bones: tuple
    tumor_type: str

    @property
    def stratum(self):
        return self.tumor_type


def test_patient_group_key_uses_centre_age_gender_bones_and_type():
    a = _Rec("IMG1", "1", 12, "M", ("femur",), "osteosarcoma")
    assert patient_group_key(a) == patient_group_key(_Rec("IMG2", "1", 12, "M", ("femur",), "osteosarcoma"))
    for other in (_Rec("IMG3", "2", 12, "M", ("femur",), "osteosarcoma"), _Rec("IMG3", "1", 13, "M", ("femur",), "osteosarcoma"),
                  _Rec("IMG3", "1", 12, "F", ("femur",), "osteosarcoma"), _Rec("IMG3", "1", 12, "M", ("tibia",), "osteosarcoma"),
                  _Rec("IMG3", "1", 12, "M", ("femur",), "osteochondroma")):
        assert patient_group_key(other) != patient_group_key(a)


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    return generate_dataset(tmp_path_factory.mktemp("split-data"), 40, seed=2, min_side=48, max_side=64)


def test_split_command_writes_versioned_csvs_and_refuses_to_change_them(synth, tmp_path, capsys):
    out = tmp_path / "splits"
    assert split_main([str(synth), "--name", "synth", "--out-dir", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "straddling two or more splits: 0" in printed  # the grouped one
    for kind in ("thesis", "grouped"):
        path = out / f"synth-{kind}-v1.csv"
        with open(path, newline="") as f:
            rows = list(csv.DictReader(f))
        assert list(rows[0]) == ["image_id", "split", "group_id", "tumor_type"]
        assert len(rows) == 40 and {r["split"] for r in rows} <= set(SPLITS)
        assert [r["image_id"] for r in rows] == sorted(r["image_id"] for r in rows)
    before = (out / "synth-grouped-v1.csv").read_bytes()
    assert split_main([str(synth), "--name", "synth", "--out-dir", str(out)]) == 0  # same data, same seed: unchanged
    assert "unchanged" in capsys.readouterr().out
    with pytest.raises(FileExistsError, match="new --version"):
        split_main([str(synth), "--name", "synth", "--out-dir", str(out), "--seed", "1"])
    assert (out / "synth-grouped-v1.csv").read_bytes() == before
    assert split_main([str(synth), "--name", "synth", "--out-dir", str(out), "--seed", "1", "--version", "2"]) == 0
    assert (out / "synth-grouped-v2.csv").read_bytes() != before


def test_split_file_round_trip_and_mismatch_report(synth, tmp_path):
    from training.btxrd import read_btxrd

    records = read_btxrd(synth).records
    rows = split_rows(records, "grouped", seed=0)
    path = tmp_path / "s.csv"
    write_split_csv(path, rows)
    sf = read_split_csv(path)
    parts, problems = assign(records, sf)
    assert problems == []
    assert sum(len(v) for v in parts.values()) == len(records)
    assert sorted(r.image_id for r in parts["val"]) == sf.ids("val")
    # a file from other data: unknown ids and unlisted images are both reported
    rows[0]["image_id"] = "IMG999999"
    write_split_csv(path, rows, overwrite=True)
    parts, problems = assign(records, read_split_csv(path))
    reasons = dict(problems)
    assert "IMG999999" in reasons and "not a usable image" in reasons["IMG999999"]
    assert any("not in split file" in r for r in reasons.values())


def test_read_split_csv_rejects_bad_files(tmp_path):
    bad = tmp_path / "bad.csv"
    bad.write_text("image_id,split\nIMG000001,holdout\n")
    with pytest.raises(ValueError, match="holdout"):
        read_split_csv(bad)
    bad.write_text("image_id,split\nIMG000001,train\nIMG000001.jpeg,val\n")
    with pytest.raises(ValueError, match="twice"):
        read_split_csv(bad)
    bad.write_text("id,fold\n")
    with pytest.raises(ValueError, match="lacks columns"):
        read_split_csv(bad)
