"""The local files of one attempt at a job: inputs from the worker's cache, and checkpoints kept in the store.

The engine reads and writes local files; the store may be on another machine. Inputs are fetched into the
worker's cache and held there (never evicted) until the attempt ends. Checkpoints are written to a local
folder by the engine and copied to the store as each one completes, and the folder is refilled from the
store when an attempt starts, so a job killed on one machine resumes on another.
"""

from __future__ import annotations

import logging
import os
from contextlib import ExitStack
from pathlib import Path

from modelpress.storage import Storage
from worker.cache import FileCache

log = logging.getLogger(__name__)


class JobFiles:
    def __init__(self, storage: Storage, cache: FileCache) -> None:
        self.storage = storage
        self.cache = cache
        self._held = ExitStack()

    def file(self, key: str) -> Path:
        """A local copy of the stored file at `key`, kept until `close()`."""
        return self._held.enter_context(self.cache.file(self.storage, key))

    def tree(self, key: str) -> Path:
        """A local copy of the stored folder at `key`, kept until `close()`."""
        return self._held.enter_context(self.cache.tree(self.storage, key))

    def close(self) -> None:
        self._held.close()


class CheckpointSync:
    """Keeps the engine's local checkpoint folder and the store's copy under `key` alike."""

    def __init__(self, storage: Storage, key: str, folder: Path) -> None:
        self.storage = storage
        self.key = key
        self.folder = Path(folder)

    def restore(self) -> int:
        """Fill the local folder with the checkpoints an earlier attempt stored; returns how many."""
        stored = self.storage.list_tree(self.key)
        for obj in stored:
            self.storage.fetch_file(f"{self.key}/{obj.key}", self.folder / obj.key)
        if stored:
            log.info("restored %d checkpoint file(s) from %s", len(stored), self.key)
        return len(stored)

    def __call__(self, path: Path) -> None:
        """Store a complete checkpoint file written under the folder (the engine's `on_checkpoint`)."""
        relative = Path(path).relative_to(self.folder).as_posix()
        # put_file consumes its source: hand it a second name for the file, which the engine only ever replaces
        link = Path(path).with_name(f".{Path(path).name}.upload")
        link.unlink(missing_ok=True)
        os.link(path, link)
        self.storage.put_file(f"{self.key}/{relative}", link)
