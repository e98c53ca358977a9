"""Searches: submit a quality-budget search (a job of kind `search` underneath: same queue, attempts,
cancellation, progress and artifacts), poll, list, cancel, and read its full result."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, HTTPException, Response, status
from fastapi.responses import JSONResponse

from app.architectures import unsupported_step
from app.deps import Limit, Offset, SearchDep, SessionDep, SettingsDep, TenantDep
from app.resources import list_page
from app.routes.jobs import cancel, check_references, list_artifacts
from app.schemas import ArtifactsPublic, SearchCreate, SearchesPublic, SearchPublic
from app.submissions import (
    IdempotencyKey,
    Submission,
    body_openapi,
    cancel_responses,
    spec_digest,
    submit_responses,
    validated_body,
)
from modelpress.fleet import live_classes
from modelpress.models import Job, JobKind, JobStatus, Model
from modelpress.routing import Need, route, waiting_reason
from modelpress.settings import Settings
from modelpress.specs import GPTQQuantize, JobSpec, SearchFormat, SearchSpec, check_fit, selected

router = APIRouter(prefix="/v1/searches", tags=["searches"])


def _check_space_fits(spec: SearchSpec, model: Model) -> None:
    """The model's architecture runs the space's methods and pruning options, some targeted Linear takes some
    allowed format (a group size must divide the input width), and every pruning option fits the targeted Linears
    (`check_fit`: an N:M pattern's M divides each input width), checked on the Linears read from the upload
    where it has them."""
    keys = sorted({spec.space.as_step(f, m).key for f in spec.space.formats for m in spec.space.methods})
    keys += sorted({step.key for step in spec.space.prune_steps()})
    refused = unsupported_step(model.details.get("model_type"), keys)
    if refused:
        raise HTTPException(status.HTTP_422_UNPROCESSABLE_ENTITY, refused)
    linears = model.details.get("linears")
    if linears is None:
        return  # GGUF uploads: the engine checks on the loaded model
    names = selected(((name, "Linear") for name in linears), spec.space.targets, spec.space.ignore)
    if not names:
        raise HTTPException(
            status.HTTP_422_UNPROCESSABLE_ENTITY,
            f"space.targets {list(spec.space.targets)} and space.ignore {list(spec.space.ignore)} select none of the "
            f"model's {len(linears)} Linear layers; check them",
        )
    shapes = {name: (shape[0], shape[1]) for name, shape in linears.items()}
    for i, step in enumerate(spec.space.prune_steps()):
        problems = check_fit(step, shapes)
        if problems:
            detail = "; ".join(p.message for p in problems)
            raise HTTPException(status.HTTP_422_UNPROCESSABLE_ENTITY, f"space.pruning.{i}: {detail}")
    sizes = [f.weights.group_size for f in spec.space.formats if f.weights is not None]
    if SearchFormat.bf16 in spec.space.formats or SearchFormat.fp8 in spec.space.formats or None in sizes:
        return
    if not any(linears[name][1] % size == 0 for name in names for size in sizes):
        raise HTTPException(
            status.HTTP_422_UNPROCESSABLE_ENTITY,
            f"no group size of space.formats ({', '.join(f.value for f in spec.space.formats)}) divides the input "
            "width of any targeted Linear; add a format that fits (int8, fp8, bf16 or another group size)",
        )


def _need(spec: SearchSpec, model: Model, settings: Settings) -> Need:
    """The memory class a search runs in: like a GPTQ job on the same windows, with the model counted twice (the
    loaded model stays while each candidate is built from a copy), three times with pruning options (a pruned
    family keeps its pruned copy too)."""
    proxy = JobSpec(
        model_id=spec.model_id, recipe=[GPTQQuantize()], calibration=spec.calibration, evaluation=spec.evaluation
    )
    copies = 3 if spec.space.pruning else 2
    return route(copies * model.parameters, model.details, proxy, settings.cpu_job_max_bytes)


@router.post(
    "",
    status_code=status.HTTP_202_ACCEPTED,
    response_model=SearchPublic,
    openapi_extra=body_openapi("SearchSpec"),
    responses=submit_responses(
        "the body is not a search this service can run: besides the `SearchSpec` schema, a budget with at least "
        "one limit, a task budget with its `evaluation.tasks` (uploaded lm-eval tasks) and tasks only with a task "
        "budget, each format, method and pruning option once, a pruning option with `sparsity` or an N:M "
        "`pattern` whose M divides every targeted input width, targets that select a Linear that some format "
        "fits, a model with a tokenizer, an `Idempotency-Key` reused only with the same body"
    ),
)
def create_search(
    tenant: TenantDep,
    spec: Annotated[SearchSpec, Depends(validated_body(SearchCreate))],
    session: SessionDep,
    settings: SettingsDep,
    response: Response,
    idempotency_key: IdempotencyKey = None,
) -> SearchPublic:
    data, digest = spec_digest(spec)
    submission = Submission(
        session, tenant, idempotency_key, digest, response, "search", router.prefix, SearchPublic.of
    )
    if (earlier := submission.earlier()) is not None:
        return earlier
    model = check_references(session, tenant, spec)
    _check_space_fits(spec, model)
    need = _need(spec, model, settings)
    families = 1 + len(spec.space.pruning)  # each pruning option adds its "prune k" stage and its candidates
    stages = 3 + families * spec.max_candidates + len(spec.space.pruning) + 1
    job = Job(
        tenant=tenant,
        kind=JobKind.search,
        model_id=spec.model_id,
        spec=data,
        spec_sha256=digest,
        idempotency_key=idempotency_key,
        status=JobStatus.queued,
        progress={"step_index": 0, "total_steps": stages, "fraction": 0.0, "message": "queued"},
        memory_class=need.memory_class,
        memory_bytes=need.memory_bytes,
        waiting_reason=waiting_reason(need, live_classes(session, settings)),
    )
    return submission.commit(job)


@router.get("", response_model=SearchesPublic)
def list_searches(session: SessionDep, tenant: TenantDep, limit: Limit = 50, offset: Offset = 0) -> SearchesPublic:
    return list_page(session, Job, tenant, limit, offset, SearchPublic.of, SearchesPublic, Job.kind == JobKind.search)


@router.get("/{search_id}", response_model=SearchPublic, responses={404: {"description": "no such search"}})
def get_search(search: SearchDep) -> SearchPublic:
    return SearchPublic.of(search)


@router.post(
    "/{search_id}/cancel",
    response_model=SearchPublic,
    responses=cancel_responses("search"),
)
def cancel_search(search: SearchDep, session: SessionDep, response: Response) -> SearchPublic:
    cancel(search, session, response)
    return SearchPublic.of(search)


@router.get(
    "/{search_id}/result",
    responses={404: {"description": "no such search"}, 409: {"description": "the search has not succeeded"}},
)
def get_result(search: SearchDep) -> JSONResponse:
    """The whole result: every candidate with its per-layer assignment, predicted and measured figures."""
    if search.status != JobStatus.succeeded or search.report is None:
        raise HTTPException(
            status.HTTP_409_CONFLICT,
            f"search {search.id} is {search.status}; its result is available once it has succeeded",
        )
    return JSONResponse(search.report)


@router.get(
    "/{search_id}/artifacts", response_model=ArtifactsPublic, responses={404: {"description": "no such search"}}
)
def list_search_artifacts(search: SearchDep, session: SessionDep) -> ArtifactsPublic:
    """The chosen candidate's model.tar (none when no candidate met the budget) and report.json."""
    return list_artifacts(search, session)
