"""Jobs: submit a validated recipe (idempotently), poll, list, cancel, and read the report and artifacts."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, HTTPException, Query, Response, status
from fastapi.responses import JSONResponse
from sqlalchemy import select, update
from sqlalchemy.orm import Session

from app.architectures import unsupported_step
from app.deps import ROW_ID, JobDep, Limit, Offset, SessionDep, SettingsDep, TenantDep
from app.resources import job_rows_page, list_page
from app.schemas import ArtifactPublic, ArtifactsPublic, JobCreate, JobPublic, JobsPublic
from app.submissions import (
    IdempotencyKey,
    Submission,
    body_openapi,
    cancel_responses,
    spec_digest,
    submit_responses,
    validated_body,
)
from modelpress.events import publish
from modelpress.fleet import live_classes
from modelpress.models import Artifact, Dataset, Job, JobStatus, Model, Webhook, new_id, utcnow
from modelpress.routing import route, waiting_reason
from modelpress.settings import Settings
from modelpress.specs import TASK_DATASET_FORMAT, DepthPrune, JobSpec, SearchSpec, WeightQuantArgs, check_fit
from modelpress.webhooks import RefusedUrl, check_url

router = APIRouter(prefix="/v1/jobs", tags=["jobs"])


def _webhook(spec: JobSpec, tenant: str, settings: Settings) -> Webhook | None:
    """The webhook row for `notify`, after refusing (422) a URL on the service's own network."""
    if spec.notify is None:
        return None
    try:
        check_url(spec.notify.url, settings)
    except RefusedUrl as exc:
        raise HTTPException(status.HTTP_422_UNPROCESSABLE_ENTITY, str(exc)) from None
    return Webhook(tenant=tenant, url=spec.notify.url, secret=spec.notify.secret.get_secret_value())


def check_references(session: Session, tenant: str, spec: JobSpec | SearchSpec) -> Model:
    """The model and datasets exist and are the tenant's (404), and the model has a tokenizer where datasets are
    read (422); returns the model.

    The rows are read FOR SHARE, so a concurrent delete waits for this job and then sees it.
    """
    model = session.scalar(
        select(Model).where(Model.id == spec.model_id, Model.tenant == tenant).with_for_update(read=True)
    )
    if model is None:
        raise HTTPException(
            status.HTTP_404_NOT_FOUND, f"model {spec.model_id} not found; upload one with POST /v1/models"
        )
    task_fields = {field for field, _ in spec.task_dataset_references()}
    for field, dataset_id in spec.dataset_references():
        dataset = session.scalar(
            select(Dataset).where(Dataset.id == dataset_id, Dataset.tenant == tenant).with_for_update(read=True)
        )
        if dataset is None:
            raise HTTPException(
                status.HTTP_404_NOT_FOUND,
                f"dataset {dataset_id} ({field}) not found; upload one with POST /v1/datasets",
            )
        _check_dataset_kind(field, dataset, field in task_fields)
        if not model.details.get("has_tokenizer"):
            raise HTTPException(
                status.HTTP_422_UNPROCESSABLE_ENTITY,
                f"{field} needs a tokenizer, but model {model.id} was uploaded without one "
                "(tokenizer.json or tokenizer.model); upload the model with its tokenizer",
            )
    return model


def _check_dataset_kind(field: str, dataset: Dataset, wants_task: bool) -> None:
    """An lm-eval task where `evaluation.tasks` names one, text everywhere else (422 otherwise)."""
    is_task = dataset.format == TASK_DATASET_FORMAT
    if is_task and not wants_task:
        raise HTTPException(
            status.HTTP_422_UNPROCESSABLE_ENTITY,
            f"dataset {dataset.id} ({field}) is an lm-eval task, not text; name it under evaluation.tasks, and give "
            f"{field} a .txt or .jsonl dataset",
        )
    if wants_task and not is_task:
        raise HTTPException(
            status.HTTP_422_UNPROCESSABLE_ENTITY,
            f"dataset {dataset.id} ({field}) is text, not an lm-eval task; upload the task as a .tar/.zip of its "
            "YAML config and .jsonl data (modelpress tasks cloze builds one from text)",
        )


def _check_fits_model(spec: JobSpec, model: Model) -> None:
    """Recipe values that depend on the model: its architecture runs every step, layers are left after depth
    pruning, and `check_fit` (targets that match a Linear layer, group sizes and N:M patterns that divide the
    targeted input widths) against the Linear layers read from the upload's safetensors headers, as uploaded.

    Where the upload has no per-layer table (GGUF files, models inspected before the table was recorded) only
    group sizes are checked, against every Linear input width the config implies; the engine runs `check_fit` on
    the loaded model before each step either way, and refuses there what this misses.
    """
    refused = unsupported_step(model.details.get("model_type"), [step.key for step in spec.recipe])
    if refused:
        raise HTTPException(status.HTTP_422_UNPROCESSABLE_ENTITY, refused)
    layers = model.details.get("num_hidden_layers")
    dropped = sum(step.num_layers for step in spec.recipe if isinstance(step, DepthPrune))
    if layers and dropped >= layers:
        raise HTTPException(
            status.HTTP_422_UNPROCESSABLE_ENTITY,
            f"the recipe drops {dropped} decoder layers but the model has {layers}; keep at least one",
        )
    linears = model.details.get("linears")
    if linears is not None:
        problems = check_fit(spec, {name: (shape[0], shape[1]) for name, shape in linears.items()})
        if problems:
            raise HTTPException(status.HTTP_422_UNPROCESSABLE_ENTITY, "; ".join(p.message for p in problems))
        return
    widths = model.details.get("linear_in_features") or []
    sizes = {
        step.weights.group_size
        for step in spec.recipe
        if isinstance(getattr(step, "weights", None), WeightQuantArgs) and step.weights.group_size is not None
    }
    for size in sorted(sizes):
        for width in widths:
            if width % size:
                raise HTTPException(
                    status.HTTP_422_UNPROCESSABLE_ENTITY,
                    f"group_size {size} does not divide {width}, an input width of this model's Linear layers "
                    f"({widths}); choose a group_size that divides all of them, or null for per-channel scales",
                )


