"""The reconciler: makes the queue agree with the job rows, the source of truth.

It runs as a thread in every worker's parent process; a short Redis lock lets one of them act per tick.
Each tick it
- re-sends every queued job when the broker has lost its data (a sentinel key has vanished: Redis restarted
  without persistence, or was flushed),
- sends queued jobs whose first send failed (the API answered 202 while the broker was down),
- reaps running jobs whose heartbeat stopped for longer than the lease (their worker was killed): back to
  queued while attempts remain, else failed with a reason,
- sets or clears each queued job's `waiting_reason` as the live workers' memory classes now stand.
A job always goes to its own memory class's queue (modelpress/routing.py), a re-queued one too.
Sending a job twice is harmless: the worker skips a job that is no longer queued.
"""

from __future__ import annotations

import logging
import threading
from datetime import datetime, timedelta

import redis
from sqlalchemy import select

from modelpress.db import session_scope
from modelpress.events import publish_job
from modelpress.fleet import refresh_waiting_reasons
from modelpress.models import FINAL_STATUSES, AttemptOutcome, Job, JobStatus, utcnow
from modelpress.queue import enqueue_job
from modelpress.settings import Settings
from modelpress.telemetry import record_heartbeat

log = logging.getLogger(__name__)

SEND_GRACE_S = 5.0


def reconcile_once(settings: Settings, client: redis.Redis, owner: str) -> dict[str, int]:
    """One pass; returns how many jobs it re-sent and reaped (empty when another worker holds the lock)."""
    if not client.set(
        f"modelpress:reconciler:{settings.queue}", owner, nx=True, px=int(settings.reconcile_interval_s * 900)
    ):
        return {}
    broker_lost = bool(client.set(f"modelpress:broker-epoch:{settings.queue}", utcnow().isoformat(), nx=True))
    now = utcnow()
    to_send: list[str] = []
    to_resend: list[str] = []  # jobs whose worker died: ahead of the queue
    ended: list[str] = []
    reaped = failed = 0
    with session_scope() as session:
        queued = select(Job).where(Job.status == JobStatus.queued)
        if not broker_lost:
            queued = queued.where(Job.enqueued_at.is_(None), Job.created_at < now - timedelta(seconds=SEND_GRACE_S))
        to_send += [job.id for job in session.scalars(queued)]
        stale = (
            select(Job)
            .where(Job.status == JobStatus.running, Job.heartbeat_at < now - timedelta(seconds=settings.lease_s))
            .with_for_update(skip_locked=True)
        )
        for job in session.scalars(stale):
            if _reap(job, settings, job.heartbeat_at):
                to_resend.append(job.id)
                reaped += 1
            else:
                ended.append(job.id)
                failed += 1
    with session_scope() as session:
        waiting = refresh_waiting_reasons(session, settings)
    for job_id in to_resend + ended + waiting:
        publish_job(job_id)
    for job_id in to_resend:
        enqueue_job(job_id, settings, front=True)
    for job_id in to_send:
        enqueue_job(job_id, settings)
    if broker_lost and to_send:
        log.warning("broker lost its data: re-sent %d queued jobs", len(to_send))
    return {"sent": len(to_send) + len(to_resend), "reaped": reaped, "failed": failed, "waiting": len(waiting)}


def _reap(job: Job, settings: Settings, last_seen: datetime | None) -> bool:
    """A running job whose worker died: its attempt ends `lost`; back to queued while attempts remain (True),
    else failed with a reason (False)."""
    now = utcnow()
    job.end_attempt(AttemptOutcome.lost, last_seen or now)
    if job.attempts >= settings.max_attempts:
        job.status, job.finished_at = JobStatus.failed, now
        job.error = {
            "code": "worker_lost",
            "message": f"the worker running this job stopped responding {job.attempts} times "
            f"(limit {settings.max_attempts}); it may have run out of memory: try a smaller recipe",
        }
        return False
    log.warning("job %s: worker %s stopped; re-queued ahead of the queue", job.id, job.worker)
    job.status, job.worker = JobStatus.queued, None
    return True


def requeue_lost(job_id: str, settings: Settings, worker: str) -> bool:
    """The parent of `worker` saw the child running `job_id` die: end that attempt now (no need to wait for the
    lease) and send the job to the front of the queue, so it runs before the jobs queued after it. True when
    the job needs no other message (re-sent, or already ended: a job over its memory limit records its failure
    before its process exits); False when the row could not be read and the caller should requeue its own."""
    try:
        with session_scope() as session:
            job = session.get(Job, job_id, with_for_update=True)
            if job is None:
                return True
            ours = job.status == JobStatus.running and job.worker == worker  # not a copy skipped by the child
            resend = job.status == JobStatus.queued or (ours and _reap(job, settings, job.heartbeat_at))
        if ours:
            publish_job(job_id)
        if resend:
            enqueue_job(job_id, settings, front=True)
        return True
    except Exception:  # the database or the broker is down: the message's own requeue and the reconciler remain
        log.exception("job %s: could not re-queue after its worker died", job_id)
        return False


def already_handled(job_id: str, settings: Settings) -> str | None:
    """Why a message for `job_id` needs no process at all, or None when a child should look at the row: the job
    is gone, has ended, or runs under a live lease. A copy of a message (the reconciler re-sends every queued job
    when the broker lost its data) is then dropped in the worker's parent for the price of one query, instead of
    a child forked to read the row. Only a hint: the child's claim, under a row lock, stays the rule."""
    with session_scope() as session:
        row = session.execute(
            select(Job.status, Job.heartbeat_at, Job.started_at, Job.created_at).where(Job.id == job_id)
        ).first()
    if row is None:
        return "no such job"
    if row.status in FINAL_STATUSES:
        return f"already {row.status}"
    if row.status == JobStatus.running:
        now = utcnow()
        beat = row.heartbeat_at or row.started_at or row.created_at
        if beat.tzinfo is None:
            beat = beat.replace(tzinfo=now.tzinfo)
        if now - beat < timedelta(seconds=settings.lease_s):
            return "running under a live lease"
    return None


class Reconciler(threading.Thread):
    """Calls `reconcile_once` every `reconcile_interval_s` until stopped, and records the worker's heartbeat for
    /metrics; errors are logged, never fatal."""

    def __init__(self, settings: Settings, owner: str) -> None:
        super().__init__(name="modelpress-reconciler", daemon=True)
        self.settings = settings
        self.owner = owner
        self.stopped = threading.Event()

    def run(self) -> None:
        client = redis.Redis.from_url(self.settings.broker_url, socket_timeout=5, socket_connect_timeout=5)
        while not self.stopped.wait(self.settings.reconcile_interval_s):
            try:
                reconcile_once(self.settings, client, self.owner)
            except Exception:  # the broker or the database is down: try again next tick
                log.exception("reconcile pass failed")
            try:
                record_heartbeat(client, self.settings.queue, self.owner)
            except redis.RedisError as exc:
                log.warning("could not record the worker's heartbeat: %s", exc)
