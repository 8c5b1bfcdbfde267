"""Score a checkpoint on a split of a BTXRD-layout folder; write the thesis's table beside ours.

Commands::

    python -m training.evaluate runs/btxrd-strong.pt --data ../shared/data/btxrd-256 \\
        --split-file training/splits/btxrd-256-grouped-v1.csv --split val
    python -m training.evaluate runs/btxrd-strong.pt --data ../shared/data/btxrd-256 \\
        --split-file training/splits/btxrd-256-grouped-v1.csv --split test --out-dir runs/eval-test

What it does: every image of the split goes through the serving path
(``model.inference.Segmenter``: the checkpoint's preprocessing, network and
postprocessing, at the image's original resolution); its mask is compared
with the polygon mask from ``training.btxrd``. The decision threshold is the
one stored in the checkpoint, chosen on the validation split when it was
trained: this command never picks a threshold, so a test score is never tuned
on the test split. ``--tta`` adds a left-right flip and averages the two
probability maps (what workers started with ``INFER_TTA=flip`` serve);
``--tta flip4`` also the up-down and the doubly mirrored frames
(``INFER_TTA=flip4``); each with the checkpoint's threshold for that mode
when it has one (``training.thresholds``).

Written to ``--out-dir``:

- ``report.md``: the thesis's Table 4.1 beside ours, pooled over all pixels
  and averaged per image, then breakdowns per tumor type, centre, view and
  lesion size (fixed bins of the lesion's share of the image: about the
  terciles of BTXRD-256), and which split, checkpoint and threshold were used.
  After the table, a section "Found at all" counts, per image, whether any predicted pixel
  lies on the tumor (found), only beside it (wrong place) or nothing was
  predicted (nothing predicted), per lesion size, and what share of the
  false-negative tumor pixels lie in images whose tumor was not found.
- ``metrics.json``: the same numbers, machine-readable.
- ``per_image.csv``: image id, group keys, confusion counts and scores.
- ``examples.png``: rows of (image, ground truth, probability, prediction)
  for images spread from the best to the worst Dice.

Metric definitions (``table_metrics``): pixel confusion counts (tp, fp, fn,
tn) per image at the original resolution. *Pooled* sums the counts over the
split first; *per image* averages each image's score (``model.metrics``
conventions for empty masks: an image with neither truth nor prediction
scores 1). Tumor IoU = tp / (tp + fp + fn); mean IoU = the mean of the tumor
IoU and the background IoU tn / (tn + fp + fn) (two-class mean IoU, as
Keras's MeanIoU); Dice = F1 on pixels; pixel accuracy = (tp + tn) / all.
Loss = the checkpoint's training loss (Dice weight x soft Dice + focal weight
x focal) on the probability maps at the original resolution: pooled over all
pixels of the split, or averaged per image. A checkpoint trained with
``--dice-per-image`` was trained on the per-image form; the report says which
column's loss is the one it was trained on.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np

from model.metrics import scores_from_confusion

# The thesis's test numbers (187 images, image-level 72/18/10 split stratified by tumor type).
THESIS = {"dice": 0.5633, "tumor_iou": 0.4596, "precision": 0.6105, "recall": 0.5792, "f1": 0.5948,
          "pixel_accuracy": 0.7921}
TABLE_ROWS = ("loss", "pixel_accuracy", "mean_iou", "tumor_iou", "dice", "precision", "recall", "f1")
ROW_NAMES = {"loss": "loss", "pixel_accuracy": "pixel accuracy", "mean_iou": "mean IoU", "tumor_iou": "tumor IoU",
             "dice": "Dice", "precision": "precision", "recall": "recall", "f1": "F1"}
# Lesion size: share of the image covered by the ground-truth mask. Fixed bins (about the terciles of
# BTXRD-256: 0.37 % and 2.2 %) so that reports on different splits compare.
SIZE_BINS = ((0.004, "small (< 0.4 %)"), (0.02, "medium (0.4-2 %)"), (math.inf, "large (>= 2 %)"))
NO_LESION = "no lesion"
PROB_EPS = 1e-6


# ---------------------------------------------------------------- per-image terms


@dataclass
class LossSpec:
    """The training loss, from a checkpoint's training config."""

    dice_weight: float = 1.0
    focal_weight: float = 1.0
    gamma: float = 2.0
    alpha: float | None = None
    smooth: float = 1.0
    per_image: bool = False  # trained with the Dice term per image (--dice-per-image): the per-image column's form

    @classmethod
    def from_training_config(cls, cfg: dict | None) -> "LossSpec":
        cfg = cfg or {}
        return cls(float(cfg.get("dice_weight", 1.0)), float(cfg.get("focal_weight", 1.0)),
                   float(cfg.get("focal_gamma", 2.0)), cfg.get("focal_alpha"),
                   per_image=bool(cfg.get("dice_per_image", False)))

    def terms(self, prob: np.ndarray, mask: np.ndarray) -> tuple[float, float, float, float, int]:
        """(sum p*t, sum p, sum t, sum focal, pixels) of one image, float64."""
        p = np.clip(np.asarray(prob, np.float64), PROB_EPS, 1.0 - PROB_EPS)
        t = (np.asarray(mask) != 0).astype(np.float64)
        p_t = np.where(t > 0, p, 1.0 - p)
        focal = -((1.0 - p_t) ** self.gamma) * np.log(p_t)
        if self.alpha is not None:
            focal *= np.where(t > 0, self.alpha, 1.0 - self.alpha)
        return float((p * t).sum()), float(p.sum()), float(t.sum()), float(focal.sum()), int(p.size)

    def loss(self, terms) -> float:
        inter, psum, tsum, focal, n = terms
        dice = 1.0 - (2.0 * inter + self.smooth) / (psum + tsum + self.smooth)
        return self.dice_weight * dice + self.focal_weight * focal / max(n, 1)


