"""Inspecting a single .gguf file with the `gguf` package's reader (metadata and tensor shapes only).

The file is stored as uploaded; the worker dequantizes it. Nothing in it is executed: GGUF is a flat
key-value table followed by tensor data, and only the table and the tensor infos are read here.
"""

from __future__ import annotations

import logging
from collections import Counter
from pathlib import Path
from typing import Any

from app.architectures import GGUF_ARCHITECTURES, REFUSED, supported_list
from app.inspection import Inspected, InspectionError

logger = logging.getLogger(__name__)


def _value(reader: Any, key: str) -> Any:
    field = reader.fields.get(key)
    if field is None:
        return None
    try:
        return field.contents()
    except (ValueError, IndexError, TypeError, UnicodeDecodeError) as exc:
        raise InspectionError(f"GGUF metadata {key!r} cannot be read: {exc}") from exc


def _positive(reader: Any, key: str, default: int | None = None) -> int:
    value = _value(reader, key)
    if value is None and default is not None:
        return default
    if not isinstance(value, int) or value <= 0:
        raise InspectionError(f"GGUF metadata {key!r} is missing or not a positive integer ({value!r})")
    return int(value)


def inspect_gguf(path: Path) -> Inspected:
    """Describe a GGUF checkpoint; refuse it when it is damaged or of an unsupported architecture."""
    from gguf import GGUFReader

    try:
        reader = GGUFReader(path, "r")
    except Exception as exc:  # the reader raises many types on damaged files; all mean "not a usable GGUF"
        logger.info("GGUF reader refused %s: %r", path, exc)
        raise InspectionError(f"the file starts like GGUF but cannot be read ({exc}); upload an intact .gguf") from exc
    arch = _value(reader, "general.architecture")
    if arch not in GGUF_ARCHITECTURES:
        reason = f": {REFUSED[arch]}" if isinstance(arch, str) and arch in REFUSED else ""
        raise InspectionError(
            f"GGUF architecture {arch!r} is not supported{reason}; supported in GGUF files: "
            f"{', '.join(sorted(GGUF_ARCHITECTURES))} (model types {supported_list()} as Hugging Face folders)"
        )
    architecture, model_type = GGUF_ARCHITECTURES[arch]
    hidden = _positive(reader, f"{arch}.embedding_length")
    heads = _positive(reader, f"{arch}.attention.head_count")
    intermediate = _positive(reader, f"{arch}.feed_forward_length", default=4 * hidden)
    head_dim = _positive(reader, f"{arch}.attention.key_length", default=max(hidden // heads, 1))
    tokens = reader.fields.get("tokenizer.ggml.tokens")
    vocab = _positive(reader, f"{arch}.vocab_size", default=len(tokens.data) if tokens is not None else 0)
    counts: Counter[str] = Counter()
    shapes: dict[str, list[int]] = {}
    for tensor in reader.tensors:
        counts[tensor.tensor_type.name] += int(tensor.n_elements)
        shapes[tensor.name] = [int(d) for d in tensor.shape]
    if not counts:
        raise InspectionError("the GGUF file holds no tensors")
    embedding = shapes.get("token_embd.weight")
    if embedding is not None and embedding != [hidden, vocab]:
        raise InspectionError(
            f"GGUF tensor token_embd.weight has shape {embedding} but the metadata says "
            f"embedding_length × vocab_size = {[hidden, vocab]}; the file is inconsistent"
        )
    details = {
        "model_type": model_type,
        "hidden_size": hidden,
        "intermediate_size": intermediate,
        "num_hidden_layers": _positive(reader, f"{arch}.block_count"),
        "num_attention_heads": heads,
        "num_key_value_heads": _positive(reader, f"{arch}.attention.head_count_kv", default=heads),
        "head_dim": head_dim,
        "vocab_size": vocab,
        "dtype": counts.most_common(1)[0][0],
        "has_tokenizer": tokens is not None,
        "linear_in_features": sorted({hidden, intermediate, heads * head_dim}),
        "files": ["model.gguf"],
        "gguf_architecture": arch,
    }
    return Inspected(architecture=architecture, parameters=sum(counts.values()), details=details)
