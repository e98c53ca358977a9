"""What the resource routes share: receiving an upload into storage (models, datasets), a page of the tenant's
rows (models, datasets, jobs), the list of a job's rows (artifacts, webhook attempts), a delete that refuses while
a queued or running job still needs the row (models, datasets), and the list / read / delete routes of an uploaded
resource, declared once.

Each route keeps its own URLs, schemas and wording; these helpers hold the logic once, so a fix to the upload's
clean-up or to the delete's locking reaches both resources.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

from fastapi import APIRouter, HTTPException, Request, Response, status
from sqlalchemy import ColumnElement, select
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool

from app.deps import Limit, Offset, Row, SessionDep, StorageDep, TenantDep, newest_page
from app.metrics import route_template
from app.uploads import Upload, receive_upload
from modelpress.models import Artifact, Dataset, Job, Model, WebhookAttempt
from modelpress.settings import Settings
from modelpress.storage import Storage

Stored = TypeVar("Stored", Model, Dataset)
JobRow = TypeVar("JobRow", Artifact, WebhookAttempt)
Page = TypeVar("Page")


async def receive_and_store(
    request: Request,
    storage: Storage,
    settings: Settings,
    store: Callable[[Upload], Stored],
    receive: Callable[[Path], Awaitable[Upload]] | None = None,
) -> Stored:
    """Stream the request's file to scratch (or let `receive` fill the scratch folder some other way), then
    `store` it (inspect, move into storage, insert the row) off the event loop; the scratch folder goes
    whatever happens."""
    scratch = storage.scratch_dir()
    upload = await (receive(scratch) if receive else receive_upload(request, scratch, settings.max_upload_bytes))
    request.app.state.metrics.upload_bytes.labels(route_template(request.scope)).inc(upload.size)
    try:
        return await run_in_threadpool(store, upload)
    finally:
        upload.discard()


def list_page(
    session: Session,
    table: type[Row],
    tenant: str,
    limit: int,
    offset: int,
    public: Callable[[Row], Any],
    page: Callable[..., Page],
    *where: ColumnElement[bool],
) -> Page:
    """One `{data, count}` page of the tenant's rows that match `where`, newest first, each shown as `public(row)`."""
    rows, count = newest_page(session, table, tenant, limit, offset, *where)
    return page(data=[public(r) for r in rows], count=count)


def job_rows_page(
    session: Session,
    table: type[JobRow],
    job: Job,
    public: Callable[[JobRow], Any],
    page: Callable[..., Page],
    *order: ColumnElement[Any],
) -> Page:
    """The `{data, count}` list of all the job's rows in `table` (its artifacts, its webhook attempts), oldest
    first by `order`, each shown as `public(row)`."""
    rows = session.scalars(
        select(table).where(table.job_id == job.id, table.tenant == job.tenant).order_by(*order)
    ).all()
    return page(data=[public(r) for r in rows], count=len(rows))


def delete_unless_used(
    session: Session,
    storage: Storage,
    row: Stored,
    users: Callable[[Session, Stored], list[str]],
) -> Response:
    """Delete the row and its stored files (under `<table name>/<id>`), or answer 409 naming up to five of the
    queued or running jobs that `users` finds using it.

    The row is locked first: a job submitted meanwhile (which takes a share lock on it) waits, then finds it gone.
    """
    table = type(row)
    noun = table.__name__.lower()
    locked = session.scalar(select(table).where(table.id == row.id).with_for_update())
    if locked is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"{noun} {row.id} not found")
    active = users(session, row)
    if active:
        session.rollback()
        raise HTTPException(
            status.HTTP_409_CONFLICT,
            f"{noun} {row.id} is used by queued or running job(s) {', '.join(active[:5])}; cancel them or wait",
        )
    session.delete(locked)
    session.commit()
    storage.delete(f"{table.__tablename__}/{row.id}")
    return Response(status_code=status.HTTP_204_NO_CONTENT)


def add_uploaded_resource_routes(
    router: APIRouter,
    table: type[Stored],
    row_dep: Any,
    public: Any,
    page: Any,
    users: Callable[[Session, Stored], list[str]],
) -> None:
    """`GET ""` (a page), `GET /{<noun>_id}` and `DELETE /{<noun>_id}` (409 while a job uses the row) for an
    uploaded resource. `row_dep` is the resource's `Annotated` dependency, which loads the row by its path id
    and answers 404 for a missing id or another tenant's."""
    noun = table.__name__.lower()
    by_id = f"/{{{noun}_id}}"
    missing = {404: {"description": f"no such {noun}"}}

    def list_rows(session: SessionDep, tenant: TenantDep, limit: Limit = 50, offset: Offset = 0) -> Any:
        return list_page(session, table, tenant, limit, offset, public.of, page)

    def get_row(row: Any) -> Any:
        return public.of(row)

    def delete_row(row: Any, session: SessionDep, storage: StorageDep) -> Response:
        return delete_unless_used(session, storage, row, users)

    for handler in (get_row, delete_row):  # the row's dependency is only known here, not as a module name
        handler.__annotations__["row"] = row_dep
    router.get("", response_model=page, name=f"list_{noun}s")(list_rows)
    router.get(by_id, response_model=public, responses=missing, name=f"get_{noun}")(get_row)
    router.delete(
        by_id,
        status_code=status.HTTP_204_NO_CONTENT,
        responses={**missing, 409: {"description": "a queued or running job uses it"}},
        name=f"delete_{noun}",
    )(delete_row)
