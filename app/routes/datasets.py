"""Datasets: text for calibration and evaluation, and lm-eval-harness tasks for the report's task accuracy.
Upload (streamed, checksummed, validated), list, read, delete."""

from __future__ import annotations

import logging

from fastapi import APIRouter, HTTPException, Request, status
from sqlalchemy import select
from sqlalchemy.orm import Session

from app.archives import ArchiveError, Limits, TooLarge
from app.deps import (
    ACTIVE_STATUSES,
    DatasetDep,
    SettingsDep,
    StorageDep,
    UploaderDep,
)
from app.resources import add_uploaded_resource_routes, receive_and_store
from app.schemas import DatasetPublic, DatasetsPublic
from app.task_datasets import ARCHIVE_SUFFIXES, is_task_archive, unpack_task
from app.text_datasets import DatasetError, count_records, dataset_format
from app.uploads import MULTIPART_OPENAPI, UPLOAD_RESPONSES, Upload, commit_or_remove, upload_name
from modelpress.models import Dataset, Job, new_id
from modelpress.settings import Settings
from modelpress.specs import TASK_DATASET_FORMAT, stored_spec
from modelpress.storage import Storage

logger = logging.getLogger(__name__)
router = APIRouter(prefix="/v1/datasets", tags=["datasets"])


def store_dataset(upload: Upload, tenant: str, storage: Storage, settings: Settings) -> Dataset:
    """Text (.txt, .jsonl) is stored as uploaded; an archive is an lm-eval task, stored as its checked YAML and
    data files (a folder). `records`: non-empty lines of text, or the documents the task scores."""
    dataset_id = new_id()
    task_folder = None
    try:
        if is_task_archive(upload.filename, upload.path):
            limits = Limits(settings.max_archive_members, settings.max_extracted_bytes, settings.max_compression_ratio)
            task_folder, records = unpack_task(upload.path, upload.folder, limits)
            fmt, key = TASK_DATASET_FORMAT, f"datasets/{dataset_id}/task"
        else:
            fmt = dataset_format(upload.filename)
            records = count_records(upload.path, fmt)
            key = f"datasets/{dataset_id}/data.{fmt}"
    except TooLarge as exc:
        raise HTTPException(status.HTTP_413_REQUEST_ENTITY_TOO_LARGE, str(exc)) from exc
    except (DatasetError, ArchiveError) as exc:
        raise HTTPException(status.HTTP_422_UNPROCESSABLE_ENTITY, str(exc)) from exc
    row = Dataset(
        id=dataset_id,
        tenant=tenant,
        name=upload_name(upload, (".txt", ".jsonl", *ARCHIVE_SUFFIXES)),
        format=fmt,
        size_bytes=upload.size,
        records=records,
        sha256=upload.sha256,
        storage_key=key,
    )
    if task_folder is None:
        storage.put_file(key, upload.path)
    else:
        storage.put_tree(key, task_folder)
    commit_or_remove(row, storage, f"datasets/{dataset_id}")
    logger.info("stored dataset %s (%s, %d records) for %s", dataset_id, fmt, records, tenant)
    return row


def _jobs_using(session: Session, dataset: Dataset) -> list[str]:
    """Ids of the tenant's queued or running jobs that calibrate, evaluate or distill on this dataset."""
    query = select(Job).where(Job.tenant == dataset.tenant, Job.status.in_(ACTIVE_STATUSES))
    return [
        job.id for job in session.scalars(query).all() if dataset.id in stored_spec(job.kind, job.spec).dataset_ids()
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
            'line without a string "text" field, no text at all; not a usable lm-eval task archive: no single YAML '
            "config, keys that run code (`!function`, `process_docs`, ...), data files missing or not JSON lines, a "
            "template that does not render; or `name` has control characters"
        },
    },
    summary='Upload text (a UTF-8 .txt file, or .jsonl with a string "text" field per line) or an lm-eval task '
    "(a .tar/.tar.gz/.zip of one YAML task config and its .jsonl data)",
)
async def upload_dataset(
    request: Request, tenant: UploaderDep, storage: StorageDep, settings: SettingsDep
) -> DatasetPublic:
    row = await receive_and_store(
        request, storage, settings, lambda upload: store_dataset(upload, tenant, storage, settings)
    )
    return DatasetPublic.of(row)


add_uploaded_resource_routes(router, Dataset, DatasetDep, DatasetPublic, DatasetsPublic, _jobs_using)
