"""One image: its status and statistics (JSON), its mask and overlay (PNG)."""

from __future__ import annotations

from datetime import datetime, timezone

from flask import Blueprint, Response, url_for

from api import services
from api.auth import authenticate, owned
from api.errors import ApiError
from db.blobstore import BlobNotFound
from db.models import DONE, STAT_COLUMNS, Image

bp = Blueprint("images", __name__, url_prefix="/v1/images")
bp.before_request(authenticate)

_COLUMNS = (
    "position", "filename", "external_id", "status", "error", "content_type", "size_bytes", "width", "height",
    *STAT_COLUMNS, "pixel_spacing_mm", "spacing_col_mm", "spacing_source", "model_version", "processing_ms", "attempts",
)  # fmt: skip
_TIMES = ("created_at", "started_at", "finished_at")
# What a client reads about one image, in this order (JSON keys and CSV columns).
IMAGE_FIELDS = ("image_id", "job_id", *_COLUMNS, *_TIMES, "mask_url", "overlay_url")


def iso(dt: datetime | None) -> str | None:
    """ISO-8601 in UTC ('...Z'); SQLite hands back naive datetimes, which are UTC."""
    if dt is None:
        return None
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=timezone.utc)
    return dt.astimezone(timezone.utc).isoformat().replace("+00:00", "Z")


def image_json(im: Image) -> dict:
    done = im.status == DONE
    return {
        "image_id": im.id,
        "job_id": im.job_id,
        **{name: getattr(im, name) for name in _COLUMNS},
        **{name: iso(getattr(im, name)) for name in _TIMES},
        "mask_url": url_for("images.mask", image_id=im.id) if done and im.mask_key else None,
        "overlay_url": url_for("images.overlay", image_id=im.id) if done and im.overlay_key else None,
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


def _png(image_id: str, kind: str) -> Response:
    im = owned(Image, image_id, "image")
    key = getattr(im, f"{kind}_key")
    if im.status != DONE or key is None:
        raise ApiError(409, f"image is {im.status}: no {kind}")
    try:
        data = services().blobs.get_bytes(key)
    except BlobNotFound:
        raise ApiError(404, f"the {kind} of image {im.id} is missing from the blob store") from None
    return Response(data, mimetype="image/png", headers={"Cache-Control": "private, max-age=3600"})