@dataclass
class ImageResult:
    image_id: str
    tumor_type: str
    center: str
    view: str
    lesion_fraction: float  # ground-truth tumor pixels / all pixels
    counts: tuple[int, int, int, int]  # tp, fp, fn, tn
    loss_terms: tuple[float, float, float, float, int] = field(repr=False)

    @property
    def size_bin(self) -> str:
        if self.counts[0] + self.counts[2] == 0:
            return NO_LESION
        return next(name for upper, name in SIZE_BINS if self.lesion_fraction < upper)


def image_scores(counts) -> dict[str, float]:
    """Table 4.1's scores for one confusion (tp, fp, fn, tn)."""
    tp, fp, fn, tn = (int(c) for c in counts)
    s = scores_from_confusion(tp, fp, fn, tn)
    background_iou = tn / (tn + fp + fn) if tn + fp + fn else 1.0
    return {"pixel_accuracy": s["pixel_accuracy"], "mean_iou": (s["iou"] + background_iou) / 2,
            "tumor_iou": s["iou"], "dice": s["dice"], "precision": s["precision"], "recall": s["recall"], "f1": s["f1"]}


def table_metrics(results: list[ImageResult], loss: LossSpec) -> dict:
    """Table 4.1 pooled over pixels and averaged per image (module docstring).

    ``per_image`` also has ``f1_of_means`` = 2 P R / (P + R) of the mean
    precision and recall (how the thesis's F1 relates to its P and R).
    """
    if not results:
        raise ValueError("no images to score")
    counts = np.array([r.counts for r in results], np.int64)
    pooled = image_scores(counts.sum(axis=0))
    pooled["loss"] = loss.loss(tuple(np.array([r.loss_terms for r in results], np.float64).sum(axis=0)))
    per = [image_scores(r.counts) | {"loss": loss.loss(r.loss_terms)} for r in results]
    per_image = {k: float(np.mean([s[k] for s in per])) for k in TABLE_ROWS}
    p, r = per_image["precision"], per_image["recall"]
    per_image["f1_of_means"] = 2 * p * r / (p + r) if p + r else 0.0
    positive = [s for s, res in zip(per, results) if res.counts[0] + res.counts[2] > 0]
    return {"pooled": pooled, "per_image": per_image, "n_images": len(results), "n_positive": len(positive),
            "mean_dice_positive": float(np.mean([s["dice"] for s in positive])) if positive else None}


