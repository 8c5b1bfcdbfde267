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
# way on both kinds). Where clean_regions labels, it takes the cheaper: one by one for a few solid regions,
# gathered for specks (a random network's: hundreds to thousands in a window, a few percent of it marked).
EACH_NS_PER_REGION = 0.12
EACH_NS_EXTRA = 0.3
GATHER_NS_PER_MARKED = 6.0


def clean_regions(mask: np.ndarray, min_area: int, fill: bool = True) -> np.ndarray:
    """``remove_small_regions(mask, min_area)``, then ``fill_holes`` when ``fill``: the same {0, 1}
    mask (``clean_regions_counted``, without the count)."""
    return clean_regions_counted(mask, min_area, fill)[0]


def clean_regions_counted(mask: np.ndarray, min_area: int, fill: bool = True,
                          zero_one: bool = False) -> tuple[np.ndarray, int | None]:
    """``remove_small_regions(mask, min_area)``, then ``fill_holes`` when
    ``fill``: the same {0, 1} mask, and the number of its 8-connected
    regions where the way it took tells them for free (``clean_by_borders``;
    else None). ``zero_one``: ``mask`` is a C-contiguous uint8 array of 0s
    and 1s that the caller hands over (it is read as it is, and may be
    returned or written).

    From its regions' borders where they are few for its size
    (``clean_by_borders``: a trained network's windows, and most of a random
    one's; on those windows 8-9 -> ~1.5 ms per 3000x2500 image on a Zen 4
    core), otherwise from one labelling (noise, and a region with holes to
    drop without ``fill``): OpenCV's BBDT labelling without statistics (with
    them, boxes and centroids computed per pixel in doubles, it cost 3-3.5x
    as much), then each label's area counted whichever way costs less for
    this mask (``EACH_NS_EXTRA``, ``EACH_NS_PER_REGION``,
    ``GATHER_NS_PER_MARKED``): each region by a comparison of its own over
    an 8-bit copy of the labels (``count_each``), the small ones then
    dropped by OpenCV's ``LUT`` (a few regions, much of the mask marked); or
    only the marked pixels' labels, gathered by the mask and counted by
    ``bincount`` (``keep_by_gather``: many small regions, a small share of
    the mask marked). Counting every pixel of the labels (``bincount``, or
    OpenCV's ``calcHist``, which adds one to the same bin for each pixel of
    a run, each add waiting for the one before) cost 2-5 ns a pixel on an
    Intel Xeon with AMX. Then one flood fill of the background from the
    border fills the holes.
    """
    if zero_one:
        m = mask
        if m.dtype != np.uint8 or m.ndim != 2 or not m.flags.c_contiguous:
            raise ValueError(f"zero_one takes a C-contiguous uint8 (H, W) mask, got {m.dtype} {m.shape}")
    else:
        m = np.ascontiguousarray(np.asarray(mask) != 0).view(np.uint8)  # any nonzero value is foreground
    if m.size == 0:
        return m, 0  # no pixels: nothing to label (OpenCV refuses an empty image)
    if min_area <= 1:
        return (_fill_binary(m) if fill else m), None
    traced = clean_by_borders(m, min_area, fill)
    if traced is not None:
        return traced
    n, labels = cv2.connectedComponentsWithAlgorithm(m, 8, cv2.CV_32S, cv2.CCL_BBDT)  # n counts the background
    if n <= 1:
        return m, 0  # nothing to keep or fill
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
    return (_fill_binary(m) if fill else m), None


# clean_by_borders costs ~1 us for each border (findContours' arrays), labelling ~1-2 ns a pixel. A border takes a
# run of a row (of marked pixels, or unmarked between them) and a row holds fewer such runs than changes (0 to 1 or
# back, the image's edges counted as 0s), so a mask whose rows change at most once in 64 pixels has at most a border
# per 64 pixels: at worst (isolated pixels at that density) ~2.5x the labelling's time, measured at 3000x2500 on a
# Zen 4 core. A trained network's windows change once in ~150-1000 pixels, a random one's specks in ~30-300,
# salt-and-pepper noise in 2-50 (labelled).
BORDER_MAX_CHANGES = 1 / 64


