"""Artifact downloads: streamed from storage, with single byte ranges (206/416) and the sha256 as ETag, or, when
configured on an object store, a 307 redirect to a short-lived presigned URL so the bytes bypass the API."""

from __future__ import annotations

import logging
import re
from typing import Annotated
from urllib.parse import quote

from fastapi import APIRouter, Header, HTTPException, status
from fastapi.responses import RedirectResponse, Response, StreamingResponse

from app.deps import ArtifactDep, SettingsDep, StorageDep
from modelpress.models import Artifact
from modelpress.storage import Storage

logger = logging.getLogger(__name__)
router = APIRouter(prefix="/v1/artifacts", tags=["artifacts"])

_RANGE = re.compile(r"^bytes=(\d*)-(\d*)$")
ARTIFACT_CONTENT = {"application/x-tar": {}, "application/json": {}}
"""The media types of the files a job stores: the model as a tar, the report as JSON."""


class Unsatisfiable(Exception):
    pass


def parse_range(header: str | None, size: int) -> tuple[int, int] | None:
    """(start, end) inclusive for one `bytes=a-b`, `a-` or `-n` range; None to send the whole file.

    Multiple ranges and malformed headers are ignored (the whole file is sent, as RFC 9110 allows);
    a range that starts past the end raises `Unsatisfiable`.
    """
    if not header:
        return None
    match = _RANGE.match(header.strip().replace(" ", ""))
    if match is None:
        return None
    first, last = match.groups()
    if not first and not last:
        return None
    if not first:
        length = int(last)
        if length == 0 or size == 0:
            raise Unsatisfiable
        return max(size - length, 0), size - 1
    start = int(first)
    end = int(last) if last else size - 1
    if last and end < start:
        return None
    if start >= size:
        raise Unsatisfiable
    return start, min(end, size - 1)


def _file_size(artifact: Artifact, storage: Storage) -> int:
    """The size of the artifact's file; 404 (logged) when its key is not a clean storage key or names no file.

    Keys are written by the worker, never by users; a key that would leave the storage root (`..`, an absolute
    path) means a bug or a tampered row, and its file is never opened.
    """
    missing = HTTPException(status.HTTP_404_NOT_FOUND, f"the file of artifact {artifact.id} is missing")
    try:
        info = storage.stat(artifact.storage_key)
    except ValueError as exc:
        logger.error("refusing to serve artifact %s: %s", artifact.id, exc)
        raise missing from exc
    except OSError as exc:
        logger.error("artifact %s has no readable file at %r: %s", artifact.id, artifact.storage_key, exc)
        raise missing from exc
    if info is None:
        logger.error("artifact %s has no readable file at %r", artifact.id, artifact.storage_key)
        raise missing
    return info.size


def content_disposition(name: str) -> str:
    fallback = re.sub(r"[^A-Za-z0-9._-]", "_", name) or "download"
    return f"attachment; filename=\"{fallback}\"; filename*=UTF-8''{quote(name, safe='')}"


@router.get(
    "/{artifact_id}",
    response_class=StreamingResponse,
    responses={
        200: {"content": ARTIFACT_CONTENT, "description": "the whole file"},
        206: {"content": ARTIFACT_CONTENT, "description": "the requested byte range"},
        307: {
            "description": "fetch the file from the presigned URL in `Location` (MODELPRESS_DOWNLOAD_REDIRECT)",
            "headers": {"Location": {"description": "a presigned URL of the store", "schema": {"type": "string"}}},
        },
        404: {"description": "no such artifact"},
        416: {
            "description": "the range selects no byte of the file (it starts past the end, or is `bytes=-0`)",
            "headers": {"Content-Range": {"description": "`bytes */<size>`", "schema": {"type": "string"}}},
        },
    },
)
def download_artifact(
    artifact: ArtifactDep,
    storage: StorageDep,
    settings: SettingsDep,
    range_header: Annotated[str | None, Header(alias="Range")] = None,
) -> Response:
    size = _file_size(artifact, storage)
    if settings.download_redirect:
        url = storage.download_url(artifact.storage_key, artifact.name, settings.download_url_ttl_s)
        if url is not None:  # the store serves the bytes (and any Range) itself
            return RedirectResponse(
                url, status_code=status.HTTP_307_TEMPORARY_REDIRECT, headers={"Cache-Control": "no-store"}
            )
    headers = {
        "Accept-Ranges": "bytes",
        "ETag": f'"{artifact.sha256}"',
        "Content-Disposition": content_disposition(artifact.name),
    }
    try:
        span = parse_range(range_header, size)
    except Unsatisfiable as exc:
        raise HTTPException(
            status.HTTP_416_REQUESTED_RANGE_NOT_SATISFIABLE,
            f"the range {range_header!r} selects no byte of the file, which has {size} bytes; send a range inside it",
            headers={**headers, "Content-Range": f"bytes */{size}"},
        ) from exc
    if span is None:
        body = storage.open_range(artifact.storage_key, 0, None)
        return StreamingResponse(body, media_type=artifact.media_type, headers={**headers, "Content-Length": str(size)})
    start, end = span
    headers.update({"Content-Range": f"bytes {start}-{end}/{size}", "Content-Length": str(end - start + 1)})
    body = storage.open_range(artifact.storage_key, start, end)
    return StreamingResponse(
        body, status_code=status.HTTP_206_PARTIAL_CONTENT, media_type=artifact.media_type, headers=headers
    )