def breakdown(results: list[ImageResult], key) -> list[dict]:
    """Per value of ``key(result)``: n, pooled Dice / tumor IoU / precision / recall and the mean per-image Dice."""
    groups: dict[str, list[ImageResult]] = defaultdict(list)
    for r in results:
        groups[str(key(r))].append(r)
    rows = []
    for name, members in groups.items():
        pooled = image_scores(np.array([m.counts for m in members], np.int64).sum(axis=0))
        rows.append({"group": name, "n": len(members), "dice": pooled["dice"], "tumor_iou": pooled["tumor_iou"],
                     "precision": pooled["precision"], "recall": pooled["recall"],
                     "mean_dice": float(np.mean([image_scores(m.counts)["dice"] for m in members]))})
    return sorted(rows, key=lambda row: (-row["n"], row["group"]))


DETECTION_OUTCOMES = ("found", "wrong place", "nothing predicted")  # images with a tumor
NORMAL_OUTCOMES = ("clean", "false alarm")  # images without one


def detection_outcome(counts) -> str:
    """Per image, from its pixel confusion: with a tumor, "found" (some predicted pixel on it), "wrong place"
    (predicted pixels, none on it) or "nothing predicted"; without one, "clean" or "false alarm"."""
    tp, fp, fn = (int(c) for c in counts[:3])
    if tp + fn == 0:
        return "false alarm" if fp else "clean"
    return "found" if tp else ("wrong place" if fp else "nothing predicted")


def detection(results: list[ImageResult]) -> dict:
    """Whether each image's tumor was found at all, the question before its outline: counts of
    ``detection_outcome`` overall and per lesion size, and the share of all false-negative tumor pixels that lie
    in images whose tumor was not found (no predicted pixel on it), which no better outline can recover."""
    outcomes = [detection_outcome(r.counts) for r in results]
    overall = {name: outcomes.count(name) for name in DETECTION_OUTCOMES + NORMAL_OUTCOMES}
    positive = sum(overall[name] for name in DETECTION_OUTCOMES)
    fn_total = sum(r.counts[2] for r in results)
    fn_unfound = sum(r.counts[2] for r, o in zip(results, outcomes) if o in ("wrong place", "nothing predicted"))
    by_size: dict[str, dict[str, int]] = {}
    for r, o in zip(results, outcomes):
        if o in DETECTION_OUTCOMES:
            by_size.setdefault(r.size_bin, dict.fromkeys(DETECTION_OUTCOMES, 0))[o] += 1
    order = [name for _, name in SIZE_BINS]
    return {"overall": overall, "n_positive": positive,
            "found_rate": overall["found"] / positive if positive else None,
            "fn_share_not_found": fn_unfound / fn_total if fn_total else None,
            "by_size": {k: by_size[k] for k in order if k in by_size}}


BREAKDOWNS = {
    "tumor type": lambda r: r.tumor_type,
    "centre": lambda r: r.center,
    "view": lambda r: r.view,
    "lesion size": lambda r: r.size_bin,
}


# ---------------------------------------------------------------- prediction


def predict(segmenter, images: list[np.ndarray], tta: bool | str = False) -> list[tuple[np.ndarray, np.ndarray]]:
    """(probability, mask) per image at the original size: ``Segmenter.predict``,
    the serving path; with ``tta`` (a mode, or True: "flip") the way a worker with INFER_TTA=<mode> runs
    (the mean of the plain and the left-right mirrored pass)."""
    saved = segmenter.tta
    segmenter.flip_tta = tta
    try:
        return [(p.prob, p.mask) for p in segmenter.predict(images)]
    finally:
        segmenter.tta = saved


