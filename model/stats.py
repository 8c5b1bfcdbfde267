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
    mask: np.ndarray, prob: np.ndarray | None, pixel_spacing_mm: tuple[float, float] | None = None
) -> TumorStats:
    """Measure the tumor in ``mask``.

    Args:
        mask: (H, W), nonzero = tumor, at the original resolution.
        prob: (H, W) probability map the mask came from, or None (e.g. for a
            ground-truth mask): then prob_max and prob_mean are None.
        pixel_spacing_mm: (row spacing, column spacing) in mm; area_mm2 is
            ``area_px * row * col`` (0.0 for an empty mask), None without it.
    """
    mask = np.asarray(mask)
    if mask.ndim != 2 or mask.size == 0:
        raise ValueError(f"expected a non-empty (H, W) mask, got shape {mask.shape}")
    if prob is not None and np.shape(prob) != mask.shape:
        raise ValueError(f"prob shape {np.shape(prob)} does not match mask shape {mask.shape}")
    row_mm = col_mm = None
    if pixel_spacing_mm is not None:
        row_mm, col_mm = (float(s) for s in pixel_spacing_mm)
        if not all(math.isfinite(s) and s > 0 for s in (row_mm, col_mm)):
            raise ValueError(f"pixel_spacing_mm must be two positive numbers, got {pixel_spacing_mm!r}")

    # Everything below looks only inside the bounding box of the tumor pixels:
    # on a 3000 x 2500 radiograph the whole-image passes (nonzero, labelling,
    # a float64 copy of the probability map) cost 30-70 ms, the box a few.
    # Area and centroid come from the tumor pixels per row and per column
    # (integer sums, so the same numbers as counting the pixels and averaging
    # their coordinates), and the probabilities are read through the mask:
    # no list of tumor pixels is ever made, which on a mask speckled over the
    # whole image (an untrained network) costs 24 ms instead of 160 (one AVX2 core).
    inside = (mask != 0).view(np.uint8)
    x0, y0, bw, bh = cv2.boundingRect(inside)
    area_mm2_of = (lambda area: None) if row_mm is None else (lambda area: area * row_mm * col_mm)
    if bw == 0:
        return TumorStats(False, 0, 0.0, area_mm2_of(0), None, None, None, None, None, None, 0, None, None)
    box = (slice(y0, y0 + bh), slice(x0, x0 + bw))
    inside_box = inside[box]
    per_col = cv2.reduce(inside_box, 0, cv2.REDUCE_SUM, dtype=cv2.CV_32S).ravel().astype(np.int64)
    per_row = cv2.reduce(inside_box, 1, cv2.REDUCE_SUM, dtype=cv2.CV_32S).ravel().astype(np.int64)
    area = int(per_col.sum())
    sum_x = int(per_col @ np.arange(x0, x0 + bw, dtype=np.int64))
    sum_y = int(per_row @ np.arange(y0, y0 + bh, dtype=np.int64))
    n_labels, _ = cv2.connectedComponentsWithAlgorithm(inside_box, 8, cv2.CV_32S, cv2.CCL_BBDT)  # as remove_small_regions
    prob_max = prob_mean = None
    if prob is not None:
        prob_box = np.asarray(prob)[box]
        if prob_box.dtype not in (np.float32, np.float64):
            prob_box = prob_box.astype(np.float32)
        # zero outside the mask, then whole-array passes: on the bench's random-network masks 14 ms against
        # 25 for OpenCV's masked minMaxLoc and mean (one core)
        masked = cv2.copyTo(prob_box, inside_box)
        prob_max = float(masked.max())
        if prob_max <= 0:  # the mask's maximum could be below the zeros outside it
            prob_max = float(cv2.minMaxLoc(prob_box, inside_box)[1])
        prob_mean = cv2.sumElems(masked)[0] / area  # summed in double: cv2.mean's value to ~1e-14
    return TumorStats(
        tumor_detected=True,
        area_px=area,
        area_fraction=area / mask.size,
        area_mm2=area_mm2_of(area),
        bbox_x=x0,
        bbox_y=y0,
        bbox_w=bw,
        bbox_h=bh,
        centroid_x=sum_x / area,  # exact sums, one correctly rounded division: as numpy's mean of the coordinates
        centroid_y=sum_y / area,
        n_regions=int(n_labels) - 1,
        prob_max=prob_max,
        prob_mean=prob_mean,
    )
