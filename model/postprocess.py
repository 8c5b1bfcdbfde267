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


# Up to this many labels (background included) a mask's regions may be counted through an 8-bit copy of
# the labels (count_each): a bound for exactness; by the costs below count_each wins only below ~50 labels.
LUT_LABELS = 256
# What the two ways of counting cost, in ns per pixel of the mask (an Intel Xeon with AMX, 2026-12-07, one
# core; bincount and OpenCV's histogram of every pixel, used before, cost 2-5 ns a pixel there): count_each
# ~0.12 per region (a comparison each) plus ~0.3 more than keep_by_gather for the 8-bit copy and the lookup
# table; keep_by_gather ~4-7 per marked pixel (numpy's boolean gather and scatter, bincount of the gathered
# labels: 4 on solid disks, 7 on a trained network's windows; 6 puts the choice within 1.3x of the faster
# way on both kinds). clean_regions takes the cheaper: one by one for a window of a few solid regions,
# gathered for specks (a random network's: hundreds to thousands in a window, a few percent of it marked).
EACH_NS_PER_REGION = 0.12
EACH_NS_EXTRA = 0.3
GATHER_NS_PER_MARKED = 6.0


def clean_regions(mask: np.ndarray, min_area: int, fill: bool = True) -> np.ndarray:
    """``remove_small_regions(mask, min_area)``, then ``fill_holes`` when
    ``fill``: the same {0, 1} mask, from one labelling.

    OpenCV's BBDT labelling without statistics, then each label's area
    counted apart: with statistics (boxes and centroids, which OpenCV
    computes per pixel in doubles) the labelling cost 3-3.5x as much; on
    the windows of a trained network's masks at 3000x2500 (one Zen 3 core)
    3.3 -> 1.5 ms per image for the served model and 22.6 -> ~9 ms for the
    full-size network at 512. The areas are counted whichever way costs less
    for this mask (``EACH_NS_EXTRA``, ``EACH_NS_PER_REGION``, ``GATHER_NS_PER_MARKED``):
    each region by a comparison of its own over an 8-bit copy of the labels
    (``count_each``), the small ones then dropped by OpenCV's ``LUT`` (a
    window of a trained network's masks: a few regions, much of the window
    marked); or only the marked pixels' labels, gathered by the mask and
    counted by ``bincount`` (``keep_by_gather``: many small regions, a
    small share of the window marked). Counting every pixel of the labels
    (``bincount``, or OpenCV's ``calcHist``, which adds one to the same bin
    for each pixel of a run, each add waiting for the one before) cost 2-5
    ns a pixel on an Intel Xeon with AMX. Then one flood fill of the
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
    each_ns = EACH_NS_EXTRA + (n - 1) * EACH_NS_PER_REGION
    if n <= LUT_LABELS and each_ns * m.size <= GATHER_NS_PER_MARKED * cv2.countNonZero(m):
        small_labels = labels.astype(np.uint8)  # exact: every label is below 256
        keep = count_each(small_labels, n) >= min_area
        keep[0] = False  # label 0 is the background
        if not keep[1:].all():
            table = np.zeros(256, np.uint8)
            table[:n] = keep
            m = cv2.LUT(small_labels, table)
    else:
        m = keep_by_gather(m, labels, n, min_area)
    return _fill_binary(m) if fill else m


def count_each(labels: np.ndarray, n: int) -> np.ndarray:
    """Pixels of each label 1..n-1 of uint8 ``labels``, one comparison per label (int64; [0] is 0)."""
    same = np.empty(labels.shape, np.bool_)
    areas = np.zeros(n, np.int64)
    for label in range(1, n):
        areas[label] = np.count_nonzero(np.equal(labels, label, out=same))
    return areas


def keep_by_gather(mask: np.ndarray, labels: np.ndarray, n: int, min_area: int) -> np.ndarray:
    """The uint8 ``mask`` of 0s and 1s only (its bool view selects) without its regions (``labels``: its n
    labels, background included) of fewer than ``min_area`` pixels: the marked pixels' labels gathered by
    the mask, counted by ``bincount``, the kept ones' pixels scattered into a new array (``mask`` itself
    when every region is kept)."""
    marked = mask.view(np.bool_)
    found = labels[marked]
    keep = np.bincount(found, minlength=n) >= min_area
    keep[0] = False
    if keep[1:].all():
        return mask
    out = np.zeros_like(mask)
    out[marked] = keep.view(np.uint8)[found]
    return out


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
