"""Which file formats Bone Detect accepts, told from a file's first bytes.

Shared by the API (which records anything else as failed at upload) and the
worker's decoder, so both agree on what is a radiograph.
"""

from __future__ import annotations

HEAD_BYTES = 132  # enough for the DICOM preamble (128 bytes) and "DICM"

CONTENT_TYPES = {"PNG": "image/png", "JPEG": "image/jpeg", "DICOM": "application/dicom"}
UNSUPPORTED = "unsupported file type: not a PNG or JPEG image, nor a DICOM file"


def sniff_format(head: bytes) -> str | None:
    """"PNG", "JPEG" or "DICOM" from a file's first HEAD_BYTES bytes, else None."""
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "PNG"
    if head.startswith(b"\xff\xd8\xff"):
        return "JPEG"
    if head[128:132] == b"DICM":
        return "DICOM"
    return None
