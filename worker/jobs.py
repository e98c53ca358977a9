"""The life of one job on a worker: claim the row, run the engine, store the artifacts, record the outcome.

The job row is the truth. A message is only a hint to look at that row: a job that is no longer queued
(cancelled, finished, or running under a live lease elsewhere) is skipped, so a message delivered twice
does no harm. While a job runs, a heartbeat thread renews its lease; a job whose heartbeat has stopped
for longer than the lease can be claimed again by the next delivery.
"""

from __future__ import annotations

import logging
import os
import shutil
import threading
import time
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import select, update

from modelpress.db import session_scope
from modelpress.events import publish_job
from modelpress.logs import job_id_var
from modelpress.models import (
    FINAL_STATUSES,
    Artifact,
    AttemptOutcome,
    Dataset,
    Job,
    JobKind,
    JobStatus,
    Model,
    utcnow,
)
from modelpress.queue import enqueue_job
from modelpress.settings import Settings, get_settings
from modelpress.specs import TASK_DATASET_FORMAT, stored_spec
from modelpress.storage import Storage, StorageUnavailable, get_storage
from worker.artifacts import remove as remove_artifacts
from worker.artifacts import store_outputs
from worker.cache import CacheFull, NoRoomNow, get_cache
from worker.job_files import CheckpointSync, JobFiles

log = logging.getLogger(__name__)


class JobCancelled(Exception):
    """Raised from the progress callback when the user asked to cancel; unwinds the engine."""


PASS_PAUSE_S = 1.0  # a worker passing on a job it handed back waits this long before sending it on


class Pass(Exception):
    """This worker handed the job back lately (no room in its cache): another worker should take it."""


def claim(job_id: str, worker_name: str, settings: Settings) -> Job | None:
    """Mark a job running on this worker, or return None when it is not ours to run; publishes what changed."""
    try:
        job = _claim(job_id, worker_name, settings)
    except Pass:
        log.info("job %s: handed back by this worker lately; sent on for another worker", job_id)
        time.sleep(PASS_PAUSE_S)  # a lone worker does not spin on the job it cannot hold
        enqueue_job(job_id, settings, front=True)
        return None
    publish_job(job_id)
    return job


def _released_here_lately(job: Job, worker_name: str, now: datetime, settings: Settings) -> bool:
    last = (job.attempt_history or [{}])[-1]
    if last.get("outcome") != AttemptOutcome.released or last.get("worker") != worker_name:
        return False
    return now - datetime.fromisoformat(last["finished_at"]) < timedelta(seconds=settings.release_hold_s)


def _claim(job_id: str, worker_name: str, settings: Settings) -> Job | None:
    with session_scope() as session:
        job = session.scalar(select(Job).where(Job.id == job_id).with_for_update())
        if job is None:
            log.warning("job %s: no such row; message dropped", job_id)
            return None
        now = utcnow()
        if job.status in FINAL_STATUSES:
            return None
        if job.status == JobStatus.running:
            heartbeat = job.heartbeat_at or job.started_at or job.created_at
            if heartbeat.tzinfo is None:
                heartbeat = heartbeat.replace(tzinfo=now.tzinfo)
            if now - heartbeat < timedelta(seconds=settings.lease_s):
                log.info("job %s is running elsewhere under a live lease; skipped", job_id)
                return None
            log.warning("job %s: previous attempt stopped heart-beating; retrying", job_id)
            job.end_attempt(AttemptOutcome.lost, heartbeat)
        if job.cancel_requested:
            _finish(job, JobStatus.cancelled, error=None)
            return None
        if job.attempts >= settings.max_attempts:
            _finish(job, JobStatus.failed, error=_attempts_spent(job, settings))
            return None
        if _released_here_lately(job, worker_name, now, settings):
            raise Pass(job_id)
        job.status = JobStatus.running
        job.start_attempt(worker_name, now)
        job.heartbeat_at = now
        job.error = None
        job.waiting_reason = None
        session.flush()
        session.expunge(job)
        return job


def _attempts_spent(job: Job, settings: Settings) -> dict[str, str]:
    if (job.attempt_history or [{}])[-1].get("outcome") == AttemptOutcome.released:
        return {
            "code": "cache_full",
            "message": f"no worker had room in its cache for the job's model and datasets in {job.attempts} "
            f"attempts (limit {settings.max_attempts}); free disk space under MODELPRESS_CACHE_DIR, raise "
            "MODELPRESS_CACHE_MAX_BYTES, or add a worker with more room, then submit the job again",
        }
    return {
        "code": "too_many_attempts",
        "message": f"the job's worker died {job.attempts} times (limit {settings.max_attempts}); "
        "the last attempt may have run out of memory: try a smaller recipe or a larger worker",
    }


