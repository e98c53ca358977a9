"""Text datasets for calibration and evaluation: upload (streamed, checksummed, validated), list, read, delete."""

from __future__ import annotations

import logging

from fastapi import APIRouter, HTTPException, Request, status
from sqlalchemy import select
from sqlalchemy.orm import Session

from app.deps import (
    ACTIVE_STATUSES,
    DatasetDep,
    SettingsDep,
    StorageDep,
    UploaderDep,
)
from app.resources import add_uploaded_resource_routes, receive_and_store
from app.schemas import DatasetPublic, DatasetsPublic
from app.text_datasets import DatasetError, count_records, dataset_format
from app.uploads import MULTIPART_OPENAPI, UPLOAD_RESPONSES, Upload, commit_or_remove, upload_name
from modelpress.models import Dataset, Job, new_id
from modelpress.specs import JobSpec
from modelpress.storage import Storage

logger = logging.getLogger(__name__)
router = APIRouter(prefix="/v1/datasets", tags=["datasets"])


def store_dataset(upload: Upload, tenant: str, storage: Storage) -> Dataset:
    try:
        fmt = dataset_format(upload.filename)
        records = count_records(upload.path, fmt)
    except DatasetError as exc:
        raise HTTPException(status.HTTP_422_UNPROCESSABLE_ENTITY, str(exc)) from exc
    dataset_id = new_id()
    key = f"datasets/{dataset_id}/data.{fmt}"
    row = Dataset(
        id=dataset_id,
        tenant=tenant,
        name=upload_name(upload, (".txt", ".jsonl")),
        format=fmt,
        size_bytes=upload.size,
        records=records,
        sha256=upload.sha256,
        storage_key=key,
    )
    storage.put_file(key, upload.path)
    commit_or_remove(row, storage, f"datasets/{dataset_id}")
    logger.info("stored dataset %s (%s, %d records) for %s", dataset_id, fmt, records, tenant)
    return row


def _jobs_using(session: Session, dataset: Dataset) -> list[str]:
    """Ids of the tenant's queued or running jobs that calibrate, evaluate or distill on this dataset."""
    query = select(Job).where(Job.tenant == dataset.tenant, Job.status.in_(ACTIVE_STATUSES))
    return [
        job.id for job in session.scalars(query).all() if dataset.id in JobSpec.model_validate(job.spec).dataset_ids()
    ]


@router.post(
    "",
    status_code=status.HTTP_201_CREATED,
    response_model=DatasetPublic,
    openapi_extra=MULTIPART_OPENAPI,
    responses={
        **UPLOAD_RESPONSES,
        422: {
            "description": "not usable text: a file name other than .txt or .jsonl, text that is not UTF-8, a .jsonl "
            'line without a string "text" field, no text at all; or `name` has control characters'
        },
    },
    summary='Upload text: a UTF-8 .txt file, or .jsonl with a string "text" field per line',
)
async def upload_dataset(
    request: Request, tenant: UploaderDep, storage: StorageDep, settings: SettingsDep
) -> DatasetPublic:
    row = await receive_and_store(request, storage, settings, lambda upload: store_dataset(upload, tenant, storage))
    return DatasetPublic.of(row)


add_uploaded_resource_routes(router, Dataset, DatasetDep, DatasetPublic, DatasetsPublic, _jobs_using)
