"""Synthetic BTXRD generator and the BTXRD reader (no real data needed)."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest

from training.btxrd import NORMAL, load_image, load_mask, main as btxrd_main, read_btxrd
from training.synthetic import generate_dataset, rasterize_polygons, synthetic_radiograph

# BTXRD's dataset.csv header, written out here so the generator is checked
# against the published layout, not against itself.
BTXRD_HEADER = [
    "image_id", "center", "age", "gender", "hand", "ulna", "radius", "humerus", "foot", "tibia", "fibula",
    "femur", "hip bone", "ankle-joint", "knee-joint", "hip-joint", "wrist-joint", "elbow-joint",
    "shoulder-joint", "tumor", "benign", "malignant", "osteochondroma", "multiple osteochondromas",
    "simple bone cyst", "giant cell tumor", "osteofibroma", "synovial osteochondroma", "other bt",
    "osteosarcoma", "other mt", "upper limb", "lower limb", "pelvis", "frontal", "lateral", "oblique",
]
TYPES = BTXRD_HEADER[22:31]
N = 14


@pytest.fixture(scope="module")
def synth(tmp_path_factory) -> Path:
    return generate_dataset(tmp_path_factory.mktemp("synth"), N, seed=3, normal_fraction=0.3, min_side=64, max_side=160)


@pytest.fixture
def damaged(synth, tmp_path) -> tuple[Path, dict[str, str]]:
    """A copy of the synthetic set with one malformed, one missing and one
    rectangle-only annotation; returns (root, {image_id: what was done})."""
    root = tmp_path / "damaged"
    shutil.copytree(synth, root)
    tumor_ids = [Path(r["image_id"]).stem for r in _rows(root) if r["tumor"] == "1"]
    malformed, missing, rect_only = tumor_ids[:3]
    (root / "Annotations" / f"{malformed}.json").write_text('{"version": "5.4.1", "shapes": [')
    (root / "Annotations" / f"{missing}.json").unlink()
    path = root / "Annotations" / f"{rect_only}.json"
    doc = json.loads(path.read_text())
    doc["shapes"] = [s for s in doc["shapes"] if s["shape_type"] == "rectangle"]
    path.write_text(json.dumps(doc))
    return root, {malformed: "malformed annotation", missing: "missing annotation", rect_only: "rectangle-only annotation"}


def _rows(root: Path) -> list[dict]:
    with open(root / "dataset.csv", newline="") as f:
        return list(csv.DictReader(f))


# ---------------------------------------------------------------- generator


def test_synthetic_csv_has_exactly_btxrd_columns(synth):
    with open(synth / "dataset.csv", newline="") as f:
        header = next(csv.reader(f))
    assert header == BTXRD_HEADER
    rows = _rows(synth)
    assert [r["image_id"] for r in rows] == [f"IMG{i:06d}.jpeg" for i in range(1, N + 1)]
    for r in rows:
        types = [t for t in TYPES if r[t] == "1"]
        if r["tumor"] == "1":
            assert len(types) == 1
            assert (r["benign"], r["malignant"]) in (("1", "0"), ("0", "1"))
        else:
            assert types == [] and r["benign"] == r["malignant"] == "0"
        assert sum(r[v] == "1" for v in ("frontal", "lateral", "oblique")) == 1
        assert set(r[c] for c in BTXRD_HEADER[4:]) <= {"0", "1"}


def test_synthetic_images_are_8bit_gray_jpeg_with_labelme_json(synth):
    rows = _rows(synth)
    assert any(r["tumor"] == "0" for r in rows) and any(r["tumor"] == "1" for r in rows)
    for r in rows:
        stem = Path(r["image_id"]).stem
        raw = cv2.imread(str(synth / "images" / r["image_id"]), cv2.IMREAD_UNCHANGED)
        assert raw.dtype == np.uint8 and raw.ndim == 2
        assert 64 <= max(raw.shape) <= 160
        ann = synth / "Annotations" / f"{stem}.json"
        if r["tumor"] == "0":
            assert not ann.exists()  # normal images have no annotation, as in BTXRD
            continue
        doc = json.loads(ann.read_text())
        assert set(doc) == {"version", "flags", "shapes", "imagePath", "imageData", "imageHeight", "imageWidth"}
        assert doc["version"].startswith("5.") and doc["flags"] == {} and doc["imageData"] is None
        assert doc["imagePath"] == r["image_id"]
        assert (doc["imageHeight"], doc["imageWidth"]) == raw.shape
        kinds = [s["shape_type"] for s in doc["shapes"]]
        assert kinds.count("rectangle") == kinds.count("polygon") >= 1
        label = next(t for t in TYPES if r[t] == "1")
        for shape in doc["shapes"]:
            assert shape["label"] == label and shape["group_id"] is None
            assert len(shape["points"]) == 2 if shape["shape_type"] == "rectangle" else len(shape["points"]) >= 3
            xs, ys = zip(*shape["points"])
            assert 0 <= min(xs) and max(xs) <= raw.shape[1] - 1 and 0 <= min(ys) and max(ys) <= raw.shape[0] - 1


def test_synthetic_dataset_is_deterministic_by_seed(tmp_path):
    a = generate_dataset(tmp_path / "a", 3, seed=5, min_side=64, max_side=96)
    b = generate_dataset(tmp_path / "b", 3, seed=5, min_side=64, max_side=96)
    c = generate_dataset(tmp_path / "c", 3, seed=6, min_side=64, max_side=96)
    files = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    assert all((a / f).read_bytes() == (b / f).read_bytes() for f in files)
    assert (a / "images" / "IMG000001.jpeg").read_bytes() != (c / "images" / "IMG000001.jpeg").read_bytes()


def test_synthetic_radiograph_mask_is_its_polygons():
    rng = np.random.default_rng(0)
    image, mask, polygons = synthetic_radiograph(rng, 120, 90, n_lesions=2)
    assert image.shape == mask.shape == (120, 90) and image.dtype == mask.dtype == np.uint8
    assert len(polygons) == 2 and mask.any() and set(np.unique(mask)) <= {0, 1}
    np.testing.assert_array_equal(mask, rasterize_polygons(polygons, 120, 90))
    # the lesion differs from its surroundings
    assert image.std() > 10
    _, empty, none = synthetic_radiograph(np.random.default_rng(1), 64, 64, n_lesions=0)
    assert not empty.any() and none == []


def test_synthetic_radiograph_rejects_bad_arguments():
    with pytest.raises(ValueError, match="too small"):
        synthetic_radiograph(np.random.default_rng(0), 10, 64)
    with pytest.raises(ValueError, match="unknown tumor type"):
        synthetic_radiograph(np.random.default_rng(0), 64, 64, tumor_type="chondroma")


# ---------------------------------------------------------------- reader


def test_reader_counts_and_masks_on_synthetic_data(synth):
    rows = _rows(synth)
    ds = read_btxrd(synth)
    assert ds.problems == []
    assert len(ds) == N
    assert sum(r.tumor for r in ds.records) == sum(r["tumor"] == "1" for r in rows)
    for record in ds.records:
        image = load_image(record)
        mask = load_mask(record, image.shape)
        assert mask.shape == image.shape and mask.dtype == np.uint8
        if record.tumor:
            assert record.tumor_type in TYPES and record.annotation_path is not None
            assert mask.any()
        else:
            assert record.tumor_type == NORMAL and record.annotation_path is None
            assert not mask.any()
        assert record.view in ("frontal", "lateral", "oblique")


def test_reader_mask_comes_from_polygons_only(synth, tmp_path):
    root = tmp_path / "one"
    shutil.copytree(synth, root)
    record = next(r for r in read_btxrd(root).records if r.tumor)
    doc = json.loads(record.annotation_path.read_text())
    h, w = doc["imageHeight"], doc["imageWidth"]
    for shape in doc["shapes"]:
        if shape["shape_type"] == "rectangle":  # a box over the whole image must not count
            shape["points"] = [[0.0, 0.0], [w - 1.0, h - 1.0]]
    record.annotation_path.write_text(json.dumps(doc))
    record = next(r for r in read_btxrd(root).records if r.image_id == record.image_id)
    polygons = [np.round(np.array(s["points"])).astype(np.int32) for s in doc["shapes"] if s["shape_type"] == "polygon"]
    expected = np.zeros((h, w), np.uint8)
    cv2.fillPoly(expected, polygons, 1)
    mask = load_mask(record, (h, w))
    np.testing.assert_array_equal(mask, expected)
    assert mask.sum() < h * w / 2


def test_reader_scales_polygons_to_the_image_size(synth):
    record = next(r for r in read_btxrd(synth).records if r.tumor)
    h, w = record.annotation_size
    small = load_mask(record, (h, w))
    big = load_mask(record, (2 * h, 2 * w))
    assert big.shape == (2 * h, 2 * w)
    assert abs(int(big.sum()) / 4 - int(small.sum())) <= 0.25 * small.sum() + 4


def test_reader_reports_bad_annotations_instead_of_dropping_them_silently(damaged):
    root, damage = damaged
    ds = read_btxrd(root)
    reported = dict(ds.problems)
    assert set(reported) == set(damage)
    for image_id, kind in damage.items():
        assert reported[image_id].startswith(kind), reported[image_id]
    assert len(ds) == N - 3
    assert not set(damage) & {r.image_id for r in ds.records}
    text = ds.summary()
    assert "problems: 3" in text
    for kind in damage.values():
        assert kind in text


def test_reader_requires_dataset_csv(tmp_path):
    with pytest.raises(FileNotFoundError, match="dataset.csv"):
        read_btxrd(tmp_path)


def test_summary_counts_types_centres_and_views(synth, capsys):
    ds = read_btxrd(synth)
    text = ds.summary()
    for heading in ("per tumor type:", "per centre:", "per view:"):
        assert heading in text
    assert f"images usable: {N}" in text
    assert btxrd_main([str(synth)]) == 0
    assert capsys.readouterr().out.strip() == text


def _reduced_copy(src: Path, dst: Path, long_side: int) -> None:
    """A copy made the way BTXRD-256 was made from BTXRD: images resized to ``long_side``
    keeping the aspect ratio, annotation coordinates and imageWidth/imageHeight scaled with them."""
    (dst / "images").mkdir(parents=True)
    (dst / "Annotations").mkdir()
    shutil.copy(src / "dataset.csv", dst / "dataset.csv")
    for path in sorted((src / "images").iterdir()):
        image = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE)
        h, w = image.shape
        scale = long_side / max(h, w)
        nh, nw = round(h * scale), round(w * scale)
        cv2.imwrite(str(dst / "images" / path.name), cv2.resize(image, (nw, nh), interpolation=cv2.INTER_AREA))
        ann = src / "Annotations" / f"{path.stem}.json"
        if ann.exists():
            doc = json.loads(ann.read_text())
            for shape in doc["shapes"]:
                shape["points"] = [[x * nw / w, y * nh / h] for x, y in shape["points"]]
            doc["imageHeight"], doc["imageWidth"] = nh, nw
            (dst / "Annotations" / ann.name).write_text(json.dumps(doc))


def test_full_size_and_reduced_copies_read_the_same(tmp_path):
    full = generate_dataset(tmp_path / "full", 8, seed=9, normal_fraction=0.25, min_side=400, max_side=520)
    _reduced_copy(full, tmp_path / "small", 128)
    big, small = read_btxrd(full), read_btxrd(tmp_path / "small")
    assert big.problems == small.problems == []
    strip = lambda text: text.split("\n", 1)[1].rsplit("annotation frame", 1)[0]  # all but the path and sizes
    assert strip(big.summary()) == strip(small.summary())
    sides = [max(r.annotation_size) for r in big.records if r.tumor]
    assert f"long side: {min(sides)}-{max(sides)} px" in big.summary() and min(sides) >= 400
    assert "long side: 128-128 px" in small.summary()
    for b, s in zip(big.records, small.records):
        assert (b.image_id, b.tumor_type, b.center, b.view, len(b.polygons)) == \
               (s.image_id, s.tumor_type, s.center, s.view, len(s.polygons))
        small_mask = load_mask(s, load_image(s).shape)
        # the full-size outline, filled at the reduced size (annotation scaled by the reader)
        from_full = load_mask(b, small_mask.shape)
        if not b.tumor:
            assert not small_mask.any() and not from_full.any()
            continue
        inter, union = (small_mask & from_full).sum(), (small_mask | from_full).sum()
        assert inter / union > 0.9
