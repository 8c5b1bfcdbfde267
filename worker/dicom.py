"""Decoding one DICOM radiograph into display-ready grayscale pixels.

Called by ``worker.decode.decode_image`` for files with 'DICM' at offset 128
(docs/dicom.md says what is kept and why). The order matters:

1. the file meta is read alone, so a transfer syntax we refuse (deflate, which
   pydicom would inflate whole on read) is refused before anything else;
2. the header is read without the pixel data, and everything that decides the
   cost of decoding (frames, Rows x Columns against ``max_pixels``, bit
   depth, samples) is checked there;
3. the file is read again with its pixel data; the pixel data's own size
   (native) or codestream header (JPEG, JPEG-LS, JPEG 2000) must agree with
   Rows/Columns/BitsAllocated before one pixel is decoded;
4. stored values -> modality LUT (rescale) -> VOI LUT or window (pydicom), or a
   0.5/99.5 percentile window when the file has none -> MONOCHROME1 inverted
   here -> uint16 (uint8 for 8-bit data), bone bright.

pydicom is imported here and only here, so PNG/JPEG decoding works without it.
"""

from __future__ import annotations

import io
import math
import struct
from typing import Any

import numpy as np

from worker.decode import MIN_SIDE, DecodedImage, DecodeError

try:
    import pydicom
    from pydicom.dataset import Dataset
    from pydicom.encaps import get_frame
    from pydicom.errors import InvalidDicomError
    from pydicom.filereader import read_dataset, read_preamble
    from pydicom.pixels import apply_modality_lut, apply_voi, apply_windowing, get_decoder
    from pydicom.pixels.utils import get_expected_length
    from pydicom.uid import UID
except ImportError:  # pragma: no cover - the worker extra installs it
    pydicom = None

# Transfer syntaxes accepted, by UID. Each is decoded by pydicom itself
# (native, RLE) or by a pylibjpeg plugin (JPEG, JPEG-LS, JPEG 2000).
SUPPORTED_TRANSFER_SYNTAXES = {
    "1.2.840.10008.1.2": "Implicit VR Little Endian",
    "1.2.840.10008.1.2.1": "Explicit VR Little Endian",
    "1.2.840.10008.1.2.2": "Explicit VR Big Endian",
    "1.2.840.10008.1.2.4.50": "JPEG Baseline",
    "1.2.840.10008.1.2.4.51": "JPEG Extended",
    "1.2.840.10008.1.2.4.57": "JPEG Lossless",
    "1.2.840.10008.1.2.4.70": "JPEG Lossless SV1",
    "1.2.840.10008.1.2.4.80": "JPEG-LS Lossless",
    "1.2.840.10008.1.2.4.81": "JPEG-LS Near-Lossless",
    "1.2.840.10008.1.2.4.90": "JPEG 2000 Lossless",
    "1.2.840.10008.1.2.4.91": "JPEG 2000",
    "1.2.840.10008.1.2.5": "RLE Lossless",
}
NATIVE = {"1.2.840.10008.1.2", "1.2.840.10008.1.2.1", "1.2.840.10008.1.2.2"}
JPEG_FAMILY = {"1.2.840.10008.1.2.4.50", "1.2.840.10008.1.2.4.51", "1.2.840.10008.1.2.4.57",
               "1.2.840.10008.1.2.4.70", "1.2.840.10008.1.2.4.80", "1.2.840.10008.1.2.4.81"}
J2K_FAMILY = {"1.2.840.10008.1.2.4.90", "1.2.840.10008.1.2.4.91"}

GRAY = {"MONOCHROME1", "MONOCHROME2"}
COLOUR = {"RGB", "YBR_FULL", "YBR_FULL_422", "YBR_RCT", "YBR_ICT"}

# The only header attributes that leave this module (DecodedImage.dicom):
# references a DICOM SEG needs, plus the spacing attributes actually used.
# Never patient name/ID/birth date, never dates, never free text.
REFERENCE_KEYWORDS = (
    "StudyInstanceUID",
    "SeriesInstanceUID",
    "SOPInstanceUID",
    "SOPClassUID",
    "Modality",
    "PhotometricInterpretation",
)