def score_records(loaded, records, device: str | None = None, batch_size: int | None = None,
                  tta: bool | str = False, cpu_bf16: bool = False) -> list[ImageResult]:
    """Run the checkpoint over ``records`` and score each image (module docstring)."""
    from model.inference import Segmenter
    from training.btxrd import load_image, load_mask

    segmenter = Segmenter(loaded, device=device, batch_size=batch_size, flip_tta=tta,  # auto batch counts the flip
                          cpu_bf16=cpu_bf16)
    loss = LossSpec.from_training_config(loaded.info.get("training_config"))
    results = []
    chunk = max(segmenter.batch_size, 32)
    for start in range(0, len(records), chunk):
        part = records[start : start + chunk]
        images = [load_image(r) for r in part]
        for record, image, (prob, pred) in zip(part, images, predict(segmenter, images, tta)):
            truth = load_mask(record, image.shape)
            t = truth != 0
            p = pred != 0
            tp = int(np.count_nonzero(p & t))
            fp, fn = int(np.count_nonzero(p)) - tp, int(np.count_nonzero(t)) - tp
            results.append(ImageResult(record.image_id, record.tumor_type, record.center, record.view or "unknown",
                                       float(t.mean()), (tp, fp, fn, int(t.size) - tp - fp - fn),
                                       loss.terms(prob, truth)))
    return results


# ---------------------------------------------------------------- outputs


def _fmt(value) -> str:
    return "n/a" if value is None else f"{value:.4f}"


def detection_markdown(found: dict) -> list[str]:
    """The report's section on whether tumors were found at all (``detection``)."""
    overall, n = found["overall"], found["n_positive"]
    if not n and not overall["clean"] + overall["false alarm"]:
        return []
    lines = ["## Found at all", "",
             "Per image, before the outline: *found* = at least one predicted pixel on the tumor; *wrong place* = "
             "predicted pixels, none on the tumor; *nothing predicted* = no tumor pixel predicted anywhere.", ""]
    if n:
        lines += ["| lesion size | images | found | wrong place | nothing predicted |", "|---|---|---|---|---|"]
        for name, row in [("all", {k: overall[k] for k in DETECTION_OUTCOMES}), *found["by_size"].items()]:
            total = sum(row.values())
            lines.append(f"| {name} | {total} | " + " | ".join(f"{row[k]} ({row[k] / total:.0%})"
                                                               for k in DETECTION_OUTCOMES) + " |")
        lines.append("")
        if found["fn_share_not_found"] is not None:
            lines += [f"Of all false-negative tumor pixels, {found['fn_share_not_found']:.0%} lie in images whose "
                      "tumor was not found (wrong place or nothing predicted): a better outline cannot recover those.", ""]
    if overall["clean"] + overall["false alarm"]:
        lines += [f"Images without a tumor: {overall['clean']} clean, {overall['false alarm']} with a false alarm.", ""]
    return lines