def release(job_id: str, worker_name: str, reason: str, settings: Settings) -> None:
    """Hand a running job back to the queue, ahead of newer jobs, for another worker: this one has no room for
    its inputs. The attempt counts (outcome `released`), so a job no worker can hold ends after max_attempts."""
    with session_scope() as session:
        job = session.get(Job, job_id, with_for_update=True)
        if job is None or job.status != JobStatus.running or job.worker != worker_name:
            return
        job.end_attempt(AttemptOutcome.released, utcnow())
        job.status, job.worker = JobStatus.queued, None
        job.progress = {**(job.progress or {}), "message": f"handed back by {worker_name}: {reason}"}
    log.warning("job %s: handed back to the queue: %s", job_id, reason)
    publish_job(job_id)
    enqueue_job(job_id, settings, front=True)


def _finish(job: Job, status: JobStatus, *, error: dict[str, str] | None) -> None:
    job.status = status
    job.error = error
    job.finished_at = utcnow()
    job.end_attempt(status, job.finished_at)


class ProgressReporter:
    """The engine's progress callback: writes progress to the row (throttled) and checks for cancellation.

    A stage's first report and its last (fraction 1) are always written, so the row and the events that follow it
    show when each stage began and ended; the reports in between at most every `interval_s`."""

    def __init__(self, job_id: str, interval_s: float) -> None:
        self.job_id = job_id
        self.interval_s = interval_s
        self._last_write = 0.0
        self._last_stage: int | None = None

    def __call__(self, event: Any) -> None:
        now = time.monotonic()
        always = event.fraction >= 1.0 or event.step_index != self._last_stage
        if not always and now - self._last_write < self.interval_s:
            return
        self._last_write = now
        self._last_stage = event.step_index
        progress = {
            "step_index": event.step_index,
            "total_steps": event.total_steps,
            "step": event.step,
            "fraction": round(float(event.fraction), 4),
            "message": event.message,
        }
        with session_scope() as session:
            session.execute(update(Job).where(Job.id == self.job_id).values(progress=progress, heartbeat_at=utcnow()))
            cancel = session.scalar(select(Job.cancel_requested).where(Job.id == self.job_id))
        publish_job(self.job_id)
        if cancel:
            raise JobCancelled(self.job_id)


MEMORY_POLL_S = 0.25


def resident_bytes() -> int:
    """This process's resident memory (RSS), read from /proc: cheap enough to poll four times a second."""
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class Heartbeat(threading.Thread):
    """Renews the job's lease while a long step runs, and enforces the job's host memory limit.

    The limit counts the memory the job adds on top of what the process held when the job started. A job
    past it is failed with a clear reason and its process exits at once: a thread cannot interrupt a torch
    kernel, and the process is the job's alone (a fresh child per job), so the worker goes on serving.
    """

    def __init__(self, job_id: str, settings: Settings, scratch: Path) -> None:
        super().__init__(name=f"heartbeat-{job_id}", daemon=True)
        self.job_id = job_id
        self.interval_s = settings.heartbeat_interval_s
        self.limit = settings.job_memory_limit_bytes
        self.ceiling = resident_bytes() + self.limit if self.limit else None
        self.scratch = scratch
        self.stopped = threading.Event()

    def run(self) -> None:
        job_id_var.set(self.job_id)  # a thread starts with an empty context: its lines carry the job id too
        last_beat = time.monotonic()
        while not self.stopped.wait(MEMORY_POLL_S if self.ceiling else self.interval_s):
            if self.ceiling and (used := resident_bytes()) > self.ceiling:
                self._out_of_memory(used)
            if time.monotonic() - last_beat >= self.interval_s:
                last_beat = time.monotonic()
                self._beat()

    def _beat(self) -> None:
        try:
            with session_scope() as session:
                session.execute(update(Job).where(Job.id == self.job_id).values(heartbeat_at=utcnow()))
        except Exception:  # a database blip must not kill the job; the next beat tries again
            log.exception("job %s: heartbeat failed", self.job_id)

    def _out_of_memory(self, used: int) -> None:
        added = used - (self.ceiling - self.limit)
        message = (
            f"the job needed more host memory than this worker allows: it had added {added / 2**20:.0f} MiB, over "
            f"the limit of {self.limit / 2**20:.0f} MiB (MODELPRESS_JOB_MEMORY_LIMIT_BYTES); use fewer or shorter "
            "calibration/evaluation windows, or a worker with a higher limit"
        )
        log.error("job %s: %s", self.job_id, message)
        try:
            _record_end(self.job_id, JobStatus.failed, {"code": "out_of_memory", "message": message})
        finally:
            shutil.rmtree(self.scratch, ignore_errors=True)
            get_storage().delete(checkpoint_key(self.job_id))
            os._exit(137)


def checkpoint_key(job_id: str) -> str:
    """Where a job keeps training checkpoints: kept across retries, removed when the job ends."""
    return f"checkpoints/{job_id}"


