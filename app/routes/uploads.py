"""Resumable uploads of big files: create, send numbered parts (in any order, again after a failure), ask which
parts arrived, complete into a model or dataset (the same inspection and answers as a single-request upload), or
abort. The mechanics are in `app.resumable`."""

from __future__ import annotations

import logging
import shutil
from datetime import timedelta
from pathlib import Path as FsPath
from typing import Annotated

from fastapi import APIRouter, Depends, HTTPException, Path, Request, Response, status
from starlette.concurrency import run_in_threadpool

from app import resumable
from app.deps import ROW_ID, SettingsDep, StorageDep, TenantDep, UploaderDep
from app.metrics import route_template
from app.routes.datasets import store_dataset
from app.routes.models import store_model
from app.schemas import MAX_UPLOAD_PARTS, DatasetPublic, ModelPublic, UploadCreate, UploadPublic
from app.task_datasets import check_dataset_filename
from app.text_datasets import DatasetError
from app.uploads import Upload
from modelpress.db import new_session
from modelpress.models import Dataset, UploadSession, utcnow
from modelpress.settings import Settings
from modelpress.storage import Storage

logger = logging.getLogger(__name__)
router = APIRouter(prefix="/v1/uploads", tags=["uploads"])

NOT_FOUND = {404: {"description": "no such upload (another tenant's, completed, aborted or expired)"}}
PART_OPENAPI = {
    "requestBody": {
        "required": True,
        "description": "the part's raw bytes: exactly `part_size` bytes, the last part the rest of the file",
        "content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}},
    }
}
"""The part body declared for /docs, since the handler streams it itself."""


def get_upload(tenant: TenantDep, upload_id: Annotated[str, Path()]) -> UploadSession:
    """The caller's upload, detached from its short session; 404 when missing, another tenant's or expired (an
    expired upload's parts are removed here, on access, as well as by the periodic sweep)."""
    with new_session() as session:
        row = session.get(UploadSession, upload_id) if ROW_ID.fullmatch(upload_id) else None
        if row is not None:
            session.expunge(row)
    if row is None or row.tenant != tenant:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"upload {upload_id} not found")
    if row.status == "receiving" and resumable.expired(row):
        resumable.remove(row)
        raise HTTPException(
            status.HTTP_404_NOT_FOUND,
            f"upload {upload_id} expired (no part for MODELPRESS_UPLOAD_TTL_S) and its parts were removed; "
            "start a new upload",
        )
    return row


UploadDep = Annotated[UploadSession, Depends(get_upload)]


def _receiving(upload: UploadSession) -> None:
    if upload.status != "receiving":
        raise HTTPException(status.HTTP_409_CONFLICT, f"upload {upload.id} is being completed; wait for that answer")