def clean_by_borders(mask: np.ndarray, min_area: int, fill: bool = True) -> tuple[np.ndarray, int | None] | None:
    """``clean_regions_counted`` of a contiguous {0, 1} uint8 ``mask`` from its regions' borders
    instead of a label per pixel, or None where it would need the labels (``fill`` False and a region
    to drop that has holes).

    ``cv2.findContours`` (RETR_CCOMP) follows the outer border of every 8-connected region and the
    border of each of its holes (4-connected background that does not reach the edge). It reads
    each pixel once and writes none, where labelling writes a label per pixel: on the windows of a
    trained network's masks ~0.25 ns a pixel against ~1.3 for the labels alone, on a Zen 4 core. A
    border's filled polygon (``cv2.drawContours``, ``FILLED``: the lattice points inside the polygon
    through its pixels' centres, and on it) is, for an outer border, the region with its holes and
    whatever lies in them; the region itself is that less the insides of its holes' polygons. So:

    - a region's area is at most its box's, and at least its polygon's (shoelace) area when it has
      no holes (a lattice polygon holds more lattice points than its area: Pick's theorem; a border
      that touches itself is loops joined at pixels, each turning the same way, its area their sum,
      and a spike adds pixels but no area); between the two, or with holes, it is counted: its
      outer border filled, its holes' polygons emptied, their borders (its own pixels) drawn back,
      inside its box;
    - with the holes filled the mask is the union of the kept regions' filled outer borders (a hole
      that remains is a hole of one kept region: with 8-connected regions and 4-connected background
      no two regions enclose background together);
    - without ``fill`` a dropped region without holes is erased by drawing its filled border in 0;
    - the regions left (the result's second part) are the kept outer borders, less, with ``fill``,
      those inside the outer border of a kept region with holes (``_regions_left``; None where that
      would test more than ``MAX_NESTING_EDGES`` edges).

    Tested against scipy's labelling on masks of every kind (rings in rings, checkerboards, lines,
    specks). Declined (None) before tracing where the rows change more often than
    ``BORDER_MAX_CHANGES``: noise, whose hundreds of thousands of borders (~1 us each, for
    findContours' arrays) would cost many times the labelling.
    """
    # 0 to 1 or back along the rows, the image's edges counted as 0s
    changes = cv2.countNonZero(cv2.absdiff(mask[:, 1:], mask[:, :-1]))
    changes += cv2.countNonZero(mask[:, :1]) + cv2.countNonZero(mask[:, -1:])
    if changes > mask.size * BORDER_MAX_CHANGES:
        return None  # too many borders for their cost (a region per few pixels: noise)
    contours, hierarchy = cv2.findContours(mask, cv2.RETR_CCOMP, cv2.CHAIN_APPROX_SIMPLE)
    if not contours:
        return mask, 0
    first_child, parent = hierarchy[0, :, 2], hierarchy[0, :, 3]
    outer = parent < 0  # a region's outer border; the others are its holes' (their parent: the region)
    holes = outer & (first_child >= 0)  # regions with holes
    # boxes and twice the shoelace areas of all borders at once (each border closed on its first point)
    points = np.concatenate(contours)[:, 0, :].astype(np.int64)
    lengths = np.fromiter(map(len, contours), np.int64, len(contours))
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    x, y = points[:, 0], points[:, 1]
    x0, x1 = np.minimum.reduceat(x, starts), np.maximum.reduceat(x, starts)
    y0, y1 = np.minimum.reduceat(y, starts), np.maximum.reduceat(y, starts)
    following = np.arange(len(points)) + 1
    following[starts + lengths - 1] = starts
    twice_area = np.abs(np.add.reduceat(x * y[following] - x[following] * y, starts))
    keep = outer & ((x1 - x0 + 1) * (y1 - y0 + 1) >= min_area)
    doubt = np.flatnonzero(keep & (holes | (twice_area < 2 * min_area)))
    by_region = np.argsort(parent, kind="stable")  # the holes' borders grouped by their region
    first, last = (np.searchsorted(parent, doubt, side=side, sorter=by_region) for side in ("left", "right"))
    for i, a, b in zip(doubt, first, last):
        keep[i] = _region_area(mask, contours, int(i), by_region[a:b],
                               (int(x0[i]), int(y0[i]), int(x1[i]), int(y1[i]))) >= min_area
    drop = outer & ~keep
    kept = int(np.count_nonzero(keep))
    if fill:
        if not drop.any() and not holes.any():
            return mask, kept
        out = np.zeros_like(mask)
        # the kept regions without holes in one call (their polygons are disjoint); each with holes apart,
        # since one inside another's hole would be a hole of the pair to the even-odd rule of one call
        cv2.drawContours(out, [contours[i] for i in np.flatnonzero(keep & ~holes)], -1, 1, cv2.FILLED)
        filled = np.flatnonzero(keep & holes)
        for i in filled:
            cv2.drawContours(out, [contours[i]], 0, 1, cv2.FILLED)
        return out, _regions_left(contours, keep, filled, (x0, y0, x1, y1))
    if not drop.any():
        return mask, kept
    if (drop & holes).any():
        return None  # erasing its filled border would erase what lies in its holes
    out = mask.copy()
    cv2.drawContours(out, [contours[i] for i in np.flatnonzero(drop)], -1, 0, cv2.FILLED)
    return out, kept


