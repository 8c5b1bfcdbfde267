"""Decoding uploads: accepted formats become grayscale arrays in display
orientation; everything else fails with a reason a user can act on."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from worker.decode import DecodeError, decode_image


def encode(array: np.ndarray, fmt: str, mode: str | None = None, **kw) -> bytes:
    buf = io.BytesIO()
    im = Image.fromarray(array, mode) if mode else Image.fromarray(array)
    im.save(buf, format=fmt, **kw)
    return buf.getvalue()


def gradient(h=40, w=60) -> np.ndarray:
    return (np.arange(h * w).reshape(h, w) % 251).astype(np.uint8)


def test_8bit_png_roundtrips_exactly():
    img = gradient()
    out = decode_image(encode(img, "PNG"))
    assert out.format == "PNG" and out.pixels.dtype == np.uint8
    np.testing.assert_array_equal(out.pixels, img)


def test_16bit_png_keeps_16_bits():
    img = (np.arange(40 * 60).reshape(40, 60) * 17).astype(np.uint16)
    out = decode_image(encode(img, "PNG"))
    assert out.pixels.dtype == np.uint16
    np.testing.assert_array_equal(out.pixels, img)


def test_rgb_and_rgba_become_luminance():
    gray = gradient()
    rgb = np.stack([gray] * 3, axis=-1)
    rgba = np.dstack([rgb, np.full_like(gray, 255)])
    for data in (encode(rgb, "PNG"), encode(rgba, "PNG")):
        out = decode_image(data)
        assert out.pixels.shape == gray.shape
        np.testing.assert_allclose(out.pixels, gray, atol=1)


def test_cmyk_jpeg_is_accepted():
    buf = io.BytesIO()
    Image.new("CMYK", (64, 48), (0, 0, 0, 100)).save(buf, format="JPEG")
    out = decode_image(buf.getvalue())
    assert out.pixels.shape == (48, 64)


def test_exif_orientation_is_honoured():
    img = np.zeros((40, 80), dtype=np.uint8)
    img[:, :10] = 255  # bright band on the left edge of the stored pixels
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    out = decode_image(encode(img, "JPEG", exif=exif.tobytes(), quality=95))
    assert out.pixels.shape == (80, 40), "displayed frame is portrait"
    assert out.pixels[:10].mean() > 200 and out.pixels[-10:].mean() < 50


def test_truncated_jpeg_fails_with_reason():
    data = encode(gradient(200, 200), "JPEG")
    with pytest.raises(DecodeError, match="truncated"):
        decode_image(data[: len(data) // 2])


@pytest.mark.parametrize(
    "data, reason",
    [
        (b"", "empty file"),
        (b"patient notes\n" * 10, "not a PNG or JPEG"),
        (b"GIF89a" + b"\0" * 50, "not a PNG or JPEG"),
    ],
)
def test_non_images_fail_with_reason(data, reason):
    with pytest.raises(DecodeError, match=reason):
        decode_image(data)


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose IHDR claims width x height, with a tiny (invalid) body."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 100)) + chunk(b"IEND", b"")


def test_decompression_bomb_refused_before_decoding():
    with pytest.raises(DecodeError, match="30000x30000 pixels, above the limit"):
        decode_image(png_header_only(30000, 30000), max_pixels=100_000_000)


def test_tiny_image_refused():
    with pytest.raises(DecodeError, match="1x1 pixels, smaller than the minimum"):
        decode_image(encode(np.zeros((1, 1), np.uint8), "PNG"))


# -- reduced decoding (the worker's JPEG_DECODE=reduced) ---------------------------------------


def radiograph_like(h: int, w: int, seed: int = 0) -> np.ndarray:
    """Smooth structures with sharp edges and grain: what a JPEG of a radiograph holds."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    img = 60 + 40 * np.sin(xx / 37.0) + 30 * np.cos(yy / 23.0)
    img[(yy - h / 2) ** 2 / (h / 3) ** 2 + (xx - w / 3) ** 2 / (w / 6) ** 2 < 1] += 90  # a bright "bone"
    img += rng.normal(0, 6, (h, w))
    return np.clip(img, 0, 255).astype(np.uint8)


def block_means(pixels: np.ndarray, k: int) -> np.ndarray:
    h, w = (pixels.shape[0] // k) * k, (pixels.shape[1] // k) * k
    return pixels[:h, :w].reshape(h // k, k, w // k, k).mean(axis=(1, 3))


@pytest.mark.parametrize("long_side, factor", [(600, 2), (300, 4), (150, 8), (100, 8), (601, 1)])
def test_a_large_jpeg_is_decoded_smaller_on_request_and_keeps_its_full_size(long_side, factor):
    data = encode(radiograph_like(1000, 1200), "JPEG", quality=92)
    full = decode_image(data)
    out = decode_image(data, long_side=long_side)
    assert full.full_shape is None and full.shape == (1000, 1200)
    assert out.shape == (1000, 1200), "masks and statistics are measured at the file's size"
    assert out.pixels.shape == (-(-1000 // factor), -(-1200 // factor))
    assert max(out.pixels.shape) >= min(long_side, 1200)
    if factor == 1:
        assert out.full_shape is None
        np.testing.assert_array_equal(out.pixels, full.pixels)
    else:
        assert out.full_shape == (1000, 1200)
        # each decoded pixel is the mean of the block of the full decode it stands for, to JPEG rounding
        means = block_means(full.pixels.astype(np.float64), factor)
        diff = np.abs(out.pixels[: means.shape[0], : means.shape[1]] - means)
        assert diff.mean() < 1.0 and diff.max() < 4, (diff.mean(), diff.max())


@pytest.mark.parametrize("orientation, shown", [(3, (400, 800)), (6, (800, 400))])
def test_a_reduced_decode_honours_exif_orientation(orientation, shown):
    img = radiograph_like(400, 800)
    exif = Image.Exif()
    exif[0x0112] = orientation  # 3: rotated 180 degrees; 6: "rotate 90 CW to display", 800 high and 400 wide
    data = encode(img, "JPEG", exif=exif.tobytes(), quality=95)
    full = decode_image(data)
    out = decode_image(data, long_side=200)
    assert full.pixels.shape == shown
    assert out.shape == out.full_shape == shown and out.pixels.shape == (shown[0] // 4, shown[1] // 4)
    diff = np.abs(out.pixels - block_means(full.pixels.astype(np.float64), 4))
    assert diff.mean() < 1.0, diff.mean()


@pytest.mark.parametrize("h, w, factor", [(1003, 1207, 1), (1002, 1206, 2), (1004, 1204, 4)])
def test_only_whole_factors_reduce(h, w, factor):
    """A side that the factor does not divide would decode into a last pixel standing for part of a
    block, which a resize stretches over a whole one (the far edge moves by up to factor - 1 pixels):
    the largest factor that divides both sides is used, or none."""
    img = radiograph_like(h, w)
    img[:, int(0.9 * w) :] = 255  # a sharp edge near the far side
    data = encode(img, "JPEG", quality=92)
    out = decode_image(data, long_side=150)
    assert out.shape == (h, w) and out.pixels.shape == (h // factor, w // factor)
    assert out.full_shape == (None if factor == 1 else (h, w))
    edge = np.flatnonzero(out.pixels[h // factor // 2].astype(int) > 230)[0] * factor
    assert abs(edge - int(0.9 * w)) <= factor, (edge, int(0.9 * w))


def test_only_jpegs_are_decoded_smaller():
    img = radiograph_like(1000, 1200)
    out = decode_image(encode(img, "PNG"), long_side=100)
    assert out.full_shape is None
    np.testing.assert_array_equal(out.pixels, img)
