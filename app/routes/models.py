"""Model checkpoints: upload (streamed, checksummed, inspected), list, read, delete."""

from __future__ import annotations

import logging
from pathlib import Path

from fastapi import APIRouter, HTTPException, Request, status
from sqlalchemy import select
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool

from app.archives import ArchiveError, Kind, Limits, TooLarge, detect_kind, extract, model_root
from app.deps import (
    ACTIVE_STATUSES,
    ModelDep,
    SettingsDep,
    StorageDep,
    UploaderDep,
)
from app.gguf_inspection import inspect_gguf
from app.inspection import Inspected, inspect_hf_folder
from app.json_body import read_json
from app.references import REFERENCE_OPENAPI_SCHEMA, fetch_reference, parse_reference
from app.resources import add_uploaded_resource_routes, receive_and_store
from app.schemas import ModelPublic, ModelsPublic
from app.uploads import MULTIPART_OPENAPI, UPLOAD_RESPONSES, Upload, commit_or_remove, upload_name
from modelpress.models import Job, Model, new_id
from modelpress.settings import Settings
from modelpress.storage import Storage

logger = logging.getLogger(__name__)
router = APIRouter(prefix="/v1/models", tags=["models"])
NAME_SUFFIXES = (".tar.gz", ".tgz", ".tar", ".zip", ".gguf")
ERRORS = {
    **UPLOAD_RESPONSES,
    422: {
        "description": "the upload or named object is not an accepted model (not a .zip/.tar/.tar.gz of a Hugging "
        "Face folder with config.json and safetensors weights, nor a .gguf file; an architecture the engine cannot "
        "run; an unsafe archive member), `name` has control characters, or `storage_url` names no readable object "
        "outside the service's own storage area; the detail says what to fix"
    },
}
OPENAPI = {
    "requestBody": {
        "required": True,
        "content": {
            **MULTIPART_OPENAPI["requestBody"]["content"],
            "application/json": {"schema": REFERENCE_OPENAPI_SCHEMA},
        },
    }
}
"""An upload (multipart) or, on object storage, a reference to an object already in the store (JSON)."""


def _tree_size(root: Path) -> int:
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file())


def store_model(upload: Upload, tenant: str, storage: Storage, settings: Settings) -> Model:
    """Inspect the received file, move it into storage and insert its row; nothing stays behind on failure."""
    try:
        kind = detect_kind(upload.path)
        model_id = new_id()
        if kind is Kind.gguf:
            inspected: Inspected = inspect_gguf(upload.path)
            fmt, key, size = "gguf", f"models/{model_id}/model.gguf", upload.size
        else:
            dest = upload.folder / "extracted"
            limits = Limits(settings.max_archive_members, settings.max_extracted_bytes, settings.max_compression_ratio)
            extract(upload.path, kind, dest, limits)
            upload.path.unlink()
            root = model_root(dest)
            inspected = inspect_hf_folder(root)
            fmt, key, size = "hf", f"models/{model_id}", _tree_size(root)
    except TooLarge as exc:
        raise HTTPException(status.HTTP_413_REQUEST_ENTITY_TOO_LARGE, str(exc)) from exc
    except ArchiveError as exc:
        raise HTTPException(status.HTTP_422_UNPROCESSABLE_ENTITY, str(exc)) from exc
    row = Model(
        id=model_id,
        tenant=tenant,
        name=upload_name(upload, NAME_SUFFIXES),
        format=fmt,
        architecture=inspected.architecture,
        parameters=inspected.parameters,
        size_bytes=size,
        sha256=upload.sha256,
        storage_key=key,
        details=inspected.details,
    )
    if fmt == "gguf":
        storage.put_file(key, upload.path)
    else:
        storage.put_tree(key, root)
    commit_or_remove(row, storage, f"models/{model_id}")
    logger.info(
        "stored model %s (%s, %s, %d parameters) for %s", model_id, fmt, row.architecture, row.parameters, tenant
    )
    return row


def _jobs_using(session: Session, model: Model) -> list[str]:
    """Ids of queued or running jobs of this model (at most five: the 409 names no more)."""
    query = select(Job.id).where(Job.model_id == model.id, Job.status.in_(ACTIVE_STATUSES)).limit(5)
    return list(session.scalars(query).all())


@router.post(
    "",
    status_code=status.HTTP_201_CREATED,
    response_model=ModelPublic,
    openapi_extra=OPENAPI,
    responses=ERRORS,
    summary="Upload a model (a .zip/.tar/.tar.gz of a Hugging Face folder, or a .gguf file), or name one in the store",
)
async def upload_model(
    request: Request, tenant: UploaderDep, storage: StorageDep, settings: SettingsDep
) -> ModelPublic:
    receive = None
    if request.headers.get("content-type", "").split(";")[0].strip().lower() == "application/json":
        reference = parse_reference(await read_json(request))

        async def receive(scratch: Path) -> Upload:
            return await run_in_threadpool(fetch_reference, reference, scratch, settings)

    row = await receive_and_store(
        request, storage, settings, lambda upload: store_model(upload, tenant, storage, settings), receive
    )
    return ModelPublic.of(row)


add_uploaded_resource_routes(router, Model, ModelDep, ModelPublic, ModelsPublic, _jobs_using)
