"""Celery tasks: thin wrappers that pass a job id to the job runner. Task names are a wire API."""

from __future__ import annotations

import logging

from celery import Task, shared_task
from celery.worker.request import Request
from celery.worker.state import task_ready

from modelpress.queue import RUN_JOB_TASK
from modelpress.settings import get_settings
from worker.reconcile import already_handled, requeue_lost

log = logging.getLogger(__name__)


class JobRequest(Request):
    """A job's message in the worker's parent. When the child running it dies, Celery rejects the message with
    requeue (reject_on_worker_lost), which puts it behind every job queued since; instead the attempt is
    recorded as lost and the job is sent to the front of the queue, and this message is dropped.

    A message for a job that has ended or runs elsewhere under a live lease is dropped here, before a child is
    forked for it (`already_handled`). The check sits in `revoked`, which Celery asks just before it hands a request
    to the pool: such a request is acknowledged and skipped the way a revoked one is, its pool slot given back."""

    def revoked(self) -> bool:
        if super().revoked():
            return True
        if not self.args:
            return False
        try:
            reason = already_handled(str(self.args[0]), get_settings())
        except Exception:  # the database is down: the child reads the row and reports what it finds
            log.exception("job %s: could not read its row before forking; the child will", self.args[0])
            return False
        if reason is None:
            return False
        log.info("job %s: message dropped (%s)", self.args[0], reason)
        task_ready(self)
        self.acknowledge()
        self._already_revoked = True
        return True

    def reject(self, requeue: bool = False) -> None:
        if requeue and self.args and requeue_lost(str(self.args[0]), get_settings(), self.hostname or "worker"):
            requeue = False
        super().reject(requeue=requeue)


class JobTask(Task):
    Request = JobRequest


@shared_task(name=RUN_JOB_TASK, bind=True, base=JobTask)
def run_job(self, job_id: str) -> None:
    """Run one optimization job; all state goes to the job's row, nothing to a result backend."""
    from worker.jobs import execute  # imports torch: only in the child process that runs the job

    execute(job_id, worker_name=self.request.hostname or "worker")
