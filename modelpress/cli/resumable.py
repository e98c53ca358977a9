"""Resumable uploads from the command line: big files go up in parts, and a rerun after an interruption sends
only the parts the server does not have.

The upload's id is kept in a small JSON state file (`$MODELPRESS_STATE_DIR`, else `~/.cache/modelpress`, file
`uploads.json`) under a key made of the server, the source's resolved path, size and modification time, so an
edited file starts a new upload. Each part is streamed from the file in chunks; none is read whole into memory.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from modelpress.cli.client import ApiError, Client

STATE_NAME = "uploads.json"
CHUNK = 1024 * 1024
DEFAULT_THRESHOLD = 64 * 1024 * 1024
"""Files above this size go up in parts (the single-request upload stays for smaller ones)."""


def state_path() -> Path:
    root = os.environ.get("MODELPRESS_STATE_DIR") or Path.home() / ".cache" / "modelpress"
    return Path(root) / STATE_NAME


def source_key(url: str, source: Path) -> str:
    """The server, the source's path, size and mtime (a folder: its files' total size and newest mtime)."""
    source = source.resolve()
    files = [p for p in source.rglob("*") if p.is_file()] if source.is_dir() else [source]
    stats = [p.stat() for p in files]
    size = sum(s.st_size for s in stats)
    mtime = max((s.st_mtime_ns for s in stats), default=0)
    return f"{url.rstrip('/')}|{source}|{size}|{mtime}"


def _load() -> dict[str, Any]:
    try:
        state = json.loads(state_path().read_text())
    except (OSError, ValueError):
        return {}
    return state if isinstance(state, dict) else {}


def _save(state: dict[str, Any]) -> None:
    path = state_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.partial")
    partial.write_text(json.dumps(state, indent=1))
    os.replace(partial, path)


def remember(key: str, upload_id: str | None) -> None:
    state = _load()
    if upload_id is None:
        state.pop(key, None)
    else:
        state[key] = upload_id
    _save(state)


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(8 * CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _part_body(path: Path, offset: int, length: int, on_read: Callable[[int], None] | None) -> Iterator[bytes]:
    with path.open("rb") as handle:
        handle.seek(offset)
        left = length
        while left > 0:
            chunk = handle.read(min(CHUNK, left))
            if not chunk:
                raise ApiError(f"{path} became shorter while uploading; upload it again")
            left -= len(chunk)
            if on_read:
                on_read(len(chunk))
            yield chunk


def _resume(client: Client, key: str, size: int) -> dict[str, Any] | None:
    """The server's state of the upload recorded for `key`, or None (and the record dropped) when it is gone."""
    upload_id = _load().get(key)
    if not isinstance(upload_id, str):
        return None
    try:
        upload = client.request("GET", f"/v1/uploads/{upload_id}").json()
    except ApiError as exc:
        if exc.status_code != 404:
            raise
        upload = None
    if upload is None or upload.get("size") != size:
        remember(key, None)
        return None
    return upload


def upload_in_parts(
    client: Client,
    kind: str,
    path: Path,
    *,
    key: str,
    name: str | None = None,
    filename: str | None = None,
    part_size: int | None = None,
    on_read: Callable[[int], None] | None = None,
) -> dict[str, Any]:
    """Upload `path` as a resumable upload of `kind` (model or dataset); returns the created model or dataset."""
    size = path.stat().st_size
    upload = _resume(client, key, size)
    if upload is None:
        body: dict[str, Any] = {"kind": kind, "filename": filename or path.name, "size": size}
        body["sha256"] = file_sha256(path)
        if name:
            body["name"] = name
        if part_size:
            body["part_size"] = part_size
        upload = client.request("POST", "/v1/uploads", json=body).json()
        remember(key, upload["id"])
    have = set(upload["received"])
    step = upload["part_size"]
    for number in range(1, upload["parts"] + 1):
        length = min(step, size - (number - 1) * step)
        if number in have:
            if on_read:
                on_read(length)
            continue
        client.request(
            "PUT",
            f"/v1/uploads/{upload['id']}/parts/{number}",
            content=_part_body(path, (number - 1) * step, length, on_read),
            headers={"Content-Type": "application/octet-stream", "Content-Length": str(length)},
        )
    try:
        created = client.request("POST", f"/v1/uploads/{upload['id']}/complete", timeout=None).json()
    except ApiError as exc:
        if exc.status_code not in (None, 409):
            remember(key, None)  # answered and refused: the server has removed the upload
        raise
    remember(key, None)
    return created