def report_markdown(meta: dict, table: dict, breakdowns: dict[str, list[dict]], found: dict | None = None) -> str:
    """The Markdown report (module docstring)."""
    split = meta["split"]
    lines = [f"# Evaluation of `{meta['version']}` on {split['name']}", ""]
    if meta.get("tta") == "flip4":
        lines += ["**With test-time augmentation over four mirrorings** (as is, left-right, up-down, both; as workers "
                  "started with `INFER_TTA=flip4` serve).", ""]
    elif meta.get("tta"):
        lines += ["**With left-right flip test-time augmentation** (as workers started with `INFER_TTA=flip` serve).", ""]
    if meta.get("cpu_bf16"):
        lines += ["**Network in bf16 autocast on the CPU** (as workers started with `INFER_CPU_BF16=on` serve).", ""]
    lines += [
        f"- checkpoint: `{meta['checkpoint']}` ({meta['label']}); trained with config `{meta['training_config_name']}`"
        f" on split {meta['trained_on_split']}",
        f"- data: `{meta['data']}`, {table['n_images']} images ({table['n_positive']} with a tumor)",
        f"- split: {split['description']}",
        f"- threshold {meta['threshold']:.2f}: stored in the checkpoint"
        f"{' for TTA ' + meta['tta'] if meta.get('threshold_for_tta') else ''}, chosen on the validation split (when it was "
        "trained, or by `training.thresholds`); never chosen on the split scored here",
        f"- test-time augmentation: {meta.get('tta') or 'off'} (workers with `INFER_TTA=auto`, the default, serve this "
        f"checkpoint with {meta.get('recommended_tta', 'off')}; `--tta MODE` scores another mode)",
        f"- resolution: each image's original size, through the serving path (`Segmenter`, preprocessing size "
        f"{meta['size']}, postprocessing included)",
    ]
    if meta.get("overlap") is not None:
        lines.append(f"- images of this split that were in the checkpoint's training set: {meta['overlap']}")
    for warning in meta.get("warnings", []):
        lines.append(f"- **warning**: {warning}")
    if meta.get("license"):
        lines.append(f"- terms: {meta['license']}")
    lines += ["", "## Table 4.1: the thesis beside ours", "",
              "| metric | thesis (test, 187 images, image-level split) | ours, pooled over pixels | ours, mean per image |",
              "|---|---|---|---|"]
    for key in TABLE_ROWS:
        lines.append(f"| {ROW_NAMES[key]} | {_fmt(THESIS.get(key))} | {_fmt(table['pooled'][key])} | "
                     f"{_fmt(table['per_image'][key])} |")
    lines += [
        "",
        f"Mean Dice over images with a tumor: {_fmt(table['mean_dice_positive'])}. "
        f"2PR/(P+R) of our per-image mean precision and recall: {_fmt(table['per_image']['f1_of_means'])}.",
        "",
        "Notes on comparing:",
        "",
        "- Compare on Dice and tumor IoU. The thesis's \"pixel accuracy\" (0.7921) cannot be the plain pixel "
        "accuracy: background covers most of every radiograph, so any usable model scores 0.97-0.99 on it. "
        "Ours is the plain (tp + tn) / all pixels.",
        "- The thesis's F1 (0.5948) differs from its Dice (0.5633), which on pixels is impossible for one "
        "confusion matrix (F1 = Dice); it equals 2PR/(P+R) of its own precision and recall (0.5944), so its "
        "precision and recall are averages (over images or batches), not pooled pixels. Our per-image column is "
        "the closest like-for-like.",
        "- The thesis scored an image-level split: views of one patient can sit in both its training and test "
        "sets. On a grouped split no likely-patient group straddles two splits, so expect lower numbers there.",
        "- The thesis did not report its loss or mean IoU (n/a).",
        "- Loss: the checkpoint's training loss; it was trained on the form of the "
        + ("per-image column (Dice term per image, averaged)." if meta.get("loss_per_image") else
           "pooled column (Dice term pooled over each batch)."),
        "",
    ]
    if found:
        lines += detection_markdown(found)
    for title, rows in breakdowns.items():
        lines += [f"## By {title}", "", "| " + title + " | images | Dice (pooled) | tumor IoU | precision | recall | "
                  "mean Dice per image |", "|---|---|---|---|---|---|---|"]
        lines += [f"| {r['group']} | {r['n']} | {r['dice']:.4f} | {r['tumor_iou']:.4f} | {r['precision']:.4f} | "
                  f"{r['recall']:.4f} | {r['mean_dice']:.4f} |" for r in rows]
        lines.append("")
    if meta.get("examples"):
        lines += ["## Examples", "", f"![examples]({meta['examples']})", "",
                  "Rows from the best to the worst Dice: image, ground truth (green), probability, prediction (red).", ""]
    return "\n".join(lines)


def _tile(gray: np.ndarray, side: int) -> tuple[np.ndarray, float, int, int]:
    h, w = gray.shape[:2]
    scale = side / max(h, w)
    nh, nw = max(1, round(h * scale)), max(1, round(w * scale))
    return cv2.resize(gray, (nw, nh), interpolation=cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR), scale, nh, nw