SPACING_PIXEL = "PixelSpacing"
SPACING_IMAGER = "ImagerPixelSpacing (detector plane)"

LOW_PERCENTILE, HIGH_PERCENTILE = 0.5, 99.5


def decode_dicom(data: bytes, max_pixels: int) -> DecodedImage:
    if pydicom is None:  # pragma: no cover
        raise DecodeError("DICOM support is not installed on this worker (pydicom missing)")
    tsyntax = _transfer_syntax(data)
    header = _read(data, stop_before_pixels=True)
    _check_header(header, tsyntax, max_pixels)
    ds = _read(data, stop_before_pixels=False)
    _check_pixel_data(ds, tsyntax)
    stored = _decode_pixels(ds)
    pixels = _to_display(stored, ds)
    spacing, source, spacing_attrs = _spacing(ds)
    return DecodedImage(
        pixels=pixels,
        format="DICOM",
        pixel_spacing_mm=spacing,
        spacing_source=source,
        dicom=_references(ds) | spacing_attrs,
    )


# --- reading ---------------------------------------------------------------


def _transfer_syntax(data: bytes) -> str:
    """The file meta's Transfer Syntax UID, read without touching the dataset."""
    fp = io.BytesIO(data)
    try:
        read_preamble(fp, False)
        meta = read_dataset(fp, False, True, stop_when=lambda tag, vr, length: tag.group != 2)
    except Exception as err:
        raise DecodeError(f"not a readable DICOM file: bad file meta header ({_text(err)})") from None
    uid = str(meta.get("TransferSyntaxUID", "") or "").strip("\0 ")
    if not uid:
        raise DecodeError("not a readable DICOM file: no Transfer Syntax UID in the file meta header")
    if uid not in SUPPORTED_TRANSFER_SYNTAXES:
        name = UID(uid).name if UID(uid).is_valid else uid
        raise DecodeError(
            f"unsupported DICOM transfer syntax {name} ({uid}); supported: "
            + ", ".join(SUPPORTED_TRANSFER_SYNTAXES.values())
        )
    if not get_decoder(UID(uid)).is_available:
        raise DecodeError(f"no decoder installed on this worker for DICOM transfer syntax {UID(uid).name}")
    return uid


def _read(data: bytes, *, stop_before_pixels: bool) -> Dataset:
    try:
        return pydicom.dcmread(io.BytesIO(data), stop_before_pixels=stop_before_pixels, force=False)
    except InvalidDicomError as err:
        raise DecodeError(f"not a readable DICOM file: {_text(err)}") from None
    except (EOFError, struct.error):
        raise DecodeError("not a readable DICOM file: truncated file") from None
    except Exception as err:  # malformed elements, absurd lengths, recursion ...
        raise DecodeError(f"not a readable DICOM file: {_text(err)}") from None


def _text(err: Exception) -> str:
    text = str(err).splitlines()[0] if str(err) else type(err).__name__
    return text[:200]


def _int(ds: Dataset, keyword: str) -> int | None:
    value = ds.get(keyword)
    if value is None or value == "":
        return None
    try:
        return int(value)
    except (TypeError, ValueError):
        raise DecodeError(f"DICOM header has an invalid {keyword}: {str(value)[:40]!r}") from None


# --- checks before decoding ------------------------------------------------


