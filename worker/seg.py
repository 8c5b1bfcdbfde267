"""The DICOM Segmentation (SEG) written for each image that came as DICOM.

``build_seg(references, mask, ...)`` returns the bytes of a binary SEG
(highdicom) with one segment, "bone tumor", one frame at the source image's
size that equals the worker's mask pixel for pixel, referencing the source
image's Study, Series and SOP Instance UIDs.

highdicom copies the Patient and Study modules from its source images. It is
handed no source file: it gets a minimal dataset built here from the
allowlisted references the decoder kept (``DecodedImage.dicom``) plus the
image size, with the type-2 patient and study attributes present but empty
(the SEG IOD requires them present; DICOM allows them empty). So no name, ID,
birth date, sex, date or accession number of the source can reach the SEG;
docs/dicom.md explains the choice and what a PACS may need.

UIDs are derived from the image id (``generate_uid(entropy_srcs=...)``), so a
chunk processed twice writes the same SEG instance, not a second one.
Torch-free; highdicom is imported on the first DICOM image only.
"""

from __future__ import annotations

import io

import numpy as np

SEGMENT_LABEL = "bone tumor"
MANUFACTURER = "Bone Detect"
MODEL_NAME = "attention U-Net"
DEVICE_SERIAL = "bonedetect"  # required (type 1) by the Enhanced General Equipment module; software has none
SERIES_NUMBER = 9901  # high, so a PACS lists the SEG after the source series
SERIES_DESCRIPTION = "Bone Detect tumor segmentation (not for clinical use)"

# Type-2 attributes of the Patient and General Study modules: the SEG carries
# them, empty. Study Instance UID (type 1) is the only study attribute copied.
EMPTY_TYPE2 = (
    "PatientName", "PatientID", "PatientBirthDate", "PatientSex",
    "StudyDate", "StudyTime", "ReferringPhysicianName", "StudyID", "AccessionNumber",
)  # fmt: skip
REQUIRED_REFERENCES = ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "SOPClassUID")


class SegError(ValueError):
    """No SEG can be written for this image; str(err) says why."""


def reference_dataset(references: dict, rows: int, columns: int):
    """The only source dataset highdicom sees: references, size, empty type-2 identity."""
    from pydicom.dataset import Dataset

    missing = [k for k in REQUIRED_REFERENCES if not references.get(k)]
    if missing:
        raise SegError(f"the source DICOM has no {', '.join(missing)}: a SEG could not reference it")
    ds = Dataset()
    for keyword in REQUIRED_REFERENCES:
        setattr(ds, keyword, str(references[keyword]))
    ds.Modality = references.get("Modality") or "OT"
    ds.Rows, ds.Columns = rows, columns
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"  # of the decoded frame; the SEG's own is fixed by highdicom
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    for keyword in EMPTY_TYPE2:
        setattr(ds, keyword, "")
    return ds


def build_seg(references: dict, mask: np.ndarray, *, image_id: str, model_version: str) -> bytes:
    """A binary DICOM SEG of `mask` ((H, W) {0, 1}, the source's size) for the source in `references`."""
    import highdicom as hd
    from pydicom.sr.codedict import codes
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    if mask.ndim != 2:
        raise SegError(f"mask must be 2-D, got shape {mask.shape}")
    rows, columns = mask.shape
    source = reference_dataset(references, rows, columns)
    algorithm = hd.AlgorithmIdentificationSequence(
        name=MANUFACTURER, version=model_version[:64], family=codes.cid7162.ArtificialIntelligence
    )
    segment = hd.seg.SegmentDescription(
        segment_number=1,
        segment_label=SEGMENT_LABEL,
        segmented_property_category=codes.SCT.MorphologicallyAbnormalStructure,
        segmented_property_type=codes.SCT.Neoplasm,
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=algorithm,
    )
    seg = hd.seg.Segmentation(
        source_images=[source],
        pixel_array=(mask > 0).astype(np.uint8),
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=[segment],
        series_instance_uid=generate_uid(entropy_srcs=["bonedetect-seg-series", image_id]),
        series_number=SERIES_NUMBER,
        sop_instance_uid=generate_uid(entropy_srcs=["bonedetect-seg-instance", image_id]),
        instance_number=1,
        manufacturer=MANUFACTURER,
        manufacturer_model_name=MODEL_NAME,
        software_versions=model_version[:64],
        device_serial_number=DEVICE_SERIAL,
        series_description=SERIES_DESCRIPTION,
        omit_empty_frames=False,  # an image with no tumor still gets its (empty) frame
        transfer_syntax_uid=ExplicitVRLittleEndian,  # BINARY allows native only (1 bit per pixel)
    )
    buf = io.BytesIO()
    seg.save_as(buf)
    return buf.getvalue()
