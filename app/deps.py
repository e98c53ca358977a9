"""Request dependencies as `Annotated` aliases: a session, the caller's tenant, storage, and owned rows.

`ModelDep`, `DatasetDep`, `JobDep`, `SearchDep` and `ArtifactDep` load a row by its path id and check that it belongs to
the caller's tenant, once, here. Another tenant's id answers exactly like a missing one (404), so ids cannot
be probed.
"""

from __future__ import annotations

import hmac
import re
from collections.abc import Iterator
from typing import Annotated, TypeVar

from fastapi import Depends, HTTPException, Path, Query, status
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy import ColumnElement, func, select
from sqlalchemy.orm import Session

from app.rate_limit import enforce
from modelpress.db import new_session
from modelpress.keys import hash_key, tenant_for_key
from modelpress.models import FINAL_STATUSES, Artifact, Dataset, Job, JobKind, JobStatus, Model
from modelpress.settings import Settings, get_settings
from modelpress.storage import Storage, get_storage

ACTIVE_STATUSES = tuple(s.value for s in JobStatus if s not in FINAL_STATUSES)
"""Statuses of a job that still needs its model and datasets."""

ROW_ID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
"""The shape of every id the service hands out (`new_id()`: a lowercase UUID)."""
MAX_OFFSET = 10**9

Limit = Annotated[int, Query(ge=1, le=200, description="how many rows to return")]
Offset = Annotated[int, Query(ge=0, le=MAX_OFFSET, description="how many rows to skip")]


def get_session() -> Iterator[Session]:
    session = new_session()
    try:
        yield session
    finally:
        session.close()


SessionDep = Annotated[Session, Depends(get_session)]
SettingsDep = Annotated[Settings, Depends(get_settings)]


def get_storage_dep() -> Storage:
    return get_storage()


StorageDep = Annotated[Storage, Depends(get_storage_dep)]

_bearer = HTTPBearer(auto_error=False, description="An API key from `modelpress keys create --tenant <name>`")


CredentialsDep = Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]


def _count_against_key(
    credentials: HTTPAuthorizationCredentials, settings: Settings, bucket: str, per_minute: int
) -> None:
    """One more request in the key's `bucket` (429 with `Retry-After` past `per_minute`)."""
    enforce(settings.redis_url, bucket, hash_key(credentials.credentials), per_minute, settings.rate_limit_window_s)


def get_tenant(credentials: CredentialsDep, settings: SettingsDep) -> str:
    """The tenant of the presented API key; 401 with `WWW-Authenticate: Bearer` when it is missing or unknown.

    It uses its own short session, so a long upload that follows holds no database connection. The request
    then counts against the key's rate limit (429 with `Retry-After` past it; see `app.rate_limit`).
    """
    if credentials is None or credentials.scheme.lower() != "bearer" or not credentials.credentials:
        raise HTTPException(
            status.HTTP_401_UNAUTHORIZED,
            "missing API key: send 'Authorization: Bearer <key>' (create one with `modelpress keys create`)",
            headers={"WWW-Authenticate": "Bearer"},
        )
    with new_session() as session:
        tenant = tenant_for_key(session, credentials.credentials)
    if tenant is None:
        raise HTTPException(
            status.HTTP_401_UNAUTHORIZED,
            "invalid or revoked API key: check the key in 'Authorization: Bearer <key>'",
            headers={"WWW-Authenticate": 'Bearer error="invalid_token"'},
        )
    _count_against_key(credentials, settings, "requests", settings.rate_limit_per_minute)
    return tenant


TenantDep = Annotated[str, Depends(get_tenant)]


def get_uploader(tenant: TenantDep, credentials: CredentialsDep, settings: SettingsDep) -> str:
    """`get_tenant`, and the upload also counts against the key's (lower) upload limit."""
    assert credentials is not None  # get_tenant has answered 401 otherwise
    _count_against_key(credentials, settings, "uploads", settings.upload_rate_limit_per_minute)
    return tenant


UploaderDep = Annotated[str, Depends(get_uploader)]


def require_admin(credentials: CredentialsDep, settings: SettingsDep) -> None:
    """Operator routes take the admin key (`MODELPRESS_ADMIN_KEY`), never a tenant's key; off (403) while it is
    unset, after a request without any key has had its 401."""
    presented = credentials.credentials if credentials and credentials.scheme.lower() == "bearer" else ""
    if not presented:
        raise HTTPException(
            status.HTTP_401_UNAUTHORIZED,
            "missing admin key: send 'Authorization: Bearer <MODELPRESS_ADMIN_KEY>'",
            headers={"WWW-Authenticate": "Bearer"},
        )
    if settings.admin_key is None:
        raise HTTPException(
            status.HTTP_403_FORBIDDEN,
            "operator routes are off: set MODELPRESS_ADMIN_KEY (32+ characters) on the API and send it as "
            "'Authorization: Bearer <admin key>'",
        )
    if not hmac.compare_digest(presented.encode(), settings.admin_key.encode()):
        raise HTTPException(
            status.HTTP_401_UNAUTHORIZED,
            "this route needs the admin key: send 'Authorization: Bearer <MODELPRESS_ADMIN_KEY>'",
            headers={"WWW-Authenticate": "Bearer"},
        )


AdminDep = Annotated[None, Depends(require_admin)]

Row = TypeVar("Row", Model, Dataset, Job, Artifact)


def owned(session: Session, table: type[Row], row_id: str, tenant: str) -> Row:
    """The row with this id if the tenant owns it; otherwise 404, whether it is missing or someone else's."""
    row = session.get(table, row_id) if ROW_ID.fullmatch(row_id) else None
    if row is None or row.tenant != tenant:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"{table.__name__.lower()} {row_id} not found")
    return row


def newest_page(
    session: Session, table: type[Row], tenant: str, limit: int, offset: int, *where: ColumnElement[bool]
) -> tuple[list[Row], int]:
    """One page of the tenant's rows, newest first, and how many match in all (for `{data, count}` lists)."""
    conditions = (table.tenant == tenant, *where)
    rows = session.scalars(
        select(table).where(*conditions).order_by(table.created_at.desc(), table.id).limit(limit).offset(offset)
    ).all()
    count = session.scalar(select(func.count()).select_from(table).where(*conditions)) or 0
    return list(rows), count


def get_model(session: SessionDep, tenant: TenantDep, model_id: Annotated[str, Path()]) -> Model:
    return owned(session, Model, model_id, tenant)


def get_dataset(session: SessionDep, tenant: TenantDep, dataset_id: Annotated[str, Path()]) -> Dataset:
    return owned(session, Dataset, dataset_id, tenant)


def get_job(session: SessionDep, tenant: TenantDep, job_id: Annotated[str, Path()]) -> Job:
    return owned(session, Job, job_id, tenant)


def get_search(session: SessionDep, tenant: TenantDep, search_id: Annotated[str, Path()]) -> Job:
    """A search is a job row of kind `search`: any other job's id answers 404 here."""
    row = owned(session, Job, search_id, tenant)
    if row.kind != JobKind.search:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"search {search_id} not found")
    return row


def get_artifact(session: SessionDep, tenant: TenantDep, artifact_id: Annotated[str, Path()]) -> Artifact:
    return owned(session, Artifact, artifact_id, tenant)


ModelDep = Annotated[Model, Depends(get_model)]
DatasetDep = Annotated[Dataset, Depends(get_dataset)]
JobDep = Annotated[Job, Depends(get_job)]
SearchDep = Annotated[Job, Depends(get_search)]
ArtifactDep = Annotated[Artifact, Depends(get_artifact)]