def _check_header(ds: Dataset, tsyntax: str, max_pixels: int) -> None:
    rows, cols = _int(ds, "Rows"), _int(ds, "Columns")
    if not rows or not cols:
        sop = ds.get("SOPClassUID")
        kind = UID(str(sop)).name if sop else "unknown SOP class"
        raise DecodeError(f"DICOM file holds no image (no Rows/Columns; {kind}, modality {ds.get('Modality', '?')})")
    frames = _int(ds, "NumberOfFrames") or 1
    if frames > 1:
        raise DecodeError(f"multi-frame DICOM ({frames} frames) is not supported: send one radiograph per file")
    if rows * cols > max_pixels:
        raise DecodeError(f"image is {cols}x{rows} pixels, above the limit of {max_pixels} pixels")
    if min(rows, cols) < MIN_SIDE:
        raise DecodeError(f"image is {cols}x{rows} pixels, smaller than the minimum of {MIN_SIDE} pixels per side")
    allocated, stored = _int(ds, "BitsAllocated"), _int(ds, "BitsStored")
    if allocated not in (8, 16):
        raise DecodeError(f"DICOM BitsAllocated {allocated} is not supported (8 or 16)")
    if stored is None or not 8 <= stored <= allocated:
        raise DecodeError(f"DICOM BitsStored {stored} is not supported (8 to 16, at most BitsAllocated {allocated})")
    if _int(ds, "PixelRepresentation") not in (0, 1):
        raise DecodeError("DICOM header has no valid PixelRepresentation")
    photometric = str(ds.get("PhotometricInterpretation", "")).strip()
    samples = _int(ds, "SamplesPerPixel") or 1
    if photometric in GRAY:
        if samples != 1:
            raise DecodeError(f"DICOM {photometric} image with {samples} samples per pixel")
    elif photometric in COLOUR:
        if samples != 3:
            raise DecodeError(f"DICOM {photometric} image with {samples} samples per pixel")
    else:
        raise DecodeError(f"unsupported DICOM photometric interpretation {photometric or '(none)'}")


def _check_pixel_data(ds: Dataset, tsyntax: str) -> None:
    if "FloatPixelData" in ds or "DoubleFloatPixelData" in ds:
        raise DecodeError("DICOM float pixel data is not supported")
    data = ds.get("PixelData")
    if not data:
        raise DecodeError("DICOM file has no pixel data")
    rows, cols, allocated = int(ds.Rows), int(ds.Columns), int(ds.BitsAllocated)
    if tsyntax in NATIVE:
        expected = get_expected_length(ds, "bytes")
        if len(data) not in (expected, expected + expected % 2):
            raise DecodeError(
                f"DICOM pixel data is {len(data)} bytes, but Rows {rows} x Columns {cols} x "
                f"{int(ds.get('SamplesPerPixel', 1))} samples x {allocated} bits need {expected} bytes"
            )
        return
    try:
        frame = get_frame(data, 0, number_of_frames=1)
    except Exception as err:
        raise DecodeError(f"DICOM encapsulated pixel data is malformed ({_text(err)})") from None
    if not frame:
        raise DecodeError("DICOM file has no pixel data (empty frame)")
    if tsyntax in JPEG_FAMILY:
        size = _jpeg_frame_size(frame)
        kind = "JPEG"
    elif tsyntax in J2K_FAMILY:
        size = _j2k_frame_size(frame)
        kind = "JPEG 2000"
    else:  # RLE: pydicom decodes into an array sized from Rows/Columns and checks the segments
        return
    if size is None:
        raise DecodeError(f"DICOM {kind} pixel data has no readable frame header")
    height, width, precision, components = size
    samples = int(ds.get("SamplesPerPixel", 1))
    if (height, width) != (rows, cols) or components != samples or precision > allocated:
        raise DecodeError(
            f"DICOM {kind} pixel data is a {width}x{height} image with {components} component(s) of "
            f"{precision} bits, but the header says Columns {cols} x Rows {rows}, {samples} sample(s), "
            f"BitsAllocated {allocated}"
        )


_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF, 0xF7}


