"""From a probability map to a clean binary tumor mask, and an overlay to look at.

All of it runs at the image's original resolution, after
``Geometry.restore``: small regions are measured against the real image area.
"""

from __future__ import annotations

import math

import cv2
import numpy as np

from model.preprocess import to_unit_float

OVERLAY_COLOR = (255, 0, 0)  # RGB red: stands out on a gray radiograph
OVERLAY_FILL_ALPHA = 0.25  # translucent fill inside the mask, so the bone stays visible


class Postprocessor:
    """Probability map -> uint8 {0, 1} mask.

    1. ``prob > threshold``.
    2. Drop 8-connected regions smaller than ``min_region_fraction`` of the
       image area (at least 1 pixel, so the default keeps everything on tiny
       images): isolated speckles are not tumors.
    3. Fill holes (background not 4-connected to the border), when
       ``fill_holes``: a tumor region is solid on a radiograph.

    Args:
        threshold: decision threshold on the probability, in (0, 1); stored in
            the checkpoint, chosen on validation data.
        min_region_fraction: smallest kept region as a fraction of H * W, in [0, 1).
        fill_holes: fill enclosed background.
    """

    def __init__(self, threshold: float = 0.5, min_region_fraction: float = 1e-4, fill_holes: bool = True):
        if not 0.0 < threshold < 1.0:
            raise ValueError(f"threshold must be in (0, 1), got {threshold!r}")
        if not 0.0 <= min_region_fraction < 1.0:
            raise ValueError(f"min_region_fraction must be in [0, 1), got {min_region_fraction!r}")
        self.threshold = float(threshold)
        self.min_region_fraction = float(min_region_fraction)
        self.fill_holes = bool(fill_holes)

    def __call__(self, prob: np.ndarray) -> np.ndarray:
        prob = np.asarray(prob)
        if prob.ndim != 2 or prob.size == 0:
            raise ValueError(f"expected a non-empty (H, W) probability map, got shape {prob.shape}")
        above = (prob > self.threshold).view(np.uint8)
        return clean_regions(above, max(1, math.ceil(self.min_region_fraction * above.size)), self.fill_holes)

    def as_dict(self) -> dict:
        return {"threshold": self.threshold, "min_region_fraction": self.min_region_fraction, "fill_holes": self.fill_holes}

    def __repr__(self) -> str:
        return f"Postprocessor(threshold={self.threshold}, min_region_fraction={self.min_region_fraction}, fill_holes={self.fill_holes})"


# Up to this many labels (background included) they are counted and dropped through 8-bit copies of
# the labels (counted as below, dropped by OpenCV's lookup table); beyond, numpy's bincount and take on
# the 32-bit labels.
LUT_LABELS = 256
# Up to this many labels (background included: 16 regions) each region's pixels are counted by a
# comparison of its own over the 8-bit copy (count_each), at any size; with more, by OpenCV's histogram
# (count_by_histogram). 17 is the break-even on an Intel Xeon with AMX (clean_regions).
FEW_LABELS = 17
# calcHist counts in float32, exact up to 2**24 pixels; a larger mask with more than FEW_LABELS labels
# is counted by bincount.
EXACT_HIST_PIXELS = 1 << 24


def clean_regions(mask: np.ndarray, min_area: int, fill: bool = True) -> np.ndarray:
    """``remove_small_regions(mask, min_area)``, then ``fill_holes`` when
    ``fill``: the same {0, 1} mask, from one labelling.

    OpenCV's BBDT labelling without statistics, then each label's area
    counted apart: with statistics (boxes and centroids, which OpenCV
    computes per pixel in doubles) the labelling cost 3-3.5x as much; on
    the windows of a trained network's masks at 3000x2500 (one Zen 3 core)
    3.3 -> 1.5 ms per image for the served model and 22.6 -> ~9 ms for the
    full-size network at 512. A window usually holds a handful of regions
    (``LUT_LABELS``), so the areas and the kept pixels come from 8-bit
    copies of the labels. Up to ``FEW_LABELS`` labels each region's pixels
    are counted by a comparison of its own (``count_each``: ~0.12 ns per
    pixel and region, streamed); above, by OpenCV's ``calcHist``
    (``count_by_histogram``), which adds one to the same bin for every
    pixel of a run, each add waiting for the one before: ~2 ns a pixel on
    an Intel Xeon with AMX (2.6x the labelling), though faster on the Zen
    3 where it was chosen. The small regions go through OpenCV's ``LUT``.
    numpy's ``bincount`` and ``take`` on 32-bit labels (several ns a pixel)
    remain for masks with more regions. Then one flood fill of the
    background from the border fills the holes.
    """
    m = np.ascontiguousarray(np.asarray(mask) != 0).view(np.uint8)  # any nonzero value is foreground
    if m.size == 0:
        return m  # no pixels: nothing to label (OpenCV refuses an empty image)
    if min_area <= 1:
        return _fill_binary(m) if fill else m
    n, labels = cv2.connectedComponentsWithAlgorithm(m, 8, cv2.CV_32S, cv2.CCL_BBDT)  # n counts the background
    if n <= 1:
        return m  # nothing to keep or fill
    if n <= LUT_LABELS and (n <= FEW_LABELS or m.size <= EXACT_HIST_PIXELS):
        small_labels = labels.astype(np.uint8)  # exact: every label is below 256
        areas = count_each(small_labels, n) if n <= FEW_LABELS else count_by_histogram(small_labels, n)
        keep = areas >= min_area
        keep[0] = False  # label 0 is the background
        if not keep[1:].all():
            table = np.zeros(256, np.uint8)
            table[:n] = keep
            m = cv2.LUT(small_labels, table)
    else:
        keep = np.bincount(labels.ravel(), minlength=n) >= min_area
        keep[0] = False
        if not keep[1:].all():
            m = np.take(keep.view(np.uint8), labels)
    return _fill_binary(m) if fill else m


