"""Streaming multipart uploads: the file part goes to a scratch folder while it is hashed and counted.

The body is parsed as it arrives with python-multipart's streaming parser over `request.stream()`, so an upload
is never held whole in memory, and the request is answered 413 as soon as the file passes the size limit, not
after the client has sent everything. Each upload lives in its own scratch folder holding a lock for as long
as the request runs: on any refusal the folder is removed, and `sweep_abandoned()` removes folders left by a
process that died mid-upload (the lock of a dead process is free).
"""

from __future__ import annotations

import fcntl
import hashlib
import logging
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from fastapi import HTTPException, Request, status
from python_multipart.exceptions import FormParserError
from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.concurrency import run_in_threadpool

from modelpress.db import new_session
from modelpress.models import Dataset, Model
from modelpress.storage import Storage

logger = logging.getLogger(__name__)

LOCK_NAME = ".upload.lock"
MAX_FIELD_BYTES = 4096
MAX_PARTS = 8
MULTIPART_SLACK = 64 * 1024
"""Bytes a multipart body may carry beyond the file itself (boundaries, part headers, small fields)."""
FLUSH_BYTES = 1024 * 1024
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")

MULTIPART_OPENAPI = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["file"],
                    "properties": {
                        "file": {"type": "string", "format": "binary"},
                        "name": {"type": "string", "maxLength": 255, "pattern": "^[^\\u0000-\\u001f\\u007f]*$"},
                    },
                    "additionalProperties": False,
                }
            }
        },
    }
}
"""The request body declared for /docs, since the handler parses the stream itself."""

UPLOAD_RESPONSES: dict[int | str, dict] = {
    400: {"description": "a malformed multipart body: no `file` part, two of them, too many parts, a field too long"},
    413: {"description": "the upload (or, for an archive, its expanded contents) passes a size limit"},
    415: {"description": "the body is not `multipart/form-data` with a boundary"},
}
"""What `receive_upload` refuses, for the upload routes' `responses=`; each route adds its 422."""


@dataclass
class Upload:
    """A received file in its own scratch folder (removed by `discard()` unless its contents were moved away)."""

    folder: Path
    path: Path
    filename: str
    size: int
    sha256: str
    fields: dict[str, str] = field(default_factory=dict)
    _lock: BinaryIO | None = None

    def discard(self) -> None:
        discard_folder(self.folder, self._lock)
        self._lock = None


def discard_folder(folder: Path, lock: BinaryIO | None) -> None:
    shutil.rmtree(folder, ignore_errors=True)
    if lock is not None:
        lock.close()


def lock_folder(folder: Path) -> BinaryIO:
    handle = (folder / LOCK_NAME).open("wb")
    fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    return handle


def sweep_abandoned(scratch_root: Path) -> int:
    """Remove upload folders whose owning process is gone (their lock can be taken); returns how many."""
    removed = 0
    if not scratch_root.is_dir():
        return 0
    for folder in scratch_root.iterdir():
        lock_path = folder / LOCK_NAME
        if not lock_path.is_file():
            continue  # not an upload folder (the worker's scratch space, for one): not ours to judge
        try:
            with lock_path.open("rb") as handle:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                shutil.rmtree(folder, ignore_errors=True)
                removed += 1
        except OSError:
            continue  # held by a live upload
    if removed:
        logger.warning("removed %d upload folder(s) abandoned by a stopped API process", removed)
    return removed


def _too_large(limit: int) -> HTTPException:
    return HTTPException(
        status.HTTP_413_REQUEST_ENTITY_TOO_LARGE,
        f"upload exceeds the limit of {limit} bytes (MODELPRESS_MAX_UPLOAD_BYTES); send a smaller file",
    )


def _bad(message: str) -> HTTPException:
    return HTTPException(status.HTTP_400_BAD_REQUEST, message)


