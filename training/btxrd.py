"""Reader for BTXRD's published layout (the real BTXRD-256 copy and synthetic data).

Layout (Yao et al., Scientific Data 12:88, 2025)::

    ROOT/dataset.csv                one row per image: image_id ("IMG000001.jpeg"),
                                    center, age, gender, one-hot bones, joints,
                                    tumor / benign / malignant, one-hot tumor
                                    types, regions and views (frontal, lateral,
                                    oblique)
    ROOT/images/IMG000001.jpeg
    ROOT/Annotations/IMG000001.json LabelMe; per lesion a "rectangle" (its box)
                                    and a "polygon" (its outline); label = type.
                                    Normal images have no annotation file.

Masks come from the polygons only (``load_mask``); rectangles are ignored.
Anything that keeps an image from being used as (image, mask) is reported in
``BtxrdDataset.problems`` as ``(image_id, reason)`` and the image is left out
of ``records``; oddities that do not (two tumor types in a row, a stray
annotation for a normal image, a degenerate polygon among good ones) are
reported there too, and the record is kept.

Command (prints counts only, never pixels)::

    python -m training.btxrd ../shared/data/btxrd-256
"""

from __future__ import annotations

import argparse
import csv
import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np

from training.synthetic import BONE_COLUMNS, TUMOR_TYPES, VIEW_COLUMNS

NORMAL = "normal"  # tumor_type of images without a tumor


@dataclass(frozen=True)
class BtxrdRecord:
    """One usable image. ``polygons`` hold (x, y) vertices in the annotation's
    own pixel frame (``annotation_size`` = (imageHeight, imageWidth))."""

    image_id: str  # file stem, e.g. "IMG000001"
    image_path: Path
    annotation_path: Path | None  # None for normal images
    tumor: bool
    tumor_type: str  # a BTXRD type name, or NORMAL
    center: str
    view: str | None  # "frontal" | "lateral" | "oblique"
    bones: tuple[str, ...]
    age: int | None
    gender: str
    polygons: tuple[np.ndarray, ...] = field(default=(), compare=False, repr=False)
    annotation_size: tuple[int, int] | None = None  # (imageHeight, imageWidth) from the JSON

    @property
    def stratum(self) -> str:
        """Key for stratified splits: the tumor type, or "normal"."""
        return self.tumor_type


@dataclass
class BtxrdDataset:
    root: Path
    records: list[BtxrdRecord]
    problems: list[tuple[str, str]]  # (image_id, reason)

    def __len__(self) -> int:
        return len(self.records)

    def summary(self) -> str:
        """Counts per tumor type, centre and view, lesions, and the problems found."""
        recs = self.records
        lines = [f"BTXRD layout at {self.root}",
                 f"images usable: {len(recs)}  (tumor {sum(r.tumor for r in recs)}, "
                 f"normal {sum(not r.tumor for r in recs)}), lesion polygons: {sum(len(r.polygons) for r in recs)}"]
        for title, counts in (
            ("tumor type", Counter(r.tumor_type for r in recs)),
            ("centre", Counter(r.center for r in recs)),
            ("view", Counter(r.view or "unknown" for r in recs)),
        ):
            lines.append(f"per {title}:")
            width = max((len(k) for k in counts), default=0)
            lines += [f"  {k:<{width}}  {v:5d}" for k, v in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))]
        sides = [max(r.annotation_size) for r in recs if r.annotation_size]
        if sides:
            lines.append(f"annotation frame (imageHeight x imageWidth), long side: {min(sides)}-{max(sides)} px "
                         "(masks are scaled to the image actually read)")
        lines.append(f"problems: {len(self.problems)}")
        reasons = Counter(_reason_kind(reason) for _, reason in self.problems)
        lines += [f"  {v:5d}  {k}" for k, v in reasons.most_common()]
        return "\n".join(lines)


def _reason_kind(reason: str) -> str:
    return reason.split(":")[0]


