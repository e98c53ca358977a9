"""What a search keeps across attempts: the baseline's figures and top-k, the sensitivity table and every
finished candidate (its record and its artifact), in the job's checkpoint folder. The worker copies each file
to the store as it is completed and refills the folder when a retried attempt starts, so a search resumed
after its worker died skips what was finished."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any


class SearchState:
    def __init__(self, folder: Path, on_checkpoint: Callable[[Path], None] | None) -> None:
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.on_checkpoint = on_checkpoint

    def path(self, name: str) -> Path:
        return self.folder / name

    def read(self, name: str) -> Any | None:
        """A JSON file an earlier attempt (or this one) completed, or None."""
        path = self.path(name)
        return json.loads(path.read_text()) if path.is_file() else None

    def write(self, name: str, data: Any) -> None:
        """Write a JSON file whole (renamed into place) and hand it to the checkpoint copier."""
        path = self.path(name)
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(path.name + ".partial")
        partial.write_text(json.dumps(data))
        partial.replace(path)
        self.completed(path)

    def completed(self, path: Path) -> None:
        """A file under the folder is complete: copy it to the store (when the worker asked for that)."""
        if self.on_checkpoint is not None:
            self.on_checkpoint(path)
