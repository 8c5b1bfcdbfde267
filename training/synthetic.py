"""Synthetic radiographs in BTXRD's exact published layout.

Synthetic data lets the whole product (training, the demo checkpoint, the
worker, the tests) run without BTXRD, whose CC BY-NC-ND licence keeps it out
of the repository. The pictures are cartoons of radiographs: bright bone
shafts with cortex edges and flared ends inside a soft-tissue haze, and
lesions on the bones (lytic = darker, sclerotic = brighter, exophytic = a
bright bump growing out of the cortex, mixed = mottled), each an irregular
polygon. They are for exercising code, never for judging a model on real
radiographs.

Layout written by :func:`generate_dataset` (the same as
``../shared/data/btxrd-256``)::

    OUT/images/IMG000001.jpeg       8-bit grayscale JPEG, quality 95
    OUT/Annotations/IMG000001.json  LabelMe 5.x; per lesion one "rectangle"
                                    (its box) and one "polygon" (its outline)
    OUT/dataset.csv                 BTXRD's columns (BTXRD_COLUMNS)
    OUT/README.md                   says the data are synthetic (is_synthetic)

Normal images (``tumor`` = 0) get no annotation file, as in BTXRD.
Everything is deterministic given the seed; image ``i`` depends only on
``(seed, i)``, not on how many images are made.

Command::

    python -m training.synthetic --out runs/synthetic --n 300 --seed 0
"""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

import cv2
import numpy as np

# dataset.csv columns, in BTXRD's order.
BONE_COLUMNS = ("hand", "ulna", "radius", "humerus", "foot", "tibia", "fibula", "femur", "hip bone")
JOINT_COLUMNS = ("ankle-joint", "knee-joint", "hip-joint", "wrist-joint", "elbow-joint", "shoulder-joint")
BENIGN_TYPES = (
    "osteochondroma",
    "multiple osteochondromas",
    "simple bone cyst",
    "giant cell tumor",
    "osteofibroma",
    "synovial osteochondroma",
    "other bt",
)
MALIGNANT_TYPES = ("osteosarcoma", "other mt")
TUMOR_TYPES = BENIGN_TYPES + MALIGNANT_TYPES
REGION_COLUMNS = ("upper limb", "lower limb", "pelvis")
VIEW_COLUMNS = ("frontal", "lateral", "oblique")
BTXRD_COLUMNS = (
    ("image_id", "center", "age", "gender")
    + BONE_COLUMNS
    + JOINT_COLUMNS
    + ("tumor", "benign", "malignant")
    + TUMOR_TYPES
    + REGION_COLUMNS
    + VIEW_COLUMNS
)

SYNTHETIC_MARKER = "# Synthetic radiographs in BTXRD's layout"  # first line of OUT/README.md
LABELME_VERSION = "5.4.1"  # what BTXRD's files carry
JPEG_QUALITY = 95

# Relative frequencies of the tumor types in BTXRD (its 1,867 tumor images).
_TYPE_WEIGHTS = {
    "osteochondroma": 754, "multiple osteochondromas": 263, "simple bone cyst": 206,
    "giant cell tumor": 93, "osteofibroma": 44, "synovial osteochondroma": 49,
    "other bt": 115, "osteosarcoma": 297, "other mt": 46,
}
# How each type looks here (a caricature, not radiology).
LOOKS = ("lytic", "sclerotic", "exophytic", "mixed")
_TYPE_LOOK = {
    "osteochondroma": ("exophytic", "sclerotic"),
    "multiple osteochondromas": ("exophytic", "sclerotic"),
    "synovial osteochondroma": ("sclerotic", "exophytic"),
    "simple bone cyst": ("lytic",),
    "giant cell tumor": ("lytic",),
    "osteofibroma": ("lytic", "sclerotic"),
    "other bt": ("lytic", "sclerotic"),
    "osteosarcoma": ("mixed", "sclerotic", "lytic"),
    "other mt": ("mixed", "lytic"),
}
_BONE_REGION = {
    "hand": "upper limb", "ulna": "upper limb", "radius": "upper limb", "humerus": "upper limb",
    "foot": "lower limb", "tibia": "lower limb", "fibula": "lower limb", "femur": "lower limb",
    "hip bone": "pelvis",
}
_BONE_JOINTS = {
    "hand": ("wrist-joint",), "ulna": ("wrist-joint", "elbow-joint"),
    "radius": ("wrist-joint", "elbow-joint"), "humerus": ("elbow-joint", "shoulder-joint"),
    "foot": ("ankle-joint",), "tibia": ("ankle-joint", "knee-joint"),
    "fibula": ("ankle-joint", "knee-joint"), "femur": ("knee-joint", "hip-joint"),
    "hip bone": ("hip-joint",),
}


