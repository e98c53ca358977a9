"""Text datasets as token windows: the whole text tokenized once, cut into non-overlapping seq_len windows.

A model whose tokenizer starts every text with a beginning-of-sequence token (Gemma's and Llama 3's `<bos>`) was
trained only on sequences that start with it, and scores text without it badly (Gemma-3-270M: perplexity 290
instead of 73 on 4 × 256 tokens of WikiText-2). Each window then starts with that token followed by seq_len − 1
tokens of text; for tokenizers that add nothing (SmolLM2, GPT-2 style) windows are the text alone.
"""

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


def split_windows(
    token_ids: torch.Tensor, seq_len: int, limit: int | None, prefix: tuple[int, ...] = ()
) -> torch.Tensor:
    """Non-overlapping windows (n, seq_len) from a 1-D id tensor: the first `limit` (None: all); tail dropped.
    With a `prefix`, each window is the prefix and then seq_len − len(prefix) text tokens."""
    text_len = seq_len - len(prefix)
    if text_len < 1:
        raise ValueError(f"seq_len={seq_len} leaves no room for text after {len(prefix)} leading special tokens")
    count = token_ids.numel() // text_len
    if limit is not None:
        count = min(count, limit)
    text = token_ids[: count * text_len].reshape(count, text_len)
    if not prefix:
        return text
    return torch.cat([torch.tensor(prefix, dtype=token_ids.dtype).expand(count, len(prefix)), text], dim=1)


def leading_special_ids(tokenizer: Any) -> tuple[int, ...]:
    """The beginning-of-sequence id when the tokenizer puts it before every text it encodes, else ()."""
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return ()
    encoded = tokenizer("a", add_special_tokens=True, return_attention_mask=False)["input_ids"]
    return (bos,) if encoded[:1] == [bos] else ()


def token_windows(
    tokenizer: Any, path: Path, data_format: str, seq_len: int, limit: int | None, purpose: str
) -> torch.Tensor:
    """Tokenize a dataset once and cut it into windows, each led by the tokenizer's <bos> where it adds one;
    refuse text too short for a single window."""
    text = read_text(path, data_format)
    ids = tokenizer(text, add_special_tokens=False, return_attention_mask=False)["input_ids"]
    prefix = leading_special_ids(tokenizer)
    windows = split_windows(torch.tensor(ids, dtype=torch.long), seq_len, limit, prefix)
    if windows.shape[0] == 0:
        raise EngineError(
            "dataset_too_short",
            f"the {purpose} dataset has {len(ids)} tokens, fewer than one window of seq_len={seq_len}: "
            "upload more text or lower seq_len",
        )
    log.info("%s: %d windows of %d tokens%s", purpose, windows.shape[0], seq_len, " (<bos> first)" if prefix else "")
    return windows
