"""One image: its status and statistics (JSON), its mask and overlay (PNG),
and for a DICOM source its DICOM Segmentation (worker/seg.py, docs/dicom.md).

Overlays are rendered here on their first request when the workers run with
OVERLAYS=lazy (the default; worker/overlay.py says why), then read back."""

from __future__ import annotations

import logging
import threading
from datetime import datetime, timezone
from urllib.parse import quote

from flask import Blueprint, Response, url_for
from sqlalchemy import select

from api import db_session, services
from api.auth import authenticate, owned
from api.errors import ApiError
from db.blobstore import BlobNotFound, image_prefix
from db.models import DONE, STAT_COLUMNS, Image

log = logging.getLogger(__name__)
bp = Blueprint("images", __name__, url_prefix="/v1/images")
bp.before_request(authenticate)

_COLUMNS = (
    "position", "filename", "external_id", "status", "error", "content_type", "source_format", "size_bytes", "width",
    "height", *STAT_COLUMNS, "pixel_spacing_mm", "spacing_col_mm", "spacing_source", "model_version", "processing_ms",
    "attempts",
)  # fmt: skip
_TIMES = ("created_at", "started_at", "finished_at")
# What a client reads about one image, in this order (JSON keys and CSV columns).
IMAGE_FIELDS = ("image_id", "job_id", *_COLUMNS, "bbox_w_mm", "bbox_h_mm", *_TIMES, "mask_url", "overlay_url", "seg_url")
DICOM = "DICOM"
DICOM_CONTENT_TYPE = "application/dicom"


def iso(dt: datetime | None) -> str | None:
    """ISO-8601 in UTC ('...Z'); SQLite hands back naive datetimes, which are UTC."""
    if dt is None:
        return None
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=timezone.utc)
    return dt.astimezone(timezone.utc).isoformat().replace("+00:00", "Z")


def _mm(pixels: int | None, spacing_mm: float | None) -> float | None:
    """A length in pixels as millimetres (at the detector when spacing_source says so), else None."""
    return None if pixels is None or spacing_mm is None else round(pixels * spacing_mm, 3)


def image_json(im: Image) -> dict:
    done = im.status == DONE
    return {
        "image_id": im.id,
        "job_id": im.job_id,
        **{name: getattr(im, name) for name in _COLUMNS},
        "bbox_w_mm": _mm(im.bbox_w, im.spacing_col_mm),  # columns x column spacing
        "bbox_h_mm": _mm(im.bbox_h, im.pixel_spacing_mm),  # rows x row spacing
        **{name: iso(getattr(im, name)) for name in _TIMES},
        "mask_url": url_for("images.mask", image_id=im.id) if done and im.mask_key else None,
        "overlay_url": url_for("images.overlay", image_id=im.id) if done and im.overlay_key else None,
        "seg_url": url_for("images.seg", image_id=im.id) if done and im.source_format == DICOM else None,
    }


@bp.get("/<image_id>")
def get_image(image_id: str):
    return image_json(owned(Image, image_id, "image"))


@bp.get("/<image_id>/mask.png")
def mask(image_id: str):
    return _png(image_id, "mask")


@bp.get("/<image_id>/overlay.png")
def overlay(image_id: str):
    return _png(image_id, "overlay")


@bp.get("/<image_id>/source")
def source(image_id: str):
    """The file as uploaded: PNG and JPEG inline, DICOM as a download."""
    im = owned(Image, image_id, "image")
    if im.blob_key is None:
        raise ApiError(409, f"image is {im.status}: it was not stored ({im.error or 'rejected at upload'})")
    try:
        data = services().blobs.get_bytes(im.blob_key)
    except BlobNotFound:
        raise ApiError(404, f"the uploaded file of image {im.id} is missing from the blob store") from None
    mimetype = im.content_type or "application/octet-stream"
    disposition = "inline" if mimetype in ("image/png", "image/jpeg") else "attachment"
    name = quote(im.filename or f"{im.id}", safe="")
    headers = {"Cache-Control": "private, max-age=3600", "Content-Disposition": f"{disposition}; filename*=UTF-8''{name}"}
    return Response(data, mimetype=mimetype, headers=headers)


