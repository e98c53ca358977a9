"""Resumable uploads: a file sent in numbered parts that land at their offsets in one file in the API's scratch space.

Each part is streamed to disk in chunks of `FLUSH_BYTES` (never whole in memory) and must be exactly its size:
`part_size`, or the rest of the file for the last part. A part counts as received once all its bytes are written,
when a marker file named by its number appears next to the data; a part cut off midway is simply sent again.
Completing hashes the assembled file and hands it to the same store function as a single-request upload, so the
same inspection and the same answers apply. Uploads that see no part for `upload_ttl_s` are removed by
`sweep_expired`, which the API runs periodically and on access.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import shutil
from datetime import UTC, datetime, timedelta
from pathlib import Path

from fastapi import HTTPException, Request, status
from python_multipart.multipart import parse_options_header
from sqlalchemy import delete, select, update
from starlette.concurrency import run_in_threadpool

from app.schemas import UploadPublic
from modelpress.db import new_session
from modelpress.models import UploadSession, utcnow
from modelpress.settings import Settings

logger = logging.getLogger(__name__)

DATA_NAME = "data"
PARTS_DIR = "parts"
FLUSH_BYTES = 1024 * 1024
HASH_CHUNK = 8 * 1024 * 1024


def aware(moment: datetime) -> datetime:
    """SQLite hands back naive datetimes; every stored time is UTC."""
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def part_count(upload: UploadSession) -> int:
    return -(-upload.size // upload.part_size)


def part_bytes(upload: UploadSession, number: int) -> int:
    """The exact size of part `number` (1-based): `part_size`, or what remains for the last part."""
    return min(upload.part_size, upload.size - (number - 1) * upload.part_size)


def received_parts(upload: UploadSession) -> list[int]:
    folder = Path(upload.folder) / PARTS_DIR
    if not folder.is_dir():
        return []
    return sorted(int(p.name) for p in folder.iterdir() if p.name.isdigit())


def missing_parts(upload: UploadSession) -> list[int]:
    have = set(received_parts(upload))
    return [n for n in range(1, part_count(upload) + 1) if n not in have]


def public(upload: UploadSession) -> UploadPublic:
    return UploadPublic(
        id=upload.id,
        kind=upload.kind,  # type: ignore[arg-type]
        filename=upload.filename,
        name=upload.name,
        size=upload.size,
        sha256=upload.sha256,
        part_size=upload.part_size,
        parts=part_count(upload),
        received=received_parts(upload),
        expires_at=aware(upload.expires_at),
        created_at=aware(upload.created_at),
    )


def prepare_folder(folder: Path) -> None:
    """An empty data file and the folder of part markers."""
    (folder / PARTS_DIR).mkdir()
    (folder / DATA_NAME).touch()


def remove(upload: UploadSession) -> None:
    """Remove the upload's parts and its row."""
    shutil.rmtree(upload.folder, ignore_errors=True)
    with new_session() as session:
        session.execute(delete(UploadSession).where(UploadSession.id == upload.id))
        session.commit()


def expired(upload: UploadSession, now: datetime | None = None) -> bool:
    return aware(upload.expires_at) <= (now or utcnow())


def sweep_expired(now: datetime | None = None) -> int:
    """Remove every upload still receiving parts past its `expires_at`; returns how many."""
    with new_session() as session:
        query = select(UploadSession).where(
            UploadSession.expires_at <= (now or utcnow()), UploadSession.status == "receiving"
        )
        rows = list(session.scalars(query).all())
    for row in rows:
        remove(row)
    if rows:
        logger.info("removed %d expired upload(s)", len(rows))
    return len(rows)


async def sweep_periodically(interval_s: float) -> None:
    """`sweep_expired` every `interval_s`, for the API's lifetime; a failed pass is logged and the next one runs."""
    while True:
        try:
            await run_in_threadpool(sweep_expired)
        except Exception:
            logger.exception("sweeping expired uploads failed")
        await asyncio.sleep(interval_s)


def _pwrite_all(fd: int, data: bytes, offset: int) -> None:
    view = memoryview(data)
    while view:
        written = os.pwrite(fd, view, offset)
        view, offset = view[written:], offset + written


async def receive_part(request: Request, upload: UploadSession, number: int, settings: Settings) -> None:
    """Stream the body into the data file at part `number`'s offset; 422 unless it is exactly the part's size."""
    content_type, _ = parse_options_header(request.headers.get("content-type"))
    if content_type not in (b"", b"application/octet-stream"):
        raise HTTPException(
            status.HTTP_415_UNSUPPORTED_MEDIA_TYPE,
            "send a part's raw bytes as the body with 'Content-Type: application/octet-stream'",
        )
    expected = part_bytes(upload, number)
    offset = (number - 1) * upload.part_size

    def wrong(got: str) -> HTTPException:
        return HTTPException(
            status.HTTP_422_UNPROCESSABLE_ENTITY,
            f"part {number} must be exactly {expected} bytes (part_size, or the rest of the file for the last part); "
            f"{got}: send the file's bytes from offset {offset}",
        )

    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) != expected:
        raise wrong(f"this one declares {declared}")
    fd = os.open(Path(upload.folder) / DATA_NAME, os.O_WRONLY)
    try:
        received, position, pending = 0, offset, bytearray()
        async for chunk in request.stream():
            received += len(chunk)
            if received > expected:
                raise wrong(f"this one has more than {expected}")
            pending += chunk
            if len(pending) >= FLUSH_BYTES:
                await run_in_threadpool(_pwrite_all, fd, bytes(pending), position)
                position += len(pending)
                pending.clear()
        if pending:
            await run_in_threadpool(_pwrite_all, fd, bytes(pending), position)
        if received != expected:
            raise wrong(f"this one has {received}")
    finally:
        os.close(fd)
    (Path(upload.folder) / PARTS_DIR / str(number)).touch()
    with new_session() as session:
        session.execute(
            update(UploadSession)
            .where(UploadSession.id == upload.id)
            .values(expires_at=utcnow() + timedelta(seconds=settings.upload_ttl_s))
        )
        session.commit()


def claim_for_completion(upload: UploadSession) -> bool:
    """Move the upload from receiving to completing; False when another request did it first."""
    with new_session() as session:
        result = session.execute(
            update(UploadSession)
            .where(UploadSession.id == upload.id, UploadSession.status == "receiving")
            .values(status="completing")
        )
        session.commit()
        return bool(result.rowcount)  # type: ignore[attr-defined]


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()