@router.post(
    "",
    status_code=status.HTTP_201_CREATED,
    response_model=UploadPublic,
    responses={
        400: {"description": "the body is not JSON"},
        413: {"description": "`size` is over MODELPRESS_MAX_UPLOAD_BYTES"},
        422: {"description": "a bad field, a `part_size` out of bounds, or a dataset file name not .txt/.jsonl"},
    },
    summary="Start a resumable upload of a model or dataset file",
)
def create_upload(body: UploadCreate, tenant: UploaderDep, storage: StorageDep, settings: SettingsDep) -> UploadPublic:
    if body.size > settings.max_upload_bytes:
        raise HTTPException(
            status.HTTP_413_REQUEST_ENTITY_TOO_LARGE,
            f"size {body.size} exceeds the limit of {settings.max_upload_bytes} bytes (MODELPRESS_MAX_UPLOAD_BYTES)",
        )
    smallest = -(-body.size // MAX_UPLOAD_PARTS)
    part_size = body.part_size or max(smallest, min(settings.upload_part_bytes, body.size))
    if not smallest <= part_size <= settings.upload_max_part_bytes:
        raise HTTPException(
            status.HTTP_422_UNPROCESSABLE_ENTITY,
            f"part_size must be between {smallest} (at most {MAX_UPLOAD_PARTS} parts) and "
            f"{settings.upload_max_part_bytes} bytes (MODELPRESS_UPLOAD_MAX_PART_BYTES)",
        )
    if body.kind == "dataset":
        try:
            check_dataset_filename(body.filename)
        except DatasetError as exc:
            raise HTTPException(status.HTTP_422_UNPROCESSABLE_ENTITY, str(exc)) from exc
    folder = storage.scratch_dir()
    row = UploadSession(
        tenant=tenant,
        kind=body.kind,
        filename=body.filename,
        name=body.name.strip() if body.name and body.name.strip() else None,
        size=body.size,
        part_size=part_size,
        sha256=body.sha256,
        folder=str(folder),
        status="receiving",
        created_at=utcnow(),
        expires_at=utcnow() + timedelta(seconds=settings.upload_ttl_s),
    )
    try:
        resumable.prepare_folder(folder)
        with new_session() as session:
            session.add(row)
            session.commit()
            session.refresh(row)
            session.expunge(row)
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        raise
    logger.info("upload %s started: %s, %d bytes in %d parts", row.id, row.kind, row.size, resumable.part_count(row))
    return resumable.public(row)


@router.get("/{upload_id}", response_model=UploadPublic, responses=NOT_FOUND, summary="Which parts have arrived")
def get_upload_state(upload: UploadDep) -> UploadPublic:
    return resumable.public(upload)


@router.put(
    "/{upload_id}/parts/{number}",
    response_model=UploadPublic,
    openapi_extra=PART_OPENAPI,
    responses={
        **NOT_FOUND,
        409: {"description": "the upload is being completed"},
        415: {"description": "the body is not `application/octet-stream`"},
        422: {"description": "the part number is past the last part, or the body is not exactly the part's size"},
    },
    summary="Send one part (again, after a failure); parts may come in any order",
)
async def put_part(
    request: Request,
    upload: UploadDep,
    settings: SettingsDep,
    number: Annotated[int, Path(ge=1, le=MAX_UPLOAD_PARTS, description="the part's number, from 1")],
) -> UploadPublic:
    _receiving(upload)
    if number > resumable.part_count(upload):
        raise HTTPException(
            status.HTTP_422_UNPROCESSABLE_ENTITY,
            f"part {number} is past the last part: this upload has parts 1 to {resumable.part_count(upload)}",
        )
    await resumable.receive_part(request, upload, number, settings)
    request.app.state.metrics.upload_bytes.labels(route_template(request.scope)).inc(
        resumable.part_bytes(upload, number)
    )
    return resumable.public(upload)


def _complete(upload: UploadSession, storage: Storage, settings: Settings) -> ModelPublic | DatasetPublic:
    """Hash the assembled file, check it against the sha256 given at creation, then store it as a single-request
    upload would be stored."""
    data = FsPath(upload.folder) / resumable.DATA_NAME
    digest = resumable.sha256_file(data)
    if upload.sha256 and digest != upload.sha256:
        raise HTTPException(
            status.HTTP_422_UNPROCESSABLE_ENTITY,
            f"the assembled file's sha256 is {digest}, not {upload.sha256} as given at creation: a part was sent with "
            "other bytes than the file's; start a new upload",
        )
    received = Upload(
        folder=FsPath(upload.folder),
        path=data,
        filename=upload.filename,
        size=upload.size,
        sha256=digest,
        fields={"name": upload.name} if upload.name else {},
    )
    if upload.kind == "dataset":
        row: Dataset = store_dataset(received, upload.tenant, storage, settings)
        return DatasetPublic.of(row)
    return ModelPublic.of(store_model(received, upload.tenant, storage, settings))


@router.post(
    "/{upload_id}/complete",
    status_code=status.HTTP_201_CREATED,
    response_model=ModelPublic | DatasetPublic,
    responses={
        **NOT_FOUND,
        409: {"description": "parts are missing (the detail names them), or the upload is already being completed"},
        413: {"description": "an archive expands past a size limit"},
        422: {
            "description": "the sha256 does not match, or the file is not an accepted model or dataset (as for "
            "POST /v1/models and /v1/datasets); the upload is removed"
        },
    },
    summary="Assemble the parts into a model or dataset (201 with it, as the single-request upload answers)",
)
async def complete_upload(upload: UploadDep, storage: StorageDep, settings: SettingsDep) -> ModelPublic | DatasetPublic:
    _receiving(upload)
    missing = resumable.missing_parts(upload)
    if missing:
        shown = ", ".join(map(str, missing[:20])) + (" ..." if len(missing) > 20 else "")
        raise HTTPException(
            status.HTTP_409_CONFLICT,
            f"{len(missing)} part(s) missing: {shown}; send them with PUT /v1/uploads/{upload.id}/parts/<number>",
        )
    if not resumable.claim_for_completion(upload):
        raise HTTPException(status.HTTP_409_CONFLICT, f"upload {upload.id} is being completed; wait for that answer")
    try:
        return await run_in_threadpool(_complete, upload, storage, settings)
    finally:
        await run_in_threadpool(resumable.remove, upload)


@router.delete(
    "/{upload_id}",
    status_code=status.HTTP_204_NO_CONTENT,
    responses={**NOT_FOUND, 409: {"description": "the upload is being completed"}},
    summary="Abort an upload and remove its parts",
)
def abort_upload(upload: UploadDep) -> Response:
    _receiving(upload)
    resumable.remove(upload)
    return Response(status_code=status.HTTP_204_NO_CONTENT)
