"""Preprocessing: intensity scaling, placement in the frame, and the way back."""

import math

import cv2
import numpy as np
import pytest

from model.preprocess import Geometry, Preprocessor, to_unit_float


# --- to_unit_float ---------------------------------------------------------


def test_uint8_is_divided_by_255():
    out = to_unit_float(np.array([[0, 51, 255]], np.uint8))
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, [[0.0, 0.2, 1.0]], rtol=0, atol=1e-7)


def test_uint16_uses_a_robust_window():
    rng = np.random.default_rng(0)
    img = rng.integers(1000, 3000, size=(200, 200)).astype(np.uint16)
    img[0, 0], img[0, 1] = 0, 65535  # a dead and a hot pixel must not set the range
    out = to_unit_float(img)
    lo, hi = np.percentile(img, [0.5, 99.5])
    np.testing.assert_allclose(out, np.clip((img - lo) / (hi - lo), 0, 1), atol=1e-6)
    assert out.min() == 0.0 and out.max() == 1.0
    assert 0.45 < out.mean() < 0.55  # contrast kept: not squashed by the outliers


def test_wide_integers_holding_8_bit_values_are_divided_by_255():
    np.testing.assert_allclose(to_unit_float(np.array([[0, 255]], np.uint16)), [[0.0, 1.0]])
    np.testing.assert_allclose(to_unit_float(np.array([[0, 51]], np.int32)), [[0.0, 0.2]], atol=1e-7)


def test_constant_wide_image_becomes_zeros():
    assert not to_unit_float(np.full((4, 5), 4000, np.uint16)).any()


def test_float_in_unit_range_is_kept_and_others_are_min_max_scaled():
    img = np.array([[0.0, 0.25, 1.0]], np.float64)
    np.testing.assert_array_equal(to_unit_float(img), img.astype(np.float32))
    np.testing.assert_allclose(to_unit_float(np.array([[-2.0, 0.0, 2.0]])), [[0.0, 0.5, 1.0]])
    assert to_unit_float(np.array([[-2.0, 0.0, 2.0]])).dtype == np.float32


def test_bool_becomes_zero_and_one():
    np.testing.assert_array_equal(to_unit_float(np.array([[True, False]])), [[1.0, 0.0]])


def test_to_unit_float_twice_changes_nothing():
    img = np.random.default_rng(1).integers(0, 4096, (30, 40)).astype(np.uint16)
    once = to_unit_float(img)
    np.testing.assert_array_equal(to_unit_float(once), once)


def test_single_channel_third_axis_is_accepted():
    assert to_unit_float(np.zeros((3, 4, 1), np.uint8)).shape == (3, 4)


@pytest.mark.parametrize(
    "img, match",
    [
        (np.zeros((8, 8, 3), np.uint8), r"\(8, 8, 3\)"),
        (np.zeros((8,), np.uint8), r"\(8,\)"),
        (np.zeros((0, 8), np.uint8), "empty"),
        (np.array([[0.0, np.nan]]), "NaN"),
        (np.array([["a"]]), "dtype"),
    ],
)
def test_bad_images_raise_value_error(img, match):
    with pytest.raises(ValueError, match=match):
        to_unit_float(img)


# --- geometry and the frame ------------------------------------------------


