"""Database tables. Every row belongs to a tenant; queries always filter on it."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

from sqlalchemy import JSON, BigInteger, Boolean, DateTime, ForeignKey, Integer, String, UniqueConstraint
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


def utcnow() -> datetime:
    return datetime.now(UTC)


def new_id() -> str:
    return str(uuid.uuid4())


class Base(DeclarativeBase):
    type_annotation_map = {dict[str, Any]: JSON, list[Any]: JSON, datetime: DateTime(timezone=True)}


class AttemptOutcome(StrEnum):
    """How one attempt at a job ended: a final job status, `lost` (its worker died), `released` (its worker had no
    room for the inputs and handed the job back to the queue), or still `running`."""

    running = "running"
    lost = "lost"
    released = "released"
    succeeded = "succeeded"
    failed = "failed"
    cancelled = "cancelled"


class JobStatus(StrEnum):
    queued = "queued"
    running = "running"
    succeeded = "succeeded"
    failed = "failed"
    cancelled = "cancelled"


class JobKind(StrEnum):
    """What a job row runs: a recipe (`job`) or a quality-budget search (`search`); both share the queue,
    attempts, cancellation, progress and artifacts."""

    job = "job"
    search = "search"


FINAL_STATUSES = frozenset({JobStatus.succeeded, JobStatus.failed, JobStatus.cancelled})


class ApiKey(Base):
    """An API key; only the sha256 of the secret is stored, with a short prefix to tell keys apart."""

    __tablename__ = "api_keys"
    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_id)
    tenant: Mapped[str] = mapped_column(String(64), index=True)
    prefix: Mapped[str] = mapped_column(String(16))
    key_hash: Mapped[str] = mapped_column(String(64), unique=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    revoked_at: Mapped[datetime | None] = mapped_column(default=None)


class Model(Base):
    """An uploaded checkpoint: a Hugging Face folder (format `hf`) or a single GGUF file (format `gguf`)."""

    __tablename__ = "models"
    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_id)
    tenant: Mapped[str] = mapped_column(String(64), index=True)
    name: Mapped[str] = mapped_column(String(255))
    format: Mapped[str] = mapped_column(String(16))
    architecture: Mapped[str] = mapped_column(String(128))
    parameters: Mapped[int] = mapped_column(BigInteger)
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    sha256: Mapped[str] = mapped_column(String(64))
    storage_key: Mapped[str] = mapped_column(String(512))
    details: Mapped[dict[str, Any]] = mapped_column(default=dict)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class Dataset(Base):
    """Uploaded text (.txt, or .jsonl with a "text" field) for calibration and evaluation."""

    __tablename__ = "datasets"
    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_id)
    tenant: Mapped[str] = mapped_column(String(64), index=True)
    name: Mapped[str] = mapped_column(String(255))
    format: Mapped[str] = mapped_column(String(16))
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    records: Mapped[int] = mapped_column(Integer)
    sha256: Mapped[str] = mapped_column(String(64))
    storage_key: Mapped[str] = mapped_column(String(512))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class Job(Base):
    """One optimization job. Its row is the truth about its state; the queue message only names its id."""

    __tablename__ = "jobs"
    __table_args__ = (UniqueConstraint("tenant", "idempotency_key", name="uq_jobs_tenant_idempotency_key"),)
    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_id)
    tenant: Mapped[str] = mapped_column(String(64), index=True)
    model_id: Mapped[str | None] = mapped_column(ForeignKey("models.id", ondelete="SET NULL"), index=True)
    kind: Mapped[str] = mapped_column(String(16), default=JobKind.job, server_default=JobKind.job.value, index=True)
    spec: Mapped[dict[str, Any]] = mapped_column()
    spec_sha256: Mapped[str] = mapped_column(String(64))
    idempotency_key: Mapped[str | None] = mapped_column(String(255), default=None)
    status: Mapped[str] = mapped_column(String(16), default=JobStatus.queued, index=True)
    progress: Mapped[dict[str, Any]] = mapped_column(default=dict)
    error: Mapped[dict[str, Any] | None] = mapped_column(JSON, default=None)
    report: Mapped[dict[str, Any] | None] = mapped_column(JSON, default=None)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    # one {started_at, finished_at, worker, outcome} per attempt, oldest first; see start_attempt / end_attempt
    attempt_history: Mapped[list[Any] | None] = mapped_column(JSON, default=list)
    cancel_requested: Mapped[bool] = mapped_column(Boolean, default=False)
    worker: Mapped[str | None] = mapped_column(String(255), default=None)
    created_at: Mapped[datetime] = mapped_column(default=utcnow, index=True)
    started_at: Mapped[datetime | None] = mapped_column(default=None)
    finished_at: Mapped[datetime | None] = mapped_column(default=None, index=True)  # /metrics reads recent ends
    heartbeat_at: Mapped[datetime | None] = mapped_column(default=None)
    enqueued_at: Mapped[datetime | None] = mapped_column(default=None)
    # routing (modelpress/routing.py): the memory class whose queue carries the job, the estimated working memory,
    # and, while no live worker serves that class, why the job waits (cleared when a worker claims it)
    memory_class: Mapped[str | None] = mapped_column(String(16), default=None)
    memory_bytes: Mapped[int | None] = mapped_column(BigInteger, default=None)
    waiting_reason: Mapped[str | None] = mapped_column(String(512), default=None)

    def start_attempt(self, worker: str, now: datetime) -> None:
        """Open a new attempt on `worker`: the job's `started_at` is the current attempt's start, so its duration
        does not count attempts whose worker died."""
        self.attempts += 1
        self.worker = worker
        self.started_at = now
        self.attempt_history = [
            *(self.attempt_history or []),
            {
                "started_at": now.isoformat(),
                "finished_at": None,
                "worker": worker,
                "outcome": AttemptOutcome.running.value,
            },
        ]

    def end_attempt(self, outcome: str, at: datetime) -> None:
        """Close the open attempt, if any, with `outcome` (a final job status, or `lost` when its worker died)."""
        history = list(self.attempt_history or [])
        if history and history[-1].get("outcome") == AttemptOutcome.running:
            history[-1] = {**history[-1], "finished_at": at.isoformat(), "outcome": AttemptOutcome(outcome).value}
            self.attempt_history = history  # a new list, so the JSON column is written


class WorkerState(StrEnum):
    idle = "idle"
    busy = "busy"
    draining = "draining"  # takes no new job; exits once its job ends


class Worker(Base):
    """A worker process as it registered itself: written at start, refreshed by its heartbeat, removed when it
    exits cleanly. A row whose heartbeat is older than `MODELPRESS_WORKER_LIVE_S` is a worker that stopped."""

    __tablename__ = "workers"
    name: Mapped[str] = mapped_column(String(255), primary_key=True)  # the Celery hostname, `gpu0@host`
    host: Mapped[str] = mapped_column(String(255))
    pid: Mapped[int] = mapped_column(Integer)
    version: Mapped[str] = mapped_column(String(64))
    # one {index, uuid, name, memory_bytes, memory_used_bytes} per GPU it runs jobs on; empty for a CPU worker
    gpus: Mapped[list[Any]] = mapped_column(JSON, default=list)
    memory_classes: Mapped[list[Any]] = mapped_column(JSON, default=list)
    queues: Mapped[list[Any]] = mapped_column(JSON, default=list)
    free_disk_bytes: Mapped[int | None] = mapped_column(BigInteger, default=None)  # of its cache folder's disk
    state: Mapped[str] = mapped_column(String(16), default=WorkerState.idle)
    current_job_id: Mapped[str | None] = mapped_column(String(36), default=None)
    started_at: Mapped[datetime] = mapped_column(default=utcnow)
    heartbeat_at: Mapped[datetime] = mapped_column(default=utcnow, index=True)


class Artifact(Base):
    """A file a job produced (the optimized model as a .tar, the report as JSON)."""

    __tablename__ = "artifacts"
    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_id)
    tenant: Mapped[str] = mapped_column(String(64), index=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    name: Mapped[str] = mapped_column(String(255))
    kind: Mapped[str] = mapped_column(String(32))
    media_type: Mapped[str] = mapped_column(String(128))
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    sha256: Mapped[str] = mapped_column(String(64))
    storage_key: Mapped[str] = mapped_column(String(512))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class UploadSession(Base):
    """A resumable upload: a file sent in numbered parts of `part_size` bytes into `folder` (API scratch space).

    Received parts are recorded next to the data, one marker file per part, so parts that arrive at once never
    race on a row. The row and its folder go when the upload completes, is aborted, or passes `expires_at`."""

    __tablename__ = "upload_sessions"
    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_id)
    tenant: Mapped[str] = mapped_column(String(64), index=True)
    kind: Mapped[str] = mapped_column(String(16))
    filename: Mapped[str] = mapped_column(String(255))
    name: Mapped[str | None] = mapped_column(String(255), default=None)
    size: Mapped[int] = mapped_column(BigInteger)
    part_size: Mapped[int] = mapped_column(BigInteger)
    sha256: Mapped[str | None] = mapped_column(String(64), default=None)
    folder: Mapped[str] = mapped_column(String(1024))
    status: Mapped[str] = mapped_column(String(16), default="receiving")
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    expires_at: Mapped[datetime] = mapped_column(index=True)


class Webhook(Base):
    """Where to POST a job's resource when it ends, and how far delivery has got. The row is the truth: a
    delivery that is neither done nor given up is sent by whichever worker finds it due, so none is lost."""

    __tablename__ = "webhooks"
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), primary_key=True)
    tenant: Mapped[str] = mapped_column(String(64), index=True)
    url: Mapped[str] = mapped_column(String(2048))
    secret: Mapped[str] = mapped_column(String(256))  # write-only: never answered by the API or logged
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[datetime | None] = mapped_column(default=None, index=True)
    delivered_at: Mapped[datetime | None] = mapped_column(default=None)
    given_up_at: Mapped[datetime | None] = mapped_column(default=None)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class WebhookAttempt(Base):
    """One POST of a job's final resource to its webhook: what the receiver answered, or why it failed."""

    __tablename__ = "webhook_attempts"
    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_id)
    tenant: Mapped[str] = mapped_column(String(64), index=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    attempt: Mapped[int] = mapped_column(Integer)
    url: Mapped[str] = mapped_column(String(2048))
    job_status: Mapped[str] = mapped_column(String(16))
    status_code: Mapped[int | None] = mapped_column(Integer, default=None)
    error: Mapped[str | None] = mapped_column(String(1024), default=None)
    delivered: Mapped[bool] = mapped_column(Boolean, default=False)
    duration_ms: Mapped[int] = mapped_column(Integer, default=0)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
