"""DICOM uploads: every supported transfer syntax decodes to display-ready
grayscale (modality LUT, then VOI LUT / window / percentile window, then
MONOCHROME1 inverted: bone bright); spacing and its source are reported;
bad files fail with a reason, oversized ones before any pixel is decoded; and
no patient identity or date leaves the decoder.

Every file here is written by the test with pydicom, except where a syntax has
no encoder installed: then pydicom's own bundled test files (shipped inside
the wheel, read with download=False) are used.
"""

from __future__ import annotations

import io

import numpy as np
import pytest

pydicom = pytest.importorskip("pydicom")

from PIL import Image  # noqa: E402
from pydicom.data import get_testdata_file  # noqa: E402
from pydicom.dataset import Dataset, FileMetaDataset  # noqa: E402
from pydicom.encaps import encapsulate  # noqa: E402
from pydicom.sequence import Sequence  # noqa: E402
from pydicom.uid import (  # noqa: E402
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGLosslessSV1,
    RLELossless,
    generate_uid,
)

import worker.dicom as dicom_mod  # noqa: E402
from model.stats import tumor_statistics  # noqa: E402
from worker.decode import DecodeError, decode_image, sniff_format  # noqa: E402

CR_STORAGE = "1.2.840.10008.5.1.4.1.1.1"
ROWS, COLS = 200, 300  # a 300 x 200 (width x height) radiograph
SLOPE, INTERCEPT = 0.5, 100.0
CENTER, WIDTH = 1100.0, 1600.0
SPACING = 0.139

IDENTITY = {
    "PatientName": "Doe^Jane",
    "PatientID": "PID-0042",
    "PatientBirthDate": "19700101",
    "StudyDate": "20240102",
    "SeriesDate": "20240102",
    "AcquisitionDate": "20240102",
    "ContentDate": "20240102",
    "StudyTime": "101500",
    "AccessionNumber": "ACC-77",
    "InstitutionName": "St Elsewhere",
    "ReferringPhysicianName": "House^Greg",
}
ALLOWED_KEYS = {
    "StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "SOPClassUID", "Modality",
    "PhotometricInterpretation", "PixelSpacing", "PixelSpacingCalibrationType", "ImagerPixelSpacing",
    "EstimatedRadiographicMagnificationFactor",
}


# --- writing test files ------------------------------------------------------


def cr_stored(rows=ROWS, cols=COLS) -> np.ndarray:
    """12-bit stored values: a ramp with texture, 0 at (0, 0), 4095 at the far corner."""
    rng = np.random.default_rng(7)
    ramp = np.linspace(0, 4095, rows * cols).reshape(rows, cols)
    arr = np.clip(ramp + rng.integers(-40, 40, size=(rows, cols)), 0, 4095).astype(np.uint16)
    arr[0, 0], arr[-1, -1] = 0, 4095
    return arr


def make_dataset(arr: np.ndarray, photometric: str, bits_stored: int, **attrs) -> Dataset:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = CR_STORAGE
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID = generate_uid()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = CR_STORAGE
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.Modality = "CR"
    for key, value in IDENTITY.items():
        setattr(ds, key, value)
    ds.set_pixel_data(arr, photometric, bits_stored, generate_instance_uid=False)
    for key, value in attrs.items():
        setattr(ds, key, value)
    return ds


def make_cr(**attrs) -> Dataset:
    """The 12-bit MONOCHROME1 CR-like image with rescale, window and detector spacing."""
    base = dict(
        RescaleSlope=SLOPE, RescaleIntercept=INTERCEPT, WindowCenter=CENTER, WindowWidth=WIDTH,
        ImagerPixelSpacing=[SPACING, SPACING],
    )
    base.update(attrs)
    return make_dataset(cr_stored(), "MONOCHROME1", 12, **base)


def to_bytes(ds: Dataset, tsyntax=None) -> bytes:
    if tsyntax is not None:
        if tsyntax == ExplicitVRBigEndian and ds.BitsAllocated == 16:
            # pydicom writes OW pixel data as given: swap it to big endian ourselves
            ds.PixelData = np.frombuffer(ds.PixelData, "<u2").astype(">u2").tobytes()
        ds.file_meta.TransferSyntaxUID = tsyntax
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def encapsulated(ds: Dataset, tsyntax, frame: bytes) -> bytes:
    ds.PixelData = encapsulate([frame])
    ds["PixelData"].VR = "OB"
    ds["PixelData"].is_undefined_length = True
    return to_bytes(ds, tsyntax)


