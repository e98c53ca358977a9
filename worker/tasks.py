"""Celery tasks: thin wrappers that pass a job id to the job runner. Task names are a wire API."""

from __future__ import annotations

from celery import shared_task

from modelpress.queue import RUN_JOB_TASK


@shared_task(name=RUN_JOB_TASK, bind=True)
def run_job(self, job_id: str) -> None:
    """Run one optimization job; all state goes to the job's row, nothing to a result backend."""
    from worker.jobs import execute  # imports torch: only in the child process that runs the job

    execute(job_id, worker_name=self.request.hostname or "worker")
