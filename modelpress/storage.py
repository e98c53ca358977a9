"""Where uploads and artifacts live: a small interface (put, open a byte range, delete) over a local folder.

Keys are relative POSIX paths chosen by the service (`models/<id>/...`), never by users; `path()` still
refuses any key that would resolve outside the root, so a bug cannot turn into a path traversal.
Writes go to a temporary name in the same folder and are renamed into place, so a reader never sees a
half-written file.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO, Protocol

CHUNK = 1024 * 1024


class Storage(Protocol):
    def put_file(self, key: str, source: Path) -> None: ...
    def put_tree(self, key: str, source: Path) -> None: ...
    def path(self, key: str) -> Path: ...
    def exists(self, key: str) -> bool: ...
    def size(self, key: str) -> int: ...
    def open_range(self, key: str, start: int = 0, end: int | None = None) -> Iterator[bytes]: ...
    def delete(self, key: str) -> None: ...
    def scratch_dir(self) -> Path: ...


class LocalStorage:
    """Storage on a local (or shared, mounted) folder."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root).resolve()
        self.root.mkdir(parents=True, exist_ok=True)

    def path(self, key: str) -> Path:
        target = (self.root / key).resolve()
        if target == self.root or self.root not in target.parents:
            raise ValueError(f"storage key {key!r} is outside the storage root")
        return target

    def scratch_dir(self) -> Path:
        """A fresh folder on the same file system as the store, so finished files can be renamed in."""
        base = self.root / "tmp"
        base.mkdir(parents=True, exist_ok=True)
        return Path(tempfile.mkdtemp(dir=base))

    def put_file(self, key: str, source: Path) -> None:
        """Move a finished file into place atomically (rename on the same file system)."""
        target = self.path(key)
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_name(f".{target.name}.partial")
        shutil.move(str(source), partial)
        os.replace(partial, target)

    def put_tree(self, key: str, source: Path) -> None:
        """Move a finished folder into place; the key must not exist yet."""
        target = self.path(key)
        if target.exists():
            raise FileExistsError(f"storage key {key!r} already exists")
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_name(f".{target.name}.partial")
        shutil.rmtree(partial, ignore_errors=True)
        shutil.move(str(source), partial)
        os.replace(partial, target)

    def exists(self, key: str) -> bool:
        return self.path(key).exists()

    def size(self, key: str) -> int:
        return self.path(key).stat().st_size

    def open_range(self, key: str, start: int = 0, end: int | None = None) -> Iterator[bytes]:
        """Yield the bytes from `start` to `end` inclusive (to the end of the file when `end` is None)."""
        path = self.path(key)
        with path.open("rb") as handle:
            yield from _read_range(handle, start, end)

    def delete(self, key: str) -> None:
        target = self.path(key)
        if target.is_dir():
            shutil.rmtree(target, ignore_errors=True)
        else:
            target.unlink(missing_ok=True)


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


def get_storage(root: Path | None = None) -> LocalStorage:
    from modelpress.settings import get_settings

    return LocalStorage(root or get_settings().data_dir / "storage")
