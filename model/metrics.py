"""Binary segmentation metrics (numpy), per image and pooled.

Masks are any arrays of the same shape; nonzero = tumor. Every score comes
from the confusion counts (tp, fp, fn, tn). Conventions for empty masks,
where a ratio would be 0/0:

- dice, iou, f1: 1.0 when prediction and target are both empty (a normal image
  correctly left empty is a perfect result), else the usual ratio (0.0 when
  exactly one is empty).
- precision (tp / (tp + fp)) with nothing predicted: 1.0 if the target is
  empty too, else 0.0.
- recall (tp / (tp + fn)) with an empty target: 1.0 if nothing was
  predicted, else 0.0.
- pixel_accuracy: (tp + tn) / all pixels; it is dominated by background on
  radiographs (0.97-0.99 for any reasonable model), so compare on dice and iou.

On pixels, f1 equals dice (2PR / (P + R) = 2tp / (2tp + fp + fn)); both are
kept because reports name both.

"Pooled" scores sum the confusion counts over a whole set first (one big
image); "mean" scores average the per-image scores. ``MetricAccumulator``
gives both.
"""

from __future__ import annotations

import numpy as np

SCORE_NAMES = ("dice", "iou", "precision", "recall", "f1", "pixel_accuracy")


def _pair(pred, target) -> tuple[np.ndarray, np.ndarray]:
    pred, target = np.asarray(pred), np.asarray(target)
    if pred.shape != target.shape:
        raise ValueError(f"pred shape {pred.shape} does not match target shape {target.shape}")
    if pred.size == 0:
        raise ValueError(f"empty masks of shape {pred.shape}")
    return pred != 0, target != 0


def confusion(pred, target) -> tuple[int, int, int, int]:
    """(tp, fp, fn, tn) pixel counts as Python ints."""
    p, t = _pair(pred, target)
    tp = int(np.count_nonzero(p & t))
    fp = int(np.count_nonzero(p)) - tp
    fn = int(np.count_nonzero(t)) - tp
    return tp, fp, fn, p.size - tp - fp - fn


def batch_confusion(pred, target) -> np.ndarray:
    """(N, ...) masks -> (N, 4) int64 array of (tp, fp, fn, tn) per image."""
    p, t = _pair(pred, target)
    if p.ndim < 2:
        raise ValueError(f"expected (N, ...) masks, got shape {p.shape}")
    p, t = p.reshape(len(p), -1), t.reshape(len(t), -1)
    tp = np.count_nonzero(p & t, axis=1)
    fp = np.count_nonzero(p, axis=1) - tp
    fn = np.count_nonzero(t, axis=1) - tp
    tn = p.shape[1] - tp - fp - fn
    return np.stack([tp, fp, fn, tn], axis=1).astype(np.int64)


def _ratio(num: int, den: int, empty: float) -> float:
    return num / den if den else empty


def scores_from_confusion(tp: int, fp: int, fn: int, tn: int) -> dict[str, float]:
    """All of SCORE_NAMES from confusion counts (module docstring: conventions)."""
    tp, fp, fn, tn = int(tp), int(fp), int(fn), int(tn)
    both_empty = tp + fp + fn == 0
    dice_ = _ratio(2 * tp, 2 * tp + fp + fn, 1.0)
    return {
        "dice": dice_,
        "iou": _ratio(tp, tp + fp + fn, 1.0),
        "precision": _ratio(tp, tp + fp, 1.0 if fn == 0 else 0.0),
        "recall": _ratio(tp, tp + fn, 1.0 if fp == 0 else 0.0),
        "f1": dice_,
        "pixel_accuracy": _ratio(tp + tn, tp + fp + fn + tn, 1.0 if both_empty else 0.0),
    }


def scores(pred, target) -> dict[str, float]:
    """All of SCORE_NAMES for one pair of masks."""
    return scores_from_confusion(*confusion(pred, target))


def dice(pred, target) -> float:
    return scores(pred, target)["dice"]


def iou(pred, target) -> float:
    return scores(pred, target)["iou"]


def precision(pred, target) -> float:
    return scores(pred, target)["precision"]


def recall(pred, target) -> float:
    return scores(pred, target)["recall"]


def f1(pred, target) -> float:
    return scores(pred, target)["f1"]


def pixel_accuracy(pred, target) -> float:
    return scores(pred, target)["pixel_accuracy"]


class MetricAccumulator:
    """Collects confusion counts image by image; ``summary()`` reports

    - pooled scores (``dice``, ``iou``, ... over the summed counts),
    - per-image means over all images (``mean_dice``, ...; an image where
      both masks are empty scores 1.0),
    - per-image means over images whose target has a tumor
      (``mean_dice_positive``, ...; None when there is none),
    - ``n_images`` and ``n_positive``.
    """

    def __init__(self):
        self.rows: list[tuple[int, int, int, int]] = []

    def update(self, pred, target) -> dict[str, float]:
        """Add one image; returns its scores."""
        row = confusion(pred, target)
        self.rows.append(row)
        return scores_from_confusion(*row)

    def update_batch(self, pred, target) -> list[dict[str, float]]:
        """Add N images stacked along the first axis; returns their scores."""
        rows = [tuple(int(v) for v in r) for r in batch_confusion(pred, target)]
        self.rows.extend(rows)
        return [scores_from_confusion(*r) for r in rows]

    def summary(self) -> dict:
        if not self.rows:
            raise ValueError("no images were added")
        counts = np.asarray(self.rows, np.int64)  # (N, 4)
        per_image = [scores_from_confusion(*r) for r in self.rows]
        positive = [s for s, r in zip(per_image, self.rows) if r[0] + r[2] > 0]  # tp + fn > 0
        out: dict = scores_from_confusion(*counts.sum(axis=0))
        for name in SCORE_NAMES:
            out[f"mean_{name}"] = float(np.mean([s[name] for s in per_image]))
            out[f"mean_{name}_positive"] = float(np.mean([s[name] for s in positive])) if positive else None
        out["n_images"], out["n_positive"] = len(self.rows), len(positive)
        return out