def test_long_side_fills_the_frame_and_the_image_is_centred():
    g = Preprocessor(512).geometry(3000, 2500)
    assert (g.scaled_h, g.scaled_w) == (512, 427)
    assert (g.top, g.left) == (0, (512 - 427) // 2)
    g = Preprocessor(512).geometry(257, 511)
    assert (g.scaled_h, g.scaled_w, g.top, g.left) == (258, 512, 127, 0)


def test_frame_is_z_scored_and_padding_is_black():
    pre = Preprocessor(64, mean=0.25, std=0.5)
    img = np.full((32, 16), 255, np.uint8)  # white, grown 2x to 64 x 32
    frame, g = pre(img)
    assert frame.shape == (64, 64) and frame.dtype == np.float32
    assert (g.top, g.left, g.scaled_h, g.scaled_w) == (0, 16, 64, 32)
    np.testing.assert_allclose(frame[:, 16:48], (1.0 - 0.25) / 0.5)
    np.testing.assert_allclose(frame[:, :16], (0.0 - 0.25) / 0.5)
    np.testing.assert_allclose(frame[:, 48:], (0.0 - 0.25) / 0.5)


def test_shrinking_uses_area_and_growing_uses_linear_interpolation():
    pre = Preprocessor(4)
    img = np.array([[0, 255] * 4] * 8, np.uint8)  # 8 x 8 stripes: area averaging gives flat 0.5
    frame, _ = pre(img)
    np.testing.assert_allclose(frame, 0.5, atol=1e-6)
    grown, g = Preprocessor(8)(np.array([[0, 255], [0, 255]], np.uint8))
    expected = cv2.resize(np.array([[0, 1], [0, 1]], np.float32), (8, 8), interpolation=cv2.INTER_LINEAR)
    np.testing.assert_allclose(grown, expected, atol=1e-6)


def test_restore_returns_original_size_float32():
    pre = Preprocessor(64)
    g = pre.geometry(100, 37)
    out = g.restore(np.ones((64, 64), np.float64))
    assert out.shape == (100, 37) and out.dtype == np.float32
    np.testing.assert_allclose(out, 1.0)


def _ellipse_mask(h, w):
    mask = np.zeros((h, w), np.uint8)
    axes = (max(1, w // 3), max(1, h // 4))
    cv2.ellipse(mask, (w // 2, h // 2), axes, 30, 0, 360, 1, -1)
    mask[: max(1, h // 10), : max(1, w // 10)] = 1  # a corner block too
    return mask


@pytest.mark.parametrize("h, w", [(3000, 2500), (257, 511), (100, 37), (511, 3), (1, 3000), (1, 1), (512, 512)])
def test_mask_forward_and_back_matches_within_one_frame_pixel(h, w):
    """Exact up to one pixel of the frame at the boundary: ceil(orig / scaled)
    original pixels when the image was shrunk (finer detail is not in the
    frame to begin with), one pixel when it was grown."""
    pre = Preprocessor(512)
    mask = _ellipse_mask(h, w)
    g = pre.geometry(h, w)
    frame = pre.resize_mask(mask, g)
    assert frame.shape == (512, 512) and frame.dtype == np.uint8
    assert not frame[: g.top].any() and not frame[g.top + g.scaled_h :].any()
    back = (g.restore(frame.astype(np.float32)) > 0.5).astype(np.uint8)
    assert back.shape == (h, w)
    ky, kx = math.ceil(h / g.scaled_h), math.ceil(w / g.scaled_w)
    kernel = np.ones((2 * ky + 1, 2 * kx + 1), np.uint8)
    grown = cv2.dilate(mask, kernel, borderType=cv2.BORDER_CONSTANT, borderValue=0)
    shrunk = cv2.erode(mask, kernel, borderType=cv2.BORDER_CONSTANT, borderValue=1)
    assert not (back & ~grown.astype(bool)).any(), "pixels added beyond one frame pixel"
    assert not (shrunk.astype(bool) & ~back.astype(bool)).any(), "pixels lost deeper than one frame pixel"
    if ky == kx == 1:  # grown or same size: only boundary pixels may differ
        assert np.count_nonzero(back != mask) <= np.count_nonzero(grown != shrunk)


def test_preprocessing_a_smooth_image_and_restoring_gives_it_back():
    yy, xx = np.mgrid[0:50, 0:21]
    img = (0.5 + 0.4 * np.sin(yy / 7.0) * np.cos(xx / 5.0)).astype(np.float32)
    frame, g = Preprocessor(128)(img)
    np.testing.assert_allclose(g.restore(frame), img, atol=0.01)


@pytest.mark.parametrize(
    "kwargs, match",
    [({"size": 0}, "size"), ({"size": 64.0}, "size"), ({"std": 0.0}, "std"), ({"mean": float("nan")}, "mean")],
)
def test_bad_preprocessor_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Preprocessor(**kwargs)


def test_mismatched_mask_and_plane_are_rejected():
    pre = Preprocessor(32)
    g = pre.geometry(10, 20)
    with pytest.raises(ValueError, match=r"\(20, 10\)"):
        pre.resize_mask(np.zeros((20, 10)), g)
    with pytest.raises(ValueError, match=r"\(32, 32\)"):
        g.restore(np.zeros((16, 16)))
    with pytest.raises(ValueError, match="0x5"):
        pre.geometry(0, 5)


def test_as_dict_round_trips():
    pre = Preprocessor(256, mean=0.4, std=0.2)
    assert pre.as_dict() == {"size": 256, "mean": 0.4, "std": 0.2}
    assert Preprocessor(**pre.as_dict()).as_dict() == pre.as_dict()
    assert isinstance(pre.geometry(3, 4), Geometry)


def test_a_reduced_decode_gets_the_full_images_geometry_and_nearly_its_frame():
    """worker.decode's long_side: pixels decoded at 1/4 of the file's size, with the file's shape,
    give the geometry of the full image (masks come back at full size) and a frame within a
    fraction of a gray level of the full image's."""
    rng = np.random.default_rng(3)
    yy, xx = np.mgrid[0:1000, 0:1200]
    img = np.clip(100 + 60 * np.sin(xx / 41.0) * np.cos(yy / 29.0) + rng.normal(0, 5, (1000, 1200)), 0, 255).astype(np.uint8)
    reduced = np.round(img.reshape(250, 4, 300, 4).mean(axis=(1, 3))).astype(np.uint8)
    pre = Preprocessor(128, 0.5, 0.25)
    frame_full, g_full = pre(img)
    frame, g = pre(reduced, shape=img.shape)
    assert g == g_full and (g.orig_h, g.orig_w) == (1000, 1200)
    levels = np.abs(frame - frame_full) * 0.25 * 255  # z-scored back to 8-bit gray levels
    assert levels.mean() < 0.5 and levels.max() < 3, (levels.mean(), levels.max())
    with pytest.raises(ValueError, match="smaller than the frame"):
        pre(reduced[:25, :30], shape=(250, 300))
    with pytest.raises(ValueError, match="whole factor"):
        pre(reduced, shape=(1200, 1000))  # a transposed shape, say
    with pytest.raises(ValueError, match="whole factor"):
        pre(reduced, shape=(1001, 1200))
