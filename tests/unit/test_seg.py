"""The DICOM SEG written for a DICOM source: it reads back with highdicom, it
references the source's Study/Series/SOP Instance UIDs, its one frame is the
mask pixel for pixel, and the source's patient identity and dates stay out."""

from __future__ import annotations

import io

import numpy as np
import pytest

hd = pytest.importorskip("highdicom")

from pydicom.data import get_testdata_file  # noqa: E402

from tests.unit.test_dicom import IDENTITY, make_cr, make_dataset, to_bytes  # noqa: E402
from worker.decode import decode_image  # noqa: E402
from worker.seg import SegError, build_seg  # noqa: E402

BUNDLED_CR = "dicomdirtests/77654033/CR1/6154"  # pydicom's own CR: MONOCHROME1, 12-bit, ImagerPixelSpacing


def read_back(data: bytes, source_sop_uid: str) -> tuple[object, np.ndarray]:
    seg = hd.seg.segread(io.BytesIO(data))
    frame = seg.get_pixels_by_source_instance(source_sop_instance_uids=[source_sop_uid], combine_segments=True)
    return seg, frame[0]


def random_mask(shape, seed=0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    mask = np.zeros(shape, np.uint8)
    mask[rng.random(shape) < 0.1] = 1  # scattered pixels: any bit-packing slip shows
    mask[10:60, 20:120] = 1
    return mask


def test_seg_of_a_written_cr_references_the_source_and_matches_the_mask():
    ds = make_cr()
    decoded = decode_image(to_bytes(ds))
    mask = random_mask(decoded.pixels.shape)
    data = build_seg(decoded.dicom, mask, image_id="img-1", model_version="unet-test-1")

    seg, frame = read_back(data, ds.SOPInstanceUID)
    assert seg.SOPClassUID == "1.2.840.10008.5.1.4.1.1.66.4" and seg.Modality == "SEG"
    assert seg.SegmentationType == "BINARY" and seg.NumberOfFrames == 1
    assert seg.StudyInstanceUID == ds.StudyInstanceUID
    ref_series = seg.ReferencedSeriesSequence[0]
    assert ref_series.SeriesInstanceUID == ds.SeriesInstanceUID
    ref = ref_series.ReferencedInstanceSequence[0]
    assert (ref.ReferencedSOPInstanceUID, ref.ReferencedSOPClassUID) == (ds.SOPInstanceUID, ds.SOPClassUID)
    assert frame.shape == mask.shape and np.array_equal(frame, mask)
    assert seg.SegmentSequence[0].SegmentLabel == "bone tumor"
    assert seg.SoftwareVersions == "unet-test-1"


def test_seg_keeps_no_patient_identity_or_date_of_the_source():
    ds = make_cr()
    decoded = decode_image(to_bytes(ds))
    data = build_seg(decoded.dicom, np.zeros(decoded.pixels.shape, np.uint8), image_id="img-2", model_version="v")
    seg, frame = read_back(data, ds.SOPInstanceUID)
    assert not frame.any(), "an image with no tumor still has its (empty) frame"
    for keyword in ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime",
                    "AccessionNumber", "ReferringPhysicianName", "StudyID"):  # fmt: skip
        assert keyword in seg and seg.data_element(keyword).value in ("", None), keyword  # type 2: present, empty
    text = bytes(data)
    for value in IDENTITY.values():
        assert value.encode() not in text, f"{value!r} from the source reached the SEG"


def test_seg_is_the_same_instance_when_the_image_is_processed_twice():
    ds = make_cr()
    decoded = decode_image(to_bytes(ds))
    mask = random_mask(decoded.pixels.shape, seed=3)
    a = hd.seg.segread(io.BytesIO(build_seg(decoded.dicom, mask, image_id="img-3", model_version="v")))
    b = hd.seg.segread(io.BytesIO(build_seg(decoded.dicom, mask, image_id="img-3", model_version="v")))
    c = hd.seg.segread(io.BytesIO(build_seg(decoded.dicom, mask, image_id="img-4", model_version="v")))
    assert a.SOPInstanceUID == b.SOPInstanceUID and a.SeriesInstanceUID == b.SeriesInstanceUID
    assert c.SOPInstanceUID != a.SOPInstanceUID


def test_seg_of_pydicoms_bundled_cr():
    path = get_testdata_file(BUNDLED_CR, download=False)
    if path is None:
        pytest.skip("pydicom's bundled dicomdirtests are not installed")
    data = open(path, "rb").read()
    decoded = decode_image(data)
    assert decoded.dicom["PhotometricInterpretation"] == "MONOCHROME1"
    mask = random_mask(decoded.pixels.shape, seed=5)
    seg, frame = read_back(build_seg(decoded.dicom, mask, image_id="img-5", model_version="v"), decoded.dicom["SOPInstanceUID"])
    assert np.array_equal(frame, mask)
    assert seg.StudyInstanceUID == decoded.dicom["StudyInstanceUID"]


def test_source_without_instance_uid_gets_a_reason_not_a_seg():
    ds = make_cr()
    decoded = decode_image(to_bytes(ds))
    refs = {**decoded.dicom, "SOPInstanceUID": None}
    with pytest.raises(SegError, match="no SOPInstanceUID"):
        build_seg(refs, np.zeros(decoded.pixels.shape, np.uint8), image_id="img-6", model_version="v")


def test_pipeline_records_the_source_format_and_writes_the_seg_of_its_own_mask():
    import cv2

    from model.checkpoint import SYNTHETIC_CHECKPOINT, load_checkpoint
    from model.inference import Segmenter
    from training.synthetic import synthetic_radiograph
    from worker.pipeline import Pipeline

    image, _, _ = synthetic_radiograph(np.random.default_rng(4), 256, 320)
    ds = make_dataset((4095 - image.astype(np.uint16) * 16).astype(np.uint16), "MONOCHROME1", 12,
                      WindowCenter=2048, WindowWidth=4096)  # fmt: skip
    dicom = to_bytes(ds)
    png = cv2.imencode(".png", image)[1].tobytes()
    pipe = Pipeline(Segmenter(load_checkpoint(SYNTHETIC_CHECKPOINT), batch_size=2), threads=2)
    try:
        dcm_result, png_result = pipe.run([("d", lambda: dicom), ("p", lambda: png)])
    finally:
        pipe.close()
    assert (dcm_result.source_format, png_result.source_format) == ("DICOM", "PNG")
    assert png_result.seg_dcm is None and png_result.seg_error is None
    mask = cv2.imdecode(np.frombuffer(dcm_result.mask_png, np.uint8), cv2.IMREAD_UNCHANGED) > 0
    assert 0 < mask.sum() < mask.size, "the demo model finds the drawn lesion: a partial mask to compare"
    seg, frame = read_back(dcm_result.seg_dcm, ds.SOPInstanceUID)
    assert np.array_equal(frame > 0, mask) and seg.SoftwareVersions == pipe.segmenter.version
