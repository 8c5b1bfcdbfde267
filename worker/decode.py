"""Decoding uploaded files into grayscale pixel arrays.

Accepted: PNG and JPEG, 8- or 16-bit, grayscale, RGB, RGBA, palette or CMYK
(colour is reduced to luminance); and single-frame DICOM ('DICM' at offset
128), decoded by worker/dicom.py (docs/dicom.md). The header is read first and an image over
the pixel limit is refused before any pixel is decoded (decompression bombs).
JPEG EXIF orientation is honoured, so masks and statistics are in the frame
the radiologist sees. Every failure is a DecodeError whose message is the
reason the user reads.
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


def decode_image(data: bytes, max_pixels: int = 100_000_000) -> DecodedImage:
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
    try:
        # The pixel count was checked above, against our own limit.
        im.load()
        im = ImageOps.exif_transpose(im)
    except (OSError, SyntaxError, ValueError) as err:
        raise DecodeError(f"not a decodable image: {_reason(err)}") from None
    return DecodedImage(pixels=_to_gray(im), format=fmt)


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
