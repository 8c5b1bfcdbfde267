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
    filtered = np.empty((h, w * channels + 1), np.uint8)  # each row: filter type byte, then the row
    filtered[:, 0] = 2  # "Up": each byte minus the byte above it, mod 256
    filtered[0, 1:] = rows[0]
    np.subtract(rows[1:], rows[:-1], out=filtered[1:, 1:])
    header = struct.pack(">IIBBBBB", w, h, 8, _PNG_COLOR_TYPES[channels], 0, 0, 0)
    return b"".join(
        (
            b"\x89PNG\r\n\x1a\n",
            _png_chunk(b"IHDR", header),
            _png_chunk(b"IDAT", isal_zlib.compress(filtered, ISAL_LEVEL)),
            _png_chunk(b"IEND", b""),
        )
    )
