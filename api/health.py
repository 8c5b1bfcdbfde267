"""Liveness and readiness, for load balancers and orchestrators (no API key)."""

from __future__ import annotations

import logging

from flask import Blueprint
from sqlalchemy import text

from api import services
from api.errors import RETRY_AFTER_S

log = logging.getLogger(__name__)

bp = Blueprint("health", __name__)


@bp.get("/healthz")
def healthz():
    """The process answers."""
    return {"status": "ok"}


@bp.get("/readyz")
def readyz():
    """The database answers a SELECT 1."""
    try:
        with services().engine.connect() as conn:
            conn.execute(text("SELECT 1"))
    except Exception as err:  # any failure means: do not route traffic here yet
        log.warning("not ready: %s", err)
        body = {"status": "unavailable", "error": "database unavailable, retry later"}
        return body, 503, {"Retry-After": str(RETRY_AFTER_S)}
    return {"status": "ready"}