def _jpeg_frame_size(src: bytes) -> tuple[int, int, int, int] | None:
    """(height, width, precision, components) from a JPEG or JPEG-LS SOF segment."""
    if src[:2] != b"\xff\xd8":
        return None
    offset = 2
    try:
        while offset + 4 <= len(src):
            if src[offset] != 0xFF:
                return None
            marker = src[offset + 1]
            if marker == 0xFF:  # fill byte
                offset += 1
                continue
            (length,) = struct.unpack(">H", src[offset + 2 : offset + 4])
            if marker in _SOF:
                precision = src[offset + 4]
                height, width = struct.unpack(">HH", src[offset + 5 : offset + 9])
                components = src[offset + 9]
                return (height, width, precision, components) if height and width else None
            if marker == 0xDA:  # start of scan before any frame header
                return None
            offset += 2 + length
    except (IndexError, struct.error):
        return None
    return None


def _j2k_frame_size(src: bytes) -> tuple[int, int, int, int] | None:
    """(height, width, precision, components) from a JPEG 2000 SIZ segment (J2K or JP2)."""
    start = src.find(b"\xff\x4f\xff\x51", 0, 4096)
    if start < 0:
        return None
    siz = src[start + 4 :]
    try:
        xsiz, ysiz, xosiz, yosiz = struct.unpack(">IIII", siz[4:20])
        (components,) = struct.unpack(">H", siz[36:38])
        precision = (siz[38] & 0x7F) + 1
    except (IndexError, struct.error):
        return None
    width, height = xsiz - xosiz, ysiz - yosiz
    return (height, width, precision, components) if width > 0 and height > 0 else None


# --- decoding and display --------------------------------------------------


def _decode_pixels(ds: Dataset) -> np.ndarray:
    try:
        arr = ds.pixel_array  # YBR is converted to RGB by pydicom
    except Exception as err:
        raise DecodeError(f"DICOM pixel data could not be decoded ({_text(err)})") from None
    samples = int(ds.get("SamplesPerPixel", 1))
    expected = (int(ds.Rows), int(ds.Columns)) + ((3,) if samples == 3 else ())
    if arr.shape != expected:
        raise DecodeError(f"DICOM pixel data decoded to shape {arr.shape}, but the header says {expected}")
    return arr


def _to_display(arr: np.ndarray, ds: Dataset) -> np.ndarray:
    eight_bit = int(ds.BitsStored) <= 8
    if arr.ndim == 3:  # colour: luminance (ITU-R 601, as PIL's "L"), no VOI for colour
        full = float(2 ** int(ds.BitsStored) - 1)
        lum = arr[..., 0] * 0.299 + arr[..., 1] * 0.587 + arr[..., 2] * 0.114
        return _quantise(np.clip(lum / full, 0.0, 1.0), eight_bit)
    values = apply_modality_lut(arr, ds)
    unit = _voi(values, ds)
    if str(ds.PhotometricInterpretation).strip() == "MONOCHROME1":
        unit = 1.0 - unit  # low values are bright in MONOCHROME1: make bone bright
    return _quantise(unit, eight_bit)


def _quantise(unit: np.ndarray, eight_bit: bool) -> np.ndarray:
    if eight_bit:
        return np.rint(unit * 255.0).astype(np.uint8)
    return np.rint(unit * 65535.0).astype(np.uint16)


def _voi(values: np.ndarray, ds: Dataset) -> np.ndarray:
    """Values after the modality LUT -> float64 in [0, 1] (MONOCHROME2 sense of the stored data)."""
    if ds.get("VOILUTSequence"):
        try:
            return _apply_voi_lut_sequence(values, ds)
        except Exception:
            pass  # an unusable LUT: fall through to window, then percentile
    if "WindowCenter" in ds and "WindowWidth" in ds:
        try:
            return _apply_window(values, ds)
        except Exception:
            pass
    return _percentile_window(values)


