"""Recognising an upload by its bytes, and extracting archives without trusting them.

Extraction writes only regular files and folders, each under the destination: absolute names, `..`,
symlinks, hard links and device files are refused. The number of members, the bytes actually written and the
ratio of written bytes to archive size are bounded while extracting, so a bomb is stopped when it goes off,
not after. Nothing in an archive is ever executed.
"""

from __future__ import annotations

import errno
import gzip
import os
import stat
import tarfile
import zipfile
import zlib
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path, PurePosixPath
from typing import BinaryIO

CHUNK = 1024 * 1024
ACCEPTED = ".zip, .tar, .tar.gz/.tgz of a Hugging Face model folder, or a single .gguf file"


class ArchiveError(ValueError):
    """The upload is refused; the message says what to fix."""


class TooLarge(ArchiveError):
    """A bound on the expanded archive was passed."""


class Kind(StrEnum):
    zip = "zip"
    tar = "tar"
    tar_gz = "tar.gz"
    gguf = "gguf"


def detect_kind(path: Path) -> Kind:
    """What the file is, from its magic bytes (never only from its name)."""
    with path.open("rb") as handle:
        head = handle.read(512)
    if head[:4] == b"GGUF":
        return Kind.gguf
    if head[:4] in (b"PK\x03\x04", b"PK\x05\x06"):
        return Kind.zip
    if head[:2] == b"\x1f\x8b":
        return Kind.tar_gz
    if len(head) >= 262 and head[257:262] == b"ustar":
        return Kind.tar
    raise ArchiveError(f"the upload is not a supported file; send a {ACCEPTED}")


@dataclass
class Limits:
    max_members: int
    max_bytes: int
    max_ratio: float


class _Budget:
    """Counts members and written bytes against the limits as extraction goes."""

    def __init__(self, limits: Limits, archive_size: int) -> None:
        self.limits = limits
        self.ratio_cap = limits.max_ratio * max(archive_size, 1)
        self.members = 0
        self.written = 0

    def member(self) -> None:
        self.members += 1
        if self.members > self.limits.max_members:
            raise TooLarge(
                f"the archive has more than {self.limits.max_members} members (MODELPRESS_MAX_ARCHIVE_MEMBERS)"
            )

    def wrote(self, count: int) -> None:
        self.written += count
        if self.written > self.limits.max_bytes:
            raise TooLarge(
                f"the archive expands to more than {self.limits.max_bytes} bytes (MODELPRESS_MAX_EXTRACTED_BYTES)"
            )
        if self.written > self.ratio_cap:
            raise TooLarge(
                f"the archive expands more than {self.limits.max_ratio:g} times its size "
                "(MODELPRESS_MAX_COMPRESSION_RATIO); it looks like a decompression bomb"
            )


def safe_member_path(dest: Path, name: str) -> Path:
    """Where a member may be written under `dest`; refuses absolute names, `..` and other escapes."""
    if not name or "\x00" in name or "\\" in name:
        raise ArchiveError(f"archive member {name!r} has an invalid name")
    posix = PurePosixPath(name)
    if posix.is_absolute() or name.startswith("/") or (len(name) > 1 and name[1] == ":"):
        raise ArchiveError(f"archive member {name!r} has an absolute path; pack paths relative to the model folder")
    parts = [p for p in posix.parts if p not in ("", ".")]
    if any(p == ".." for p in parts):
        raise ArchiveError(f"archive member {name!r} points outside the archive ('..'); pack a plain folder")
    if not parts:
        return dest
    target = dest.joinpath(*parts)
    resolved = target.resolve()
    if resolved != dest.resolve() and dest.resolve() not in resolved.parents:
        raise ArchiveError(f"archive member {name!r} would be written outside the model folder")
    return target


def _write_member(source: BinaryIO, target: Path, budget: _Budget) -> None:
    if target.exists():
        raise ArchiveError(f"archive member {target.name!r} appears twice or clashes with a folder")
    target.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
    with os.fdopen(fd, "wb") as out:
        while chunk := source.read(CHUNK):
            budget.wrote(len(chunk))
            out.write(chunk)


