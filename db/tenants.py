"""Tenants (hospitals) and their API keys.

A key is 32 random bytes, shown once at creation and stored only as its
SHA-256 hash. Lookup is by hash; the final comparison is constant-time.
Each tenant also has a webhook secret that signs its job-completion
callbacks (docs/callbacks.md), shown at creation and on rotation.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets

from sqlalchemy import select
from sqlalchemy.orm import Session

from db.models import ApiKey, Tenant, utcnow

KEY_PREFIX = "bd_"
WEBHOOK_SECRET_PREFIX = "whsec_"


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def create_tenant(session: Session, name: str) -> tuple[Tenant, str]:
    """Create a tenant with one API key; returns (tenant, the key in clear)."""
    if not name or not name.strip():
        raise ValueError("tenant name must not be empty")
    if session.scalar(select(Tenant).where(Tenant.name == name)) is not None:
        raise ValueError(f"tenant {name!r} already exists")
    tenant = Tenant(name=name, webhook_secret=new_webhook_secret())
    session.add(tenant)
    session.flush()
    return tenant, issue_key(session, tenant)


def issue_key(session: Session, tenant: Tenant) -> str:
    key = KEY_PREFIX + secrets.token_urlsafe(32)
    session.add(ApiKey(tenant_id=tenant.id, key_hash=hash_key(key), prefix=key[:10]))
    session.flush()
    return key


def new_webhook_secret() -> str:
    """The key that signs a tenant's job-completion callbacks (HMAC-SHA256).

    Kept in clear: signing needs it. It authenticates our callbacks to the
    hospital; it grants no access to the API.
    """
    return WEBHOOK_SECRET_PREFIX + secrets.token_urlsafe(32)


def rotate_webhook_secret(session: Session, name: str) -> str:
    """Give the tenant named `name` a new webhook secret; returns it (callbacks sent from now on use it)."""
    tenant = session.scalar(select(Tenant).where(Tenant.name == name))
    if tenant is None:
        raise ValueError(f"no tenant named {name!r}")
    tenant.webhook_secret = new_webhook_secret()
    session.flush()
    return tenant.webhook_secret


def revoke_key(session: Session, key_prefix: str) -> int:
    """Revoke every active key whose visible prefix matches; returns how many."""
    keys = session.scalars(select(ApiKey).where(ApiKey.prefix == key_prefix, ApiKey.revoked_at.is_(None))).all()
    for k in keys:
        k.revoked_at = utcnow()
    return len(keys)


def tenant_for_key(session: Session, key: str) -> Tenant | None:
    """The tenant owning an active key, or None."""
    digest = hash_key(key)
    row = session.execute(  # one round trip per request: the key and its tenant together
        select(ApiKey.key_hash, Tenant)
        .join(Tenant, Tenant.id == ApiKey.tenant_id)
        .where(ApiKey.key_hash == digest, ApiKey.revoked_at.is_(None))
    ).first()
    if row is None or not hmac.compare_digest(row.key_hash, digest):
        return None
    return row.Tenant
