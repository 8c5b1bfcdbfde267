"""Postprocessing, the overlay, and tumor statistics on hand-drawn masks."""

from collections import Counter

import cv2
import numpy as np
import pytest
from scipy import ndimage

import model.postprocess as postprocess
from model.postprocess import Postprocessor, clean_regions, fill_holes, remove_small_regions, render_overlay
from model.stats import TumorStats, tumor_statistics

# --- postprocessing ----------------------------------------------------------


def test_threshold_is_strict_and_from_the_postprocessor():
    prob = np.array([[0.2, 0.5, 0.51, 0.9]], np.float32)
    out = Postprocessor(threshold=0.5, min_region_fraction=0, fill_holes=False)(prob)
    assert out.dtype == np.uint8
    np.testing.assert_array_equal(out, [[0, 0, 1, 1]])
    np.testing.assert_array_equal(Postprocessor(0.85, 0, False)(prob), [[0, 0, 0, 1]])


def test_regions_smaller_than_the_fraction_of_the_image_are_removed():
    prob = np.zeros((100, 100), np.float32)
    prob[10:20, 10:20] = 0.9  # 100 px = 1% of the image: kept
    prob[50:53, 50:53] = 0.9  # 9 px: removed at 1e-3 (10 px minimum)
    prob[80, 80] = prob[81, 81] = 0.9  # 2 px, diagonal: one 8-connected region, removed
    out = Postprocessor(0.5, min_region_fraction=1e-3, fill_holes=False)(prob)
    assert out.sum() == 100 and out[10:20, 10:20].all()
    kept = Postprocessor(0.5, min_region_fraction=9e-4, fill_holes=False)(prob)  # 9 px minimum
    assert kept.sum() == 109


def test_diagonal_neighbours_form_one_region():
    mask = np.eye(5, dtype=np.uint8)  # 5 px touching only at corners
    np.testing.assert_array_equal(remove_small_regions(mask, 5), mask)
    assert not remove_small_regions(mask, 6).any()


def speckle(rng, h: int, w: int) -> np.ndarray:
    """Blurred noise above a high quantile: many small clusters and a few large ones, a random
    network's kind of mask (the large ones' boxes cover little of the image)."""
    noise = cv2.GaussianBlur(rng.normal(size=(h, w)).astype(np.float32), (0, 0), rng.uniform(1.0, 3.0))
    return (noise > np.quantile(noise, rng.uniform(0.85, 0.97))).astype(np.uint8)


def test_remove_small_regions_matches_scipy_on_random_masks():
    """8-connected labelling by scipy, areas by bincount: the independent reference. Dense noise
    (one region spans the image: the per-pixel lookup) and speckle (the kept regions' boxes)."""
    for seed in range(40):
        rng = np.random.default_rng(seed)
        if seed % 2:
            mask = speckle(rng, 160, 130) * np.uint8(rng.choice([1, 255]))
        else:
            mask = (rng.random((61, 47)) < rng.uniform(0.2, 0.6)).astype(np.uint8) * np.uint8(rng.choice([1, 255]))
        labels, _ = ndimage.label(mask, structure=np.ones((3, 3)))
        areas = np.bincount(labels.ravel())
        for min_area in (1, 2, 7, 40, 10_000):
            want = ((areas[labels] >= min_area) & (labels > 0)).astype(np.uint8)
            got = remove_small_regions(mask, min_area)
            assert got.dtype == np.uint8 and set(np.unique(got)) <= {0, 1}
            np.testing.assert_array_equal(got, want, err_msg=f"seed {seed}, min_area {min_area}")
    assert not remove_small_regions(np.zeros((9, 9), np.uint8), 3).any()


