"""Where uploads, artifacts and checkpoints live: a small interface over a local folder or an S3-compatible store.

Keys are relative POSIX paths chosen by the service (`models/<id>/...`), never by users; every backend refuses
a key that is absolute or climbs out with `..`, so a bug cannot turn into a path traversal. The interface never
hands out a local path: a caller that may run on another machine copies what it needs (`fetch_file`,
`list_tree`) and puts results back (`put_file`, `put_tree`). Writes are all-or-nothing: a reader never sees a
half-written object (a rename into place locally, a single PUT or a completed multipart upload on S3).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import BinaryIO, Protocol

CHUNK = 1024 * 1024


class StorageUnavailable(ConnectionError):
    """The store did not answer within its retry budget (`MODELPRESS_STORAGE_RETRY_S`); nothing was half-written."""


@dataclass(frozen=True)
class ObjectInfo:
    """One stored object: its key (relative to the tree asked for, in `list_tree`), size and version tag."""

    key: str
    size: int
    etag: str


class Storage(Protocol):
    scratch_root: Path

    def put_file(self, key: str, source: Path) -> None: ...
    def put_tree(self, key: str, source: Path) -> None: ...
    def fetch_file(self, key: str, dest: Path) -> None: ...
    def list_tree(self, key: str) -> list[ObjectInfo]: ...
    def stat(self, key: str) -> ObjectInfo | None: ...
    def exists(self, key: str) -> bool: ...
    def size(self, key: str) -> int: ...
    def open_range(self, key: str, start: int = 0, end: int | None = None) -> Iterator[bytes]: ...
    def download_url(self, key: str, filename: str, expires_s: int) -> str | None: ...
    def delete(self, key: str) -> None: ...
    def scratch_dir(self) -> Path: ...


def check_key(key: str) -> str:
    """The key itself when it is a clean relative POSIX path; ValueError otherwise."""
    parts = PurePosixPath(key).parts
    if not key or key.startswith("/") or "\\" in key or any(p in ("..", ".") for p in parts) or "//" in key:
        raise ValueError(f"storage key {key!r} is not a clean relative path")
    return key


class LocalStorage:
    """Storage on a local (or shared, mounted) folder; the default, for one machine."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root).resolve()
        self.root.mkdir(parents=True, exist_ok=True)
        self.scratch_root = self.root / "tmp"

    def _path(self, key: str) -> Path:
        """The file behind a key, for this class only: callers elsewhere may be on another machine."""
        target = (self.root / check_key(key)).resolve()
        if target == self.root or self.root not in target.parents:
            raise ValueError(f"storage key {key!r} is outside the storage root")
        return target

    def scratch_dir(self) -> Path:
        """A fresh folder on the same file system as the store, so finished files can be renamed in."""
        self.scratch_root.mkdir(parents=True, exist_ok=True)
        return Path(tempfile.mkdtemp(dir=self.scratch_root))

    def put_file(self, key: str, source: Path) -> None:
        """Move a finished file into place atomically (rename on the same file system); `source` is consumed."""
        target = self._path(key)
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_name(f".{target.name}.partial")
        shutil.move(str(source), partial)
        os.replace(partial, target)

    def put_tree(self, key: str, source: Path) -> None:
        """Move a finished folder into place; the key must not exist yet."""
        target = self._path(key)
        if target.exists():
            raise FileExistsError(f"storage key {key!r} already exists")
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_name(f".{target.name}.partial")
        shutil.rmtree(partial, ignore_errors=True)
        shutil.move(str(source), partial)
        os.replace(partial, target)

    def fetch_file(self, key: str, dest: Path) -> None:
        """Copy an object to `dest`: a hard link where the two share a file system (stored files are never
        rewritten in place, only replaced), else a copy."""
        source = self._path(key)
        if not source.is_file():
            raise FileNotFoundError(f"no stored object {key!r}")
        dest.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(source, dest)
        except OSError:
            shutil.copyfile(source, dest)

    def list_tree(self, key: str) -> list[ObjectInfo]:
        root = self._path(key)
        if not root.is_dir():
            return []
        found = []
        for path in sorted(root.rglob("*")):
            if path.is_file() and not path.name.endswith(".partial"):
                stat = path.stat()
                found.append(ObjectInfo(path.relative_to(root).as_posix(), stat.st_size, _local_etag(stat)))
        return found

    def stat(self, key: str) -> ObjectInfo | None:
        path = self._path(key)
        try:
            stat = path.stat()
        except FileNotFoundError:
            return None
        return ObjectInfo(key, stat.st_size, _local_etag(stat)) if path.is_file() else None

    def exists(self, key: str) -> bool:
        return self._path(key).exists()

    def size(self, key: str) -> int:
        return self._path(key).stat().st_size

    def open_range(self, key: str, start: int = 0, end: int | None = None) -> Iterator[bytes]:
        """Yield the bytes from `start` to `end` inclusive (to the end of the file when `end` is None)."""
        path = self._path(key)
        with path.open("rb") as handle:
            yield from _read_range(handle, start, end)

    def download_url(self, key: str, filename: str, expires_s: int) -> str | None:
        """None: a local folder has no URL of its own, so the API streams the bytes itself."""
        return None

    def delete(self, key: str) -> None:
        target = self._path(key)
        if target.is_dir():
            shutil.rmtree(target, ignore_errors=True)
        else:
            target.unlink(missing_ok=True)


def _local_etag(stat: os.stat_result) -> str:
    """A version tag for a local file: a replaced file gets a new inode and modification time."""
    return f"{stat.st_ino:x}-{stat.st_mtime_ns:x}-{stat.st_size:x}"


def _read_range(handle: BinaryIO, start: int, end: int | None) -> Iterator[bytes]:
    handle.seek(start)
    remaining = None if end is None else end - start + 1
    while remaining is None or remaining > 0:
        chunk = handle.read(CHUNK if remaining is None else min(CHUNK, remaining))
        if not chunk:
            return
        if remaining is not None:
            remaining -= len(chunk)
        yield chunk


def get_storage(root: Path | None = None) -> Storage:
    """The configured backend: S3 when `STORAGE_URL` is an `s3://` URL, else the folder under the data dir."""
    from modelpress.settings import get_settings

    settings = get_settings()
    if root is None and settings.storage_url:
        from modelpress.object_storage import shared_s3_storage

        return shared_s3_storage(settings)
    return LocalStorage(root or settings.data_dir / "storage")
