"""The worker's local cache of stored models and datasets: the engine reads local files, the store may be remote.

An LRU over whole objects (a file, or a model folder stored as a tree), bounded in bytes. An entry is named by
its storage key and version (size and ETag), so a replaced object is fetched again. Several jobs on one machine
share the cache safely through file locks:

- `<entry>.use`: held shared while a job uses the entry; eviction takes it exclusively without waiting, so an
  entry in use is never evicted;
- `<entry>.fetch`: held exclusively while the entry is downloaded, so two jobs wanting one object fetch it once;
- `.lock`: held while space is reserved and entries are evicted, so two downloads never both count the same room.

Space is reserved (the entry's `meta.json`) before its download starts; a download that dies leaves an entry
without `ready`, which the next fetch of that object (or eviction) removes. Lock files are a few bytes and stay.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import logging
import os
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

from modelpress.storage import ObjectInfo, Storage

log = logging.getLogger(__name__)

META, READY, DATA = "meta.json", "ready", "data"


class CacheFull(OSError):
    """The object does not fit: the cache is smaller than it, or the rest is in use by running jobs."""


class NoRoomNow(CacheFull):
    """The object would fit this cache, but not now: running jobs hold the rest, or the disk under it is full.
    Another worker, or this one later, may have room: the job goes back to the queue instead of failing."""


class FileCache:
    def __init__(self, root: Path, max_bytes: int) -> None:
        self.root = Path(root)
        self.max_bytes = max_bytes
        self.root.mkdir(parents=True, exist_ok=True)

    @contextmanager
    def file(self, storage: Storage, key: str) -> Iterator[Path]:
        """A local copy of the object at `key`, kept from eviction until the block ends."""
        info = storage.stat(key)
        if info is None:
            raise FileNotFoundError(f"no stored object {key!r}")
        with self._entry(storage, key, f"{info.size}:{info.etag}", info.size, [info], tree=False) as path:
            yield path

    @contextmanager
    def tree(self, storage: Storage, key: str) -> Iterator[Path]:
        """A local copy of the folder stored under `key/`, kept from eviction until the block ends."""
        listing = storage.list_tree(key)
        if not listing:
            raise FileNotFoundError(f"no stored folder {key!r}")
        version = hashlib.sha256("\n".join(f"{o.key}\0{o.size}\0{o.etag}" for o in listing).encode()).hexdigest()
        size = sum(o.size for o in listing)
        with self._entry(storage, key, version, size, listing, tree=True) as path:
            yield path

    def entries(self) -> list[tuple[Path, int]]:
        """(folder, reserved bytes) of every entry, least recently used first."""
        found = []
        for meta in self.root.glob(f"*/{META}"):
            try:
                found.append((meta.stat().st_mtime_ns, meta.parent, json.loads(meta.read_text())["size"]))
            except (OSError, ValueError, KeyError):
                continue  # removed meanwhile, or half written by a process that died: counted as nothing
        return [(folder, size) for _, folder, size in sorted(found, key=lambda item: item[0])]

    def used_bytes(self) -> int:
        return sum(size for _, size in self.entries())

    @contextmanager
    def _entry(
        self, storage: Storage, key: str, version: str, size: int, objects: list[ObjectInfo], tree: bool
    ) -> Iterator[Path]:
        name = hashlib.sha256(f"{key}\0{version}".encode()).hexdigest()[:32]
        entry = self.root / name
        with _locked(self.root / f"{name}.use", fcntl.LOCK_SH):
            with _locked(self.root / f"{name}.fetch", fcntl.LOCK_EX):
                if not (entry / READY).exists():
                    try:
                        self._reserve(entry, key, size)
                        self._download(storage, key, objects, tree, entry)
                    except BaseException as exc:
                        shutil.rmtree(entry, ignore_errors=True)  # no half-written entry, no reserved room
                        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
                            raise NoRoomNow(
                                f"the disk under the worker's cache ({self.root}) filled while fetching {key} "
                                f"({size} bytes): {exc.strerror}"
                            ) from exc
                        raise
                now = time.time_ns()  # the clock, not the file system's coarser timestamps: order matters
                os.utime(entry / META, ns=(now, now))  # most recently used
            yield entry / DATA

    def _reserve(self, entry: Path, key: str, size: int) -> None:
        if size > self.max_bytes:
            raise CacheFull(
                f"{key} needs {size} bytes but the worker's cache holds at most {self.max_bytes} "
                "(MODELPRESS_CACHE_MAX_BYTES); raise the limit"
            )
        with _locked(self.root / ".lock", fcntl.LOCK_EX):
            shutil.rmtree(entry, ignore_errors=True)  # a download that died before it finished
            self._evict(size, keep=entry)
            entry.mkdir()
            (entry / META).write_text(json.dumps({"key": key, "size": size}))

    def _evict(self, needed: int, keep: Path) -> None:
        """Remove least recently used entries nobody uses until `needed` more bytes fit (call under `.lock`)."""
        entries = [(folder, size) for folder, size in self.entries() if folder != keep]
        total = sum(size for _, size in entries)
        for folder, size in entries:
            if total + needed <= self.max_bytes:
                return
            with (self.root / f"{folder.name}.use").open("a+b") as use:
                try:
                    fcntl.flock(use, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    continue  # in use by a running job
                shutil.rmtree(folder, ignore_errors=True)
                total -= size
                log.info("cache: evicted %s (%d bytes)", folder.name, size)
        if total + needed > self.max_bytes:
            raise NoRoomNow(
                f"the worker's cache ({self.max_bytes} bytes, MODELPRESS_CACHE_MAX_BYTES) is held by running jobs "
                f"({total} bytes); {needed} more do not fit: retry when they finish, or raise the limit"
            )

    def _download(self, storage: Storage, key: str, objects: list[ObjectInfo], tree: bool, entry: Path) -> None:
        partial = entry / f"{DATA}.partial"
        if tree:
            for obj in objects:
                storage.fetch_file(f"{key}/{obj.key}", partial / obj.key)
        else:
            storage.fetch_file(key, partial)
        os.replace(partial, entry / DATA)
        (entry / READY).touch()


@contextmanager
def _locked(path: Path, mode: int) -> Iterator[BinaryIO]:
    with path.open("a+b") as handle:
        fcntl.flock(handle, mode)
        try:
            yield handle
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def get_cache() -> FileCache:
    from modelpress.settings import get_settings

    settings = get_settings()
    return FileCache(settings.cache_root, settings.cache_max_bytes)
