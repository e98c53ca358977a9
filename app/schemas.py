"""Request and response bodies. `JobCreate` is the shared `JobSpec`: the same JSON the worker receives."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal, Self

from pydantic import BaseModel, ConfigDict, Field, computed_field

from modelpress.models import Job
from modelpress.specs import JobSpec

JobCreate = JobSpec


class _FromRow(BaseModel):
    """A public view read straight from a table row's attributes."""

    model_config = ConfigDict(from_attributes=True)

    @classmethod
    def of(cls, row: Any) -> Self:
        return cls.model_validate(row)


class ModelPublic(_FromRow):
    id: str
    name: str
    format: Literal["hf", "gguf"]
    architecture: str
    parameters: int
    size_bytes: int
    sha256: str
    created_at: datetime
    details: dict[str, Any] = Field(
        default_factory=dict, description="what inspection found: sizes, dtype, tokenizer, Linear input widths"
    )


class ModelsPublic(BaseModel):
    data: list[ModelPublic]
    count: int


class DatasetPublic(_FromRow):
    id: str
    name: str
    format: Literal["txt", "jsonl"]
    size_bytes: int
    records: int
    sha256: str
    created_at: datetime


class DatasetsPublic(BaseModel):
    data: list[DatasetPublic]
    count: int


class Progress(BaseModel):
    step_index: int = 0
    total_steps: int = 0
    step: str | None = None
    fraction: float = 0.0
    message: str = ""


class JobError(BaseModel):
    code: str
    message: str


class AttemptPublic(BaseModel):
    """One attempt at running the job: `outcome` is running, succeeded, failed, cancelled, or lost (its worker
    died and the job was queued again)."""

    started_at: datetime
    finished_at: datetime | None
    worker: str | None
    outcome: Literal["running", "lost", "succeeded", "failed", "cancelled"]


class JobPublic(BaseModel):
    model_config = ConfigDict(protected_namespaces=())

    id: str
    model_id: str
    status: Literal["queued", "running", "succeeded", "failed", "cancelled"]
    recipe: list[dict[str, Any]]
    calibration: dict[str, Any] | None
    evaluation: dict[str, Any] | None
    progress: Progress
    error: JobError | None
    attempts: int = Field(description="how many times a worker started the job")
    attempt_history: list[AttemptPublic] = Field(
        description="each attempt, oldest first; a retried job's `started_at` is its last attempt's start"
    )
    cancel_requested: bool
    created_at: datetime
    started_at: datetime | None = Field(description="when the current (or last) attempt started")
    finished_at: datetime | None

    @classmethod
    def of(cls, row: Job) -> JobPublic:
        spec = row.spec or {}
        progress = {"total_steps": len(spec.get("recipe", [])), **(row.progress or {})}
        known = Progress.model_fields
        error = row.error or None
        return cls(
            id=row.id,
            model_id=spec.get("model_id") or row.model_id or "",
            status=row.status,
            recipe=spec.get("recipe", []),
            calibration=spec.get("calibration"),
            evaluation=spec.get("evaluation"),
            progress=Progress(**{k: v for k, v in progress.items() if k in known and v is not None}),
            error=JobError(code=str(error.get("code", "error")), message=str(error.get("message", "")))
            if error
            else None,
            attempts=row.attempts,
            attempt_history=[AttemptPublic(**attempt) for attempt in row.attempt_history or []],
            cancel_requested=row.cancel_requested,
            created_at=row.created_at,
            started_at=row.started_at,
            finished_at=row.finished_at,
        )


class JobsPublic(BaseModel):
    data: list[JobPublic]
    count: int


class ArtifactPublic(_FromRow):
    id: str
    name: str
    kind: str
    media_type: str
    size_bytes: int
    sha256: str
    created_at: datetime

    @computed_field
    @property
    def download_url(self) -> str:
        return f"/v1/artifacts/{self.id}"


class ArtifactsPublic(BaseModel):
    data: list[ArtifactPublic]
    count: int