def _png(image_id: str, kind: str) -> Response:
    im = owned(Image, image_id, "image")
    key = getattr(im, f"{kind}_key")
    if im.status != DONE or key is None:
        raise ApiError(409, f"image is {im.status}: no {kind}")
    try:
        data = services().blobs.get_bytes(key)
    except BlobNotFound:
        if kind != "overlay":
            raise ApiError(404, f"the {kind} of image {im.id} is missing from the blob store") from None
        data = _render_overlay(im, key)
    return Response(data, mimetype="image/png", headers={"Cache-Control": "private, max-age=3600"})


# Rendering an overlay decodes the upload (up to MAX_IMAGE_PIXELS) in this process: a few at a time
# per API process, so a page of thumbnails or one tenant's huge files cannot take its memory.
RENDERS_AT_ONCE = 2
RENDER_WAIT_S = 10.0
_renders = threading.BoundedSemaphore(RENDERS_AT_ONCE)


def _render_overlay(im: Image, key: str) -> bytes:
    """OVERLAYS=lazy: render the overlay from the upload and the mask, keep it at ``key``."""
    from worker.decode import DecodeError
    from worker.overlay import render_overlay_png

    svc = services()
    try:
        source = svc.blobs.get_bytes(im.blob_key) if im.blob_key else None
        mask_png = svc.blobs.get_bytes(im.mask_key) if im.mask_key else None
    except BlobNotFound:
        source = mask_png = None
    if source is None or mask_png is None:
        raise ApiError(404, f"the overlay of image {im.id} cannot be made: its upload or mask is missing from the blob store")
    if not _renders.acquire(timeout=RENDER_WAIT_S):
        raise ApiError(503, "busy rendering other overlays, retry shortly", {"Retry-After": "2"})
    try:
        data = render_overlay_png(source, mask_png, svc.settings.max_image_pixels)
    except (DecodeError, ValueError) as err:
        log.error("image %s: overlay not rendered: %s", im.id, err)
        raise ApiError(500, f"the overlay of image {im.id} could not be rendered: {err}") from None
    finally:
        _renders.release()
    try:
        svc.blobs.put_bytes(key, data)  # concurrent requests may write the same bytes: puts are atomic
    except Exception as err:  # not kept this time: served all the same, rendered again next time
        log.warning("image %s: rendered overlay not stored: %s", im.id, err)
        return data
    # A purge may have run while this rendered: then the put just recreated a derivative of a deleted
    # upload. The row is the record: without it, take the image's folder away again.
    session = db_session()
    tenant_id, job_id, image_id = im.tenant_id, im.job_id, im.id
    session.rollback()  # end this request's read transaction: look at the database as it is now
    if session.scalar(select(Image.id).where(Image.id == image_id)) is None:
        log.info("image %s was purged while its overlay rendered; overlay removed", image_id)
        svc.blobs.delete_prefix(image_prefix(tenant_id, job_id, image_id))
    return data


@bp.get("/<image_id>/seg.dcm")
def seg(image_id: str):
    """The DICOM Segmentation of the mask, for an image uploaded as DICOM (made by the worker)."""
    im = owned(Image, image_id, "image")
    if im.content_type != DICOM_CONTENT_TYPE and im.source_format != DICOM:
        what = im.source_format or im.content_type or "not an image"
        raise ApiError(404, f"no DICOM SEG: image {im.id} was not uploaded as DICOM ({what}); a SEG is made only for DICOM sources")
    if im.status != DONE:
        raise ApiError(409, f"image is {im.status}: no SEG")
    try:
        data = services().blobs.get_bytes(image_prefix(im.tenant_id, im.job_id, im.id) + "/seg.dcm")
    except BlobNotFound:
        raise ApiError(404, f"no DICOM SEG was made for image {im.id} (the worker could not write one; see its log)") from None
    return Response(
        data,
        mimetype="application/dicom",
        headers={"Cache-Control": "private, max-age=3600", "Content-Disposition": f'attachment; filename="{im.id}-seg.dcm"'},
    )
