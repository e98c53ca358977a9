"""The fleet as the database shows it: which workers are live, which memory classes they serve, and why a queued
job waits. Shared by the API (submission, `GET /v1/workers`, /metrics) and the workers' reconciler."""

from __future__ import annotations

from datetime import datetime, timedelta

from sqlalchemy import select
from sqlalchemy.orm import Session

from modelpress.models import Job, JobStatus, Worker, WorkerState, utcnow
from modelpress.routing import CPU_CLASS, Need, waiting_reason
from modelpress.settings import Settings


def live_since(settings: Settings, now: datetime | None = None) -> datetime:
    """The oldest heartbeat of a worker still counted as live."""
    return (now or utcnow()) - timedelta(seconds=settings.worker_live_s)


def is_live(worker: Worker, settings: Settings, now: datetime | None = None) -> bool:
    beat = worker.heartbeat_at
    if beat.tzinfo is None:  # SQLite hands back naive UTC
        beat = beat.replace(tzinfo=utcnow().tzinfo)
    return beat >= live_since(settings, now)


def live_classes(session: Session, settings: Settings) -> set[str]:
    """The memory classes some live worker that still takes jobs serves."""
    rows = session.scalars(
        select(Worker.memory_classes).where(
            Worker.heartbeat_at >= live_since(settings), Worker.state != WorkerState.draining
        )
    )
    return {memory_class for classes in rows for memory_class in classes or []}


def job_need(job: Job) -> Need:
    """The job's routing as stored at submission (a job from before routing runs on the CPU class's queue)."""
    return Need(job.memory_bytes or 0, job.memory_class or CPU_CLASS)


def refresh_waiting_reasons(session: Session, settings: Settings) -> list[str]:
    """Set or clear `waiting_reason` on every queued job as the live workers now stand; the ids that changed."""
    classes = live_classes(session, settings)
    changed = []
    for job in session.scalars(select(Job).where(Job.status == JobStatus.queued).with_for_update(skip_locked=True)):
        reason = waiting_reason(job_need(job), classes)
        if reason != job.waiting_reason:
            job.waiting_reason = reason
            changed.append(job.id)
    return changed
