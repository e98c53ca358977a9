"""What a job's process tells operators: its job id on every log line, and its CUDA memory for /metrics.

Connected to Celery's task signals in `worker.celery_app`, so the task itself stays thin. Both run in the child
that runs the job, around the whole task (Celery's own lines about it included). The parent never imports
torch: the memory reporter reads CUDA only when the job has already imported torch and initialised CUDA, so a
CPU worker reports nothing and its GPU metric is absent, not zero.
"""

from __future__ import annotations

import logging
import sys
import threading
import time
from contextvars import Token
from typing import Any

import redis

from modelpress.logs import job_id_var
from modelpress.queue import RUN_JOB_TASK
from modelpress.settings import Settings, get_settings
from modelpress.telemetry import GpuMemory, forget_gpu_memory, record_gpu_memory

log = logging.getLogger(__name__)


def cuda_memory() -> GpuMemory | None:
    """The CUDA memory this process holds on all its devices, or None when it has not initialised CUDA."""
    torch = sys.modules.get("torch")
    if torch is None or getattr(torch.__spec__, "_initializing", False):  # the job's thread is still importing it
        return None
    if not torch.cuda.is_available() or not torch.cuda.is_initialized():
        return None
    devices = range(torch.cuda.device_count())
    allocated = sum(torch.cuda.memory_allocated(d) for d in devices)
    reserved = sum(torch.cuda.memory_reserved(d) for d in devices)
    return GpuMemory(allocated=allocated, reserved=reserved, at=time.time())


class GpuMemoryReporter(threading.Thread):
    """Writes the job process's CUDA memory to Redis every heartbeat interval, and removes it when stopped."""

    def __init__(self, job_id: str, worker: str, settings: Settings) -> None:
        super().__init__(name=f"gpu-memory-{job_id}", daemon=True)
        self.job_id = job_id
        self.worker = worker
        self.queue = settings.queue
        self.interval_s = settings.heartbeat_interval_s
        self.client = redis.Redis.from_url(settings.broker_url, socket_timeout=5, socket_connect_timeout=5)
        self.stopped = threading.Event()

    def run(self) -> None:
        job_id_var.set(self.job_id)  # a thread starts with an empty context: its lines carry the job id too
        while not self.stopped.wait(self.interval_s):
            try:
                memory = cuda_memory()
                if memory is not None:
                    record_gpu_memory(self.client, self.queue, self.worker, memory)
            except Exception as exc:  # metrics must never fail a job, nor stop reporting for good
                log.warning("could not report GPU memory: %s", exc)

    def stop(self) -> None:
        self.stopped.set()
        self.join(timeout=5)
        try:
            forget_gpu_memory(self.client, self.queue, self.worker)
        except redis.RedisError as exc:
            log.warning("could not clear the GPU memory report: %s", exc)
        finally:
            self.client.close()


_running: dict[str, tuple[Token[str | None], GpuMemoryReporter | None]] = {}


def job_started(task_id: str, task: Any, args: tuple[Any, ...], **_kwargs: Any) -> None:
    """`task_prerun`: from here until `task_postrun`, every line of this process carries the job id."""
    if task.name != RUN_JOB_TASK or not args:
        return
    job_id = str(args[0])
    token = job_id_var.set(job_id)
    reporter = None
    try:
        reporter = GpuMemoryReporter(job_id, task.request.hostname or "worker", get_settings())
        reporter.start()
    except (redis.RedisError, RuntimeError, ValueError) as exc:  # no broker URL or a bad one: run the job anyway
        log.warning("GPU memory will not be reported for this job: %s", exc)
    _running[task_id] = (token, reporter)


def job_ended(task_id: str, **_kwargs: Any) -> None:
    """`task_postrun`: stop reporting and take the job id off this process's lines."""
    token, reporter = _running.pop(task_id, (None, None))
    if reporter is not None:
        reporter.stop()
    if token is not None:
        job_id_var.reset(token)