class _CountedStream:
    """The decompressed tar stream, bounded too: tar headers (pax records) are read into memory by tarfile."""

    def __init__(self, raw: BinaryIO, budget: _Budget) -> None:
        self.raw = raw
        self.budget = budget
        self.count = 0

    def read(self, size: int = -1) -> bytes:
        data = self.raw.read(size if size is not None and size >= 0 else CHUNK)
        self.count += len(data)
        slack = 1024 * (self.budget.members + 1) + CHUNK
        if self.count > min(self.budget.limits.max_bytes, self.budget.ratio_cap) + slack:
            self.budget.wrote(self.count)  # raises with the message of the bound that was passed
        return data


def _extract_tar(path: Path, kind: Kind, dest: Path, budget: _Budget) -> None:
    try:
        with path.open("rb") as raw:
            source: BinaryIO = raw
            if kind is Kind.tar_gz:
                source = gzip.GzipFile(fileobj=raw, mode="rb")  # type: ignore[assignment]
            with tarfile.open(fileobj=_CountedStream(source, budget), mode="r|") as tar:  # type: ignore[arg-type]
                for member in tar:
                    _extract_tar_member(tar, member, dest, budget)
    except (tarfile.TarError, EOFError, OSError, zlib.error) as exc:
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise  # the server's disk is full: not the archive's fault
        raise ArchiveError(f"the {kind} archive is damaged or not a tar archive ({exc}); pack it again") from exc


def _extract_tar_member(tar: tarfile.TarFile, member: tarfile.TarInfo, dest: Path, budget: _Budget) -> None:
    budget.member()
    target = safe_member_path(dest, member.name)
    if member.issym() or member.islnk():
        raise ArchiveError(f"archive member {member.name!r} is a link; upload real files, not links")
    if member.isdir():
        target.mkdir(parents=True, exist_ok=True)
    elif member.isreg():
        source = tar.extractfile(member)
        if source is None:
            raise ArchiveError(f"archive member {member.name!r} cannot be read")
        _write_member(source, target, budget)
    else:
        raise ArchiveError(f"archive member {member.name!r} is a device or special file; upload only files")


def _extract_zip(path: Path, dest: Path, budget: _Budget) -> None:
    try:
        archive = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as exc:
        raise ArchiveError(f"the zip archive is damaged ({exc}); pack it again") from exc
    with archive:
        for info in archive.infolist():
            budget.member()
            target = safe_member_path(dest, info.filename)
            mode = info.external_attr >> 16
            if stat.S_ISLNK(mode):
                raise ArchiveError(f"archive member {info.filename!r} is a link; upload real files, not links")
            # no file type bits (DOS attributes only, or permissions only as `ZipFile.writestr` leaves them): a file
            if stat.S_IFMT(mode) and not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
                raise ArchiveError(f"archive member {info.filename!r} is a device or special file; upload only files")
            if info.is_dir():
                target.mkdir(parents=True, exist_ok=True)
                continue
            if info.flag_bits & 0x1:
                raise ArchiveError(f"archive member {info.filename!r} is encrypted; upload an unencrypted zip")
            try:
                with archive.open(info) as source:
                    _write_member(source, target, budget)
            except (zipfile.BadZipFile, NotImplementedError, EOFError, OSError) as exc:
                raise ArchiveError(f"archive member {info.filename!r} cannot be read ({exc})") from exc


def extract(path: Path, kind: Kind, dest: Path, limits: Limits) -> int:
    """Extract an archive into the empty folder `dest` within the limits; returns the bytes written."""
    dest.mkdir(parents=True, exist_ok=True)
    budget = _Budget(limits, path.stat().st_size)
    if kind is Kind.zip:
        _extract_zip(path, dest, budget)
    elif kind in (Kind.tar, Kind.tar_gz):
        _extract_tar(path, kind, dest, budget)
    else:
        raise ArchiveError(f"a {kind} file is not an archive")
    return budget.written


def model_root(dest: Path) -> Path:
    """The folder holding config.json: the archive root, or its single top folder."""
    if (dest / "config.json").is_file():
        return dest
    entries = [p for p in dest.iterdir() if p.name not in ("__MACOSX", ".DS_Store")]
    if len(entries) == 1 and entries[0].is_dir() and (entries[0] / "config.json").is_file():
        return entries[0]
    raise ArchiveError(
        "the archive has no config.json at its root or inside a single top folder; "
        "pack the Hugging Face model folder (config.json, *.safetensors, tokenizer files)"
    )
