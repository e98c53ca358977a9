"""Checking uploaded text: UTF-8 .txt (records = non-empty lines) or .jsonl with a string "text" per line."""

from __future__ import annotations

import codecs
import json
from pathlib import Path

CHUNK = 1024 * 1024
MAX_JSONL_LINE = 16 * 1024 * 1024
SUFFIXES = (".txt", ".jsonl")


class DatasetError(ValueError):
    """The dataset is refused; the message says what to fix."""


def dataset_format(filename: str) -> str:
    lower = filename.lower()
    for suffix in SUFFIXES:
        if lower.endswith(suffix):
            return suffix[1:]
    raise DatasetError(
        f'dataset file {filename!r} must be a .txt file, a .jsonl file with a "text" field, or an lm-eval task '
        "archive (.tar, .tar.gz, .tgz, .zip)"
    )


def count_txt(path: Path) -> int:
    """Validate UTF-8 while streaming; count non-empty lines."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    records, pending, offset = 0, False, 0
    with path.open("rb") as handle:
        while True:
            chunk = handle.read(CHUNK)
            try:
                text = decoder.decode(chunk, final=not chunk)
            except UnicodeDecodeError as exc:
                raise DatasetError(f"the text is not UTF-8 (near byte {offset + exc.start}); save it as UTF-8") from exc
            offset += len(chunk)
            *complete, rest = text.split("\n")
            for line in complete:
                records += pending or bool(line.strip())
                pending = False
            pending = pending or bool(rest.strip())
            if not chunk:
                return records + pending


def count_jsonl(path: Path) -> int:
    """Validate every line: a JSON object with a string "text"; blank lines are skipped."""
    records = 0
    with path.open("rb") as handle:
        number = 0
        while True:
            raw = handle.readline(MAX_JSONL_LINE + 1)
            if not raw:
                break
            number += 1
            if len(raw) > MAX_JSONL_LINE and not raw.endswith(b"\n"):
                raise DatasetError(f"line {number} is longer than {MAX_JSONL_LINE} bytes; split the record")
            if not raw.strip():
                continue
            try:
                value = json.loads(raw.decode("utf-8"))
            except UnicodeDecodeError as exc:
                raise DatasetError(f"line {number} is not UTF-8; save the file as UTF-8") from exc
            except (ValueError, RecursionError) as exc:
                raise DatasetError(f"line {number} is not valid JSON ({exc})") from exc
            if not isinstance(value, dict) or not isinstance(value.get("text"), str):
                raise DatasetError(f'line {number} must be a JSON object with a string "text" field')
            records += 1
    return records


def count_records(path: Path, fmt: str) -> int:
    records = count_txt(path) if fmt == "txt" else count_jsonl(path)
    if records == 0:
        raise DatasetError("the dataset holds no text; upload at least one non-empty line")
    return records