# ---------------------------------------------------------------- drawing


def _smooth_noise(rng: np.random.Generator, h: int, w: int, sigma: float) -> np.ndarray:
    """Gaussian-blurred white noise scaled to unit standard deviation, float32."""
    n = rng.standard_normal((h, w)).astype(np.float32)
    n = cv2.GaussianBlur(n, (0, 0), sigmaX=max(sigma, 0.5))
    return n / (float(n.std()) + 1e-6)


def _segment_coords(xx, yy, a, b):
    """For each pixel: position t in [0, 1] along segment a->b and distance to it."""
    d = b - a
    length2 = float(d @ d) + 1e-9
    t = ((xx - a[0]) * d[0] + (yy - a[1]) * d[1]) / length2
    t = np.clip(t, 0.0, 1.0)
    dist = np.hypot(xx - (a[0] + t * d[0]), yy - (a[1] + t * d[1]))
    return t, dist


class _Bone:
    """One long bone: a shaft from a to b with half-width hw, flared ends."""

    def __init__(self, a, b, hw, flare):
        self.a, self.b, self.hw, self.flare = a, b, hw, flare
        self.axis = (b - a) / (np.linalg.norm(b - a) + 1e-9)

    def half_width(self, t):
        # wider towards both ends (metaphysis / epiphysis)
        return self.hw * (1.0 + self.flare * np.abs(2.0 * t - 1.0) ** 4)

    def point(self, t, across):
        normal = np.array([-self.axis[1], self.axis[0]])
        return self.a + t * (self.b - self.a) + across * normal


def _lesion_polygon(rng, center, axis, r_along, r_across, h, w):
    """Irregular closed outline around center, elongated along the bone axis."""
    k = int(rng.integers(14, 36))
    theta = np.sort(rng.uniform(0, 2 * np.pi, k)) if rng.random() < 0.3 else (
        np.linspace(0, 2 * np.pi, k, endpoint=False) + rng.uniform(-0.4, 0.4, k) * (2 * np.pi / k)
    )
    radius = np.ones(k)
    for harmonic in range(2, 6):
        radius += rng.uniform(0, 0.3 / harmonic * 1.5) * np.cos(harmonic * theta + rng.uniform(0, 2 * np.pi))
    radius *= 1.0 + rng.uniform(-0.06, 0.06, k)
    radius = np.clip(radius, 0.45, 1.6)
    u = radius * np.cos(theta) * r_along
    v = radius * np.sin(theta) * r_across
    normal = np.array([-axis[1], axis[0]])
    pts = center[None, :] + u[:, None] * axis[None, :] + v[:, None] * normal[None, :]
    pts[:, 0] = np.clip(pts[:, 0], 0, w - 1)
    pts[:, 1] = np.clip(pts[:, 1], 0, h - 1)
    return np.round(pts, 2)


def rasterize_polygons(polygons, h: int, w: int) -> np.ndarray:
    """{0,1} uint8 mask of the polygons, exactly as ``training.btxrd.load_mask`` does."""
    mask = np.zeros((h, w), np.uint8)
    for pts in polygons:
        cv2.fillPoly(mask, [np.round(np.asarray(pts, np.float64)).astype(np.int32)], 1)
    return mask