@router.post(
    "",
    status_code=status.HTTP_202_ACCEPTED,
    response_model=JobPublic,
    openapi_extra=body_openapi("JobCreate"),
    responses=submit_responses(
        "the body is not a job this service can run. Besides what the `JobCreate` schema says: "
        "`sparsity` or `pattern` (not a sparsity that contradicts the pattern, and a pattern only with `scope` "
        '"row"); structured pruning with some sparsity above 0; `targets`/`ignore` patterns that are not empty '
        "and compile after `re:`; a `calibration` section for the steps that learn from data; quantization as "
        "the last step, once; a `teacher_step` earlier than its step; "
        "a `group_size` that divides every Linear input width of the model; fewer layers dropped than "
        "the model has; a model with a tokenizer when datasets are used; no NaN, Infinity, U+0000 or JSON "
        "nested deeper than 32; an `Idempotency-Key` reused only with the same body; a `notify.url` whose host "
        "resolves to a public address (loopback, link-local and private networks are refused unless the "
        "operator allows them)"
    ),
)
def create_job(
    tenant: TenantDep,
    spec: Annotated[JobSpec, Depends(validated_body(JobCreate))],
    session: SessionDep,
    settings: SettingsDep,
    response: Response,
    idempotency_key: IdempotencyKey = None,
) -> JobPublic:
    data, digest = spec_digest(spec)
    submission = Submission(session, tenant, idempotency_key, digest, response, "job", router.prefix, JobPublic.of)
    if (earlier := submission.earlier()) is not None:
        return earlier
    model = check_references(session, tenant, spec)
    _check_fits_model(spec, model)
    webhook = _webhook(spec, tenant, settings)
    need = route(model.parameters, model.details, spec, settings.cpu_job_max_bytes)
    job = Job(
        tenant=tenant,
        model_id=spec.model_id,
        spec=data,
        spec_sha256=digest,
        idempotency_key=idempotency_key,
        status=JobStatus.queued,
        progress={"step_index": 0, "total_steps": len(spec.recipe), "fraction": 0.0, "message": "queued"},
        memory_class=need.memory_class,
        memory_bytes=need.memory_bytes,
        waiting_reason=waiting_reason(need, live_classes(session, settings)),
    )
    if webhook is not None:
        webhook.job_id = job.id = new_id()
        return submission.commit(job, webhook)
    return submission.commit(job)


@router.get("", response_model=JobsPublic)
def list_jobs(
    session: SessionDep,
    tenant: TenantDep,
    status_filter: Annotated[JobStatus | None, Query(alias="status")] = None,
    model_id: Annotated[
        str | None, Query(pattern=f"^{ROW_ID.pattern}$", description="only the jobs on this model (its id)")
    ] = None,
    limit: Limit = 50,
    offset: Offset = 0,
) -> JobsPublic:
    where = [Job.status == status_filter.value] if status_filter else []
    if model_id is not None:
        where.append(Job.model_id == model_id)
    return list_page(session, Job, tenant, limit, offset, JobPublic.of, JobsPublic, *where)


@router.get("/{job_id}", response_model=JobPublic, responses={404: {"description": "no such job"}})
def get_job(job: JobDep) -> JobPublic:
    return JobPublic.of(job)


@router.post(
    "/{job_id}/cancel",
    response_model=JobPublic,
    responses=cancel_responses("job"),
)
def cancel_job(job: JobDep, session: SessionDep, response: Response) -> JobPublic:
    cancel(job, session, response)
    return JobPublic.of(job)


def cancel(job: Job, session: Session, response: Response) -> None:
    """Cancel a queued job at once, or ask a running one to stop (202); 409 once it has ended."""
    queued = session.execute(
        update(Job)
        .where(Job.id == job.id, Job.status == JobStatus.queued)
        .values(status=JobStatus.cancelled, cancel_requested=True, finished_at=utcnow())
    )
    if queued.rowcount == 0:
        running = session.execute(
            update(Job).where(Job.id == job.id, Job.status == JobStatus.running).values(cancel_requested=True)
        )
        if running.rowcount == 0:
            session.rollback()
            session.refresh(job)
            raise HTTPException(status.HTTP_409_CONFLICT, f"job {job.id} is already {job.status}; nothing to cancel")
        response.status_code = status.HTTP_202_ACCEPTED
    session.commit()
    session.refresh(job)
    publish(job)


@router.get(
    "/{job_id}/report",
    responses={404: {"description": "no such job"}, 409: {"description": "the job has not succeeded"}},
)
def get_report(job: JobDep) -> JSONResponse:
    if job.status != JobStatus.succeeded:
        raise HTTPException(
            status.HTTP_409_CONFLICT, f"job {job.id} is {job.status}; its report is available once it has succeeded"
        )
    if job.report is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"job {job.id} succeeded but stored no report")
    return JSONResponse(job.report)


@router.get("/{job_id}/artifacts", response_model=ArtifactsPublic, responses={404: {"description": "no such job"}})
def list_artifacts(job: JobDep, session: SessionDep) -> ArtifactsPublic:
    return job_rows_page(session, Artifact, job, ArtifactPublic.of, ArtifactsPublic, Artifact.created_at, Artifact.name)