class _Receiver:
    """Callbacks for the multipart parser: the `file` part to disk (hashed), small text fields to memory."""

    def __init__(self, target: BinaryIO, limit: int) -> None:
        self.target = target
        self.limit = limit
        self.hash = hashlib.sha256()
        self.size = 0
        self.filename: str | None = None
        self.fields: dict[str, str] = {}
        self.parts = 0
        self.ended = False
        self._header_field = b""
        self._header_value = b""
        self._headers: dict[bytes, bytes] = {}
        self._name: str | None = None
        self._is_file = False
        self._buffer = bytearray()

    def callbacks(self) -> dict:
        return {
            "on_part_begin": self.on_part_begin,
            "on_header_field": lambda d, s, e: self._append("_header_field", d[s:e]),
            "on_header_value": lambda d, s, e: self._append("_header_value", d[s:e]),
            "on_header_end": self.on_header_end,
            "on_headers_finished": self.on_headers_finished,
            "on_part_data": self.on_part_data,
            "on_part_end": self.on_part_end,
            "on_end": self.on_end,
        }

    def _append(self, attr: str, data: bytes) -> None:
        setattr(self, attr, getattr(self, attr) + data)

    def on_part_begin(self) -> None:
        self.parts += 1
        if self.parts > MAX_PARTS:
            raise _bad(f"too many form fields; send only 'file' and optionally 'name' (at most {MAX_PARTS} parts)")
        self._headers, self._name, self._is_file = {}, None, False
        self._buffer = bytearray()

    def on_header_end(self) -> None:
        self._headers[self._header_field.strip().lower()] = self._header_value.strip()
        self._header_field = self._header_value = b""

    def on_headers_finished(self) -> None:
        disposition, options = parse_options_header(self._headers.get(b"content-disposition"))
        if disposition != b"form-data" or b"name" not in options:
            raise _bad("malformed multipart part: each part needs 'Content-Disposition: form-data; name=...'")
        self._name = options[b"name"].decode("utf-8", "replace")
        if self._name == "file":
            if self.filename is not None:
                raise _bad("send exactly one 'file' part")
            self._is_file = True
            raw = os.path.basename(options.get(b"filename", b"upload").decode("utf-8", "replace"))
            self.filename = _CONTROL.sub("", raw)[:255]

    def on_part_data(self, data: bytes, start: int, end: int) -> None:
        chunk = data[start:end]
        if self._is_file:
            self.size += len(chunk)
            if self.size > self.limit:
                raise _too_large(self.limit)
            self.hash.update(chunk)
            self.target.write(chunk)
        else:
            self._buffer += chunk
            if len(self._buffer) > MAX_FIELD_BYTES:
                raise _bad(f"form field {self._name!r} is longer than {MAX_FIELD_BYTES} bytes")

    def on_part_end(self) -> None:
        if not self._is_file and self._name is not None:
            try:
                self.fields[self._name] = self._buffer.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise _bad(f"form field {self._name!r} is not UTF-8 text") from exc

    def on_end(self) -> None:
        self.ended = True


async def receive_upload(request: Request, scratch: Path, limit: int) -> Upload:
    """Stream a multipart/form-data body with one `file` part into `scratch`; 400/413 on a bad or large body."""
    content_type, options = parse_options_header(request.headers.get("content-type"))
    if content_type != b"multipart/form-data" or not options.get(b"boundary"):
        discard_folder(scratch, None)
        raise HTTPException(
            status.HTTP_415_UNSUPPORTED_MEDIA_TYPE,
            "send the upload as multipart/form-data with a 'file' field (curl -F file=@model.tar.gz)",
        )
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit + MULTIPART_SLACK:
        discard_folder(scratch, None)
        raise _too_large(limit)
    lock = lock_folder(scratch)
    path = scratch / "upload"
    try:
        with path.open("wb") as target:
            receiver = _Receiver(target, limit)
            parser = MultipartParser(options[b"boundary"], receiver.callbacks())
            pending = bytearray()
            received = 0
            async for chunk in request.stream():
                received += len(chunk)
                if received > limit + MULTIPART_SLACK:  # the parser's own max_size silently truncates
                    raise _too_large(limit)
                pending += chunk
                if len(pending) >= FLUSH_BYTES:
                    await run_in_threadpool(parser.write, bytes(pending))
                    pending.clear()
            if pending:
                await run_in_threadpool(parser.write, bytes(pending))
            parser.finalize()
    except FormParserError as exc:
        discard_folder(scratch, lock)
        raise _bad(f"malformed multipart body: {exc}") from exc
    except BaseException:
        discard_folder(scratch, lock)
        raise
    if not receiver.ended:
        discard_folder(scratch, lock)
        raise _bad("incomplete multipart body: the upload ended before its closing boundary")
    if receiver.filename is None:
        discard_folder(scratch, lock)
        raise _bad("no 'file' field in the form; send the upload as -F file=@<path>")
    return Upload(
        folder=scratch,
        path=path,
        filename=receiver.filename,
        size=receiver.size,
        sha256=receiver.hash.hexdigest(),
        fields=receiver.fields,
        _lock=lock,
    )


def upload_name(upload: Upload, suffixes: tuple[str, ...]) -> str:
    """The `name` form field, or the file name without its archive suffix."""
    name = upload.fields.get("name", "").strip()
    if name:
        if len(name) > 255:
            raise HTTPException(status.HTTP_422_UNPROCESSABLE_ENTITY, "name is longer than 255 characters")
        if _CONTROL.search(name):
            raise HTTPException(status.HTTP_422_UNPROCESSABLE_ENTITY, "name may not contain control characters")
        return name
    base = upload.filename
    for suffix in suffixes:
        if base.lower().endswith(suffix) and len(base) > len(suffix):
            return base[: -len(suffix)]
    return base or "upload"


def commit_or_remove(row: Model | Dataset, storage: Storage, key: str) -> None:
    """Insert the row of an upload already moved into storage under `key`; if that fails, remove the files,
    so a refused or failed upload never leaves files without a row."""
    try:
        with new_session() as session:
            session.add(row)
            session.commit()
    except BaseException:
        storage.delete(key)
        raise
