"""Import by reference: a model named by an `s3://bucket/key` URL that the service's credentials can read,
instead of uploaded bytes. The object is copied into an upload's scratch folder (streamed and hashed as an
upload is), then inspected and stored exactly as an upload; so it is refused exactly as an upload would be.

Objects under the service's own storage prefix are refused: they belong to tenants (by id), and naming one
must not be a way to read another tenant's model.
"""

from __future__ import annotations

import hashlib
from pathlib import Path, PurePosixPath
from typing import Any

from fastapi import HTTPException, status
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from app.uploads import Upload, discard_folder, lock_folder
from modelpress.settings import Settings, s3_location

REFERENCE_OPENAPI_SCHEMA = {
    "type": "object",
    "required": ["storage_url"],
    "additionalProperties": False,
    "properties": {
        "storage_url": {"type": "string", "maxLength": 2048, "description": "s3://bucket/key of a model object"},
        "name": {"type": "string", "maxLength": 255},
    },
}


class ModelReference(BaseModel):
    """The JSON body of `POST /v1/models` that names a stored object instead of uploading one."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    storage_url: str = Field(max_length=2048)
    name: str | None = Field(default=None, max_length=255)


def _unprocessable(message: str) -> HTTPException:
    return HTTPException(status.HTTP_422_UNPROCESSABLE_ENTITY, message)


def parse_reference(value: Any) -> ModelReference:
    try:
        return ModelReference.model_validate(value)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'body'}: {e['msg']}" for e in exc.errors())
        raise _unprocessable(
            f'a JSON body names a stored model as {{"storage_url": "s3://bucket/key"}} ({problems}); '
            "to upload bytes, send multipart/form-data with a 'file' field"
        ) from exc


def _locate(reference: ModelReference, settings: Settings) -> tuple[str, str]:
    if not settings.storage_url:
        raise _unprocessable(
            "this server keeps models on its own disk and cannot import by reference; upload the file instead"
        )
    url = reference.storage_url.strip()
    if not url.startswith("s3://"):
        raise _unprocessable(f"storage_url must be an s3://bucket/key URL, not {url[:100]!r}")
    bucket, _, key = url[len("s3://") :].partition("/")
    parts = PurePosixPath(key).parts
    if not bucket or not key or key.endswith("/") or ".." in parts:
        raise _unprocessable(f"storage_url must name one object as s3://bucket/key, not {url[:100]!r}")
    own_bucket, own_prefix = s3_location(settings.storage_url)
    if bucket == own_bucket and (not own_prefix or key.startswith(own_prefix + "/")):
        raise _unprocessable(
            f"{url[:100]!r} is inside the service's own storage area; name an object you put there yourself"
        )
    return bucket, key


def fetch_reference(reference: ModelReference, scratch: Path, settings: Settings) -> Upload:
    """Copy the named object into `scratch` as an Upload (hashed while it streams); 4xx for what the caller
    can fix: a missing or unreadable object (422), one past the upload size limit (413)."""
    from botocore.exceptions import BotoCoreError, ClientError  # object storage only: local storage needs no boto3

    from modelpress.object_storage import is_missing, s3_client

    lock = lock_folder(scratch)
    try:
        bucket, key = _locate(reference, settings)
        client = s3_client(settings)
        try:
            size = client.head_object(Bucket=bucket, Key=key)["ContentLength"]
            if size > settings.max_upload_bytes:
                raise HTTPException(
                    status.HTTP_413_REQUEST_ENTITY_TOO_LARGE,
                    f"s3://{bucket}/{key} is {size} bytes, over the upload limit of {settings.max_upload_bytes}",
                )
            path, digest = scratch / "upload", hashlib.sha256()
            body = client.get_object(Bucket=bucket, Key=key)["Body"]
            with path.open("wb") as target:
                for chunk in body.iter_chunks(1024 * 1024):
                    digest.update(chunk)
                    target.write(chunk)
        except ClientError as exc:
            what = "does not exist" if is_missing(exc) else f"cannot be read with the service's credentials ({exc})"
            raise _unprocessable(f"the object s3://{bucket}/{key} {what}") from exc
        except BotoCoreError as exc:
            raise HTTPException(
                status.HTTP_503_SERVICE_UNAVAILABLE, f"the object store did not answer ({exc}); try again later"
            ) from exc
    except BaseException:
        discard_folder(scratch, lock)
        raise
    fields = {"name": reference.name} if reference.name else {}
    return Upload(scratch, path, PurePosixPath(key).name, size, digest.hexdigest(), fields, lock)
