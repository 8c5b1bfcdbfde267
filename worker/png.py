"""A fast, standard, lossless PNG writer for masks and overlays.

Light on purpose (numpy, OpenCV, ISA-L; no PyTorch): the API imports it too,
to render overlays on request (worker/overlay.py).
"""

from __future__ import annotations

import struct
import zlib

import cv2
import numpy as np

# PNG encoding was the largest cost of an image after the network: 258 ms of
# one core for a 3000x2500 RGB overlay with libpng's defaults (zlib level 1,
# adaptive row filters). Here: the "Up" row filter for every row (numpy), then
# ISA-L's deflate (python-isal, about 4x zlib's speed at the same size): 51 ms,
# and 1 ms instead of 46 for the mask (docs/benchmarks.md). Without isal,
# libpng with the Up filter: 144 ms. Either way a standard, lossless PNG.
try:
    from isal import isal_zlib
except ImportError:  # pragma: no cover - isal is a worker dependency
    isal_zlib = None
ISAL_LEVEL = 2  # ISA-L levels 0-3; 2 was the fastest at zlib level 1's size here
PNG_PARAMS = [cv2.IMWRITE_PNG_COMPRESSION, 1, cv2.IMWRITE_PNG_FILTER, cv2.IMWRITE_PNG_FILTER_UP]
_PNG_COLOR_TYPES = {1: 0, 3: 2, 4: 6}  # channels -> PNG colour type: gray, RGB, RGBA


def _png_chunk(kind: bytes, data) -> bytes:
    crc = zlib.crc32(data, zlib.crc32(kind))
    return struct.pack(">I", len(data)) + kind + bytes(data) + struct.pack(">I", crc)


def encode_png(array: np.ndarray) -> bytes:
    """8-bit gray (H, W), RGB (H, W, 3) or RGBA (H, W, 4) array -> PNG bytes
    (channels in PNG's own order, RGB: not OpenCV's BGR)."""
    array = np.asarray(array)
    channels = 1 if array.ndim == 2 else (array.shape[2] if array.ndim == 3 else 0)
    if array.dtype != np.uint8 or channels not in _PNG_COLOR_TYPES or array.size == 0:
        raise ValueError(f"encode_png takes a non-empty uint8 gray, RGB or RGBA image, got {array.dtype} {array.shape}")
    h, w = array.shape[:2]
    if isal_zlib is None:
        bgr = {1: None, 3: cv2.COLOR_RGB2BGR, 4: cv2.COLOR_RGBA2BGRA}[channels]
        ok, buf = cv2.imencode(".png", cv2.cvtColor(array, bgr) if bgr is not None else array, PNG_PARAMS)
        if not ok:
            raise RuntimeError("PNG encoding failed")
        return buf.tobytes()
    rows = np.ascontiguousarray(array).reshape(h, w * channels)
    return _png_file(w, h, _PNG_COLOR_TYPES[channels], isal_zlib.compress(_up_filtered(rows), ISAL_LEVEL))


def _up_filtered(rows: np.ndarray) -> np.ndarray:
    """(n, width) uint8 rows -> PNG's filtered rows, (n, width + 1): each the filter type byte 2, "Up" (each
    byte minus the byte above it, mod 256), then the row; the first row's row above is zero, as PNG takes it
    at the top of an image."""
    filtered = np.empty((rows.shape[0], rows.shape[1] + 1), np.uint8)
    filtered[:, 0] = 2
    filtered[0, 1:] = rows[0]
    np.subtract(rows[1:], rows[:-1], out=filtered[1:, 1:])
    return filtered


def _png_file(w: int, h: int, color_type: int, idat: bytes) -> bytes:
    """An 8-bit PNG of w x h pixels around its compressed image data."""
    header = struct.pack(">IIBBBBB", w, h, 8, color_type, 0, 0, 0)
    return b"".join(
        (b"\x89PNG\r\n\x1a\n", _png_chunk(b"IHDR", header), _png_chunk(b"IDAT", idat), _png_chunk(b"IEND", b""))
    )


# Rows of zeros, fed to the compressor where a mask has nothing: filter type 0 ("None") and zero bytes.
_ZEROS = np.zeros(1 << 20, np.uint8)
_ZEROS.flags.writeable = False


def encode_mask_png(mask: np.ndarray, windows: list[tuple[int, int, int, int]] | None = None) -> bytes:
    """A {0, 1} uint8 (H, W) mask -> the PNG of ``mask * 255``: 8-bit gray, 0 and 255 (the worker's mask.png).

    ``windows``: (top, bottom, left, right) boxes outside which the mask is
    0 (``Prediction.windows``; None: the mask's own bounding box, found with
    one pass). The caller vouches for that: a pixel set in a row that no
    window spans is written as 0. Only the rows from the first window's top to the last
    window's bottom are scaled, filtered ("Up") and compressed as such; the
    rows above and below are zero rows with filter type "None", fed to the
    compressor straight from one block of zeros. On a 3000x2500 radiograph
    with a tumor that was 3.7-4.1 ms of a core per image for ``encode_png(mask
    * 255)`` and is 1.8 here; the file is about half as large. The same
    image, a standard PNG (each row may name its own filter).
    """
    mask = np.asarray(mask)
    if mask.dtype != np.uint8 or mask.ndim != 2 or mask.size == 0:
        raise ValueError(f"encode_mask_png takes a non-empty uint8 (H, W) mask, got {mask.dtype} {mask.shape}")
    if isal_zlib is None:
        return encode_png(mask * np.uint8(255))
    h, w = mask.shape
    if windows is None:
        _, top, _, bh = cv2.boundingRect(mask)
        bottom = top + bh
    elif windows:
        top, bottom = min(t for t, _, _, _ in windows), max(b for _, b, _, _ in windows)
    else:
        top = bottom = 0
    top = max(0, min(top, h))
    bottom = max(top, min(bottom, h))
    compressor = isal_zlib.compressobj(ISAL_LEVEL)
    stride = w + 1
    out = []

    def zero_rows(n: int) -> None:
        n *= stride
        while n:
            k = min(n, _ZEROS.size)
            out.append(compressor.compress(_ZEROS[:k]))
            n -= k

    zero_rows(top)
    if bottom > top:
        # "Up" reads no row outside the band: the row above its first is zero (or, at the top, taken as zero)
        out.append(compressor.compress(_up_filtered(mask[top:bottom] * np.uint8(255))))
    zero_rows(h - bottom)
    out.append(compressor.flush())
    return _png_file(w, h, 0, b"".join(out))
