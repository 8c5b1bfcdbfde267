"""The job-completion callback as the API sees it: the URL a submission names
(form field `callback_url`) and the delivery record a job shows.

Delivery itself is the worker's (worker/callbacks.py); docs/callbacks.md is
the receiver's side.
"""

from __future__ import annotations

import unicodedata
from urllib.parse import urlsplit

from sqlalchemy import select
from sqlalchemy.orm import Session

from api.errors import ApiError
from api.images import iso
from db.jobs import CALLBACK_HELD
from db.models import CallbackDelivery, Job

FIELD = "callback_url"
MAX_URL = 2000  # Job.callback_url


def parse_callback_url(raw: str | None) -> str | None:
    """The submitted callback URL, checked: absolute http(s), a host, no credentials; else 400."""
    url = (raw or "").strip()
    if not url:
        return None
    if len(url) > MAX_URL:
        raise ApiError(400, f"{FIELD} is longer than {MAX_URL} characters")
    if any(ch.isspace() or unicodedata.category(ch) in ("Cc", "Cf") for ch in url):
        raise ApiError(400, f"{FIELD} must not contain spaces or control characters")
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError for a port that is not a number in range
    except ValueError as err:
        raise ApiError(400, f"{FIELD} is not a valid URL: {err}") from None
    if parts.scheme.lower() not in ("http", "https"):
        raise ApiError(400, f"{FIELD} must be an http:// or https:// URL, got scheme {parts.scheme or '(none)'!r}")
    if not parts.hostname:
        raise ApiError(400, f"{FIELD} has no host")
    if parts.username is not None or parts.password is not None:
        raise ApiError(400, f"{FIELD} must not carry credentials: callbacks are authenticated by their signature")
    return url


def callback_json(session: Session, job: Job) -> dict | None:
    """{"url", "state", "attempts": [...]} for a job with a callback URL, else None.

    state: "waiting" (job not finished), "pending" (being delivered or
    retried), "delivered", "failed" (every retry failed).
    """
    if job.callback_url is None:
        return None
    rows = session.scalars(
        select(CallbackDelivery).where(CallbackDelivery.job_id == job.id).order_by(CallbackDelivery.attempt)
    ).all()
    return {
        "url": job.callback_url,
        "state": "waiting" if job.callback_state in (None, CALLBACK_HELD) else job.callback_state,
        "attempts": [
            {"attempt": r.attempt, "status": r.status, "http_status": r.http_status, "error": r.error, "at": iso(r.created_at)}
            for r in rows
        ],
    }