def bundled(name: str) -> bytes:
    path = get_testdata_file(name, download=False)  # never from the network
    if path is None:
        pytest.skip(f"pydicom test file {name} is not available offline")
    with open(path, "rb") as fh:
        return fh.read()


# --- expected values, computed independently of the decoder ----------------


def expected_window(stored, slope, intercept, center, width, invert) -> np.ndarray:
    """PS3.3 C.11.2.1.2.1 LINEAR window, to 16 bits, by hand."""
    x = stored.astype(np.float64) * slope + intercept
    c, w = center - 0.5, width - 1.0
    y = np.where(x <= c - w / 2, 0.0, np.where(x > c + w / 2, 1.0, (x - c) / w + 0.5))
    if invert:
        y = 1.0 - y
    return np.rint(y * 65535.0)


def expected_percentile(values, invert=False, full=65535.0) -> np.ndarray:
    values = values.astype(np.float64)
    lo, hi = np.percentile(values, [0.5, 99.5])
    y = np.clip((values - lo) / (hi - lo), 0.0, 1.0)
    if invert:
        y = 1.0 - y
    return np.rint(y * full)


def assert_cr(out, source: np.ndarray | None = None):
    stored = cr_stored() if source is None else source
    assert out.format == "DICOM"
    assert out.pixels.shape == (ROWS, COLS) and out.pixels.dtype == np.uint16
    expected = expected_window(stored, SLOPE, INTERCEPT, CENTER, WIDTH, invert=True)
    np.testing.assert_allclose(out.pixels.astype(np.float64), expected, atol=1)
    # MONOCHROME1: the minimum stored value is displayed brightest, the maximum darkest
    assert out.pixels[0, 0] == 65535 and out.pixels[-1, -1] == 0
    assert out.pixel_spacing_mm == pytest.approx((SPACING, SPACING))
    assert out.spacing_source == "ImagerPixelSpacing (detector plane)"


# --- transfer syntaxes -------------------------------------------------------


@pytest.mark.parametrize("tsyntax", [ExplicitVRLittleEndian, ImplicitVRLittleEndian, ExplicitVRBigEndian])
def test_uncompressed_cr_rescaled_windowed_and_inverted(tsyntax):
    data = to_bytes(make_cr(), tsyntax)
    assert sniff_format(data[:132]) == "DICOM"
    assert_cr(decode_image(data))


def test_rle_lossless_written_by_pydicom():
    ds = make_cr()
    ds.compress(RLELossless, generate_instance_uid=False)
    assert_cr(decode_image(to_bytes(ds)))


def test_jpeg2000_lossless_written_by_openjpeg():
    pytest.importorskip("openjpeg")
    ds = make_cr()
    ds.compress(JPEG2000Lossless, generate_instance_uid=False)
    assert_cr(decode_image(to_bytes(ds)))


def test_jpeg_lossless_sv1_12bit_written_by_libjpeg_turbo():
    imagecodecs = pytest.importorskip("imagecodecs")
    frame = imagecodecs.jpeg8_encode(cr_stored(), lossless=True, predictor=1, bitspersample=12)
    assert frame[:2] == b"\xff\xd8" and b"\xff\xc3" in frame[:200]  # SOF3: lossless process 14
    assert_cr(decode_image(encapsulated(make_cr(), JPEGLosslessSV1, frame)))


def test_jpeg_baseline_8bit_gets_a_percentile_window():
    yy, xx = np.mgrid[0:ROWS, 0:COLS]
    gray = (40 + 150 * (xx / COLS) + 20 * np.sin(yy / 15.0)).astype(np.uint8)  # smooth, not full range
    buf = io.BytesIO()
    Image.fromarray(gray).save(buf, format="JPEG", quality=95)
    ds = make_dataset(gray, "MONOCHROME2", 8)
    out = decode_image(encapsulated(ds, JPEGBaseline8Bit, buf.getvalue()))
    assert out.pixels.dtype == np.uint8 and out.pixels.shape == (ROWS, COLS)
    # the lossy codestream as Pillow decodes it, then the 0.5/99.5 percentile window by hand
    lossy = np.asarray(Image.open(io.BytesIO(buf.getvalue())), dtype=np.uint8)
    expected = expected_percentile(lossy, full=255.0)
    assert np.abs(out.pixels.astype(int) - expected).max() <= 3
    assert out.pixel_spacing_mm is None and out.spacing_source is None


