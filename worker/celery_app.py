"""The worker's Celery app, built from settings alone (never by importing the web app).

Pool: prefork with one child per GPU (concurrency 1 by default) and a fresh child for every job
(`worker_max_tasks_per_child=1`). The parent never imports torch, so no CUDA context exists before the fork;
each job runs in a new process that gives all its GPU and host memory back when it exits, and a child that
dies (SIGKILL, OOM killer) is noticed by the parent (acks_late + reject_on_worker_lost), which records the
lost attempt and sends the job to the front of the queue (worker/tasks.py). The cost is a second or two of
torch import per job, nothing next to a GPU job.
The parent also runs the reconciler thread (worker/reconcile.py), the webhook sender (modelpress/webhooks.py) and
the worker's registration heartbeat (worker/registration.py).

Drain: SIGTERM (or `modelpress workers drain`, a remote shutdown) is Celery's warm shutdown: the worker stops
consuming, finishes the job it runs, and exits; its row says `draining` meanwhile and is removed at the exit.
"""

from __future__ import annotations

import logging
import os

from celery import Celery, signals

from modelpress.queue import celery_config
from modelpress.settings import Settings, get_settings
from worker.registration import Registration, RegistrationBeat, detect_gpus

log = logging.getLogger(__name__)


def create_celery(settings: Settings | None = None) -> Celery:
    settings = settings or get_settings()
    app = Celery("modelpress-worker")
    app.conf.update(celery_config(settings))
    app.conf.update(
        worker_pool="prefork",
        worker_concurrency=settings.worker_concurrency,
        worker_max_tasks_per_child=1,
        worker_send_task_events=False,
    )
    app.conf.update(include=["worker.tasks"])
    return app


_registration: list[Registration] = []  # this parent's registration, once the worker is ready


@signals.worker_init.connect
def _preload_engine(**_kwargs) -> None:
    """With MODELPRESS_PRELOAD_ENGINE, import the job runner (torch, transformers, the engine) in the parent before
    the pool forks: a child per job then starts with them loaded. Importing torch does not initialise CUDA; the
    child that runs a job is the first to touch a GPU, so forking stays safe."""
    if not get_settings().preload_engine:
        return
    import transformers

    import worker.engine.pipeline  # noqa: F401
    import worker.jobs  # noqa: F401

    transformers.AutoModelForCausalLM  # noqa: B018  (its lazy module: resolve it now, once)
    log.info("torch and the engine preloaded in the worker's parent process")


@signals.worker_ready.connect
def _start_reconciler(sender=None, **_kwargs) -> None:
    from modelpress.webhooks import WebhookSender
    from worker.reconcile import Reconciler

    settings = get_settings()
    hostname = getattr(sender, "hostname", None) or f"worker-{os.getpid()}"
    registration = Registration(settings, hostname, detect_gpus(settings))
    try:
        registration.register()
    except Exception:  # the database is down: the heartbeat registers the worker once it answers
        log.exception("could not register the worker; its heartbeat will try again")
    _registration.append(registration)
    RegistrationBeat(registration, settings.heartbeat_interval_s).start()
    Reconciler(settings, owner=hostname).start()
    WebhookSender(settings).start()
    log.info("registration, reconciler and webhook sender started in the worker's parent process")


@signals.worker_shutting_down.connect
def _draining(**_kwargs) -> None:
    for registration in _registration:
        try:
            registration.drain()
        except Exception:  # the row may stay idle; the drain itself goes on
            log.exception("could not mark the worker draining")


@signals.worker_shutdown.connect
def _unregister(**_kwargs) -> None:
    while _registration:
        try:
            _registration.pop().remove()
        except Exception:  # the row ages out of the live set instead
            log.exception("could not remove the worker's row")


@signals.worker_process_init.connect
def _fresh_database_pool(**_kwargs) -> None:
    """A forked child must not reuse the parent's database connections: start its own pool."""
    from modelpress import db

    db.reset()


@signals.task_prerun.connect
def _job_started(**kwargs) -> None:
    from worker.observe import job_started

    job_started(**kwargs)


@signals.task_postrun.connect
def _job_ended(**kwargs) -> None:
    from worker.observe import job_ended

    job_ended(**kwargs)
