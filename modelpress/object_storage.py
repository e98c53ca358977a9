"""Storage in any S3-compatible object store (AWS S3, SeaweedFS, MinIO, R2 ...), through boto3.

Big files go up as multipart uploads read part by part from disk (boto3's managed transfer), so an upload
never holds a whole file in memory; reads stream with HTTP Range requests. A "tree" (a Hugging Face model
folder) is the objects under `<key>/`.

A store that stops answering (restarted, network partition, 5xx) is waited for: every operation is retried
with doubling pauses for up to `MODELPRESS_STORAGE_RETRY_S`, then raises `StorageUnavailable`. botocore's own
retries stay short so that the budget, not botocore, decides how long a caller waits.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import quote

import boto3
from boto3.exceptions import S3UploadFailedError
from boto3.s3.transfer import TransferConfig
from botocore.config import Config
from botocore.exceptions import ClientError, ConnectionError, HTTPClientError

from modelpress.settings import Settings, s3_location
from modelpress.storage import CHUNK, ObjectInfo, StorageUnavailable, check_key

log = logging.getLogger(__name__)

MISSING = {"404", "NoSuchKey", "NotFound"}
BUSY = {"SlowDown", "ServiceUnavailable", "InternalError", "RequestTimeout"}
FIRST_PAUSE_S, LONGEST_PAUSE_S = 0.5, 5.0
T = TypeVar("T")


def s3_client(settings: Settings, endpoint_url: str | None = None) -> Any:
    """A boto3 S3 client from the settings' endpoint, credentials and region (boto3's own lookup fills gaps)."""
    return boto3.client(
        "s3",
        endpoint_url=endpoint_url or settings.aws_endpoint_url,
        aws_access_key_id=settings.aws_access_key_id,
        aws_secret_access_key=settings.aws_secret_access_key,
        region_name=settings.aws_region or "us-east-1",
        # SigV4 everywhere: presigned URLs that carry response-* overrides fail SigV2 checks on some stores
        config=Config(
            retries={"max_attempts": 2, "mode": "standard"},
            connect_timeout=5,
            s3={"addressing_style": "path"},
            signature_version="s3v4",
        ),
    )


def is_missing(exc: ClientError) -> bool:
    return str(exc.response.get("Error", {}).get("Code")) in MISSING


def is_transient(exc: BaseException) -> bool:
    """The store did not answer or answered "busy" (a 5xx): worth trying again, unlike a refusal (4xx)."""
    if isinstance(exc, S3UploadFailedError) and exc.__context__ is not None:
        return is_transient(exc.__context__)  # boto3 re-raises an upload's ClientError as this, as its context
    if isinstance(exc, ConnectionError | HTTPClientError):
        return True
    if isinstance(exc, ClientError):
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0
        return status >= 500 or str(exc.response.get("Error", {}).get("Code")) in BUSY
    return False


class S3Storage:
    """Objects under `s3://bucket/prefix/`; local scratch space under the data dir."""

    def __init__(
        self,
        client: Any,
        bucket: str,
        prefix: str,
        scratch_root: Path,
        part_size: int = 64 * 1024**2,
        presign_client: Any | None = None,
        retry_s: float = 120.0,
    ) -> None:
        self.client = client
        self.retry_s = retry_s
        self.presign_client = presign_client or client
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.scratch_root = Path(scratch_root)
        self.transfer = TransferConfig(multipart_threshold=part_size, multipart_chunksize=part_size, max_concurrency=4)

    @classmethod
    def from_settings(cls, settings: Settings) -> S3Storage:
        bucket, prefix = s3_location(settings.storage_url or "")
        client = s3_client(settings)
        public = s3_client(settings, settings.s3_public_endpoint_url) if settings.s3_public_endpoint_url else None
        return cls(
            client,
            bucket,
            prefix,
            settings.data_dir / "tmp",
            settings.s3_part_size_bytes,
            public,
            settings.storage_retry_s,
        )

    def _retrying(self, what: str, call: Callable[[], T], before_retry: Callable[[], None] | None = None) -> T:
        """`call()`, tried again with doubling pauses while the store does not answer, for up to `retry_s`."""
        deadline, pause = time.monotonic() + self.retry_s, FIRST_PAUSE_S
        while True:
            try:
                return call()
            except Exception as exc:
                if not is_transient(exc):
                    raise
                left = deadline - time.monotonic()
                if left <= 0:
                    raise StorageUnavailable(
                        f"the object store ({self.client.meta.endpoint_url}, bucket {self.bucket}) did not answer "
                        f"for {self.retry_s:g}s (MODELPRESS_STORAGE_RETRY_S) while {what}: {exc}; nothing was "
                        "half-written: submit the job again once the store is back"
                    ) from exc
                log.warning("object store: %s failed (%s); trying again in %.1fs", what, exc, min(pause, left))
                time.sleep(min(pause, left))
                pause = min(2 * pause, LONGEST_PAUSE_S)
                if before_retry is not None:
                    try:
                        before_retry()
                    except Exception as cleanup:  # still down: the next attempt says so
                        log.debug("object store: cleanup before retrying %s failed: %s", what, cleanup)

    def object_key(self, key: str) -> str:
        """The full object key of a storage key (under the prefix)."""
        check_key(key)
        return f"{self.prefix}/{key}" if self.prefix else key

    def scratch_dir(self) -> Path:
        self.scratch_root.mkdir(parents=True, exist_ok=True)
        return Path(tempfile.mkdtemp(dir=self.scratch_root))

    def put_file(self, key: str, source: Path) -> None:
        """Upload a file (multipart past the part size, streamed from disk); `source` is consumed. An object
        appears only once complete; a multipart upload cut off by an outage is aborted before the next try."""
        name = self.object_key(key)
        self._retrying(
            f"storing {key}",
            lambda: self.client.upload_file(str(source), self.bucket, name, Config=self.transfer),
            before_retry=lambda: self.abort_incomplete(name),
        )
        Path(source).unlink(missing_ok=True)

    def abort_incomplete(self, object_key: str) -> int:
        """Abort the unfinished multipart uploads of one object (their parts are stored and billed until then)."""
        listing = self.client.list_multipart_uploads(Bucket=self.bucket, Prefix=object_key)
        uploads = [u for u in listing.get("Uploads", []) if u["Key"] == object_key]
        for upload in uploads:
            self.client.abort_multipart_upload(Bucket=self.bucket, Key=object_key, UploadId=upload["UploadId"])
        return len(uploads)

    def put_tree(self, key: str, source: Path) -> None:
        """Upload every file of a folder under `<key>/`; the folder is consumed."""
        source = Path(source)
        for path in sorted(source.rglob("*")):
            if path.is_file():
                self.put_file(f"{key}/{path.relative_to(source).as_posix()}", path)
        shutil.rmtree(source, ignore_errors=True)

    def fetch_file(self, key: str, dest: Path) -> None:
        """Download an object to `dest` (ranged parts in parallel for big objects)."""
        dest.parent.mkdir(parents=True, exist_ok=True)
        name = self.object_key(key)
        try:
            self._retrying(
                f"fetching {key}", lambda: self.client.download_file(self.bucket, name, str(dest), Config=self.transfer)
            )
        except ClientError as exc:
            if is_missing(exc):
                raise FileNotFoundError(f"no stored object {key!r}") from exc
            raise

    def list_tree(self, key: str) -> list[ObjectInfo]:
        base = self.object_key(key) + "/"

        def listing() -> list[ObjectInfo]:
            pages = self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=base)
            return [
                ObjectInfo(item["Key"][len(base) :], item["Size"], item["ETag"].strip('"'))
                for page in pages
                for item in page.get("Contents", [])
            ]

        return sorted(self._retrying(f"listing {key}/", listing), key=lambda o: o.key)

    def stat(self, key: str) -> ObjectInfo | None:
        name = self.object_key(key)
        try:
            head = self._retrying(f"reading {key}", lambda: self.client.head_object(Bucket=self.bucket, Key=name))
        except ClientError as exc:
            if is_missing(exc):
                return None
            raise
        return ObjectInfo(key, head["ContentLength"], head["ETag"].strip('"'))

    def exists(self, key: str) -> bool:
        """True for an object or a non-empty tree at `key`."""
        if self.stat(key) is not None:
            return True
        base = self.object_key(key) + "/"
        page = self._retrying(
            f"listing {key}/", lambda: self.client.list_objects_v2(Bucket=self.bucket, Prefix=base, MaxKeys=1)
        )
        return page.get("KeyCount", 0) > 0

    def size(self, key: str) -> int:
        info = self.stat(key)
        if info is None:
            raise FileNotFoundError(f"no stored object {key!r}")
        return info.size

    def open_range(self, key: str, start: int = 0, end: int | None = None) -> Iterator[bytes]:
        """Yield the bytes from `start` to `end` inclusive, streamed with one Range request."""
        span = f"bytes={start}-" + ("" if end is None else str(end))
        name = self.object_key(key)
        body = self._retrying(
            f"reading {key}", lambda: self.client.get_object(Bucket=self.bucket, Key=name, Range=span)
        )["Body"]
        try:
            yield from body.iter_chunks(CHUNK)
        finally:
            body.close()

    def download_url(self, key: str, filename: str, expires_s: int) -> str | None:
        """A presigned GET that expires after `expires_s` seconds and saves under `filename`."""
        disposition = f"attachment; filename*=UTF-8''{quote(filename, safe='')}"
        return self.presign_client.generate_presigned_url(
            "get_object",
            Params={"Bucket": self.bucket, "Key": self.object_key(key), "ResponseContentDisposition": disposition},
            ExpiresIn=expires_s,
        )

    def delete(self, key: str) -> None:
        """Remove the object at `key` and every object under `<key>/`."""
        keys = [self.object_key(key)] + [f"{self.object_key(key)}/{o.key}" for o in self.list_tree(key)]
        for i in range(0, len(keys), 1000):
            batch = {"Objects": [{"Key": k} for k in keys[i : i + 1000]], "Quiet": True}
            self._retrying(f"deleting {key}", lambda b=batch: self.client.delete_objects(Bucket=self.bucket, Delete=b))


_shared: dict[tuple, S3Storage] = {}


def shared_s3_storage(settings: Settings) -> S3Storage:
    """One S3Storage per configuration and process: a boto3 client is costly to build and safe to share between
    threads once built, but not across a fork (its pooled connections would be shared), hence the pid."""
    fields = (
        "storage_url",
        "aws_endpoint_url",
        "aws_access_key_id",
        "aws_secret_access_key",
        "aws_region",
        "storage_retry_s",
    )
    config = tuple(getattr(settings, name) for name in fields) + (
        settings.s3_part_size_bytes,
        settings.s3_public_endpoint_url,
        settings.data_dir,
        os.getpid(),
    )
    if config not in _shared:
        _shared[config] = S3Storage.from_settings(settings)
    return _shared[config]