MR_VARIANTS = [
    "MR_small_implicit.dcm",  # Implicit VR Little Endian
    "MR_small_bigendian.dcm",  # Explicit VR Big Endian
    "MR_small_RLE.dcm",  # RLE Lossless (written by another encoder than pydicom's)
    "MR_small_jp2klossless.dcm",  # JPEG 2000 Lossless
    "MR_small_jpeg_ls_lossless.dcm",  # JPEG-LS Lossless (no JPEG-LS encoder installed)
]


@pytest.mark.parametrize("name", MR_VARIANTS)
def test_bundled_variants_decode_like_the_uncompressed_original(name):
    reference = decode_image(bundled("MR_small.dcm"))
    out = decode_image(bundled(name))
    np.testing.assert_array_equal(out.pixels, reference.pixels)
    assert out.pixel_spacing_mm == pytest.approx((0.3125, 0.3125)) and out.spacing_source == "PixelSpacing"


def test_bundled_mr_window_applied_after_rescale():
    raw = pydicom.dcmread(get_testdata_file("MR_small.dcm", download=False))
    center, width = float(raw.WindowCenter), float(raw.WindowWidth)  # single-valued in this file
    slope, intercept = float(raw.get("RescaleSlope", 1)), float(raw.get("RescaleIntercept", 0))
    out = decode_image(bundled("MR_small.dcm"))
    expected = expected_window(raw.pixel_array, slope, intercept, center, width, invert=False)
    np.testing.assert_allclose(out.pixels.astype(np.float64), expected, atol=1)


def test_bundled_rgb_jpeg_lossless_becomes_luminance():
    """JPEG Lossless SV1 (RGB, by GDCM) against the same picture stored as RLE."""
    rle = pydicom.dcmread(get_testdata_file("SC_rgb_rle.dcm", download=False)).pixel_array.astype(np.float64)
    expected = np.rint(rle[..., 0] * 0.299 + rle[..., 1] * 0.587 + rle[..., 2] * 0.114)
    for name in ("SC_rgb_jpeg_gdcm.dcm", "SC_rgb_rle.dcm"):
        out = decode_image(bundled(name))
        assert out.pixels.dtype == np.uint8 and out.pixels.shape == (100, 100)
        np.testing.assert_allclose(out.pixels, expected, atol=1)


def test_bundled_jpeg_extended_12bit_decodes():
    out = decode_image(bundled("JPGExtended.dcm"))
    assert out.pixels.shape == (1024, 256) and out.pixels.dtype == np.uint16


def test_rgb_uncompressed_becomes_luminance():
    rng = np.random.default_rng(3)
    rgb = rng.integers(0, 256, size=(40, 50, 3), dtype=np.uint8)
    out = decode_image(to_bytes(make_dataset(rgb, "RGB", 8)))
    expected = np.rint(rgb[..., 0] * 0.299 + rgb[..., 1] * 0.587 + rgb[..., 2] * 0.114)
    assert out.pixels.dtype == np.uint8
    np.testing.assert_allclose(out.pixels, expected, atol=1)


# --- VOI variants ------------------------------------------------------------


def test_voi_lut_sequence_preferred_over_window():
    entries = 4096
    lut = np.rint(np.sqrt(np.arange(entries) / (entries - 1)) * 65535).astype(np.uint16)
    item = Dataset()
    item.LUTDescriptor = [entries, 0, 16]
    item.add_new(0x00283006, "US", lut.tolist())  # LUTData, VR US (ambiguous US or OW)
    ds = make_dataset(cr_stored(), "MONOCHROME2", 12, WindowCenter=10.0, WindowWidth=2.0)
    ds.VOILUTSequence = Sequence([item])
    out = decode_image(to_bytes(ds))
    expected = lut[cr_stored()].astype(np.float64)  # no rescale: LUT input = stored value
    np.testing.assert_allclose(out.pixels, expected, atol=1)


def test_multi_valued_window_uses_the_first():
    ds = make_cr(WindowCenter=[CENTER, 500.0], WindowWidth=[WIDTH, 100.0])
    assert_cr(decode_image(to_bytes(ds)))