def synthetic_radiograph(
    rng: np.random.Generator,
    h: int,
    w: int,
    n_lesions: int | None = None,
    tumor_type: str | None = None,
    lesion_scale: float = 1.0,
    looks: tuple[str, ...] | None = None,
) -> tuple[np.ndarray, np.ndarray, list[np.ndarray]]:
    """One synthetic radiograph.

    Args:
        rng: the only source of randomness (``np.random.default_rng(seed)``).
        h, w: image size in pixels.
        n_lesions: number of lesions; 0 gives a normal image. None: 1 (or
            more for "multiple osteochondromas").
        tumor_type: a BTXRD type name; decides how lesions look. None: drawn
            with BTXRD's frequencies.
        lesion_scale: multiplies every lesion's radii (> 0); 1 keeps the
            usual sizes, larger makes easy images for quick tests.
        looks: draw lesions only with these looks (LOOKS); None: the tumor
            type's usual looks. ("sclerotic",) with a large ``lesion_scale``
            gives lesions visible over their whole outline: easy images.

    Returns:
        image: (h, w) uint8.
        mask: (h, w) uint8 {0, 1}, the polygons rasterised with cv2.fillPoly.
        polygons: one (k, 2) float array of (x, y) vertices per lesion.
    """
    if h < 32 or w < 32:
        raise ValueError(f"image too small for a synthetic radiograph: {h}x{w}")
    if not lesion_scale > 0:
        raise ValueError(f"lesion_scale must be > 0, got {lesion_scale}")
    if looks is not None and (not looks or set(looks) - set(LOOKS)):
        raise ValueError(f"looks must be some of {LOOKS}, got {looks}")
    if tumor_type is None:
        tumor_type = _draw_type(rng)
    if tumor_type not in TUMOR_TYPES:
        raise ValueError(f"unknown tumor type {tumor_type!r}")
    if n_lesions is None:
        n_lesions = int(rng.integers(2, 5)) if tumor_type == "multiple osteochondromas" else (
            2 if rng.random() < 0.08 else 1)

    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    side = float(min(h, w))
    diag = float(np.hypot(h, w))

    # background and a low-frequency exposure gradient
    img = np.full((h, w), rng.uniform(0.02, 0.12), np.float32)
    img += 0.05 * _smooth_noise(rng, h, w, side / 4)

    # bones: 1-3 roughly parallel shafts (a forearm, a leg), sometimes one
    n_bones = int(rng.choice([1, 1, 2, 2, 3]))
    angle = rng.uniform(0, np.pi)
    center = np.array([w, h], np.float32) * rng.uniform(0.35, 0.65, 2)
    hw0 = side * rng.uniform(0.05, 0.10)
    bones: list[_Bone] = []
    tissue = np.zeros((h, w), np.float32)
    bone_att = np.zeros((h, w), np.float32)
    for i in range(n_bones):
        ang = angle + rng.uniform(-0.12, 0.12)
        axis = np.array([np.cos(ang), np.sin(ang)], np.float32)
        normal = np.array([-axis[1], axis[0]], np.float32)
        offset = (i - (n_bones - 1) / 2) * hw0 * rng.uniform(2.6, 3.4)
        length = diag * rng.uniform(0.45, 1.1)
        mid = center + offset * normal + axis * rng.uniform(-0.15, 0.15) * diag
        a, b = mid - axis * length / 2, mid + axis * length / 2
        hw = hw0 * rng.uniform(0.6, 1.1) if i else hw0
        bone = _Bone(a, b, hw, flare=rng.uniform(0.3, 0.9))
        bones.append(bone)
        t, dist = _segment_coords(xx, yy, a, b)
        r = dist / bone.half_width(t)  # 0 on the axis, 1 on the outer cortex
        edge = np.clip((1.0 - r) * bone.hw / 1.5, 0.0, 1.0)  # ~1.5 px soft edge
        cortex = np.exp(-(((1.0 - r) / rng.uniform(0.12, 0.3)) ** 2))
        medulla = rng.uniform(0.30, 0.45) * (1.0 + 0.08 * _smooth_noise(rng, h, w, 1.5))
        bone_att += edge * (medulla + rng.uniform(0.25, 0.4) * cortex)
        tissue = np.maximum(tissue, np.clip((hw0 * rng.uniform(2.5, 4.0) - dist) / (hw0 * 1.5), 0, 1))
    img += tissue * rng.uniform(0.08, 0.22) * (1.0 + 0.1 * _smooth_noise(rng, h, w, side / 10))

    # lesions, each on a bone
    polygons: list[np.ndarray] = []
    for _ in range(n_lesions):
        bone = bones[int(rng.integers(len(bones)))]
        look = str(rng.choice(_TYPE_LOOK[tumor_type] if looks is None else tuple(looks)))
        t = rng.uniform(0.15, 0.85)
        # keep the lesion in view: move t until the point lies inside the image
        for _try in range(20):
            p = bone.point(t, 0.0)
            if 0.1 * w < p[0] < 0.9 * w and 0.1 * h < p[1] < 0.9 * h:
                break
            t = rng.uniform(0.05, 0.95)
        hwt = float(bone.half_width(t))
        if look == "exophytic":  # a bump growing out of the cortex
            side_sign = rng.choice([-1.0, 1.0])
            c = bone.point(t, side_sign * hwt * rng.uniform(0.9, 1.2))
            r_across = hwt * rng.uniform(0.5, 1.0)
            r_along = r_across * rng.uniform(0.8, 1.6)
        else:  # inside the bone
            across = rng.uniform(-0.3, 0.3) * hwt
            c = bone.point(t, across)
            r_across = (hwt - abs(across)) * rng.uniform(0.55, 0.9)
            r_along = r_across * rng.uniform(1.0, 2.5)
        r_across = max(r_across, side * 0.025) * lesion_scale
        r_along = max(r_along, side * 0.03) * lesion_scale
        pts = _lesion_polygon(rng, c, bone.axis, r_along, r_across, h, w)
        if len(np.unique(np.round(pts).astype(np.int32), axis=0)) < 3:
            continue
        polygons.append(pts)
        region = rasterize_polygons([pts], h, w).astype(np.float32)
        soft = cv2.GaussianBlur(region, (0, 0), sigmaX=rng.uniform(0.6, 1.5))
        tex = _smooth_noise(rng, h, w, rng.uniform(1.0, 3.0))
        if look == "lytic":
            depth = rng.uniform(0.35, 0.65)
            bone_att *= 1.0 - soft * np.clip(depth + 0.12 * tex, 0.1, 0.9)
            rim = cv2.GaussianBlur(cv2.morphologyEx(region, cv2.MORPH_GRADIENT, np.ones((3, 3))), (0, 0), 1.0)
            bone_att += rim * rng.uniform(0.0, 0.15)
        elif look == "sclerotic":
            bone_att += soft * np.clip(rng.uniform(0.22, 0.4) + 0.1 * tex, 0.05, None)
        elif look == "exophytic":
            bone_att = np.maximum(bone_att, soft * np.clip(rng.uniform(0.5, 0.75) + 0.1 * tex, 0.2, None))
        else:  # mixed: mottled, mostly brighter
            bone_att += soft * (rng.uniform(0.12, 0.25) + rng.uniform(0.12, 0.2) * tex)
    img += bone_att

    # markers ("R"/"L") that are not lesions
    if rng.random() < 0.5:
        scale = side / 200 * rng.uniform(0.6, 1.2)
        org = (int(rng.uniform(0.03, 0.85) * w), int(rng.uniform(0.1, 0.95) * h))
        marker = np.zeros((h, w), np.uint8)
        cv2.putText(marker, str(rng.choice(["R", "L"])), org, cv2.FONT_HERSHEY_SIMPLEX, scale, 255,
                    max(1, int(2 * scale)), cv2.LINE_AA)
        img = np.maximum(img, marker.astype(np.float32) * (rng.uniform(0.6, 0.95) / 255.0))

    # exposure: gain, gamma, detector noise
    img = np.clip(img, 0.0, None)
    img = img / max(float(np.percentile(img, 99.5)), 1e-3) * rng.uniform(0.7, 1.0)
    img = np.clip(img, 0.0, 1.0) ** rng.uniform(0.7, 1.4)
    img += rng.uniform(0.005, 0.03) * rng.standard_normal((h, w)).astype(np.float32)
    img += rng.uniform(0.0, 0.02) * _smooth_noise(rng, h, w, 2.0)
    image = np.clip(np.round(img * 255.0), 0, 255).astype(np.uint8)
    return image, rasterize_polygons(polygons, h, w), polygons