def nested(rng, h: int, w: int) -> np.ndarray:
    """Rings with holes, islands inside the holes (some of them small), rings inside rings and
    regions on the border, over a sparse speckle: every case where per-region hole filling could
    differ from the whole image's."""
    mask = (rng.random((h, w)) < 0.02).astype(np.uint8)
    for _ in range(int(rng.integers(1, 6))):
        cy, cx, r = int(rng.integers(0, h)), int(rng.integers(0, w)), int(rng.integers(4, max(5, min(h, w) // 3)))
        cv2.circle(mask, (cx, cy), r, 1, thickness=int(rng.integers(1, 3)))
        if rng.random() < 0.7:
            cv2.circle(mask, (cx, cy), max(1, r // 2), 1, thickness=int(rng.choice([1, -1])))
        if rng.random() < 0.5:
            mask[cy, cx] = 1  # a one-pixel island inside the inner ring's hole
    return mask


def count_calls(monkeypatch) -> Counter:
    """Calls of clean_regions' ways, counted from now on: its regions' borders ("borders": clean_by_borders
    gave the mask; "labelled": it declined), the two ways of counting labelled regions, OpenCV's LUT."""
    calls = Counter()
    for name in ("count_each", "keep_by_gather"):
        real = getattr(postprocess, name)
        monkeypatch.setattr(postprocess, name, lambda *a, _n=name, _f=real: calls.update([_n]) or _f(*a))
    real_lut = cv2.LUT
    monkeypatch.setattr(postprocess.cv2, "LUT", lambda *a: calls.update(["lut"]) or real_lut(*a))
    real_borders = postprocess.clean_by_borders

    def borders(*a):
        out = real_borders(*a)
        calls.update(["labelled" if out is None else "borders"])
        return out

    monkeypatch.setattr(postprocess, "clean_by_borders", borders)
    return calls


def labels_only(monkeypatch) -> None:
    """clean_regions without its borders' way: it labels every mask."""
    monkeypatch.setattr(postprocess, "clean_by_borders", lambda *a: None)


def borders_always(monkeypatch) -> None:
    """clean_by_borders for any mask, however many borders it has (no estimate of their cost)."""
    monkeypatch.setattr(postprocess, "BORDER_MAX_CHANGES", float("inf"))


@pytest.mark.parametrize("way", ["borders", "one by one", "gathered"],
                         ids=["the regions' borders traced", "each region counted alone over 8-bit labels",
                              "the marked pixels' labels gathered"])
def test_clean_regions_equals_removing_small_regions_then_filling_holes(way, monkeypatch):
    """scipy's 8-connected labelling and hole filling are the reference; each of clean_regions'
    ways of counting and dropping regions (forced: the borders for every mask, or labels, and
    one labelled way made to cost more than the other) gives the same masks, for masks of 0/1,
    0/255, booleans and a strided view."""
    if way == "borders":
        borders_always(monkeypatch)
    else:
        labels_only(monkeypatch)
        # the other way made to cost more than any mask here could save: one by one wherever the labels fit in 8 bits
        monkeypatch.setattr(postprocess, "GATHER_NS_PER_MARKED" if way == "one by one" else "EACH_NS_PER_REGION", 1e9)
    calls = count_calls(monkeypatch)
    many = 0
    for seed in range(30):
        rng = np.random.default_rng(seed)
        h, w = int(rng.integers(30, 200)), int(rng.integers(30, 200))
        mask = (nested, speckle)[seed % 2](rng, h, w) * np.uint8(rng.choice([1, 255]))
        labels, count = ndimage.label(mask, structure=np.ones((3, 3)))
        many += count >= 256  # then the 8-bit copies cannot hold the labels: gathered either way
        areas = np.bincount(labels.ravel())
        strided = np.pad(mask, ((0, 0), (1, 0)))[:, 1:]  # the same mask, not contiguous
        for min_area in (1, 2, 5, 30, 10**6):
            kept = (areas[labels] >= min_area) & (labels > 0)
            want = ndimage.binary_fill_holes(kept).astype(np.uint8)
            for fill in (True, False):
                for given in (mask, mask != 0, strided):
                    got = clean_regions(given, min_area, fill)
                    assert got.dtype == np.uint8 and got.shape == mask.shape
                    np.testing.assert_array_equal(got, want if fill else kept.astype(np.uint8),
                                                  err_msg=f"seed {seed}, min_area {min_area}, fill {fill}, {given.dtype}")
    assert many > 0
    each, gather, lut = calls["count_each"], calls["keep_by_gather"], calls["lut"]
    # the borders' way declines only without fill, to drop a region with holes (then the labels)
    assert {"borders": calls["borders"] > 10 * calls["labelled"] > 0 and each + gather == calls["labelled"],
            "one by one": each > 20 and lut > 20 and 0 < gather < each and calls["borders"] == 0,
            "gathered": each == 0 and lut == 0 and gather > 20 and calls["borders"] == 0}[way], calls


def test_clean_regions_traces_the_borders_of_solid_regions_and_labels_noise(monkeypatch):
    """A trained network's window (two solid regions filling much of it, one too small, a hole) by its
    borders, without a label; masks whose rows change every few pixels (specks, salt-and-pepper noise:
    a border per few pixels, each costing more than labelling their pixels) labelled."""
    calls = count_calls(monkeypatch)
    solid = np.zeros((300, 400), np.uint8)
    cv2.circle(solid, (150, 150), 100, 1, -1)
    solid[140:160, 140:160] = 0  # a hole: filled
    cv2.circle(solid, (350, 50), 3, 1, -1)
    got = clean_regions(solid, 100)
    assert got.sum() == solid.sum() + 400 - 29 and calls == Counter(borders=1)  # the small disk's 29 pixels went
    calls.clear()
    speckled = speckle(np.random.default_rng(5), 300, 400)
    noise = (np.random.default_rng(6).random((300, 400)) < 0.05).astype(np.uint8)
    every_other = np.zeros((300, 400), np.uint8)
    every_other[1::8, ::2] = 1  # isolated pixels on a few rows only: every row is looked at
    labelled = []
    for mask in (speckled, noise, every_other):
        calls.clear()
        labelled.append(clean_regions(mask, 100))
        assert calls == Counter(labelled=1, keep_by_gather=1)
    borders_always(monkeypatch)
    for mask, want in zip((speckled, noise, every_other), labelled):
        np.testing.assert_array_equal(clean_regions(mask, 100), want)  # traced, the same masks


def test_labelled_masks_count_a_few_solid_regions_one_by_one_and_specks_by_gathering(monkeypatch):
    """Where clean_regions labels, the cheaper way of counting: a few solid regions filling much of the
    mask counted one by one, specks (hundreds, a few percent of it) gathered."""
    labels_only(monkeypatch)
    calls = count_calls(monkeypatch)
    solid = np.zeros((300, 400), np.uint8)
    cv2.circle(solid, (150, 150), 100, 1, -1)
    cv2.circle(solid, (350, 50), 3, 1, -1)
    got = clean_regions(solid, 100)
    assert got.sum() == solid.sum() - 29 and calls == Counter(labelled=1, count_each=1, lut=1)
    calls.clear()
    specks = speckle(np.random.default_rng(5), 300, 400)
    clean_regions(specks, 100)
    assert ndimage.label(specks, structure=np.ones((3, 3)))[1] > 256 and calls == Counter(labelled=1, keep_by_gather=1)
    calls.clear()
    assert 2 < ndimage.label(specks[:60, :60], structure=np.ones((3, 3)))[1] < 255
    clean_regions(specks[:60, :60], 100)  # labels that fit in 8 bits: still gathered, the cheaper way for specks
    assert calls == Counter(labelled=1, keep_by_gather=1)


def awkward(rng, h: int, w: int) -> np.ndarray:
    """Masks whose borders are hard to get right: checkerboards (one region, a one-pixel hole in every
    other pixel, the holes' borders sharing pixels), lines one pixel wide (4- and 8-connected), rings
    within rings with islands, swiss cheese, thresholded enlargements (a network's kind), all touching
    the edges."""
    kind = rng.integers(0, 5)
    if kind == 0:
        return ((np.indices((h, w)).sum(0) % 2 == 0) & (rng.random((h, w)) < rng.uniform(0.7, 1.0))).astype(np.uint8)
    mask = np.zeros((h, w), np.uint8)
    if kind == 1:
        for _ in range(int(rng.integers(1, 8))):
            ends = [(int(rng.integers(-5, w + 5)), int(rng.integers(-5, h + 5))) for _ in range(2)]
            cv2.line(mask, *ends, 1, 1, lineType=int(rng.choice([4, 8])))
        return mask
    if kind == 2:
        return nested(rng, h, w)
    if kind == 3:
        mask[:] = 1
        mask[rng.random((h, w)) < rng.uniform(0.05, 0.4)] = 0  # holes of one to a few pixels
        mask[: int(rng.integers(0, h)), : int(rng.integers(0, w))] = 0
        return mask
    small = rng.random((max(1, h // 6), max(1, w // 6))).astype(np.float32)
    return (cv2.resize(small, (w, h), interpolation=cv2.INTER_LINEAR) > rng.uniform(0.4, 0.8)).astype(np.uint8)


def test_clean_by_borders_equals_scipy_on_awkward_masks_at_every_regions_area(monkeypatch):
    """The borders' way alone (forced for every mask) against scipy's labelling and hole filling, with
    the smallest kept area at each region's own area and one more: where its bounds (the box, the
    polygon's area) cannot decide and it counts the region's pixels by drawing its borders. The
    regions it says the result holds are scipy's count of them."""
    borders_always(monkeypatch)
    declined = nested = 0
    for seed in range(150):
        rng = np.random.default_rng(4000 + seed)
        h, w = int(rng.integers(1, 120)), int(rng.integers(1, 120))
        mask = awkward(rng, h, w)
        labels, count = ndimage.label(mask, structure=np.ones((3, 3)))
        areas = np.bincount(labels.ravel())
        picked = rng.choice(areas[1:], min(3, count), replace=False) if count else []
        for min_area in {2, 3, 1000, *(int(a) for a in picked), *(int(a) + 1 for a in picked)}:
            kept = (areas[labels] >= min_area) & (labels > 0)
            for fill in (True, False):
                traced = postprocess.clean_by_borders(np.ascontiguousarray(mask), min_area, fill)
                if traced is None:
                    declined += 1
                    assert not fill
                    continue
                got, regions = traced
                want = ndimage.binary_fill_holes(kept) if fill else kept
                where = f"seed {seed}, min_area {min_area}, fill {fill}"
                np.testing.assert_array_equal(got, want.astype(np.uint8), err_msg=where)
                assert regions == ndimage.label(want, structure=np.ones((3, 3)))[1], where
                nested += fill and regions < np.count_nonzero(np.bincount(labels[kept])) if kept.any() else 0
    assert 0 < declined and 0 < nested, "some masks had a kept region in another's filled hole"


def test_regions_in_a_filled_hole_are_not_counted_twice(monkeypatch):
    """A ring holding a blob, a ring in a ring holding a blob, and a blob beside them: filled, two regions
    are left. Past MAX_NESTING_EDGES the borders' way does not know (None), and the mask is the same."""
    borders_always(monkeypatch)
    yy, xx = np.mgrid[0:80, 0:120]
    d = np.hypot(yy - 40, xx - 40)
    mask = ((d > 30) & (d < 34)) | ((d > 15) & (d < 18)) | (d < 5) | (np.abs(xx - 100) + np.abs(yy - 40) < 8)
    mask = mask.astype(np.uint8)
    assert ndimage.label(mask, structure=np.ones((3, 3)))[1] == 4
    got, regions = postprocess.clean_by_borders(mask, 10)
    np.testing.assert_array_equal(got, ndimage.binary_fill_holes(mask).astype(np.uint8))
    assert regions == 2
    assert postprocess.clean_by_borders(mask, 10, fill=False)[1] == 4
    monkeypatch.setattr(postprocess, "MAX_NESTING_EDGES", 1)
    got_again, unknown = postprocess.clean_by_borders(mask, 10)
    assert unknown is None and np.array_equal(got_again, got)


def test_clean_regions_counted_takes_a_zero_one_mask_as_it_is_and_refuses_others():
    """zero_one: the caller's contiguous 0/1 uint8 mask is read without a copy; the same result."""
    from model.postprocess import clean_regions_counted

    mask = np.zeros((40, 50), np.uint8)
    mask[5:15, 5:15] = 1
    mask[30, 30] = 1  # below the smallest kept area
    mask[8:11, 8:11] = 0  # a hole
    want = clean_regions_counted(mask * 255, 4)
    got = clean_regions_counted(mask.copy(), 4, zero_one=True)
    np.testing.assert_array_equal(got[0], want[0])
    assert got[1] == want[1] == 1 and got[0].sum() == 100
    for bad in (mask[:, ::2], mask.astype(bool), mask[None]):
        with pytest.raises(ValueError, match="zero_one"):
            clean_regions_counted(bad, 4, zero_one=True)


def test_clean_regions_and_fill_holes_take_empty_masks_and_refuse_other_shapes():
    for shape in ((0, 5), (4, 0)):
        for min_area in (1, 3):
            got = clean_regions(np.zeros(shape, np.uint8), min_area, fill=True)
            assert got.shape == shape and got.dtype == np.uint8
        assert fill_holes(np.zeros(shape, np.uint8)).shape == shape
    with pytest.raises(ValueError, match=r"\(H, W\)"):
        fill_holes(np.zeros((4, 4, 3), np.uint8))


def test_regions_of_a_mask_without_holes_are_counted_by_their_outer_borders():
    """tumor_statistics(hole_free=True) counts outer borders instead of labelling: the same numbers on
    every mask whose holes were filled (regions on the border, one pixel wide, thousands of specks)."""
    for seed in range(40):
        rng = np.random.default_rng(2000 + seed)
        h, w = int(rng.integers(1, 300)), int(rng.integers(1, 300))
        raw = (nested, speckle)[seed % 2](rng, h, w) if min(h, w) >= 30 else (rng.random((h, w)) < 0.4).astype(np.uint8)
        mask = clean_regions(raw, int(rng.choice([1, 3, 20])), fill=True)
        prob = rng.random((h, w)).astype(np.float32)
        want = tumor_statistics(mask, prob, (0.1, 0.2))
        assert tumor_statistics(mask, prob, (0.1, 0.2), hole_free=True) == want, seed
        windows = [(0, h, 0, w)]
        assert tumor_statistics(mask, prob, (0.1, 0.2), windows=windows, hole_free=True) == want, seed
    ring = np.zeros((40, 40), np.uint8)
    cv2.circle(ring, (20, 20), 12, 1, thickness=3)
    ring[20, 20] = 1  # a region in the ring's hole: the mask has a hole, so hole_free=True would miss it
    assert tumor_statistics(ring, None).n_regions == 2
    assert tumor_statistics(ring, None, hole_free=True).n_regions == 1, "the precondition is the caller's"


def test_regions_of_a_mask_without_holes_are_counted_by_their_outer_borders_in_any_windows():
    """Windows cut anywhere through a mask without holes (a window's part of it has none either)."""
    for seed in range(20):
        rng = np.random.default_rng(3000 + seed)
        h, w = int(rng.integers(40, 300)), int(rng.integers(40, 300))
        mask = clean_regions(speckle(rng, h, w), int(rng.choice([1, 5])), fill=True)
        cuts = np.sort(rng.integers(0, h, 3)), np.sort(rng.integers(0, w, 3))
        rows, cols = [0, *cuts[0], h], [0, *cuts[1], w]
        windows = [(rows[i], rows[i + 1], cols[j], cols[j + 1]) for i in range(4) for j in range(4)
                   if rows[i] < rows[i + 1] and cols[j] < cols[j + 1]]
        for t, b, l, r in windows:
            box = np.ascontiguousarray(mask[t:b, l:r])
            assert tumor_statistics(box, None, hole_free=True) == tumor_statistics(box, None), (seed, t, b, l, r)


@pytest.mark.parametrize("way", ["borders", "count_each", "keep_by_gather"], ids=["traced", "counted alone", "gathered"])
def test_a_smallest_area_above_float32s_exact_integers_is_kept_exactly(way, monkeypatch):
    """A mask of 2**24 pixels, each way of counting (forced by making the other cost more): one region of
    exactly 2**24 pixels stays with min_area 2**24 and goes with 2**24 + 1, which float32 cannot hold (a
    guard: OpenCV's histogram, which clean_regions used before, counts in float32). Traced, the region's
    box holds 2**24 pixels and its polygon less: its pixels are counted."""
    if way != "borders":
        labels_only(monkeypatch)
        monkeypatch.setattr(postprocess, "EACH_NS_PER_REGION" if way == "keep_by_gather" else "GATHER_NS_PER_MARKED", 1e9)
    calls = count_calls(monkeypatch)
    mask = np.ones((4096, 4096), np.uint8)
    assert clean_regions(mask, 2**24, fill=False).all()
    assert not clean_regions(mask, 2**24 + 1, fill=False).any()
    assert calls[way] == 2


def test_clean_regions_of_one_region_equals_scipy():
    """One region, the usual case inside a window (model.inference.windows): a ring with a hole, a bay, an
    island in the hole (then two regions), on the border or not, large and small against the smallest kept
    area, against scipy's labelling and hole filling."""
    for seed in range(40):
        rng = np.random.default_rng(1000 + seed)
        h, w = int(rng.integers(20, 120)), int(rng.integers(20, 120))
        mask = np.zeros((h, w), np.uint8)
        cy, cx = int(rng.integers(0, h)), int(rng.integers(0, w))
        r = int(rng.integers(3, max(4, min(h, w) // 2)))
        cv2.circle(mask, (cx, cy), r, 1, thickness=int(rng.integers(1, 4)))
        if seed % 3 == 0:
            mask[cy, cx : cx + r + 5] = 0  # a bay: the hole opens to the outside
        if seed % 5 == 0:
            mask[cy, cx] = 1  # an island in the hole: two regions
        mask *= np.uint8(rng.choice([1, 255]))
        labels, n = ndimage.label(mask, structure=np.ones((3, 3)))
        areas = np.bincount(labels.ravel())
        for min_area in (1, 2, int(areas[1:].max()) if n else 1, int(areas[1:].max()) + 1 if n else 2):
            kept = (areas[labels] >= min_area) & (labels > 0)
            for fill in (True, False):
                want = ndimage.binary_fill_holes(kept).astype(np.uint8) if fill else kept.astype(np.uint8)
                got = clean_regions(mask, min_area, fill)
                assert got.dtype == np.uint8
                np.testing.assert_array_equal(got, want, err_msg=f"seed {seed}, min_area {min_area}, fill {fill}")
    assert not clean_regions(np.zeros((9, 9), np.uint8), 3).any()


def test_default_keeps_single_pixels_on_tiny_images():
    prob = np.zeros((50, 50), np.float32)
    prob[25, 25] = 1.0  # 1e-4 * 2500 = 0.25 px: at least 1 px, so this one stays
    assert Postprocessor()(prob).sum() == 1


def test_holes_are_filled_but_open_bays_are_not():
    mask = np.zeros((40, 40), np.uint8)
    cv2.rectangle(mask, (5, 5), (20, 20), 1, thickness=2)  # closed ring: filled
    mask[25:35, 25:35] = 1
    mask[28:32, 30:35] = 0  # a bay open to the right edge of the square: stays open
    out = fill_holes(mask)
    assert out[5:21, 5:21].all()
    np.testing.assert_array_equal(out[25:35, 25:35], mask[25:35, 25:35])


def test_fill_holes_matches_scipy_on_random_masks():
    for seed in range(20):
        mask = (np.random.default_rng(seed).random((37, 53)) < 0.55).astype(np.uint8)
        np.testing.assert_array_equal(fill_holes(mask), ndimage.binary_fill_holes(mask).astype(np.uint8))


def test_corner_touching_background_is_a_hole_for_8_connected_foreground():
    mask = np.array([[0, 1, 0], [1, 0, 1], [0, 1, 0]], np.uint8)  # a diamond: centre enclosed
    assert fill_holes(mask)[1, 1] == 1


@pytest.mark.parametrize(
    "kwargs, match",
    [({"threshold": 0.0}, "threshold"), ({"threshold": 1.5}, "1.5"), ({"min_region_fraction": -1e-3}, "min_region_fraction")],
)
def test_bad_postprocessor_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Postprocessor(**kwargs)


def test_postprocessor_rejects_non_2d_and_round_trips_as_dict():
    with pytest.raises(ValueError, match=r"\(2, 3, 4\)"):
        Postprocessor()(np.zeros((2, 3, 4)))
    post = Postprocessor(0.4, 2e-4, False)
    assert Postprocessor(**post.as_dict()).as_dict() == post.as_dict() == {
        "threshold": 0.4,
        "min_region_fraction": 2e-4,
        "fill_holes": False,
    }


def test_overlay_is_rgb_gray_outside_and_red_on_the_contour():
    img = np.full((300, 400), 60, np.uint8)
    mask = np.zeros((300, 400), np.uint8)
    mask[100:200, 150:250] = 1
    rgb = render_overlay(img, mask)
    assert rgb.shape == (300, 400, 3) and rgb.dtype == np.uint8
    assert (rgb[10, 10] == 60).all()  # untouched gray
    assert tuple(rgb[100, 200]) == (255, 0, 0)  # contour, in red
    r, g, b = rgb[150, 200].astype(int)  # tinted fill: redder, bone still visible
    assert r > g == b > 0
    assert (render_overlay(img, np.zeros_like(mask)) == 60).all()


def test_overlay_accepts_16_bit_images_and_rejects_mismatched_masks():
    img = np.random.default_rng(0).integers(0, 4096, (64, 48)).astype(np.uint16)
    assert render_overlay(img, np.ones((64, 48), np.uint8)).shape == (64, 48, 3)
    with pytest.raises(ValueError, match=r"\(48, 64\)"):
        render_overlay(img, np.ones((48, 64), np.uint8))


# --- statistics ----------------------------------------------------------------


def test_rectangle_statistics():
    mask = np.zeros((100, 200), np.uint8)
    mask[10:30, 40:90] = 1  # 20 rows x 50 columns
    prob = np.where(mask, 0.8, 0.1).astype(np.float32)
    prob[15, 60] = 0.95
    s = tumor_statistics(mask, prob, pixel_spacing_mm=(0.2, 0.15))
    assert s.tumor_detected and s.area_px == 1000 and s.area_fraction == 1000 / 20000
    assert (s.bbox_x, s.bbox_y, s.bbox_w, s.bbox_h) == (40, 10, 50, 20)
    assert (s.centroid_x, s.centroid_y) == (64.5, 19.5)
    assert s.n_regions == 1
    assert s.area_mm2 == pytest.approx(1000 * 0.2 * 0.15, rel=1e-12)
    assert s.prob_max == pytest.approx(0.95) and s.prob_mean == pytest.approx((999 * 0.8 + 0.95) / 1000, rel=1e-6)


def test_disc_area_is_counted_from_the_drawn_pixels():
    mask = np.zeros((201, 301), np.uint8)
    cv2.circle(mask, (150, 100), 60, 1, thickness=-1)
    drawn = sum(int(row.sum()) for row in mask)  # what cv2 actually drew, row by row
    s = tumor_statistics(mask, None)
    assert s.area_px == drawn
    assert abs(s.area_px - np.pi * 60**2) / (np.pi * 60**2) < 0.01
    assert (s.centroid_x, s.centroid_y) == (150.0, 100.0)
    assert (s.bbox_x, s.bbox_y, s.bbox_w, s.bbox_h) == (90, 40, 121, 121)
    assert s.area_mm2 is None and s.prob_max is None and s.prob_mean is None


def test_two_separate_squares_are_two_regions_and_diagonal_touch_is_one():
    mask = np.zeros((50, 50), np.uint8)
    mask[5:10, 5:10] = 1
    mask[30:40, 20:30] = 1
    s = tumor_statistics(mask, np.zeros((50, 50), np.float32))
    assert s.n_regions == 2 and s.area_px == 125
    assert (s.bbox_x, s.bbox_y, s.bbox_w, s.bbox_h) == (5, 5, 25, 35)
    assert s.centroid_x == pytest.approx((25 * 7 + 100 * 24.5) / 125)
    mask[10, 10] = 1  # touches the first square at a corner only
    assert tumor_statistics(mask, None).n_regions == 2


def test_probabilities_are_read_inside_the_mask_only():
    """An L-shaped mask: its bounding box holds pixels outside it, with higher values than inside."""
    mask = np.zeros((40, 60), np.uint8)
    mask[5:15, 10:14] = 1
    mask[11:15, 14:30] = 1  # 40 + 64 = 104 pixels; the box's other 56 are not the tumor's
    prob = np.full((40, 60), 0.9, np.float32)
    inside = mask.astype(bool)
    prob[inside] = np.linspace(0.2, 0.6, 104, dtype=np.float32)
    s = tumor_statistics(mask, prob)
    assert s.prob_max == pytest.approx(0.6) and s.prob_mean == pytest.approx(0.4, rel=1e-6)
    prob[inside] = -0.5  # not a probability, but the maximum inside the mask is still what is reported
    prob[6, 12] = -0.25
    s = tumor_statistics(mask, prob)
    assert s.prob_max == -0.25 and s.prob_mean == pytest.approx((103 * -0.5 - 0.25) / 104, rel=1e-12)


def test_empty_mask_gives_no_tumor():
    s = tumor_statistics(np.zeros((30, 40), np.uint8), np.full((30, 40), 0.3, np.float32))
    assert s == TumorStats(False, 0, 0.0, None, None, None, None, None, None, None, 0, None, None)
    assert tumor_statistics(np.zeros((3, 3)), None, (0.1, 0.1)).area_mm2 == 0.0


def test_statistics_are_plain_python_numbers():
    mask = np.zeros((10, 10), bool)
    mask[2:4, 3:7] = True
    d = tumor_statistics(mask, np.ones((10, 10), np.float16), (0.5, 0.5)).as_dict()
    for key, value in d.items():
        assert type(value) in (bool, int, float), (key, type(value))


@pytest.mark.parametrize("spacing", [(0.0, 0.1), (-0.1, 0.1), (float("nan"), 0.1)])
def test_bad_spacing_or_shapes_raise(spacing):
    mask = np.ones((4, 4), np.uint8)
    with pytest.raises(ValueError, match="pixel_spacing_mm"):
        tumor_statistics(mask, None, spacing)
    with pytest.raises(ValueError, match=r"\(4, 5\)"):
        tumor_statistics(mask, np.ones((4, 5)))