def _apply_voi_lut_sequence(values: np.ndarray, ds: Dataset) -> np.ndarray:
    item = ds.VOILUTSequence[0]
    entries, first = int(item.LUTDescriptor[0]) or 65536, int(item.LUTDescriptor[1])
    if values.dtype.kind == "f":  # LUT inputs are integers: a rescale may have made floats
        values = np.rint(values).astype(np.int64)
    out = apply_voi(values, ds, 0).astype(np.float64)
    lut = apply_voi(np.arange(first, first + entries, dtype=np.int64), ds, 0).astype(np.float64)
    lo, hi = float(lut.min()), float(lut.max())
    if hi <= lo:
        raise ValueError("constant VOI LUT")
    return np.clip((out - lo) / (hi - lo), 0.0, 1.0)


def _apply_window(values: np.ndarray, ds: Dataset) -> np.ndarray:
    """The file's first window (LINEAR, LINEAR_EXACT or SIGMOID) by pydicom's
    apply_windowing, on a stand-in dataset whose output range is fixed at
    0..65535, so the result does not depend on how pydicom derives the output
    range from BitsStored and the rescale."""
    center, width = _first(ds.WindowCenter), _first(ds.WindowWidth)
    if not (math.isfinite(center) and math.isfinite(width)):
        raise ValueError("window is not finite")
    window = Dataset()
    window.PhotometricInterpretation = "MONOCHROME2"
    window.BitsStored = 16
    window.PixelRepresentation = 0
    window.WindowCenter = center
    window.WindowWidth = width
    if ds.get("VOILUTFunction"):
        window.VOILUTFunction = str(ds.VOILUTFunction)
    out = apply_windowing(np.asarray(values, dtype=np.float64), window, 0)
    return np.clip(out / 65535.0, 0.0, 1.0)


def _first(value: Any) -> float:
    """The first of a multi-valued DS (several windows may be offered)."""
    if not isinstance(value, (str, bytes)) and hasattr(value, "__len__"):
        value = value[0]
    return float(value)


def _percentile_window(values: np.ndarray) -> np.ndarray:
    values = np.asarray(values, dtype=np.float64)
    lo, hi = np.percentile(values, [LOW_PERCENTILE, HIGH_PERCENTILE])
    if hi <= lo:
        return np.zeros(values.shape, dtype=np.float64)
    return np.clip((values - lo) / (hi - lo), 0.0, 1.0)


# --- spacing and references -----------------------------------------------


def _pair(ds: Dataset, keyword: str) -> tuple[float, float] | None:
    value = ds.get(keyword)
    if value is None:
        return None
    try:
        row, col = (float(v) for v in value)
    except (TypeError, ValueError):
        return None
    if not all(math.isfinite(s) and s > 0 for s in (row, col)):
        return None
    return row, col


def _spacing(ds: Dataset) -> tuple[tuple[float, float] | None, str | None, dict]:
    """(row, col) spacing in mm, its source, and the attributes used.

    PixelSpacing (calibrated to the patient plane where the modality says so)
    wins; else ImagerPixelSpacing, which is at the detector: an area from it is
    "mm^2 at the detector", magnified by the source-object/source-detector
    geometry. EstimatedRadiographicMagnificationFactor is recorded, not applied.
    """
    pixel = _pair(ds, "PixelSpacing")
    if pixel is not None:
        attrs: dict[str, Any] = {"PixelSpacing": list(pixel)}
        if ds.get("PixelSpacingCalibrationType"):
            attrs["PixelSpacingCalibrationType"] = str(ds.PixelSpacingCalibrationType)
        return pixel, SPACING_PIXEL, attrs
    imager = _pair(ds, "ImagerPixelSpacing")
    if imager is not None:
        attrs = {"ImagerPixelSpacing": list(imager)}
        try:
            emf = float(ds.get("EstimatedRadiographicMagnificationFactor"))
            if math.isfinite(emf) and emf > 0:
                attrs["EstimatedRadiographicMagnificationFactor"] = emf
        except (TypeError, ValueError):
            pass
        return imager, SPACING_IMAGER, attrs
    return None, None, {}


def _references(ds: Dataset) -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for keyword in REFERENCE_KEYWORDS:
        value = ds.get(keyword)
        out[keyword] = str(value).strip() if value not in (None, "") else None
    return out