def _draw_type(rng: np.random.Generator, types: tuple[str, ...] = TUMOR_TYPES) -> str:
    p = np.array([_TYPE_WEIGHTS[t] for t in types], np.float64)
    return str(types[int(rng.choice(len(types), p=p / p.sum()))])


# ---------------------------------------------------------------- dataset


def _labelme(polygons, label: str, image_name: str, h: int, w: int) -> dict:
    shapes = []
    for pts in polygons:
        x0, y0 = pts.min(axis=0)
        x1, y1 = pts.max(axis=0)
        common = {"group_id": None, "description": "", "flags": {}, "mask": None}
        shapes.append({"label": label, "points": [[float(x0), float(y0)], [float(x1), float(y1)]],
                       "shape_type": "rectangle", **common})
        shapes.append({"label": label, "points": [[float(x), float(y)] for x, y in pts],
                       "shape_type": "polygon", **common})
    # key order as in BTXRD's files
    return {"version": LABELME_VERSION, "flags": {}, "shapes": shapes, "imagePath": image_name,
            "imageData": None, "imageHeight": int(h), "imageWidth": int(w)}


def _csv_row(rng: np.random.Generator, image_name: str, tumor_type: str | None) -> dict:
    row = dict.fromkeys(BTXRD_COLUMNS, 0)
    bone = str(rng.choice(BONE_COLUMNS))
    row.update({
        "image_id": image_name,
        "center": int(rng.choice([1, 1, 1, 2, 3])),
        "age": int(rng.integers(3, 80)),
        "gender": str(rng.choice(["M", "F"])),
        bone: 1,
        _BONE_REGION[bone]: 1,
        str(rng.choice(VIEW_COLUMNS, p=[0.6, 0.35, 0.05])): 1,
    })
    if rng.random() < 0.5:
        row[str(rng.choice(_BONE_JOINTS[bone]))] = 1
    if tumor_type is not None:
        row["tumor"] = 1
        row["malignant" if tumor_type in MALIGNANT_TYPES else "benign"] = 1
        row[tumor_type] = 1
    return row