def count_each(labels: np.ndarray, n: int) -> np.ndarray:
    """Pixels of each label 1..n-1 of uint8 ``labels``, one comparison per label (int64; [0] is 0)."""
    same = np.empty(labels.shape, np.bool_)
    areas = np.zeros(n, np.int64)
    for label in range(1, n):
        areas[label] = np.count_nonzero(np.equal(labels, label, out=same))
    return areas


def count_by_histogram(labels: np.ndarray, n: int) -> np.ndarray:
    """Pixels of each label 0..n-1 of uint8 ``labels`` (int64), by OpenCV's histogram (exact up to
    ``EXACT_HIST_PIXELS``)."""
    # int64 before comparing: in float32 a min_area above 2**24 could round down
    return cv2.calcHist([labels], [0], None, [n], [0, n]).ravel().astype(np.int64)


def remove_small_regions(mask: np.ndarray, min_area: int) -> np.ndarray:
    """Keep the 8-connected regions of ``mask`` with at least ``min_area``
    pixels, as a {0, 1} uint8 mask (``clean_regions`` without the fill)."""
    return clean_regions(mask, min_area, fill=False)


def fill_holes(mask: np.ndarray) -> np.ndarray:
    """Set to 1 every background pixel not 4-connected to the image border
    (4-connected background is the complement of 8-connected foreground)."""
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise ValueError(f"expected an (H, W) mask, got shape {mask.shape}")
    return _fill_binary((mask != 0).view(np.uint8))


def _fill_binary(mask: np.ndarray) -> np.ndarray:
    """``fill_holes`` of a {0, 1} uint8 (H, W) mask."""
    if mask.size == 0:
        return mask.copy()
    padded = cv2.copyMakeBorder(mask, 1, 1, 1, 1, cv2.BORDER_CONSTANT, value=0)  # a background ring joins every border pixel
    cv2.floodFill(padded, None, (0, 0), 2, flags=4)  # the background reached from the border -> 2
    return np.not_equal(padded[1:-1, 1:-1], 2).view(np.uint8)


def render_overlay(pixels: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Gray radiograph and its mask -> (H, W, 3) uint8 RGB: the image in gray,
    the tumor lightly tinted and outlined in red (line width grows with the
    image, about 1/256 of the long side).

    8-bit input is used as it is (``to_unit_float`` and back would give the
    same bytes), and the tint and the outline touch only the tumor's bounding
    box: on a 3000 x 2500 radiograph this is ~10 ms instead of ~55.
    """
    pixels = np.asarray(pixels)
    if pixels.ndim == 3 and pixels.shape[2] == 1:
        pixels = pixels[:, :, 0]
    if pixels.dtype == np.uint8 and pixels.ndim == 2 and pixels.size:
        gray = np.ascontiguousarray(pixels)
    else:
        gray = np.round(to_unit_float(pixels) * 255).astype(np.uint8)
    mask = np.asarray(mask)
    if mask.shape != gray.shape:
        raise ValueError(f"mask shape {mask.shape} does not match image shape {gray.shape}")
    rgb = cv2.cvtColor(gray, cv2.COLOR_GRAY2RGB)  # (H, W, 3)
    inside = mask != 0
    x0, y0, bw, bh = cv2.boundingRect(inside.view(np.uint8))
    if bw == 0:
        return rgb
    box = (slice(y0, y0 + bh), slice(x0, x0 + bw))
    inside_box, rgb_box = inside[box], rgb[box]
    color = np.asarray(OVERLAY_COLOR, np.float32)
    rgb_box[inside_box] = np.round((1 - OVERLAY_FILL_ALPHA) * rgb_box[inside_box] + OVERLAY_FILL_ALPHA * color).astype(np.uint8)
    contours, _ = cv2.findContours(inside_box.astype(np.uint8), cv2.RETR_LIST, cv2.CHAIN_APPROX_NONE, offset=(x0, y0))
    thickness = max(1, round(max(gray.shape) / 256))
    cv2.drawContours(rgb, contours, -1, OVERLAY_COLOR, thickness=thickness)
    return rgb
