"""Hostile and broken uploads for the refusal tests, built in memory from a real tiny model folder."""

from __future__ import annotations

import io
import json
import math
import os
import pickle
import struct
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


def safetensors_table(path: Path) -> dict[str, dict]:
    """The tensor table of a .safetensors file: name → {"dtype", "shape"} (offsets and metadata dropped)."""
    with path.open("rb") as handle:
        (length,) = struct.unpack("<Q", handle.read(8))
        header = json.loads(handle.read(length))
    header.pop("__metadata__", None)
    return {name: {"dtype": entry["dtype"], "shape": entry["shape"]} for name, entry in header.items()}


def write_safetensors(path: Path, table: dict[str, dict]) -> Path:
    """A valid .safetensors file with these tensors (all zeros): a crafted header with consistent offsets."""
    sizes = {"F32": 4, "F16": 2, "BF16": 2, "I32": 4, "U8": 1}
    header, offset = {}, 0
    for name, entry in table.items():
        nbytes = math.prod(entry["shape"]) * sizes[entry["dtype"]]
        header[name] = {**entry, "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header).encode()
    with path.open("wb") as handle:
        handle.write(struct.pack("<Q", len(raw)) + raw)
        handle.truncate(8 + len(raw) + offset)
    return path


def with_tensors(folder: Path, dest: Path, changes: dict[str, list[int] | None], **config: object) -> Path:
    """A copy of a model folder whose weights have these shapes (None removes a tensor; a new name adds one)."""
    copy = copy_with_config(folder, dest, **config)
    table = safetensors_table(folder / "model.safetensors")
    for name, shape in changes.items():
        if shape is None:
            del table[name]
        else:
            table[name] = {"dtype": table.get(name, {}).get("dtype", "F32"), "shape": shape}
    write_safetensors(copy / "model.safetensors", table)
    return copy


def zip_with(path: Path, folder: Path | None, extra: dict[str, bytes], compression: int = zipfile.ZIP_STORED) -> Path:
    """A zip of `folder`'s files at the root, plus members with hand-written names (traversal, absolute...)."""
    with zipfile.ZipFile(path, "w", compression=compression) as zf:
        if folder is not None:
            for file in sorted(folder.iterdir()):
                zf.write(file, file.name)
        for name, data in extra.items():
            zf.writestr(zipfile.ZipInfo(name), data, compress_type=compression)
    return path
