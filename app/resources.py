"""What the resource routes share: receiving an upload into storage (models, datasets), a page of the tenant's
rows (models, datasets, jobs), and a delete that refuses while a queued or running job still needs the row
(models, datasets).

Each route keeps its own URLs, schemas and wording; these helpers hold the logic once, so a fix to the upload's
clean-up or to the delete's locking reaches both resources.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

from fastapi import HTTPException, Request, Response, status
from sqlalchemy import ColumnElement, select
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool

from app.deps import Row, newest_page
from app.metrics import route_template
from app.uploads import Upload, receive_upload
from modelpress.models import Dataset, Model
from modelpress.settings import Settings
from modelpress.storage import Storage

Stored = TypeVar("Stored", Model, Dataset)
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
