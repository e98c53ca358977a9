"""A worker registers itself: its row in `workers` (host, GPUs, free disk, version, queues, state, current job),
written when it starts, refreshed by a heartbeat thread in its parent process, removed when it exits cleanly.

The parent never imports torch (no CUDA context may exist before the fork), so the GPUs are read from
`nvidia-smi`, filtered by `CUDA_VISIBLE_DEVICES` as CUDA would filter them, or, where it is missing, from
torch.cuda in a child process; `MODELPRESS_GPUS` declares them instead. The GPUs decide which memory classes,
hence which queues, the worker consumes (modelpress/routing.py).
"""

from __future__ import annotations

import importlib.metadata
import json
import logging
import os
import shutil
import socket
import subprocess
import sys
import threading
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass

from sqlalchemy import select, update

from modelpress.db import session_scope
from modelpress.models import Job, JobStatus, Worker, WorkerState, utcnow
from modelpress.routing import classes_served, queue_name
from modelpress.settings import Settings

log = logging.getLogger(__name__)

NVIDIA_SMI = [
    "nvidia-smi",
    "--query-gpu=index,uuid,name,memory.total,memory.used",
    "--format=csv,noheader,nounits",
]
MiB = 1024**2


@dataclass(frozen=True)
class Gpu:
    index: int
    uuid: str | None
    name: str
    memory_bytes: int
    memory_used_bytes: int | None = None


def query_gpus(run: Callable[..., subprocess.CompletedProcess[str]] = subprocess.run) -> list[Gpu]:
    """Every GPU `nvidia-smi` lists, with its memory in use; none where it is missing or fails."""
    try:
        result = run(NVIDIA_SMI, capture_output=True, text=True, timeout=30, check=True)
    except (OSError, subprocess.SubprocessError) as exc:
        log.info("no GPU listed (nvidia-smi: %s)", exc)
        return []
    gpus = []
    for line in result.stdout.strip().splitlines():
        index, uuid, name, total, used = (field.strip() for field in line.split(","))
        gpus.append(Gpu(int(index), uuid, name, int(float(total) * MiB), int(float(used) * MiB)))
    return gpus


TORCH_QUERY = (
    "import json, torch\n"
    "props = [torch.cuda.get_device_properties(i) for i in range(torch.cuda.device_count())]\n"
    "print(json.dumps([[i, 'GPU-' + str(p.uuid), p.name, p.total_memory] for i, p in enumerate(props)]))"
)


def query_torch_gpus(run: Callable[..., subprocess.CompletedProcess[str]] = subprocess.run) -> list[Gpu]:
    """The GPUs torch.cuda sees, asked in a child process so this one never holds a CUDA context; already as
    `CUDA_VISIBLE_DEVICES` filters them. For hosts without nvidia-smi; no memory in use."""
    try:
        result = run([sys.executable, "-c", TORCH_QUERY], capture_output=True, text=True, timeout=120, check=True)
        rows = json.loads(result.stdout.strip().splitlines()[-1])
    except (OSError, subprocess.SubprocessError, ValueError, IndexError) as exc:
        log.info("no GPU listed by torch.cuda: %s", exc)
        return []
    return [Gpu(int(index), uuid, name, int(total)) for index, uuid, name, total in rows]


def visible(gpus: list[Gpu], visible_devices: str | None) -> list[Gpu]:
    """The GPUs `CUDA_VISIBLE_DEVICES` leaves a process, in its order: indices or (prefixes of) UUIDs; unset
    leaves all, an empty value or an entry that names no GPU stops the list there, as CUDA does."""
    if visible_devices is None:
        return list(gpus)
    chosen: list[Gpu] = []
    for token in (t.strip() for t in visible_devices.split(",")):
        match = next(
            (
                gpu
                for gpu in gpus
                if (token.isdigit() and gpu.index == int(token))
                or (not token.isdigit() and token and gpu.uuid and gpu.uuid.startswith(token))
            ),
            None,
        )
        if match is None:
            break
        chosen.append(match)
    return chosen