def read_btxrd(root: str | Path) -> BtxrdDataset:
    """Read ``ROOT/dataset.csv`` and every annotation it implies.

    Raises:
        FileNotFoundError: when ``ROOT/dataset.csv`` does not exist.
        ValueError: when dataset.csv lacks a column the reader needs.
    """
    root = Path(root)
    csv_path = root / "dataset.csv"
    if not csv_path.is_file():
        raise FileNotFoundError(f"no dataset.csv in {root} (expected BTXRD's layout)")
    with open(csv_path, newline="") as f:
        reader = csv.DictReader(f)
        needed = {"image_id", "center", "tumor", *TUMOR_TYPES, *VIEW_COLUMNS}
        missing = sorted(needed - set(reader.fieldnames or ()))
        if missing:
            raise ValueError(f"{csv_path} lacks columns {missing}")
        rows = list(reader)

    records: list[BtxrdRecord] = []
    problems: list[tuple[str, str]] = []
    seen: set[str] = set()
    for row in rows:
        name = row["image_id"].strip()
        image_id = Path(name).stem
        if image_id in seen:
            problems.append((image_id, "duplicate row in dataset.csv: later row ignored"))
            continue
        seen.add(image_id)
        image_path = root / "images" / name
        if not image_path.is_file():
            problems.append((image_id, f"missing image: {image_path.name} not in images/"))
            continue
        types = [t for t in TUMOR_TYPES if _flag(row.get(t))]
        tumor = _flag(row.get("tumor")) or bool(types)
        views = [v for v in VIEW_COLUMNS if _flag(row.get(v))]
        ann_path = root / "Annotations" / f"{image_id}.json"
        base = dict(
            image_id=image_id, image_path=image_path, tumor=tumor, center=row["center"].strip(),
            view=views[0] if len(views) == 1 else None,
            bones=tuple(b for b in BONE_COLUMNS if _flag(row.get(b))),
            age=int(row["age"]) if (row.get("age") or "").strip().isdigit() else None,
            gender=(row.get("gender") or "").strip(),
        )
        if not tumor:
            if ann_path.is_file():
                problems.append((image_id, "annotation for a normal image: ignored, mask is empty"))
            records.append(BtxrdRecord(annotation_path=None, tumor_type=NORMAL, **base))
            continue
        if not ann_path.is_file():
            problems.append((image_id, f"missing annotation: tumor image without Annotations/{ann_path.name}"))
            continue
        try:
            polygons, labels, size, notes = _read_labelme(ann_path)
        except ValueError as exc:
            problems.append((image_id, f"malformed annotation: {exc}"))
            continue
        problems += [(image_id, note) for note in notes]
        if not polygons:
            what = "rectangle-only annotation" if "rectangle" in labels.values() else "no polygon"
            problems.append((image_id, f"{what}: no lesion outline to make a mask from"))
            continue
        if len(types) == 1:
            tumor_type = types[0]
        else:
            poly_labels = [lab for lab, kind in labels.items() if kind == "polygon" and lab in TUMOR_TYPES]
            tumor_type = next((t for t in types if t in poly_labels), types[0] if types else None)
            tumor_type = tumor_type or (poly_labels[0] if poly_labels else "unknown")
            problems.append((image_id, f"tumor types in dataset.csv: {types or 'none'}; kept as {tumor_type!r}"))
        records.append(BtxrdRecord(annotation_path=ann_path, tumor_type=tumor_type,
                                   polygons=tuple(polygons), annotation_size=size, **base))
    listed = {Path(r["image_id"].strip()).stem for r in rows}
    images_dir = root / "images"
    if images_dir.is_dir():
        for path in sorted(images_dir.iterdir()):
            if path.is_file() and path.stem not in listed:
                problems.append((path.stem, "image not in dataset.csv: ignored"))
    return BtxrdDataset(root=root, records=records, problems=problems)


def _flag(value) -> bool:
    return str(value or "").strip() in ("1", "1.0", "True", "true")


def _read_labelme(path: Path):
    """-> (polygons, {label: shape kind seen}, (h, w) or None, notes). ValueError if malformed."""
    try:
        doc = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path.name} is not valid JSON ({exc})") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("shapes"), list):
        raise ValueError(f"{path.name} has no 'shapes' list")
    size = None
    if isinstance(doc.get("imageHeight"), int) and isinstance(doc.get("imageWidth"), int):
        size = (doc["imageHeight"], doc["imageWidth"])
    polygons, labels, notes = [], {}, []
    for i, shape in enumerate(doc["shapes"]):
        if not isinstance(shape, dict):
            raise ValueError(f"{path.name}: shape {i} is not an object")
        kind = shape.get("shape_type", "polygon")  # LabelMe's default
        label = str(shape.get("label", ""))
        if kind != "polygon":
            labels.setdefault(label, kind)
            continue
        labels[label] = "polygon"
        try:
            pts = np.asarray(shape.get("points"), np.float64)
        except (TypeError, ValueError):
            raise ValueError(f"{path.name}: polygon {i} has non-numeric points") from None
        if pts.ndim != 2 or pts.shape[1] != 2 or not np.isfinite(pts).all():
            raise ValueError(f"{path.name}: polygon {i} points are not a list of (x, y)")
        if len(pts) < 3:
            notes.append(f"degenerate polygon: shape {i} has {len(pts)} points, skipped")
            continue
        polygons.append(pts)
    return polygons, labels, size, notes


def load_image(record: BtxrdRecord) -> np.ndarray:
    """The record's radiograph as (H, W) uint8 gray."""
    image = cv2.imread(str(record.image_path), cv2.IMREAD_GRAYSCALE)
    if image is None:
        raise ValueError(f"{record.image_id}: cannot decode {record.image_path}")
    return image


def load_mask(record: BtxrdRecord, shape: tuple[int, int]) -> np.ndarray:
    """(H, W) uint8 {0, 1}: the record's polygons filled with cv2.fillPoly.

    Rectangles are ignored. ``shape`` is the image's (H, W); when it differs
    from the annotation's imageHeight/imageWidth the points are scaled to it.
    Normal images give an all-zero mask.
    """
    h, w = int(shape[0]), int(shape[1])
    mask = np.zeros((h, w), np.uint8)
    if not record.polygons:
        return mask
    sx = sy = 1.0
    if record.annotation_size is not None and record.annotation_size != (h, w):
        ah, aw = record.annotation_size
        sy, sx = h / ah, w / aw
    for pts in record.polygons:
        scaled = pts * np.array([sx, sy])
        cv2.fillPoly(mask, [np.round(scaled).astype(np.int32)], 1)
    return mask


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training.btxrd",
                                     description="Summarise a folder in BTXRD's layout (counts only).")
    parser.add_argument("root", help="folder holding dataset.csv, images/, Annotations/")
    parser.add_argument("--problems", action="store_true", help="also list every problem by image id")
    args = parser.parse_args(argv)
    dataset = read_btxrd(args.root)
    print(dataset.summary())
    if args.problems:
        for image_id, reason in dataset.problems:
            print(f"  {image_id}: {reason}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
