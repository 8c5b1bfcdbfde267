"""Tumor statistics of one mask, at the image's original resolution.

Plain Python numbers only (no numpy scalars), so a ``TumorStats`` can go
straight into a database row or JSON.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import cv2
import numpy as np


@dataclass
class TumorStats:
    tumor_detected: bool
    area_px: int
    area_fraction: float  # area_px / (H * W)
    area_mm2: float | None  # None without pixel spacing; "mm at the detector" for ImagerPixelSpacing
    bbox_x: int | None  # bounding box of all tumor pixels: left column,
    bbox_y: int | None  # top row,
    bbox_w: int | None  # width and height in pixels
    bbox_h: int | None
    centroid_x: float | None  # mean column of the tumor pixels
    centroid_y: float | None  # mean row
    n_regions: int  # 8-connected regions
    prob_max: float | None  # over the mask; None when the mask is empty or prob not given
    prob_mean: float | None

    def as_dict(self) -> dict:
        return asdict(self)


def tumor_statistics(
    mask: np.ndarray,
    prob: np.ndarray | None,
    pixel_spacing_mm: tuple[float, float] | None = None,
    windows: list[tuple[int, int, int, int]] | None = None,
    window_probs: list[np.ndarray] | None = None,
    hole_free: bool = False,
    window_regions: list[int | None] | None = None,
    zero_one: bool = False,
) -> TumorStats:
    """Measure the tumor in ``mask``.

    Args:
        mask: (H, W), nonzero = tumor, at the original resolution.
        prob: (H, W) probability map the mask came from, or None (e.g. for a
            ground-truth mask): then prob_max and prob_mean are None.
        pixel_spacing_mm: (row spacing, column spacing) in mm; area_mm2 is
            ``area_px * row * col`` (0.0 for an empty mask), None without it.
        windows: disjoint (top, bottom, left, right) boxes that hold every
            tumor pixel, no 8-connected region in two
            (``Prediction.windows``, from ``model.inference.windows``): then
            only they are read, and the same numbers come out (prob_mean to
            ~1e-16: the windows' sums are added apart). None: the tumor's
            bounding box.
        window_probs: with ``windows`` and no ``prob``, the probabilities
            inside each window (``Prediction.window_probs``), one array of
            the window's shape each: the same numbers as from the full map.
        hole_free: the mask has no holes (a ``Postprocessor`` that fills
            them made it): its regions are counted by their outer borders
            (``cv2.findContours``), 3-4x faster than labelling them; with
            holes a region inside another's hole would not be counted.
        window_regions: with ``windows``, the 8-connected regions of the
            mask in each window where the caller knows them (the clean-up
            that made it, ``Prediction.window_regions``), None where it does
            not: those are counted here.
        zero_one: the mask holds only 0s and 1s (a ``Postprocessor``'s): it
            is read as it is, not compared with 0 first.
    """
    mask = np.asarray(mask)
    if mask.ndim != 2 or mask.size == 0:
        raise ValueError(f"expected a non-empty (H, W) mask, got shape {mask.shape}")
    if prob is not None and np.shape(prob) != mask.shape:
        raise ValueError(f"prob shape {np.shape(prob)} does not match mask shape {mask.shape}")
    if window_regions is not None and (windows is None or len(window_regions) != len(windows)):
        raise ValueError("window_regions needs windows, and one count (or None) per window")
    if window_probs is not None:
        if prob is not None or windows is None or len(window_probs) != len(windows) or any(
                np.shape(p) != (b - t, r - l) for p, (t, b, l, r) in zip(window_probs, windows)):
            raise ValueError("window_probs needs windows, no prob, and one array of each window's shape")
    row_mm = col_mm = None
    if pixel_spacing_mm is not None:
        row_mm, col_mm = (float(s) for s in pixel_spacing_mm)
        if not all(math.isfinite(s) and s > 0 for s in (row_mm, col_mm)):
            raise ValueError(f"pixel_spacing_mm must be two positive numbers, got {pixel_spacing_mm!r}")

    # Everything below looks only inside the bounding box of the tumor pixels
    # (or inside each window): on a 3000 x 2500 radiograph the whole-image
    # passes (nonzero, labelling, a float64 copy of the probability map) cost
    # 30-70 ms, the box a few.
    # Area and centroid come from the tumor pixels per row and per column
    # (integer sums, so the same numbers as counting the pixels and averaging
    # their coordinates), and the probabilities are read through the mask:
    # no list of tumor pixels is ever made, which on a mask speckled over the
    # whole image (an untrained network) costs 24 ms instead of 160 (one AVX2 core).
    if windows is None:
        parts = [_box_sums(mask, prob, (0, mask.shape[0], 0, mask.shape[1]), hole_free=hole_free, zero_one=zero_one)]
    else:
        probs = window_probs if window_probs is not None else [prob] * len(windows)
        counted = window_regions if window_regions is not None else [None] * len(windows)
        parts = [_box_sums(mask, p, w, windowed=window_probs is not None, hole_free=hole_free, regions=n, zero_one=zero_one)
                 for p, w, n in zip(probs, windows, counted)]
    parts = [p for p in parts if p is not None]
    area_mm2_of = (lambda area: None) if row_mm is None else (lambda area: area * row_mm * col_mm)
    if not parts:
        return TumorStats(False, 0, 0.0, area_mm2_of(0), None, None, None, None, None, None, 0, None, None)
    area = sum(p.area for p in parts)
    x0, y0 = min(p.x0 for p in parts), min(p.y0 for p in parts)
    x1, y1 = max(p.x1 for p in parts), max(p.y1 for p in parts)
    prob_max = prob_mean = None
    if prob is not None or window_probs is not None:
        prob_max = max(p.prob_max for p in parts)
        prob_mean = math.fsum(p.prob_sum for p in parts) / area if len(parts) > 1 else parts[0].prob_sum / area
    return TumorStats(
        tumor_detected=True,
        area_px=area,
        area_fraction=area / mask.size,
        area_mm2=area_mm2_of(area),
        bbox_x=x0,
        bbox_y=y0,
        bbox_w=x1 - x0,
        bbox_h=y1 - y0,
        # exact sums, one correctly rounded division: as numpy's mean of the coordinates
        centroid_x=sum(p.sum_x for p in parts) / area,
        centroid_y=sum(p.sum_y for p in parts) / area,
        n_regions=sum(p.regions for p in parts),
        prob_max=prob_max,
        prob_mean=prob_mean,
    )


@dataclass
class _Sums:
    area: int
    x0: int  # the tumor pixels' bounding box, half-open
    y0: int
    x1: int
    y1: int
    sum_x: int
    sum_y: int
    regions: int
    prob_max: float | None
    prob_sum: float | None


# The probabilities inside the mask are summed and their maximum found this many pixels at a time: a masked copy
# of a band stays in the core's cache for the two passes over it (a trained network's windows, Zen 4 core: 1.36 ->
# 1.14 ms per image against one copy of the whole box)
PROB_BAND_PIXELS = 1 << 17


def _box_sums(mask: np.ndarray, prob: np.ndarray | None, window: tuple[int, int, int, int],
              windowed: bool = False, hole_free: bool = False, regions: int | None = None,
              zero_one: bool = False) -> _Sums | None:
    """The additive parts of the statistics of the tumor pixels inside ``window``; None when it has none.
    ``windowed``: ``prob`` holds the window's probabilities only (its top left corner is the window's).
    ``hole_free``, ``zero_one``: as ``tumor_statistics`` has them; ``regions``: the window's regions, when
    the caller knows them."""
    top, bottom, left, right = window
    inside = mask[top:bottom, left:right] if zero_one else (mask[top:bottom, left:right] != 0).view(np.uint8)
    bx, by, bw, bh = cv2.boundingRect(inside)
    if bw == 0:
        return None
    x0, y0 = left + bx, top + by
    box = (slice(y0, y0 + bh), slice(x0, x0 + bw))
    inside_box = inside[by : by + bh, bx : bx + bw]
    per_col = cv2.reduce(inside_box, 0, cv2.REDUCE_SUM, dtype=cv2.CV_32S).ravel().astype(np.int64)
    per_row = cv2.reduce(inside_box, 1, cv2.REDUCE_SUM, dtype=cv2.CV_32S).ravel().astype(np.int64)
    area = int(per_col.sum())
    if regions is not None:
        pass  # counted by the clean-up that made the mask
    elif hole_free:  # one outer border per 8-connected region (findContours follows 8-connected borders)
        regions = len(cv2.findContours(inside_box, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)[0])
    else:
        regions = cv2.connectedComponentsWithAlgorithm(inside_box, 8, cv2.CV_32S, cv2.CCL_BBDT)[0] - 1  # as clean_regions
    prob_max = prob_sum = None
    if prob is not None:
        prob_box = np.asarray(prob)[(slice(by, by + bh), slice(bx, bx + bw)) if windowed else box]
        if prob_box.dtype not in (np.float32, np.float64):
            prob_box = prob_box.astype(np.float32)
        # zero outside the mask, then whole-array passes: on the bench's random-network masks 14 ms against
        # 25 for OpenCV's masked minMaxLoc and mean (one core); a band at a time (PROB_BAND_PIXELS)
        rows = max(1, PROB_BAND_PIXELS // bw)
        maxima, prob_sum = [], 0.0
        for y in range(0, bh, rows):
            masked = cv2.copyTo(prob_box[y : y + rows], inside_box[y : y + rows])
            maxima.append(masked.max())
            prob_sum += cv2.sumElems(masked)[0]  # summed in double: cv2.mean's value to ~1e-14
        prob_max = float(np.max(maxima))  # a NaN in the mask is reported, as numpy's max of the whole box did
        if prob_max <= 0:  # the mask's maximum could be below the zeros outside it
            prob_max = float(cv2.minMaxLoc(prob_box, inside_box)[1])
    return _Sums(
        area=area, x0=x0, y0=y0, x1=x0 + bw, y1=y0 + bh,
        sum_x=int(per_col @ np.arange(x0, x0 + bw, dtype=np.int64)),
        sum_y=int(per_row @ np.arange(y0, y0 + bh, dtype=np.int64)),
        regions=int(regions), prob_max=prob_max, prob_sum=prob_sum,
    )