def test_no_window_uses_percentiles_then_inverts_monochrome1():
    ds = make_cr()
    del ds.WindowCenter, ds.WindowWidth
    out = decode_image(to_bytes(ds))
    values = cr_stored() * SLOPE + INTERCEPT
    np.testing.assert_allclose(out.pixels.astype(np.float64), expected_percentile(values, invert=True), atol=1)
    assert out.pixels[0, 0] == 65535


def test_unusable_window_falls_back_to_percentiles():
    ds = make_dataset(cr_stored(), "MONOCHROME2", 12, WindowCenter=100.0, WindowWidth=0.0)
    out = decode_image(to_bytes(ds))
    np.testing.assert_allclose(out.pixels.astype(np.float64), expected_percentile(cr_stored()), atol=1)


# --- spacing -----------------------------------------------------------------


def test_pixel_spacing_preferred_over_imager_pixel_spacing():
    out = decode_image(to_bytes(make_cr(PixelSpacing=[0.1, 0.12], PixelSpacingCalibrationType="GEOMETRY")))
    assert out.pixel_spacing_mm == pytest.approx((0.1, 0.12))
    assert out.spacing_source == "PixelSpacing"
    assert out.dicom["PixelSpacing"] == pytest.approx([0.1, 0.12])
    assert out.dicom["PixelSpacingCalibrationType"] == "GEOMETRY"
    assert "ImagerPixelSpacing" not in out.dicom


def test_imager_pixel_spacing_is_flagged_detector_plane_and_magnification_not_applied():
    out = decode_image(to_bytes(make_cr(EstimatedRadiographicMagnificationFactor=1.2)))
    assert out.pixel_spacing_mm == pytest.approx((SPACING, SPACING))
    assert out.spacing_source == "ImagerPixelSpacing (detector plane)"
    assert out.dicom["ImagerPixelSpacing"] == pytest.approx([SPACING, SPACING])
    assert out.dicom["EstimatedRadiographicMagnificationFactor"] == pytest.approx(1.2)


def test_invalid_pixel_spacing_falls_back_and_none_gives_none():
    out = decode_image(to_bytes(make_cr(PixelSpacing=[0, 0])))
    assert out.spacing_source == "ImagerPixelSpacing (detector plane)"
    ds = make_cr()
    del ds.ImagerPixelSpacing
    out = decode_image(to_bytes(ds))
    assert out.pixel_spacing_mm is None and out.spacing_source is None


def test_area_in_mm2_from_a_dicom_through_the_statistics():
    decoded = decode_image(to_bytes(make_cr()))
    mask = np.zeros(decoded.pixels.shape, np.uint8)
    mask[50:60, 100:120] = 1  # 10 x 20 pixels
    stats = tumor_statistics(mask, None, decoded.pixel_spacing_mm)
    assert stats.area_px == 200
    assert stats.area_mm2 == pytest.approx(200 * 0.139 * 0.139)


# --- privacy -----------------------------------------------------------------


def test_dicom_dict_holds_references_and_spacing_only():
    ds = make_cr()
    out = decode_image(to_bytes(ds))
    assert set(out.dicom) <= ALLOWED_KEYS
    assert out.dicom["StudyInstanceUID"] == ds.StudyInstanceUID
    assert out.dicom["SeriesInstanceUID"] == ds.SeriesInstanceUID
    assert out.dicom["SOPInstanceUID"] == ds.SOPInstanceUID
    assert out.dicom["SOPClassUID"] == CR_STORAGE
    assert out.dicom["Modality"] == "CR" and out.dicom["PhotometricInterpretation"] == "MONOCHROME1"
    text = repr(out)
    for key, value in IDENTITY.items():
        assert key not in out.dicom
        assert value not in text, f"{key} leaked"


def test_png_and_jpeg_have_no_dicom_dict():
    buf = io.BytesIO()
    Image.fromarray(np.zeros((20, 20), np.uint8)).save(buf, format="PNG")
    assert decode_image(buf.getvalue()).dicom is None


# --- refusals ----------------------------------------------------------------


def test_multi_frame_refused():
    frames = np.stack([cr_stored()] * 3)
    ds = make_dataset(frames, "MONOCHROME2", 12)
    assert ds.NumberOfFrames == 3
    with pytest.raises(DecodeError, match=r"multi-frame DICOM \(3 frames\) is not supported: send one radiograph per file"):
        decode_image(to_bytes(ds))


def test_no_pixel_data_refused():
    ds = make_cr()
    del ds.PixelData
    with pytest.raises(DecodeError, match="no pixel data"):
        decode_image(to_bytes(ds))


