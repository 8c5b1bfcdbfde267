"""Overlays: the radiograph with its tumor tinted and outlined, as a PNG.

With ``OVERLAYS=lazy`` (the default) the worker stores the mask and the
statistics only, and the API renders an image's overlay the first time it is
asked for (``GET /v1/images/<id>/overlay.png``), from the uploaded file and
the stored mask, then keeps it in the blob store under the key the worker
recorded, so later requests read it back. With ``OVERLAYS=eager`` the worker
writes every overlay as it goes.

Why lazy is the default: a 3000 x 2500 overlay is a 4.2 MB RGB PNG that costs
~50 ms of a CPU core to render and encode, half of all the work an image needs
outside the network on this project's CPU, and more CPU than a GPU worker
host has at the rates the network reaches (1,000 images/s would need ~50
cores for overlays alone). Most overlays of an overnight batch are never
looked at; the masks (40 KB) and statistics are what downstream systems read.
Both modes draw the same mask on the same pixels when the worker decodes at
full size (tests/unit/test_overlay.py checks the bytes). A lazy worker
decodes a large JPEG smaller (JPEG_DECODE=reduced, worker/decode.py; its rows
say "+jpeg-reduced"), which moves the mask a little (Dice 0.985 between
the two on upscaled BTXRD, docs/benchmarks.md); the overlay always shows the
stored mask on the full-size image. A worker decoding JPEGs with nvJPEG
(GPU_DECODE) sees gray levels that may differ by one or two from Pillow's,
and so would its eager overlays.

Light on purpose (no PyTorch): the API process imports it.
"""

from __future__ import annotations

import cv2
import numpy as np

from model.postprocess import render_overlay
from worker.decode import decode_image
from worker.png import encode_png

def overlay_png(pixels: np.ndarray, mask: np.ndarray) -> bytes:
    """Decoded gray pixels and their {0, 1} (or {0, 255}) mask -> overlay PNG bytes."""
    return encode_png(render_overlay(pixels, mask))


def render_overlay_png(source: bytes, mask_png: bytes, max_pixels: int = 100_000_000) -> bytes:
    """The overlay of an uploaded file (JPEG, PNG or DICOM, as the worker read it)
    and its stored mask PNG.

    Raises:
        worker.decode.DecodeError: the file cannot be decoded (it was, by the worker).
        ValueError: the mask is not a PNG of the image's size.
    """
    image = decode_image(source, max_pixels)
    mask = cv2.imdecode(np.frombuffer(mask_png, np.uint8), cv2.IMREAD_GRAYSCALE)
    if mask is None:
        raise ValueError("the stored mask is not a readable PNG")
    return overlay_png(image.pixels, mask)
