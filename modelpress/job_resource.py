"""The job resource: the JSON `GET /v1/jobs/{id}` answers, the data of each job event and each webhook's body.

It lives beside the tables, not in the API, because the worker builds it too (events, webhooks).
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from modelpress.models import Job


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
    """One attempt at running the job: `outcome` is running, succeeded, failed, cancelled, lost (its worker
    died and the job was queued again) or released (its worker had no room in its cache for the job's inputs and
    handed the job back to the queue for another worker)."""

    started_at: datetime
    finished_at: datetime | None
    worker: str | None
    outcome: Literal["running", "lost", "released", "succeeded", "failed", "cancelled"]


class JobPublic(BaseModel):
    model_config = ConfigDict(protected_namespaces=())

    id: str
    kind: Literal["job", "search"] = Field(
        default="job", description="`job`: a recipe; `search`: a quality-budget search (see /v1/searches)"
    )
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
    memory_class: str | None = Field(
        description="the worker class the job needs: `cpu`, or `gpu-N` (a GPU of N GB); see docs/fleet.md"
    )
    estimated_memory_bytes: int | None = Field(description="the working memory the job was estimated to need")
    waiting_reason: str | None = Field(
        description="while the job is queued and no running worker can take it, why (for example the GPU memory "
        "it waits for); null otherwise"
    )
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
            kind=row.kind or "job",
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
            memory_class=row.memory_class,
            estimated_memory_bytes=row.memory_bytes,
            waiting_reason=row.waiting_reason if row.status == "queued" else None,
            created_at=row.created_at,
            started_at=row.started_at,
            finished_at=row.finished_at,
        )
