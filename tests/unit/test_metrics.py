"""Segmentation metrics against hand-computed cases and an independent
implementation on sets of pixel indices."""

import numpy as np
import pytest

from model import metrics
from model.metrics import MetricAccumulator, batch_confusion, confusion, scores


def reference(pred, target) -> dict:
    """The same definitions, written on Python sets of flat pixel indices."""
    P = {int(i) for i in np.flatnonzero(pred)}
    T = {int(i) for i in np.flatnonzero(target)}
    n = pred.size
    tp, fp, fn = len(P & T), len(P - T), len(T - P)
    tn = n - len(P | T)
    both_empty = not P and not T
    return {
        "confusion": (tp, fp, fn, tn),
        "dice": 1.0 if both_empty else 2 * len(P & T) / (len(P) + len(T)),
        "iou": 1.0 if both_empty else len(P & T) / len(P | T),
        "precision": (1.0 if not T else 0.0) if not P else len(P & T) / len(P),
        "recall": (1.0 if not P else 0.0) if not T else len(P & T) / len(T),
        "pixel_accuracy": (n - len(P ^ T)) / n,
    }


@pytest.mark.parametrize("seed", range(40))
def test_matches_set_based_reference_on_random_masks(seed):
    rng = np.random.default_rng(seed)
    shape = tuple(rng.integers(1, 40, size=2))
    pred = rng.random(shape) < rng.random()
    target = (rng.random(shape) < rng.random()).astype(np.uint8) * 255  # nonzero = tumor
    ref = reference(pred, target)
    assert confusion(pred, target) == ref["confusion"]
    got = scores(pred, target)
    for name in ("dice", "iou", "precision", "recall", "pixel_accuracy"):
        assert abs(got[name] - ref[name]) <= 1e-12, name
        assert abs(getattr(metrics, name)(pred, target) - ref[name]) <= 1e-12, name
    assert got["f1"] == got["dice"]
    p, r = ref["precision"], ref["recall"]
    if p + r > 0 and pred.any() and target.any():
        assert abs(got["f1"] - 2 * p * r / (p + r)) <= 1e-12


def test_hand_computed_case():
    pred = np.array([[1, 1, 0], [0, 1, 0]])
    target = np.array([[1, 0, 0], [0, 1, 1]])
    assert confusion(pred, target) == (2, 1, 1, 2)
    s = scores(pred, target)
    assert s["dice"] == 4 / 6 and s["iou"] == 2 / 4
    assert s["precision"] == 2 / 3 and s["recall"] == 2 / 3
    assert s["pixel_accuracy"] == 4 / 6


def test_empty_mask_conventions():
    empty, one = np.zeros((3, 3)), np.eye(3)
    assert scores(empty, empty) == {"dice": 1.0, "iou": 1.0, "precision": 1.0, "recall": 1.0, "f1": 1.0, "pixel_accuracy": 1.0}
    missed = scores(empty, one)  # tumor missed entirely
    assert (missed["dice"], missed["iou"], missed["precision"], missed["recall"]) == (0.0, 0.0, 0.0, 0.0)
    false_alarm = scores(one, empty)  # tumor called on a normal image
    assert (false_alarm["dice"], false_alarm["precision"], false_alarm["recall"]) == (0.0, 0.0, 0.0)
    assert false_alarm["pixel_accuracy"] == 6 / 9


def test_batch_confusion_matches_per_image():
    rng = np.random.default_rng(7)
    pred, target = rng.random((5, 16, 12)) < 0.3, rng.random((5, 16, 12)) < 0.4
    rows = batch_confusion(pred, target)
    assert rows.shape == (5, 4)
    for i in range(5):
        assert tuple(rows[i]) == confusion(pred[i], target[i])


def test_accumulator_pools_counts_and_averages_images():
    acc = MetricAccumulator()
    a_pred, a_true = np.array([[1, 1], [0, 0]]), np.array([[1, 0], [0, 0]])  # dice 2/3
    acc.update(a_pred, a_true)
    acc.update_batch(np.zeros((1, 2, 2)), np.zeros((1, 2, 2)))  # normal image, left empty: dice 1
    s = acc.summary()
    assert s["n_images"] == 2 and s["n_positive"] == 1
    assert s["dice"] == 2 / 3  # pooled: the empty image adds only true negatives
    assert s["mean_dice"] == pytest.approx((2 / 3 + 1) / 2)
    assert s["mean_dice_positive"] == pytest.approx(2 / 3)
    assert s["pixel_accuracy"] == 7 / 8


def test_mismatched_or_empty_inputs_raise():
    with pytest.raises(ValueError, match=r"\(2, 3\).*\(3, 2\)"):
        confusion(np.zeros((2, 3)), np.zeros((3, 2)))
    with pytest.raises(ValueError, match="empty"):
        confusion(np.zeros((0, 3)), np.zeros((0, 3)))
    with pytest.raises(ValueError, match="no images"):
        MetricAccumulator().summary()
