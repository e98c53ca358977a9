"""Celery tasks: thin wrappers that pass a job id to the job runner. Task names are a wire API."""

from __future__ import annotations

from celery import Task, shared_task
from celery.worker.request import Request

from modelpress.queue import RUN_JOB_TASK
from modelpress.settings import get_settings
from worker.reconcile import requeue_lost


class JobRequest(Request):
    """A job's message in the worker's parent. When the child running it dies, Celery rejects the message with
    requeue (reject_on_worker_lost), which puts it behind every job queued since; instead the attempt is
    recorded as lost and the job is sent to the front of the queue, and this message is dropped."""

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
