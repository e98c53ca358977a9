"""The downloadable artifact: a Hugging Face folder with a manifest, packed as one uncompressed tar."""

from __future__ import annotations

import hashlib
import json
import tarfile
from pathlib import Path
from typing import Any

MANIFEST_NAME = "modelpress_manifest.json"


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def folder_files(folder: Path) -> dict[str, dict[str, Any]]:
    """sha256 and size of every file in the folder (the manifest itself excluded), by relative path."""
    return {
        str(path.relative_to(folder)): {"sha256": sha256_file(path), "bytes": path.stat().st_size}
        for path in sorted(folder.rglob("*"))
        if path.is_file() and path.name != MANIFEST_NAME
    }


def write_manifest(folder: Path, content: dict[str, Any]) -> Path:
    """Write the manifest (job spec, versions, what was done) with checksums of every file beside it."""
    manifest = {"manifest_version": 1, **content, "files": folder_files(folder)}
    path = folder / MANIFEST_NAME
    path.write_text(json.dumps(manifest, indent=2, sort_keys=True))
    return path


def tar_folder(folder: Path, archive: Path) -> Path:
    """An uncompressed tar of the folder's files at the archive root."""
    with tarfile.open(archive, "w") as tar:
        for path in sorted(folder.rglob("*")):
            if path.is_file():
                tar.add(path, arcname=str(path.relative_to(folder)))
    return archive