def generate_dataset(
    out_dir: str | Path,
    n_images: int,
    seed: int = 0,
    normal_fraction: float = 0.15,
    min_side: int = 192,
    max_side: int = 640,
    min_aspect: float = 0.6,
    max_aspect: float = 1.6,
    tumor_types: tuple[str, ...] | None = None,
    lesion_scale: float = 1.0,
    looks: tuple[str, ...] | None = None,
) -> Path:
    """Write ``n_images`` synthetic radiographs in BTXRD's layout under ``out_dir``.

    Args:
        out_dir: created if missing; existing files of the same names are overwritten.
        n_images: number of images (lesion + normal).
        seed: image ``i`` is made from ``np.random.SeedSequence([seed, i])``.
        normal_fraction: share of normal images (no lesion, no annotation file).
        min_side, max_side: range of the long side in pixels.
        min_aspect, max_aspect: range of height / width.
        tumor_types: draw only these types (with BTXRD's relative
            frequencies); None: all of them.
        lesion_scale, looks: passed to ``synthetic_radiograph`` (1 and None:
            the usual lesions).

    Returns:
        ``out_dir`` as a Path.
    """
    if n_images < 1:
        raise ValueError(f"n_images must be >= 1, got {n_images}")
    if not 0.0 <= normal_fraction <= 1.0:
        raise ValueError(f"normal_fraction must be in [0, 1], got {normal_fraction}")
    if not 32 <= min_side <= max_side:
        raise ValueError(f"need 32 <= min_side <= max_side, got {min_side}, {max_side}")
    types = TUMOR_TYPES if tumor_types is None else tuple(tumor_types)
    unknown = sorted(set(types) - set(TUMOR_TYPES))
    if unknown or not types:
        raise ValueError(f"tumor_types must be BTXRD type names, got {unknown or 'none'}")
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    (out / "Annotations").mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n_images):
        rng = np.random.default_rng(np.random.SeedSequence([seed, i]))
        stem = f"IMG{i + 1:06d}"
        long_side = int(rng.integers(min_side, max_side + 1))
        aspect = float(np.exp(rng.uniform(np.log(min_aspect), np.log(max_aspect))))  # h / w
        if aspect >= 1.0:
            h, w = long_side, max(32, int(round(long_side / aspect)))
        else:
            h, w = max(32, int(round(long_side * aspect))), long_side
        normal = rng.random() < normal_fraction
        tumor_type = None if normal else _draw_type(rng, types)
        image, _mask, polygons = synthetic_radiograph(
            rng, h, w, n_lesions=0 if normal else None, tumor_type=tumor_type or "osteochondroma",
            lesion_scale=lesion_scale, looks=looks)
        if not normal and not polygons:  # cannot happen at these sizes; stay consistent if it does
            normal, tumor_type = True, None
        cv2.imwrite(str(out / "images" / f"{stem}.jpeg"), image, [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY])
        if not normal:
            doc = _labelme(polygons, tumor_type, f"{stem}.jpeg", h, w)
            (out / "Annotations" / f"{stem}.json").write_text(json.dumps(doc, indent=2))
        rows.append(_csv_row(rng, f"{stem}.jpeg", tumor_type))
    with open(out / "dataset.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=BTXRD_COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    n_normal = sum(row["tumor"] == 0 for row in rows)
    (out / "README.md").write_text(
        f"{SYNTHETIC_MARKER}\n\n"
        f"Made by `training.synthetic.generate_dataset(n_images={n_images}, seed={seed}, "
        f"normal_fraction={normal_fraction}, min_side={min_side}, max_side={max_side}"
        + (f", tumor_types={list(types)}" if tumor_types is not None else "")
        + (f", lesion_scale={lesion_scale}" if lesion_scale != 1.0 else "")
        + (f", looks={list(looks)}" if looks is not None else "")
        + ")`: "
        f"{n_images - n_normal} images with lesions, {n_normal} normal. No real patient data; "
        "cartoons of radiographs for exercising code, not for judging a model on real images.\n")
    return out


def is_synthetic(root: str | Path) -> bool:
    """True when ``root`` was written by :func:`generate_dataset` (its README says so)."""
    readme = Path(root) / "README.md"
    try:
        return readme.is_file() and readme.read_text().startswith(SYNTHETIC_MARKER)
    except (OSError, UnicodeDecodeError):
        return False


def synthetic_jpegs(
    n: int, seed: int, sides: tuple[int, int] = (200, 520), name: str = "img-{:03d}.jpg", first: int = 0
) -> tuple[list[tuple[str, bytes]], dict[str, np.ndarray]]:
    """n synthetic radiographs as JPEG files (quality 92), and the lesion mask drawn for each.

    Returns ([(filename, bytes)], {filename: mask}); height and width are drawn
    in [sides[0], sides[1]); filenames are name.format(first + i). Used by the
    demo and the system tests, which check masks against what was drawn.
    """
    import io

    from PIL import Image

    rng = np.random.default_rng(seed)
    files, truth = [], {}
    for i in range(n):
        h, w = int(rng.integers(*sides)), int(rng.integers(*sides))
        image, mask, _ = synthetic_radiograph(rng, h, w)
        buf = io.BytesIO()
        Image.fromarray(image).save(buf, format="JPEG", quality=92)
        filename = name.format(first + i)
        files.append((filename, buf.getvalue()))
        truth[filename] = mask
    return files, truth


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training.synthetic", description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, help="output folder (BTXRD layout)")
    parser.add_argument("--n", type=int, default=300, help="number of images")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--normal-fraction", type=float, default=0.15)
    parser.add_argument("--min-side", type=int, default=192, help="smallest long side, px")
    parser.add_argument("--max-side", type=int, default=640, help="largest long side, px")
    args = parser.parse_args(argv)
    out = generate_dataset(args.out, args.n, seed=args.seed, normal_fraction=args.normal_fraction,
                           min_side=args.min_side, max_side=args.max_side)
    print(f"wrote {args.n} synthetic images to {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
