"""The FastAPI application factory: `uvicorn app.main:create_app --factory`."""

from __future__ import annotations

import asyncio
import errno
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse

from app import dashboard, errors
from app.metrics import RequestMiddleware, build_metrics, serving_port
from app.resumable import sweep_periodically
from app.routes import artifacts, datasets, health, job_events, jobs, metrics, models, searches, uploads, workers
from app.schemas import JobCreate
from app.uploads import sweep_abandoned
from modelpress.logs import configure_logging
from modelpress.settings import get_settings
from modelpress.storage import StorageUnavailable, get_storage

logger = logging.getLogger(__name__)

DESCRIPTION = """Upload a causal LM checkpoint, submit a recipe of prune/quantize steps that GPU workers run,
poll the job, and download the optimized model and its metric report.

Every `/v1` call needs `Authorization: Bearer <key>` (create one with `modelpress keys create --tenant <name>`).
Each key has a rate limit: past it, a call answers 429 with `Retry-After` (seconds).
Every 4xx answers the `Error` schema: `{"detail": "<what to fix>"}`, and for a 422 from request validation also
`errors`, one `{loc, msg, type}` per problem. A method a path does not serve answers 405 with `Allow`."""

V1_RESPONSES: dict[int | str, dict[str, Any]] = {
    401: {
        "description": "missing or invalid API key",
        "headers": {"WWW-Authenticate": {"description": "`Bearer`", "schema": {"type": "string"}}},
    },
    429: {
        "description": "this API key is over its rate limit; retry after `Retry-After` seconds",
        "headers": {"Retry-After": {"description": "seconds until the window ends", "schema": {"type": "integer"}}},
    },
}


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    storage = get_storage()
    sweep_abandoned(storage.scratch_root)
    sweeper = asyncio.create_task(sweep_periodically(get_settings().upload_sweep_interval_s))
    with serving_port(app.state.metrics, get_settings()):
        yield
    sweeper.cancel()


async def _on_os_error(_request: Request, exc: Exception) -> JSONResponse:
    """A full disk answers 507 (the upload was removed); other I/O errors stay 500s, logged."""
    if isinstance(exc, StorageUnavailable):
        logger.error("object store unavailable: %s", exc)
        detail = "the server's object store is not answering; nothing was stored: try again in a minute"
        return JSONResponse({"detail": detail}, status_code=503, headers={"Retry-After": "60"})
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        logger.error("storage is full: %s", exc)
        return JSONResponse({"detail": "the server's storage is full; try again later"}, status_code=507)
    logger.exception("I/O error", exc_info=exc)
    return JSONResponse({"detail": "internal error"}, status_code=500)


def _openapi(app: FastAPI) -> dict[str, Any]:
    """The generated schema, plus `JobCreate` (the jobs route parses its body itself, with bounds), with every 4xx
    declared as `Error`."""
    if app.openapi_schema:
        return app.openapi_schema
    schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
    job_create = JobCreate.model_json_schema(ref_template="#/components/schemas/{model}")
    components = schema.setdefault("components", {}).setdefault("schemas", {})
    for name, definition in job_create.pop("$defs", {}).items():
        components.setdefault(name, definition)
    components["JobCreate"] = job_create
    errors.declare_errors(schema)
    app.openapi_schema = schema
    return schema


def create_app() -> FastAPI:
    settings = get_settings()
    if settings.log_format == "json":  # plain text keeps uvicorn's own logging untouched
        configure_logging(settings.log_format)
    app = FastAPI(title="modelpress", version="0.1.0", description=DESCRIPTION, lifespan=lifespan)
    app.state.metrics = build_metrics(settings)
    app.add_middleware(RequestMiddleware, metrics=app.state.metrics)
    errors.install(app)
    app.add_exception_handler(OSError, _on_os_error)
    app.include_router(health.router)
    app.include_router(metrics.router)
    for module in (models, datasets, uploads, jobs, searches, job_events, artifacts):
        app.include_router(module.router, responses=V1_RESPONSES)
    app.include_router(workers.router)
    dashboard.install(app)
    app.openapi = lambda: _openapi(app)  # type: ignore[method-assign]
    return app
