"""The worker's process pool: Celery's prefork pool, with the next job's child forked as soon as the last one ends.

With a fresh child per job (`worker_max_tasks_per_child=1`), the pool learns that a child ended from its process
sentinel, a pipe the kernel closes while the process exits, and forks the next child when the exit code can be
read. The pipe closes a moment before the exit code is ready; the stock pool then finds the child still there and
forks its replacement only at its next maintenance tick, up to five seconds later: dead time before every job.
This pool reaps the exiting child first (waiting at most `REAP_WAIT_S`), so the replacement starts at once.
"""

from __future__ import annotations

import time
from typing import Any

from celery.concurrency.asynpool import AsynPool
from celery.concurrency.prefork import TaskPool

REAP_WAIT_S = 1.0  # a child whose sentinel closed is exiting: this bounds the wait for its exit code
REAP_POLL_S = 0.005


def reap(process: Any, wait_s: float = REAP_WAIT_S, poll_s: float = REAP_POLL_S) -> int | None:
    """The exit code of a child whose sentinel has closed, polled without blocking for at most `wait_s`; None
    when it is still running then (the pool's maintenance tick finds it later)."""
    deadline = time.monotonic() + wait_s
    while (code := process.exitcode) is None and time.monotonic() < deadline:
        time.sleep(poll_s)
    return code


class JobAsynPool(AsynPool):
    def _event_process_exit(self, hub: Any, proc: Any) -> None:
        reap(proc)
        super()._event_process_exit(hub, proc)


class JobTaskPool(TaskPool):
    """`worker_pool` for modelpress workers: prefork with `JobAsynPool`."""

    Pool = JobAsynPool
