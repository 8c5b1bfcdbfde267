"""Decoding uploaded files into grayscale pixel arrays.

Accepted: PNG and JPEG, 8- or 16-bit, grayscale, RGB, RGBA, palette or CMYK
(colour is reduced to luminance); and single-frame DICOM ('DICM' at offset
128), decoded by worker/dicom.py (docs/dicom.md). The header is read first and an image over
the pixel limit is refused before any pixel is decoded (decompression bombs).
JPEG EXIF orientation is honoured, so masks and statistics are in the frame
the radiologist sees. Every failure is a DecodeError whose message is the
reason the user reads.

A caller that only needs the image at a smaller size (the worker, which
shrinks every radiograph to the network's frame) passes ``long_side``: a JPEG
whose long side is at least twice that is then decoded at 1/2, 1/4 or 1/8 of
its size by libjpeg's scaled inverse DCT (Pillow's ``draft``; each decoded
pixel is, to JPEG rounding, the mean of the block it stands for), the largest
reduction that divides both sides and still leaves at least ``long_side``
pixels on the long side, without the full-size pixels ever existing.
``DecodedImage.shape`` stays the size of the file, so masks and statistics
are still at full resolution.
"""

from __future__ import annotations

import io
import struct
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from bonedetect.formats import HEAD_BYTES, UNSUPPORTED, sniff_format

ACCEPTED_FORMATS = {"PNG", "JPEG"}  # through Pillow; "DICOM" goes to worker/dicom.py
MIN_SIDE = 16  # a radiograph smaller than this cannot be segmented meaningfully

# We check the pixel count ourselves before decoding, with the configured limit.
Image.MAX_IMAGE_PIXELS = None


class DecodeError(ValueError):
    """The file cannot be turned into a radiograph; str(err) is the user-facing reason."""


@dataclass
class DecodedImage:
    pixels: np.ndarray  # (H, W) uint8 or uint16 grayscale, in display orientation
    format: str  # "PNG" | "JPEG" | "DICOM"
    pixel_spacing_mm: tuple[float, float] | None = None  # (row, column); None: unknown
    spacing_source: str | None = None  # "PixelSpacing" | "ImagerPixelSpacing (detector plane)" | None
    # DICOM only: the references a DICOM SEG needs (Study/Series/SOP Instance
    # UIDs, SOP Class UID, Modality, PhotometricInterpretation) and the spacing
    # attributes used. Never patient name/ID/birth date or any date.
    dicom: dict | None = None
    # (H, W) of the image in the file, in display orientation, when ``pixels``
    # were decoded smaller (decode_image's long_side); None: pixels are full size.
    full_shape: tuple[int, int] | None = None

    @property
    def shape(self) -> tuple[int, int]:
        """(H, W) of the radiograph as uploaded: what masks and statistics are measured at."""
        return self.full_shape or (int(self.pixels.shape[0]), int(self.pixels.shape[1]))


# EXIF orientations that swap width and height (Pillow's ImageOps.exif_transpose applies them).
_TRANSPOSING = {5, 6, 7, 8}


def decode_image(data: bytes, max_pixels: int = 100_000_000, long_side: int | None = None) -> DecodedImage:
    """The file's pixels, gray, in display orientation (module docstring).

    Args:
        max_pixels: larger images are refused before any pixel is decoded.
        long_side: a JPEG may be decoded smaller, down to this many pixels on
            its long side (module docstring); None: always full size.
    """
    if not data:
        raise DecodeError("empty file")
    kind = sniff_format(data[:HEAD_BYTES])
    if kind is None:
        raise DecodeError(UNSUPPORTED)
    if kind == "DICOM":
        from worker.dicom import decode_dicom  # pydicom is loaded only when a DICOM file comes

        return decode_dicom(data, max_pixels)
    try:
        im = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        raise DecodeError("not a decodable image: unreadable header") from None
    except (OSError, SyntaxError, ValueError, struct.error) as err:
        raise DecodeError(f"not a decodable image: {_reason(err)}") from None
    fmt = im.format
    if fmt not in ACCEPTED_FORMATS:
        raise DecodeError(f"unsupported image format {fmt}")
    w, h = im.size
    if w * h > max_pixels:
        raise DecodeError(f"image is {w}x{h} pixels, above the limit of {max_pixels} pixels")
    if min(w, h) < MIN_SIDE:
        raise DecodeError(f"image is {w}x{h} pixels, smaller than the minimum of {MIN_SIDE} pixels per side")
    full_shape = None
    try:
        if long_side and fmt == "JPEG" and _draft(im, long_side) > 1:
            transposed = im.getexif().get(0x0112, 1) in _TRANSPOSING
            full_shape = (w, h) if transposed else (h, w)
        # The pixel count was checked above, against our own limit.
        im.load()
        im = ImageOps.exif_transpose(im)
    except (OSError, SyntaxError, ValueError) as err:
        raise DecodeError(f"not a decodable image: {_reason(err)}") from None
    return DecodedImage(pixels=_to_gray(im), format=fmt, full_shape=full_shape)


def _draft(im: Image.Image, long_side: int) -> int:
    """Set ``im`` (a JPEG not yet loaded) to decode at 1/8, 1/4 or 1/2 of its
    size: the largest of those that divides both sides and keeps at least
    ``long_side`` pixels on the long side (so the short side keeps its share
    too); returns the factor, 1 when none does. Only whole divisors: libjpeg
    decodes a side that is not a multiple of the factor into one more pixel
    that stands for a part-block, which a resize would stretch over a whole
    one, shifting the far edge by up to factor - 1 pixels."""
    w, h = im.size
    for factor in (8, 4, 2):
        if w % factor == 0 and h % factor == 0 and max(w, h) // factor >= long_side:
            # Pillow picks the largest of 8, 4, 2 with w // size[0] and h // size[1] at least that: exactly factor
            if im.draft(im.mode, (w // factor, h // factor)) is None:
                return 1  # e.g. a multi-tile JPEG: Pillow decodes it at full size
            return factor
    return 1


def _reason(err: Exception) -> str:
    text = str(err) or type(err).__name__
    return f"truncated file ({text})" if "truncated" in text.lower() else text


def _to_gray(im: Image.Image) -> np.ndarray:
    mode = im.mode
    if mode in ("I;16", "I;16B", "I;16L", "I;16N"):
        return np.asarray(im, dtype=np.uint16)
    if mode == "I":  # 32-bit int container, e.g. some 16-bit PNGs
        arr = np.asarray(im)
        if arr.min() < 0 or arr.max() > 65535:
            raise DecodeError("unsupported pixel range for a 32-bit integer image")
        return arr.astype(np.uint16)
    if mode == "L":
        return np.asarray(im, dtype=np.uint8)
    if mode in ("LA", "1", "P", "PA"):
        return np.asarray(im.convert("L"), dtype=np.uint8)
    if mode in ("RGB", "RGBA", "CMYK", "YCbCr", "RGBX", "LAB", "HSV"):
        return np.asarray(im.convert("RGB").convert("L"), dtype=np.uint8)
    raise DecodeError(f"unsupported pixel mode {mode}")
