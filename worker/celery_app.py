"""The worker's Celery app, built from settings alone (never by importing the web app).

Pool: prefork with one child per GPU (concurrency 1 by default) and a fresh child for every job
(`worker_max_tasks_per_child=1`). The parent never imports torch, so no CUDA context exists before the fork;
each job runs in a new process that gives all its GPU and host memory back when it exits, and a child that
dies (SIGKILL, OOM killer) is noticed by the parent (acks_late + reject_on_worker_lost), which records the
lost attempt and sends the job to the front of the queue (worker/tasks.py). The cost is a second or two of
torch import per job, nothing next to a GPU job, or a fork of a parent that preloaded it
(`MODELPRESS_PRELOAD_ENGINE`); a child exits as soon as its job is done and the pool (worker/pool.py) forks the
next one at once.
The parent also runs the reconciler thread (worker/reconcile.py), the webhook sender (modelpress/webhooks.py) and
the worker's registration heartbeat (worker/registration.py).

Drain: SIGTERM (or `modelpress workers drain`, a remote shutdown) is Celery's warm shutdown: the worker stops
consuming, finishes the job it runs, and exits; its row says `draining` meanwhile and is removed at the exit.
"""

from __future__ import annotations

import gc
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
        # prefork; with fork_at_once the next child is forked as soon as the last one exits
        worker_pool="worker.pool:JobTaskPool" if settings.fork_at_once else "prefork",
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
    gc.collect()
    gc.freeze()  # a child's collections skip what it inherited, and leave those pages shared with the parent
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


@signals.worker_process_shutdown.connect
def _exit_at_once(exitcode: int | None = None, **_kwargs) -> None:
    """A job's child exits as soon as its job is done. Left to the pool, it would announce its end and sleep a
    second first, and the parent, woken by that announcement while the child still lived, would fork the next
    child only on its pool-maintenance tick, up to five seconds later. Exiting now, the parent sees the process
    gone and forks the next one at once. Nothing is lost: the job's outcome is in its row, the task's result
    already with the parent, and the pool's own exit that follows is the same `os._exit`."""
    if not get_settings().fork_at_once:
        return
    logging.shutdown()  # flush the log handlers, as os._exit does not
    os._exit(exitcode or 0)


@signals.task_prerun.connect
def _job_started(**kwargs) -> None:
    from worker.observe import job_started

    job_started(**kwargs)


@signals.task_postrun.connect
def _job_ended(**kwargs) -> None:
    from worker.observe import job_ended

    job_ended(**kwargs)