def _engine_request(
    job: Job, local: JobFiles, output_dir: Path, settings: Settings, checkpoints: CheckpointSync
) -> Any:
    from worker.engine import EngineRequest

    spec = stored_spec(job.kind, job.spec)
    references = spec.dataset_references()
    with session_scope() as session:
        model = session.get(Model, job.model_id) if job.model_id else None
        if model is None:
            raise LookupError("the job's model was deleted before the job ran; upload it again and resubmit")
        datasets: dict[str, Dataset] = {}
        for where, dataset_id in references:
            dataset = session.get(Dataset, dataset_id)
            if dataset is None:
                raise LookupError(f"the dataset {dataset_id} ({where}) was deleted before the job ran; resubmit")
            datasets[dataset_id] = dataset
    files = {
        i: (local.tree(d.storage_key) if d.format == TASK_DATASET_FORMAT else local.file(d.storage_key), d.format)
        for i, d in datasets.items()
    }
    calibration_file = files[spec.calibration.dataset_id] if spec.calibration else (None, None)
    evaluation_file = files[spec.evaluation.dataset_id] if spec.evaluation else (None, None)
    return EngineRequest(
        model_path=local.tree(model.storage_key) if model.format == "hf" else local.file(model.storage_key),
        model_format=model.format,
        spec=spec,
        calibration_path=calibration_file[0],
        calibration_format=calibration_file[1],
        evaluation_path=evaluation_file[0],
        evaluation_format=evaluation_file[1],
        output_dir=output_dir,
        device=settings.device,
        datasets=files,
        checkpoint_dir=checkpoints.folder,
        on_checkpoint=checkpoints,
    )


def _is_out_of_memory(exc: BaseException) -> bool:
    if isinstance(exc, MemoryError) or type(exc).__name__ == "OutOfMemoryError":
        return True
    text = str(exc)
    return isinstance(exc, RuntimeError) and ("can't allocate memory" in text or "out of memory" in text)


def _error_for(exc: BaseException) -> dict[str, str]:
    """Turn an exception into an error a person can act on."""
    from worker.engine import EngineError

    if isinstance(exc, EngineError):
        return {"code": exc.code, "message": str(exc)}
    if isinstance(exc, LookupError):
        return {"code": "missing_input", "message": str(exc)}
    if isinstance(exc, CacheFull):
        return {"code": "cache_full", "message": str(exc)}
    if isinstance(exc, StorageUnavailable):
        return {"code": "storage_unavailable", "message": str(exc)}
    if _is_out_of_memory(exc):
        return {
            "code": "out_of_memory",
            "message": f"the worker ran out of memory ({exc}); use fewer calibration samples, a shorter seq_len, "
            "or a worker with more memory",
        }
    if isinstance(exc, OSError) and exc.errno == 28:
        return {"code": "disk_full", "message": "the worker's disk filled while writing the artifact; nothing was kept"}
    return {"code": "internal_error", "message": f"{type(exc).__name__}: {exc}"}


def execute(job_id: str, worker_name: str) -> None:
    """Run a job (a recipe, or a search) end to end. Never raises for a job failure: the outcome is written to the
    row."""
    from worker.engine import run_pipeline, run_search

    settings = get_settings()
    job = claim(job_id, worker_name, settings)
    if job is None:
        return
    storage = get_storage()
    output_dir = storage.scratch_dir()
    heartbeat = Heartbeat(job_id, settings, output_dir)
    heartbeat.start()
    log.info("job %s: attempt %d on %s", job_id, job.attempts, worker_name)
    local = JobFiles(storage, get_cache())
    try:
        checkpoints = CheckpointSync(storage, checkpoint_key(job_id), output_dir / "checkpoints")
        checkpoints.restore()
        request = _engine_request(job, local, output_dir, settings, checkpoints)
        run = run_search if job.kind == JobKind.search else run_pipeline
        report = run(request, ProgressReporter(job_id, settings.progress_interval_s))
        artifacts = store_outputs(storage, job, output_dir, model_required=job.kind != JobKind.search)
        _record_success(job_id, report, artifacts, storage)
        publish_job(job_id)
    except JobCancelled:
        log.info("job %s: cancelled", job_id)
        _record_end(job_id, JobStatus.cancelled, None)
    except NoRoomNow as exc:
        release(job_id, worker_name, str(exc), settings)
    except Exception as exc:
        log.exception("job %s failed", job_id)
        _record_end(job_id, JobStatus.failed, _error_for(exc))
    finally:
        heartbeat.stopped.set()
        local.close()
        shutil.rmtree(output_dir, ignore_errors=True)
    try:
        storage.delete(checkpoint_key(job_id))  # the job has ended; only a crash keeps them for the retry
    except StorageUnavailable as exc:
        log.warning("job %s: its checkpoints stay in the store: %s", job_id, exc)


def _record_success(job_id: str, report: dict[str, Any], artifacts: list[Artifact], storage: Storage) -> None:
    try:
        with session_scope() as session:
            job = session.get(Job, job_id, with_for_update=True)
            if job.cancel_requested:
                raise JobCancelled(job_id)
            session.add_all(artifacts)
            job.report = report
            job.progress = {**(job.progress or {}), "fraction": 1.0, "message": "done"}
            _finish(job, JobStatus.succeeded, error=None)
    except BaseException:
        remove_artifacts(storage, artifacts)
        raise


def _record_end(job_id: str, status: JobStatus, error: dict[str, str] | None) -> None:
    with session_scope() as session:
        job = session.get(Job, job_id, with_for_update=True)
        if job is not None and job.status not in FINAL_STATUSES:
            _finish(job, status, error=error)
    publish_job(job_id)