def detect_gpus(
    settings: Settings,
    environ: Mapping[str, str] = os.environ,
    query: Callable[[], list[Gpu]] = query_gpus,
    query_torch: Callable[[], list[Gpu]] = query_torch_gpus,
) -> list[Gpu]:
    """The GPUs this worker runs jobs on, as `CUDA_VISIBLE_DEVICES` filters them: those `MODELPRESS_GPUS` declares,
    else none when `MODELPRESS_DEVICE` is the CPU, else those nvidia-smi lists, else those torch.cuda sees."""
    if settings.gpus is not None:
        gpus = [Gpu(i, None, gpu.name, gpu.memory_bytes) for i, gpu in enumerate(settings.gpus)]
    elif settings.device is not None and settings.device.startswith("cpu"):
        return []
    else:
        gpus = query()
        if not gpus:
            return query_torch()
    return visible(gpus, environ.get("CUDA_VISIBLE_DEVICES"))


def consumed_queues(settings: Settings, gpus: list[Gpu]) -> list[str]:
    """The queues of every memory class the worker's GPUs serve, the largest class first (Celery's Redis
    transport takes them in turn)."""
    return [queue_name(settings.queue, c) for c in reversed(classes_served(g.memory_bytes for g in gpus))]


def version() -> str:
    try:
        return importlib.metadata.version("modelpress")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


class Registration:
    """The worker's row: `register` at start, `beat` on every heartbeat, `drain` when it stops taking jobs,
    `remove` when it exits cleanly."""

    def __init__(self, settings: Settings, name: str, gpus: list[Gpu], query: Callable[[], list[Gpu]] = query_gpus):
        self.settings = settings
        self.name = name
        self.gpus = gpus
        self.query = query
        self.draining = False

    def register(self) -> None:
        now = utcnow()
        with session_scope() as session:
            session.merge(
                Worker(
                    name=self.name,
                    host=socket.gethostname(),
                    pid=os.getpid(),
                    version=version(),
                    gpus=[asdict(gpu) for gpu in self.gpus],
                    memory_classes=classes_served(gpu.memory_bytes for gpu in self.gpus),
                    queues=consumed_queues(self.settings, self.gpus),
                    free_disk_bytes=self._free_disk(),
                    state=WorkerState.idle,
                    current_job_id=None,
                    started_at=now,
                    heartbeat_at=now,
                )
            )
        log.info("registered worker %s (%d GPU(s))", self.name, len(self.gpus))

    def beat(self) -> None:
        """Refresh the row: heartbeat, free disk, GPU memory in use, state and current job."""
        gpus = self._gpus_now()
        with session_scope() as session:
            current = session.scalar(
                select(Job.id).where(Job.status == JobStatus.running, Job.worker == self.name).limit(1)
            )
            row = session.get(Worker, self.name, with_for_update=True)
            if row is None:  # removed by hand, or the database was restored: register again
                session.rollback()
                self.register()
                return
            self.draining = self.draining or row.state == WorkerState.draining  # `modelpress workers drain`
            row.state = WorkerState.draining if self.draining else WorkerState.busy if current else WorkerState.idle
            row.current_job_id = current
            row.free_disk_bytes = self._free_disk()
            row.gpus = [asdict(gpu) for gpu in gpus]
            row.heartbeat_at = utcnow()

    def drain(self) -> None:
        """From now on the worker takes no new job (Celery's warm shutdown); the row says so at once."""
        self.draining = True
        with session_scope() as session:
            session.execute(update(Worker).where(Worker.name == self.name).values(state=WorkerState.draining))

    def remove(self) -> None:
        with session_scope() as session:
            session.execute(Worker.__table__.delete().where(Worker.name == self.name))

    def _gpus_now(self) -> list[Gpu]:
        """The registered GPUs with their memory in use now (nvidia-smi; unknown for declared ones)."""
        if self.settings.gpus is not None or not self.gpus:
            return self.gpus
        now = {gpu.uuid: gpu for gpu in self.query()}
        return [now.get(gpu.uuid, gpu) for gpu in self.gpus]

    def _free_disk(self) -> int | None:
        folder = self.settings.cache_root
        try:
            folder.mkdir(parents=True, exist_ok=True)
            return shutil.disk_usage(folder).free
        except OSError as exc:
            log.warning("could not read the free disk of %s: %s", folder, exc)
            return None


class RegistrationBeat(threading.Thread):
    """Calls `beat` every `heartbeat_interval_s` until stopped; a failed beat is logged, never fatal."""

    def __init__(self, registration: Registration, interval_s: float) -> None:
        super().__init__(name="modelpress-registration", daemon=True)
        self.registration = registration
        self.interval_s = interval_s
        self.stopped = threading.Event()

    def run(self) -> None:
        while not self.stopped.wait(self.interval_s):
            try:
                self.registration.beat()
            except Exception:  # the database is down: the next beat tries again
                log.exception("worker heartbeat failed")