# _regions_left's point-in-polygon tests may take this many of the polygons' edges in all (each test reads every edge
# of its polygon, ~1 ns each); beyond, the caller counts the regions itself
MAX_NESTING_EDGES = 1 << 20


def _regions_left(contours, keep: np.ndarray, filled: np.ndarray, boxes) -> int | None:
    """The regions of the kept regions (``keep``, by their outer borders) once those with holes (``filled``)
    are drawn filled: a kept region inside another's outer border (in one of its holes) is then part of it.
    Its border's first point (one of its pixels) is inside that polygon or outside, never on it (whose
    lattice points are the other region's pixels). None past ``MAX_NESTING_EDGES`` edges tested."""
    kept = np.flatnonzero(keep)
    if not len(filled):
        return len(kept)
    x0, y0, x1, y1 = (b[kept] for b in boxes)
    inside = set()
    work = 0
    for i in filled:
        bx0, by0, bx1, by1 = (int(b[i]) for b in boxes)
        within = kept[(x0 > bx0) & (x1 < bx1) & (y0 > by0) & (y1 < by1)]  # boxes strictly inside i's
        work += len(within) * len(contours[i])
        if work > MAX_NESTING_EDGES:
            return None
        for j in within:
            x, y = contours[j][0, 0]
            if cv2.pointPolygonTest(contours[i], (float(x), float(y)), False) > 0:
                inside.add(int(j))
    return len(kept) - len(inside)


def _region_area(mask: np.ndarray, contours, i: int, hole_borders, box: tuple[int, int, int, int]) -> int:
    """Marked pixels of the region whose outer border is ``contours[i]`` (box: x0, y0, x1, y1
    inclusive): the border filled, the insides of its holes' borders (``hole_borders``: indices into
    ``contours``) emptied, those borders drawn back, counted where ``mask`` is marked."""
    x0, y0, x1, y1 = box
    inside = np.zeros((y1 - y0 + 1, x1 - x0 + 1), np.uint8)
    cv2.drawContours(inside, [contours[i]], 0, 1, cv2.FILLED, offset=(-x0, -y0))
    if len(hole_borders):
        borders = [contours[j] for j in hole_borders]
        # in one call: the holes' insides are disjoint, so each lies inside one polygon (even-odd: emptied once)
        cv2.drawContours(inside, borders, -1, 0, cv2.FILLED, offset=(-x0, -y0))
        cv2.drawContours(inside, borders, -1, 1, 1, offset=(-x0, -y0))
    return cv2.countNonZero(cv2.bitwise_and(inside, mask[y0 : y1 + 1, x0 : x1 + 1]))


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