def _outlined(image: np.ndarray, mask: np.ndarray, color: tuple[int, int, int]) -> np.ndarray:
    """Gray uint8 image -> BGR with ``mask`` lightly tinted and outlined in ``color`` (BGR)."""
    bgr = np.repeat(image[:, :, None], 3, axis=2)
    inside = mask != 0
    if inside.any():
        bgr[inside] = np.round(0.75 * bgr[inside] + 0.25 * np.asarray(color, np.float32)).astype(np.uint8)
        contours, _ = cv2.findContours(inside.astype(np.uint8), cv2.RETR_LIST, cv2.CHAIN_APPROX_NONE)
        cv2.drawContours(bgr, contours, -1, color, thickness=max(1, round(max(image.shape) / 256)))
    return bgr


def example_sheet(rows: list[dict], side: int = 192) -> np.ndarray:
    """(H, W, 3) BGR uint8 sheet, one row per dict (image: uint8 HxW, truth, prob, pred, title):
    image | ground truth (green) | probability (inferno colour map) | prediction (red)."""
    header = 18
    sheet_rows = []
    for row in rows:
        image = np.asarray(row["image"], np.uint8)
        heat = cv2.applyColorMap(np.round(np.clip(row["prob"], 0, 1) * 255).astype(np.uint8), cv2.COLORMAP_INFERNO)
        cells = []
        for picture in (np.repeat(image[:, :, None], 3, axis=2), _outlined(image, row["truth"], (0, 200, 0)), heat,
                        _outlined(image, row["pred"], (0, 0, 255))):
            small, _, nh, nw = _tile(np.ascontiguousarray(picture), side)
            cell = np.full((side, side, 3), 32, np.uint8)
            top, left = (side - nh) // 2, (side - nw) // 2
            cell[top : top + nh, left : left + nw] = small
            cells.append(cell)
        band = np.full((header, side * 4, 3), 255, np.uint8)
        cv2.putText(band, row["title"], (4, header - 5), cv2.FONT_HERSHEY_SIMPLEX, 0.42, (0, 0, 0), 1, cv2.LINE_AA)
        sheet_rows.append(np.vstack([band, np.hstack(cells)]))
    titles = np.full((header, side * 4, 3), 255, np.uint8)
    for i, name in enumerate(("image", "ground truth", "probability", "prediction")):
        cv2.putText(titles, name, (i * side + 4, header - 5), cv2.FONT_HERSHEY_SIMPLEX, 0.45, (0, 0, 0), 1, cv2.LINE_AA)
    return np.vstack([titles, *sheet_rows])


def pick_examples(results: list[ImageResult], n: int) -> list[ImageResult]:
    """``n`` results spread evenly from the best to the worst per-image Dice."""
    if n <= 0 or not results:
        return []
    ranked = sorted(results, key=lambda r: (-image_scores(r.counts)["dice"], r.image_id))
    idx = np.unique(np.round(np.linspace(0, len(ranked) - 1, min(n, len(ranked)))).astype(int))
    return [ranked[i] for i in idx]


def write_per_image_csv(path: Path, results: list[ImageResult]) -> None:
    fields = ["image_id", "tumor_type", "center", "view", "lesion_fraction", "size_bin", "outcome", "tp", "fp", "fn",
              "tn", "dice", "tumor_iou", "precision", "recall"]
    with open(path, "w", newline="") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(fields)
        for r in results:
            s = image_scores(r.counts)
            writer.writerow([r.image_id, r.tumor_type, r.center, r.view, f"{r.lesion_fraction:.6f}", r.size_bin,
                             detection_outcome(r.counts),
                             *r.counts, *(f"{s[k]:.6f}" for k in ("dice", "tumor_iou", "precision", "recall"))])


# ---------------------------------------------------------------- the command


