"""Request and response bodies. `JobCreate` is the shared `JobSpec`: the same JSON the worker receives."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal, Self

from pydantic import BaseModel, ConfigDict, Field, computed_field

from modelpress.job_resource import AttemptPublic, JobError, JobPublic, Progress
from modelpress.specs import JobSpec, SearchPruning, SearchSpec

__all__ = ["AttemptPublic", "JobCreate", "JobError", "JobPublic", "Progress"]

JobCreate = JobSpec
SearchCreate = SearchSpec


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
    format: Literal["txt", "jsonl", "lm-eval"] = Field(
        description="txt or jsonl: text for calibration and evaluation; lm-eval: a task for evaluation.tasks"
    )
    size_bytes: int
    records: int = Field(description="non-empty lines of text, or the documents an lm-eval task scores")
    sha256: str
    created_at: datetime


class DatasetsPublic(BaseModel):
    data: list[DatasetPublic]
    count: int


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


MAX_UPLOAD_PARTS = 10_000
"""The most parts one resumable upload may have (so a part is at least size / 10 000 bytes)."""
_NO_CONTROL = r"^[^\x00-\x1f\x7f]*$"


class UploadCreate(BaseModel):
    """A resumable upload to start: what the file is and how big, so parts can be checked as they come."""

    model_config = ConfigDict(extra="forbid")
    kind: Literal["model", "dataset"] = Field(description="what the file becomes on completion")
    filename: str = Field(
        min_length=1,
        max_length=255,
        pattern=r"^[^\x00-\x1f\x7f/\\]+$",
        description="the file's name (a dataset's must end in .txt or .jsonl); no folders",
    )
    size: int = Field(ge=1, le=2**53, description="the whole file's size in bytes")
    sha256: str | None = Field(
        default=None, pattern="^[0-9a-f]{64}$", description="the whole file's sha256 (hex), checked on completion"
    )
    name: str | None = Field(
        default=None, max_length=255, pattern=_NO_CONTROL, description="the model or dataset name (default: filename)"
    )
    part_size: int | None = Field(
        default=None,
        ge=1,
        le=2**53,
        description="bytes per part, every part but the last (default MODELPRESS_UPLOAD_PART_BYTES, at most "
        f"MODELPRESS_UPLOAD_MAX_PART_BYTES, at least size / {MAX_UPLOAD_PARTS})",
    )


class UploadPublic(BaseModel):
    """A resumable upload and the parts the server holds."""

    id: str
    kind: Literal["model", "dataset"]
    filename: str
    name: str | None
    size: int
    sha256: str | None
    part_size: int = Field(description="bytes per part; the last part holds the rest")
    parts: int = Field(description="how many parts the file has, numbered from 1")
    received: list[int] = Field(description="the part numbers received in full, ascending")
    expires_at: datetime = Field(description="when the parts are removed unless another part arrives first")
    created_at: datetime


class GpuPublic(BaseModel):
    index: int
    uuid: str | None
    name: str
    memory_bytes: int
    memory_used_bytes: int | None = Field(description="in use at the last heartbeat; null when unknown")


class WorkerPublic(_FromRow):
    name: str = Field(description="the Celery hostname it registered under, `gpu<i>@<host>` for per-GPU workers")
    host: str
    pid: int
    version: str
    gpus: list[GpuPublic] = Field(description="the GPUs it runs jobs on; empty for a CPU worker")
    memory_classes: list[str] = Field(description="the memory classes it serves (docs/fleet.md)")
    queues: list[str]
    free_disk_bytes: int | None = Field(description="free space on the disk of its cache folder")
    state: Literal["idle", "busy", "draining"]
    current_job_id: str | None
    live: bool = Field(description="whether its heartbeat is within MODELPRESS_WORKER_LIVE_S")
    started_at: datetime
    heartbeat_at: datetime


class WorkersPublic(BaseModel):
    data: list[WorkerPublic]
    count: int


class SearchTaskPublic(BaseModel):
    """One task's accuracy on a candidate beside the model as uploaded (lm-eval's acc and its standard error)."""

    task: str | None
    accuracy: float | None = Field(description="null when the task could not be scored on the candidate")
    stderr: float | None
    baseline_accuracy: float
    baseline_stderr: float | None
    drop: float | None = Field(description="baseline − candidate accuracy, absolute (0.02 = 2 points lost)")
    predicted_drop: float | None = Field(description="null: the search has no per-layer task predictor")
    n: int | None = Field(description="documents scored")
    error: str | None


class SearchCandidatePublic(BaseModel):
    """One built candidate, as measured on the artifact transformers reloads (predicted figures beside)."""

    id: str
    method: str
    pruning: str | None = Field(
        default=None, description='the pruning option of its family ("wanda 50%", "sparsegpt 2:4"); null: unpruned'
    )
    sparsity: float | None = Field(
        default=None, description="share of exact zeros in the pruned layers, measured on the reloaded artifact"
    )
    formats: dict[str, int] = Field(description="how many layers got each format")
    size_bytes: int = Field(description="bytes of the artifact's *.safetensors files")
    perplexity: float
    perplexity_increase: float = Field(description="relative to the model as uploaded (0.02 = +2%)")
    kl_divergence: float | None = Field(description="mean KL(baseline ‖ candidate), nats per token")
    predicted_perplexity_increase: float
    predicted_size_bytes: int = Field(description="tensor bytes predicted from the assignment")
    linear_weight_bytes: int = Field(description="weight bytes every decoded token reads from the Linears")
    decode_tokens_per_s: float | None = Field(
        description="decode tokens/s at batch 1 measured on the serving kernels (CUDA workers, decode_speed "
        "objective); null where not timed"
    )
    speed_source: Literal["model", "measured"] = Field(
        description="`measured`: the decode speed was timed; `model`: the weight bytes read per token stand for it"
    )
    tasks: list[SearchTaskPublic] | None = Field(description="task accuracies, when the budget limits them")
    meets_budget: bool
    pareto: bool


class SearchResultPublic(BaseModel):
    chosen: str | None = Field(description="the chosen candidate's id; null when none met the budget")
    message: str
    pareto_front: list[str]
    candidates: list[SearchCandidatePublic]


class SearchPublic(BaseModel):
    """A quality-budget search: a job underneath (same queue, attempts, cancellation, progress, artifacts)."""

    model_config = ConfigDict(protected_namespaces=())

    id: str
    model_id: str
    status: Literal["queued", "running", "succeeded", "failed", "cancelled"]
    search: dict[str, Any] = Field(description="the search as submitted (budget, objective, space, …)")
    progress: Progress
    error: JobError | None
    attempts: int
    attempt_history: list[AttemptPublic]
    cancel_requested: bool
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    result: SearchResultPublic | None = Field(
        description="once succeeded: every candidate, the Pareto front and the choice (the per-layer assignments "
        "are at /v1/searches/{id}/result)"
    )

    @classmethod
    def of(cls, row: Any) -> SearchPublic:
        job = JobPublic.of(row)
        report = row.report if row.status == "succeeded" else None
        return cls(
            **job.model_dump(include=set(cls.model_fields) - {"search", "result"}),
            search=row.spec,
            result=None if report is None else _search_result(report),
        )


def _search_result(report: dict[str, Any]) -> SearchResultPublic:
    candidates = [
        SearchCandidatePublic(
            id=c["id"],
            method=c["method"],
            pruning=None if c.get("pruning") is None else SearchPruning.model_validate(c["pruning"]).label,
            sparsity=c["measured"].get("sparsity"),
            formats=c["formats"],
            size_bytes=c["measured"]["size_bytes"],
            perplexity=c["measured"]["perplexity"],
            perplexity_increase=c["measured"]["perplexity_increase"],
            kl_divergence=(c["measured"].get("kl_divergence") or {}).get("mean"),
            predicted_perplexity_increase=c["predicted"]["perplexity_increase"],
            predicted_size_bytes=c["predicted"]["size_bytes"],
            linear_weight_bytes=c["predicted"]["linear_weight_bytes"],
            decode_tokens_per_s=(c["measured"].get("decode") or {}).get("tokens_per_s"),
            speed_source=c.get("speed_source", "model"),
            tasks=None if c.get("tasks") is None else [SearchTaskPublic.model_validate(t) for t in c["tasks"]],
            meets_budget=c["meets_budget"],
            pareto=c["pareto"],
        )
        for c in report.get("candidates", [])
    ]
    return SearchResultPublic(
        chosen=report.get("chosen"),
        message=report.get("message", ""),
        pareto_front=report.get("pareto_front", []),
        candidates=candidates,
    )


class SearchesPublic(BaseModel):
    data: list[SearchPublic]
    count: int
