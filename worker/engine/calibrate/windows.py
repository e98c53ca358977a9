"""Text datasets as token windows: the whole text tokenized once, cut into non-overlapping seq_len windows."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch

from worker.engine.steps import EngineError

log = logging.getLogger(__name__)


def _read_txt(path: Path) -> str:
    return path.read_text(encoding="utf-8")


def _read_jsonl(path: Path) -> str:
    texts = []
    with path.open(encoding="utf-8") as lines:
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise EngineError("bad_dataset", f"{path.name} line {number} is not JSON: {exc}") from exc
            if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                raise EngineError("bad_dataset", f"{path.name} line {number} has no string field 'text'")
            texts.append(record["text"])
    return "\n\n".join(texts)


_READERS = {"txt": _read_txt, "jsonl": _read_jsonl}


def read_text(path: Path, data_format: str) -> str:
    """The dataset's text: a .txt file as is, a .jsonl file's "text" fields joined by blank lines."""
    if data_format not in _READERS:
        raise EngineError("bad_dataset", f"dataset format {data_format!r} is not one of {sorted(_READERS)}")
    return _READERS[data_format](Path(path))


def split_windows(token_ids: torch.Tensor, seq_len: int, limit: int | None) -> torch.Tensor:
    """Non-overlapping windows (n, seq_len) from a 1-D id tensor: the first `limit` (None: all); tail dropped."""
    count = token_ids.numel() // seq_len
    if limit is not None:
        count = min(count, limit)
    return token_ids[: count * seq_len].reshape(count, seq_len)


def token_windows(
    tokenizer: Any, path: Path, data_format: str, seq_len: int, limit: int | None, purpose: str
) -> torch.Tensor:
    """Tokenize a dataset once and cut it into windows; refuse text too short for a single window."""
    text = read_text(path, data_format)
    ids = tokenizer(text, add_special_tokens=False, return_attention_mask=False)["input_ids"]
    windows = split_windows(torch.tensor(ids, dtype=torch.long), seq_len, limit)
    if windows.shape[0] == 0:
        raise EngineError(
            "dataset_too_short",
            f"the {purpose} dataset has {len(ids)} tokens, fewer than one window of seq_len={seq_len}: "
            "upload more text or lower seq_len",
        )
    log.info("%s: %d windows of %d tokens", purpose, windows.shape[0], seq_len)
    return windows