def evaluate_checkpoint(checkpoint, data, split_file=None, split: str | None = None, out_dir=None, tta: bool | str = False,
                        examples: int = 8, device: str | None = None, batch_size: int | None = None, max_images: int = 0,
                        quiet: bool = False, cpu_bf16: bool = False) -> dict:
    """Everything ``main`` does; returns the metrics dict (also written to ``out_dir/metrics.json``).

    Raises:
        ValueError: ``split`` without a split file, or with one and not one of train/val/test; an empty selection.
    """
    from model.checkpoint import load_checkpoint
    from training.btxrd import load_image, load_mask, read_btxrd
    from training.split import SPLITS, assign, read_split_csv

    from model.inference import tta_mode

    say = (lambda *a: None) if quiet else (lambda *a: print(*a, flush=True))
    tta = tta_mode(tta)
    tta = None if tta == "off" else tta  # the mode's name, or None
    loaded = load_checkpoint(checkpoint)
    dataset = read_btxrd(data)
    warnings = []
    if split_file:
        if split not in SPLITS:
            raise ValueError(f"--split must be one of {SPLITS} with a split file, got {split!r}")
        sf = read_split_csv(split_file)
        parts, problems = assign(dataset.records, sf)
        records = parts[split]
        if problems:
            warnings.append(f"{len(problems)} images differ between the data and the split file "
                            f"(first: {problems[0][0]}: {problems[0][1]})")
        split_meta = {"name": f"the {split} split of {sf.name}", "file": sf.name, "sha256": sf.sha256, "split": split,
                      "description": f"`{split}` of {sf.describe()}"}
    else:
        if split not in (None, "all"):
            raise ValueError(f"--split {split} needs --split-file")
        records = dataset.records
        split_meta = {"name": f"all of {Path(data).name}", "file": None, "sha256": None, "split": "all",
                      "description": "every usable image of the folder (no split file)"}
    if max_images and len(records) > max_images:
        rng = np.random.default_rng(0)
        records = [records[i] for i in sorted(rng.choice(len(records), max_images, replace=False))]
        warnings.append(f"a seeded subset of {max_images} images (--max-images): a smoke check, not a result")
    if not records:
        raise ValueError("no images to evaluate in that selection")

    info = loaded.info
    trained_split = (info.get("data") or {}).get("split") or {}
    train_ids = set((info.get("data") or {}).get("train_ids") or [])
    overlap = None
    if train_ids:
        overlap = sum(r.image_id in train_ids for r in records)
        if overlap and not (split_meta["split"] == "train"):
            warnings.append(f"{overlap} of these {len(records)} images were in the checkpoint's training set: "
                            "these scores are not held-out scores")
    elif split_meta["split"] != "train":
        warnings.append("the checkpoint does not list its training images; cannot check that this split is held out")
    if split_meta["split"] == "test" and trained_split.get("sha256") and trained_split.get("sha256") != split_meta["sha256"]:
        warnings.append(f"the checkpoint was trained on split {trained_split.get('description')}, not on this file")

    out = Path(out_dir) if out_dir else Path("runs") / f"eval-{loaded.version}-{split_meta['split']}{'-' + tta if tta else ''}"
    out.mkdir(parents=True, exist_ok=True)
    say(f"scoring {len(records)} images ({split_meta['description']}) with {loaded.version}"
        f"{' and TTA ' + tta if tta else ''} ...")
    t0 = time.perf_counter()
    results = score_records(loaded, records, device=device, batch_size=batch_size, tta=tta, cpu_bf16=cpu_bf16)
    seconds = time.perf_counter() - t0
    loss = LossSpec.from_training_config(info.get("training_config"))
    table = table_metrics(results, loss)
    breakdowns = {title: breakdown(results, key) for title, key in BREAKDOWNS.items()}
    found = detection(results)

    example_name = None
    chosen = pick_examples(results, examples)
    if chosen:
        from model.inference import Segmenter

        by_id = {r.image_id: r for r in records}
        segmenter = Segmenter(loaded, device=device, batch_size=batch_size, flip_tta=tta, cpu_bf16=cpu_bf16)
        images = [load_image(by_id[c.image_id]) for c in chosen]
        rows = []
        for c, image, (prob, pred) in zip(chosen, images, predict(segmenter, images, tta)):
            rows.append({"image": image, "truth": load_mask(by_id[c.image_id], image.shape), "prob": prob, "pred": pred,
                         "title": f"{c.image_id}  {c.tumor_type}  Dice {image_scores(c.counts)['dice']:.3f}"})
        example_name = "examples.png"
        cv2.imwrite(str(out / example_name), example_sheet(rows))

    training_config = info.get("training_config") or {}
    meta = {
        "checkpoint": str(checkpoint), "version": loaded.version, "label": loaded.label,
        "training_config_name": training_config.get("config", "unknown"),
        "trained_on_split": trained_split.get("description", "unknown"),
        "data": str(data), "split": split_meta,
        "threshold": loaded.postprocessor_for(tta or "off").threshold,
        "threshold_for_tta": tta in loaded.postprocessors_tta, "recommended_tta": loaded.recommended_tta,
        "size": loaded.preprocessor.size, "tta": tta, "cpu_bf16": cpu_bf16, "loss_per_image": loss.per_image, "overlap": overlap, "warnings": warnings,
        "license": info.get("data_license"), "examples": example_name, "seconds": round(seconds, 1),
    }
    (out / "report.md").write_text(report_markdown(meta, table, breakdowns, found))
    write_per_image_csv(out / "per_image.csv", results)
    metrics = {"meta": meta, "table": table, "breakdowns": breakdowns, "detection": found, "thesis": THESIS}
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    for w in warnings:
        say(f"warning: {w}")
    pooled, per = table["pooled"], table["per_image"]
    say(f"{split_meta['description']}, TTA {tta or 'off'}: {len(results)} images in {seconds:.0f}s: Dice pooled {pooled['dice']:.4f} "
        f"(per image {per['dice']:.4f}), tumor IoU {pooled['tumor_iou']:.4f}, precision {pooled['precision']:.4f}, "
        f"recall {pooled['recall']:.4f}; thesis Dice {THESIS['dice']:.4f}")
    if found["n_positive"]:
        say(f"tumors found at all: {found['overall']['found']} of {found['n_positive']} images "
            f"({found['overall']['wrong place']} wrong place, {found['overall']['nothing predicted']} nothing predicted)")
    say(f"report: {out / 'report.md'}")
    return metrics


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m training.evaluate", description=__doc__.split("\n")[0])
    p.add_argument("checkpoint")
    p.add_argument("--data", required=True, help="folder in BTXRD's layout")
    p.add_argument("--split-file", help="split CSV (training/splits/...); without it every image is scored")
    p.add_argument("--split", choices=("train", "val", "test", "all"), help="which split of --split-file")
    p.add_argument("--out-dir", help="where report.md etc. go (default runs/eval-<version>-<split>)")
    p.add_argument("--tta", nargs="?", const="flip", choices=("flip", "flip4"), default=None,
                   help="test-time augmentation as workers run it with INFER_TTA=<mode>: flip (the default mode: "
                        "with a left-right mirrored pass) or flip4 (also up-down and both)")
    p.add_argument("--cpu-bf16", action="store_true", help="on a CPU, the network in bf16 autocast (what workers run "
                   "with INFER_CPU_BF16=on)")
    p.add_argument("--examples", type=int, default=8, help="rows in examples.png (0: none)")
    p.add_argument("--device", default=None)
    p.add_argument("--batch-size", type=int, default=None, help="forward batch (default: automatic, as the workers)")
    p.add_argument("--max-images", type=int, default=0, help="score a seeded subset (smoke checks)")
    args = p.parse_args(argv)
    if args.split_file and not args.split:
        p.error("--split-file needs --split train|val|test")
    import torch

    from bonedetect import allocator

    allocator.apply_from_env()  # ALLOCATOR, keep by default, as the workers: no page faults for each image's blocks
    torch.set_num_threads(os.cpu_count() or 1)
    evaluate_checkpoint(args.checkpoint, args.data, args.split_file, args.split, args.out_dir, args.tta, args.examples,
                        args.device, args.batch_size, args.max_images, cpu_bf16=args.cpu_bf16)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
