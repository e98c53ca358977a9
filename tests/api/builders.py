"""Hostile and broken uploads for the refusal tests, built in memory from a real tiny model folder."""

from __future__ import annotations

import io
import json
import os
import pickle
import tarfile
import zipfile
from pathlib import Path

Member = tuple[tarfile.TarInfo, bytes | None]


def tar_with(path: Path, folder: Path | None, extra: list[Member], gz: bool = False) -> Path:
    """A tar of `folder`'s files at the root, plus hand-made members (links, traversal names...)."""
    with tarfile.open(path, "w:gz" if gz else "w") as tar:
        if folder is not None:
            for file in sorted(folder.iterdir()):
                tar.add(file, arcname=file.name)
        for info, data in extra:
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return path


def file_member(name: str, data: bytes) -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    return info, data


def link_member(name: str, target: str, hard: bool = False) -> tuple[tarfile.TarInfo, None]:
    info = tarfile.TarInfo(name)
    info.type = tarfile.LNKTYPE if hard else tarfile.SYMTYPE
    info.linkname = target
    return info, None


def device_member(name: str) -> tuple[tarfile.TarInfo, None]:
    info = tarfile.TarInfo(name)
    info.type = tarfile.CHRTYPE
    info.devmajor, info.devminor = 1, 3
    return info, None


def copy_with_config(folder: Path, dest: Path, **changes: object) -> Path:
    """A copy of a model folder with config.json keys changed (a value of None removes the key)."""
    dest.mkdir(parents=True)
    for file in folder.iterdir():
        (dest / file.name).write_bytes(file.read_bytes())
    config = json.loads((folder / "config.json").read_text())
    for key, value in changes.items():
        if value is None:
            config.pop(key, None)
        else:
            config[key] = value
    (dest / "config.json").write_text(json.dumps(config))
    return dest


class _WritesFile:
    """A pickle that creates a file if anything ever unpickles it."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def malicious_pickle(marker: Path) -> bytes:
    return pickle.dumps(_WritesFile(marker))


def zip_with_symlink(path: Path, folder: Path) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        for file in sorted(folder.iterdir()):
            zf.write(file, file.name)
        info = zipfile.ZipInfo("tokenizer.model")
        info.create_system = 3
        info.external_attr = 0o120777 << 16
        zf.writestr(info, "/etc/passwd")
    return path