def test_non_image_dicom_refused():
    ds = make_cr()
    for key in ("PixelData", "Rows", "Columns"):
        delattr(ds, key)
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.88.11"
    ds.Modality = "SR"
    with pytest.raises(DecodeError, match=r"holds no image .*Basic Text SR"):
        decode_image(to_bytes(ds))


@pytest.mark.parametrize(
    "lie",
    [
        {"Rows": ROWS + 10},  # more rows than the data holds
        {"Columns": COLS - 1},  # fewer columns: the data is too long
        {"BitsAllocated": 8, "BitsStored": 8, "HighBit": 7},  # 16-bit data declared 8-bit
    ],
)
def test_native_pixel_data_inconsistent_with_header_refused(lie):
    ds = make_cr(**lie)
    with pytest.raises(DecodeError, match=r"pixel data is \d+ bytes, but Rows"):
        decode_image(to_bytes(ds))


def test_compressed_frame_inconsistent_with_header_refused():
    pytest.importorskip("openjpeg")
    ds = make_cr()
    ds.compress(JPEG2000Lossless, generate_instance_uid=False)
    ds.Rows = 4 * ROWS
    with pytest.raises(DecodeError, match=r"JPEG 2000 pixel data is a 300x200 image .* Columns 300 x Rows 800"):
        decode_image(to_bytes(ds))


def test_jpeg_frame_inconsistent_with_header_refused():
    buf = io.BytesIO()
    Image.fromarray(np.zeros((64, 64), np.uint8)).save(buf, format="JPEG")
    ds = make_dataset(np.zeros((32, 32), np.uint8), "MONOCHROME2", 8)
    with pytest.raises(DecodeError, match=r"JPEG pixel data is a 64x64 image"):
        decode_image(encapsulated(ds, JPEGBaseline8Bit, buf.getvalue()))


def test_header_over_pixel_limit_refused_before_pixels_are_read(monkeypatch):
    reads = []
    real_read = dicom_mod._read

    def spy_read(data, *, stop_before_pixels):
        reads.append(stop_before_pixels)
        return real_read(data, stop_before_pixels=stop_before_pixels)

    def no_decode(ds):
        raise AssertionError("pixels decoded")

    monkeypatch.setattr(dicom_mod, "_read", spy_read)
    monkeypatch.setattr(dicom_mod, "_decode_pixels", no_decode)
    ds = make_dataset(np.zeros((32, 32), np.uint16), "MONOCHROME2", 12)
    ds.Rows = ds.Columns = 20000  # header claims 400 MP; the data is 2 KB
    with pytest.raises(DecodeError, match="image is 20000x20000 pixels, above the limit of 100000000 pixels"):
        decode_image(to_bytes(ds), max_pixels=100_000_000)
    assert reads == [True], "only the header may be read"


def test_tiny_dicom_refused():
    with pytest.raises(DecodeError, match="smaller than the minimum"):
        decode_image(to_bytes(make_dataset(np.zeros((8, 8), np.uint8), "MONOCHROME2", 8)))


@pytest.mark.parametrize(
    "mutate, reason",
    [
        (lambda d: d[: len(d) // 2], "pixel data is|truncated|not a readable DICOM"),
        (lambda d: d[:132] + b"\x02\x00" + b"\xff" * 64, "not a readable DICOM file"),
        (lambda d: d[:140], "not a readable DICOM file"),
    ],
)
def test_broken_files_fail_with_a_reason(mutate, reason):
    with pytest.raises(DecodeError, match=reason):
        decode_image(mutate(to_bytes(make_cr())))


def test_unsupported_transfer_syntax_refused():
    ds = make_cr()
    with pytest.raises(DecodeError, match="unsupported DICOM transfer syntax Deflated"):
        decode_image(to_bytes(ds, DeflatedExplicitVRLittleEndian))


def test_unsupported_bit_depth_and_photometric_refused():
    ds = make_dataset(np.zeros((32, 32), np.uint8), "MONOCHROME2", 8, PhotometricInterpretation="PALETTE COLOR")
    with pytest.raises(DecodeError, match="photometric interpretation PALETTE COLOR"):
        decode_image(to_bytes(ds))
    ds = make_dataset(np.zeros((32, 32), np.uint8), "MONOCHROME2", 8, BitsStored=6, HighBit=5)
    with pytest.raises(DecodeError, match="BitsStored 6 is not supported"):
        decode_image(to_bytes(ds))
