"""Operators' view of the fleet: the workers that registered, and a drain (admin key only)."""

from __future__ import annotations

import logging

from fastapi import APIRouter, HTTPException, status
from sqlalchemy import select, update

from app.deps import AdminDep, SessionDep, SettingsDep
from app.schemas import WorkerPublic, WorkersPublic
from modelpress.fleet import is_live
from modelpress.models import Worker, WorkerState
from modelpress.queue import sender

logger = logging.getLogger(__name__)
router = APIRouter(prefix="/v1/workers", tags=["workers"])
ADMIN_RESPONSES = {
    401: {"description": "no key, or not the admin key"},
    403: {"description": "operator routes are off (MODELPRESS_ADMIN_KEY is unset)"},
}


def _public(worker: Worker, live: bool) -> WorkerPublic:
    columns = {column.name: getattr(worker, column.name) for column in Worker.__table__.columns}
    return WorkerPublic.model_validate({**columns, "live": live})


@router.get("", response_model=WorkersPublic, responses=ADMIN_RESPONSES)
def list_workers(_admin: AdminDep, session: SessionDep, settings: SettingsDep) -> WorkersPublic:
    """Every registered worker, by name; `live` tells those whose heartbeat is recent from those that stopped."""
    rows = session.scalars(select(Worker).order_by(Worker.name)).all()
    return WorkersPublic(data=[_public(row, is_live(row, settings)) for row in rows], count=len(rows))


@router.post(
    "/{name}/drain",
    response_model=WorkerPublic,
    status_code=status.HTTP_202_ACCEPTED,
    responses={**ADMIN_RESPONSES, 404: {"description": "no worker registered under this name"}},
)
def drain_worker(name: str, _admin: AdminDep, session: SessionDep, settings: SettingsDep) -> WorkerPublic:
    """Ask a worker to stop taking jobs, finish the one it runs and exit (Celery's warm shutdown)."""
    worker = session.get(Worker, name)
    if worker is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"no worker named {name!r}; `GET /v1/workers` lists them")
    try:
        sender().control.shutdown(destination=[name])
    except Exception as exc:  # the broker is down: nothing changed, the worker goes on
        logger.warning("could not send the drain to %s: %s", name, exc)
        raise HTTPException(
            status.HTTP_503_SERVICE_UNAVAILABLE, f"the broker did not take the drain for {name}: {exc}; try again"
        ) from None
    session.execute(update(Worker).where(Worker.name == name).values(state=WorkerState.draining))
    session.commit()
    session.refresh(worker)
    return _public(worker, is_live(worker, settings))
