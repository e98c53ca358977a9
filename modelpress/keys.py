"""API keys: shown once at creation, stored only as a sha256 hash."""

from __future__ import annotations

import hashlib
import secrets

from sqlalchemy import select
from sqlalchemy.orm import Session

from modelpress.models import ApiKey

KEY_PREFIX = "mp_"


def hash_key(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def create_key(session: Session, tenant: str) -> tuple[ApiKey, str]:
    """Store a new key for `tenant` and return the row and the secret (the only time it exists in clear)."""
    secret = KEY_PREFIX + secrets.token_urlsafe(32)
    row = ApiKey(tenant=tenant, prefix=secret[:10], key_hash=hash_key(secret))
    session.add(row)
    session.flush()
    return row, secret


def tenant_for_key(session: Session, secret: str) -> str | None:
    """The tenant a presented key belongs to, or None for an unknown or revoked key."""
    row = session.scalar(select(ApiKey).where(ApiKey.key_hash == hash_key(secret), ApiKey.revoked_at.is_(None)))
    return row.tenant if row else None
