"""The Celery wire API, shared by the API (which sends) and the worker (which runs).

Task names are a wire API: they never change with module paths. Messages carry only a job id; the job row
holds the state. The API builds a sending-only Celery app from settings and never imports the worker.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any

from celery import Celery

from modelpress.routing import CPU_CLASS, all_classes, queue_name
from modelpress.settings import Settings, get_settings

RUN_JOB_TASK = "modelpress.jobs.run"

# Redis transport priorities: a worker pops the lists in `PRIORITY_STEPS` order, 0 first. A new job waits at
# JOB_PRIORITY; a job whose worker died goes back at RETRY_PRIORITY, ahead of every job queued after it.
PRIORITY_STEPS = [0, 3, 6, 9]
RETRY_PRIORITY = 0
JOB_PRIORITY = 3


def celery_config(settings: Settings) -> dict[str, Any]:
    """Settings for hours-long GPU jobs: late acks, one message at a time, a long visibility timeout."""
    visibility_timeout = 2 * settings.job_time_limit_s
    return {
        "broker_url": settings.broker_url,
        "task_default_queue": job_queue(settings, CPU_CLASS),
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "worker_prefetch_multiplier": 1,
        "task_time_limit": settings.job_time_limit_s + 300,
        "task_soft_time_limit": settings.job_time_limit_s,
        "broker_transport_options": {
            "visibility_timeout": visibility_timeout,
            "priority_steps": PRIORITY_STEPS,
            "queue_order_strategy": "priority",
        },
        "broker_connection_retry_on_startup": True,
        "task_ignore_result": True,
        "task_serializer": "json",
        "accept_content": ["json"],
        "worker_hijack_root_logger": False,
    }


@lru_cache
def sender() -> Celery:
    app = Celery("modelpress-api")
    app.conf.update(celery_config(get_settings()))
    return app


def job_queue(settings: Settings, memory_class: str | None) -> str:
    """The queue of a job's memory class (a job from before routing: the CPU class's, which every worker serves)."""
    return queue_name(settings.queue, memory_class or CPU_CLASS)


def all_queues(settings: Settings) -> list[str]:
    """Every capability queue of the deployment, the CPU class first."""
    return [queue_name(settings.queue, memory_class) for memory_class in all_classes()]


def queue_keys(queue: str) -> list[str]:
    """The Redis lists that hold a queue's messages, in the order a worker pops them (kombu's naming)."""
    return [queue if step == 0 else f"{queue}\x06\x16{step}" for step in PRIORITY_STEPS]


def enqueue_job(job_id: str, settings: Settings | None = None, *, front: bool = False) -> None:
    """Put a job on its memory class's queue and note when. Safe to repeat: the worker skips a job no longer
    queued. `front`: ahead of every job queued at the usual priority (a job whose worker died).

    Raises when the broker is down; the row keeps `enqueued_at` empty and the reconciler sends it later.
    """
    from sqlalchemy import select, update

    from modelpress.db import session_scope
    from modelpress.models import Job, utcnow

    settings = settings or get_settings()
    priority = RETRY_PRIORITY if front else JOB_PRIORITY
    with session_scope() as session:
        memory_class = session.scalar(select(Job.memory_class).where(Job.id == job_id))
    sender().send_task(RUN_JOB_TASK, args=[job_id], queue=job_queue(settings, memory_class), priority=priority)
    with session_scope() as session:
        session.execute(update(Job).where(Job.id == job_id).values(enqueued_at=utcnow()))
