"""API keys: every /v1 request carries `Authorization: Bearer <key>`; the key
names the tenant (hospital) whose jobs and images the request may see."""

from __future__ import annotations

import uuid

from flask import g, request
from sqlalchemy import select

from api import db_session
from api.errors import ApiError
from db.tenants import tenant_for_key

CHALLENGE = {"WWW-Authenticate": 'Bearer realm="bonedetect"'}


def authenticate() -> None:
    """before_request hook of the /v1 blueprints: sets g.tenant_id or answers 401."""
    scheme, _, key = request.headers.get("Authorization", "").partition(" ")
    key = key.strip()
    if scheme.lower() != "bearer" or not key:
        raise ApiError(401, "missing API key: send the header 'Authorization: Bearer <key>'", CHALLENGE)
    tenant = tenant_for_key(db_session(), key)
    if tenant is None:
        raise ApiError(401, "invalid or revoked API key", CHALLENGE)
    g.tenant_id = tenant.id


def tenant_id() -> str:
    return g.tenant_id


def owned(model, raw_id: str, what: str):
    """The row of `model` with this id if it belongs to the caller's tenant, else 404.

    Another tenant's id answers exactly like a missing one; a malformed id
    answers 404 before any query (PostgreSQL would reject it as a uuid).
    """
    try:
        row_id = str(uuid.UUID(raw_id))
    except ValueError:
        raise ApiError(404, f"{what} not found") from None
    row = db_session().scalar(select(model).where(model.id == row_id, model.tenant_id == tenant_id()))
    if row is None:
        raise ApiError(404, f"{what} not found")
    return row
