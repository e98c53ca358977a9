"""Inspecting a Hugging Face model folder without running anything that came with it.

Only JSON is parsed: config.json, tokenizer_config.json and the JSON header of each .safetensors file (an
8-byte little-endian length, then that many bytes of JSON, capped); tensors are never loaded. The shapes in
those headers must follow from config.json (`app.weight_shapes`). Pickle weights
are refused, never opened. The result is the `details` stored on the model row.
"""

from __future__ import annotations

import json
import re
import struct
from collections import Counter
from dataclasses import dataclass
from math import prod
from pathlib import Path
from typing import Any

from app.architectures import SUPPORTED_ARCHITECTURES, refusal
from app.archives import ArchiveError
from app.weight_shapes import FLOAT_DTYPES, check_weight_shapes

MAX_JSON_BYTES = 8 * 1024 * 1024
MAX_SAFETENSORS_HEADER = 100 * 1024 * 1024
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model")
INDEX_NAME = "model.safetensors.index.json"
SHARD_NAME = re.compile(r"-\d{5}-of-\d{5}\.safetensors$")

SAFETENSORS_DTYPES = {
    "F64": ("float64", 8),
    "F32": ("float32", 4),
    "F16": ("float16", 2),
    "BF16": ("bfloat16", 2),
    "F8_E4M3": ("float8_e4m3fn", 1),
    "F8_E5M2": ("float8_e5m2", 1),
    "I64": ("int64", 8),
    "I32": ("int32", 4),
    "I16": ("int16", 2),
    "I8": ("int8", 1),
    "U8": ("uint8", 1),
    "BOOL": ("bool", 1),
}

EMBEDDING_SUFFIXES = ("embed_tokens.weight", "wte.weight", "word_embeddings.weight")
POSITION_EMBEDDING_SUFFIXES = ("embed_positions.weight", "wpe.weight")


class InspectionError(ArchiveError):
    """The model folder is refused; the message says what to fix."""


@dataclass
class Inspected:
    architecture: str
    parameters: int
    details: dict[str, Any]


def read_json(path: Path, what: str) -> Any:
    if path.stat().st_size > MAX_JSON_BYTES:
        raise InspectionError(f"{what} is larger than {MAX_JSON_BYTES} bytes")
    try:
        return json.loads(path.read_bytes())
    except (ValueError, RecursionError) as exc:
        raise InspectionError(f"{what} is not valid JSON: {exc}") from exc


def _positive_int(config: dict[str, Any], *names: str, default: int | None = None) -> int:
    for name in names:
        value = config.get(name)
        if value is not None:
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise InspectionError(f"config.json: {name} must be a positive integer, not {value!r}")
            return value
    if default is not None:
        return default
    raise InspectionError(f"config.json lacks {names[0]}; it is needed to know the model's shape")


def check_config(config: Any) -> tuple[str, str]:
    """Refuse remote code and unknown architectures; return (architecture, model_type)."""
    if not isinstance(config, dict):
        raise InspectionError("config.json must be a JSON object")
    if "auto_map" in config:
        raise InspectionError(
            "config.json has 'auto_map', which asks for custom code from the upload; modelpress never runs uploaded "
            "code: save the model with a built-in transformers architecture"
        )
    model_type = config.get("model_type")
    architectures = config.get("architectures")
    if not isinstance(architectures, list) or len(architectures) != 1 or not isinstance(architectures[0], str):
        raise InspectionError("config.json must name exactly one class in 'architectures', e.g. [\"LlamaForCausalLM\"]")
    architecture = architectures[0]
    allowed = SUPPORTED_ARCHITECTURES.get(model_type) if isinstance(model_type, str) else None
    if allowed is None:
        raise InspectionError(refusal(model_type))
    if architecture not in allowed:
        raise InspectionError(
            f"architecture {architecture!r} is not supported for model_type {model_type!r}; "
            f"expected {' or '.join(sorted(allowed))}"
        )
    return architecture, model_type


def shape_details(config: dict[str, Any], model_type: str) -> dict[str, Any]:
    """The sizes the API and the engine need, read under the names each model family uses."""
    hidden = _positive_int(config, "hidden_size", "n_embd", "d_model")
    layers = _positive_int(config, "num_hidden_layers", "n_layer", "num_layers")
    heads = _positive_int(config, "num_attention_heads", "n_head")
    kv_default = 1 if config.get("multi_query") and not config.get("new_decoder_architecture") else heads
    kv_heads = _positive_int(config, "num_key_value_heads", "num_kv_heads", default=kv_default)
    intermediate = _positive_int(
        config, "intermediate_size", "n_inner", "ffn_dim", "ffn_hidden_size", default=4 * hidden
    )
    if config.get("head_dim") is None and hidden % heads:
        raise InspectionError(f"config.json: hidden_size {hidden} is not divisible by num_attention_heads {heads}")
    head_dim = _positive_int(config, "head_dim", default=hidden // heads)
    vocab = _positive_int(config, "vocab_size")
    return {
        "model_type": model_type,
        "hidden_size": hidden,
        "intermediate_size": intermediate,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "head_dim": head_dim,
        "vocab_size": vocab,
        "linear_in_features": sorted({hidden, intermediate, heads * head_dim}),
    }


def read_safetensors_header(path: Path) -> dict[str, dict[str, Any]]:
    """The tensor table of a .safetensors file, validated against the file size; tensors are not read."""
    size = path.stat().st_size
    with path.open("rb") as handle:
        prefix = handle.read(8)
        if len(prefix) < 8:
            raise InspectionError(f"{path.name} is too short to be a safetensors file")
        (length,) = struct.unpack("<Q", prefix)
        if length > MAX_SAFETENSORS_HEADER or length > size - 8:
            raise InspectionError(f"{path.name} is not a valid safetensors file (header length {length})")
        raw = handle.read(length)
    try:
        header = json.loads(raw)
    except (ValueError, RecursionError) as exc:
        raise InspectionError(f"{path.name} is not a valid safetensors file (bad header: {exc})") from exc
    if not isinstance(header, dict):
        raise InspectionError(f"{path.name} is not a valid safetensors file (header is not an object)")
    header.pop("__metadata__", None)
    data_size = size - 8 - length
    for name, entry in header.items():
        if not isinstance(entry, dict) or entry.get("dtype") not in SAFETENSORS_DTYPES:
            raise InspectionError(f"{path.name}: tensor {name!r} has an unknown dtype")
        shape, offsets = entry.get("shape"), entry.get("data_offsets")
        if not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape):
            raise InspectionError(f"{path.name}: tensor {name!r} has an invalid shape")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets)):
            raise InspectionError(f"{path.name}: tensor {name!r} has invalid data offsets")
        begin, end = offsets
        if not 0 <= begin <= end <= data_size or end - begin != prod(shape) * SAFETENSORS_DTYPES[entry["dtype"]][1]:
            raise InspectionError(
                f"{path.name}: tensor {name!r} does not fit the file; the file is truncated or corrupt"
            )
    return header


def _check_files(root: Path) -> list[Path]:
    files = sorted(p for p in root.rglob("*") if p.is_file())
    pickles = [p.relative_to(root).as_posix() for p in files if p.suffix.lower() in PICKLE_SUFFIXES]
    if pickles:
        raise InspectionError(
            f"pickle-based weights are not accepted ({', '.join(pickles[:5])}): they can run code when loaded. "
            "Convert them to safetensors, e.g. model.save_pretrained(folder, safe_serialization=True)"
        )
    code = [p.relative_to(root).as_posix() for p in files if p.suffix.lower() in (".py", ".pyc", ".so")]
    if code:
        raise InspectionError(f"the upload contains code ({', '.join(code[:5])}); modelpress never runs uploaded code")
    return files


def inspect_hf_folder(root: Path) -> Inspected:
    """Check and describe a Hugging Face model folder (config.json + *.safetensors at `root`)."""
    files = _check_files(root)
    architecture, model_type = check_config(config := read_json(root / "config.json", "config.json"))
    tokenizer_config = root / "tokenizer_config.json"
    if tokenizer_config.is_file():
        tok = read_json(tokenizer_config, "tokenizer_config.json")
        if isinstance(tok, dict) and "auto_map" in tok:
            raise InspectionError(
                "tokenizer_config.json has 'auto_map' (custom tokenizer code); use a built-in tokenizer"
            )
    details = shape_details(config, model_type)
    weights = sorted(p for p in files if p.suffix == ".safetensors")
    if not weights:
        raise InspectionError("no *.safetensors weights next to config.json; save the model with safe_serialization")
    tensors: dict[str, dict[str, Any]] = {}
    where: dict[str, str] = {}
    for path in weights:
        for name, entry in read_safetensors_header(path).items():
            if name in tensors:
                raise InspectionError(f"tensor {name!r} appears in more than one safetensors file")
            tensors[name] = entry
            where[name] = path.relative_to(root).as_posix()
    index = root / INDEX_NAME
    if not index.is_file() and any(SHARD_NAME.search(p.name) for p in weights):
        raise InspectionError(
            f"the weights are shards ({weights[0].name}, ...) but {INDEX_NAME} is missing; upload it with them"
        )
    if index.is_file():
        uploaded = {p.relative_to(root).as_posix() for p in weights}
        details["shards"] = check_shard_index(read_json(index, INDEX_NAME), where, uploaded)
    if not tensors:
        raise InspectionError("the safetensors files hold no tensors")
    _check_embedding(tensors, config, details)
    check_weight_shapes(tensors, details)
    counts: Counter[str] = Counter()
    for entry in tensors.values():
        counts[entry["dtype"]] += prod(entry["shape"])
    details["linears"] = linear_shapes(tensors)
    details.update(
        dtype=SAFETENSORS_DTYPES[counts.most_common(1)[0][0]][0],
        has_tokenizer=any((root / name).is_file() for name in TOKENIZER_FILES),
        files=[p.relative_to(root).as_posix() for p in files],
    )
    return Inspected(architecture=architecture, parameters=sum(counts.values()), details=details)


def check_shard_index(index: Any, where: dict[str, str], uploaded: set[str]) -> int:
    """A sharded checkpoint's index must agree with its shards: every shard it names is uploaded, every tensor it
    maps is in the header of the shard it names, and no shard holds a tensor it does not map (transformers
    loads by the index, so such a tensor would be silently dropped). Returns the number of shards."""
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise InspectionError(
            f"{INDEX_NAME} has no 'weight_map' object of tensor name → shard file; save the model again with "
            "save_pretrained"
        )
    shards = sorted(set(weight_map.values()))
    missing = [s for s in shards if s not in uploaded]
    if missing:
        raise InspectionError(
            f"{INDEX_NAME} names shard(s) that are not in the upload: {', '.join(missing[:5])}; upload every shard "
            "of the checkpoint"
        )
    for name, shard in sorted(weight_map.items()):
        if where.get(name) != shard:
            found = f"it is in {where[name]}" if name in where else "no shard holds it"
            raise InspectionError(
                f"{INDEX_NAME} maps tensor {name!r} to {shard}, but {found}; the index does not belong to these "
                "shards: upload the index saved with them"
            )
    unmapped = sorted(set(where) - set(weight_map))
    if unmapped:
        raise InspectionError(
            f"tensor {unmapped[0]!r} in {where[unmapped[0]]} is not in {INDEX_NAME}'s weight_map, so transformers "
            "would not load it; upload the index saved with these shards"
        )
    return len(shards)


def linear_shapes(tensors: dict[str, dict[str, Any]]) -> dict[str, list[int]]:
    """The Linear layers a recipe can target, from the safetensors headers: a 2-D float `<module>.weight` that is
    not an embedding counts as a Linear named `<module>`, [out_features, in_features] (what `check_fit` reads).
    Every accepted architecture (app.architectures) holds its projections in `torch.nn.Linear` modules."""
    skipped = EMBEDDING_SUFFIXES + POSITION_EMBEDDING_SUFFIXES
    return {
        name.removesuffix(".weight"): entry["shape"]
        for name, entry in sorted(tensors.items())
        if name.endswith(".weight")
        and len(entry["shape"]) == 2
        and entry["dtype"] in FLOAT_DTYPES
        and not name.endswith(skipped)
    }


def _check_embedding(tensors: dict[str, dict[str, Any]], config: dict[str, Any], details: dict[str, Any]) -> None:
    """The token embedding must be vocab_size × hidden (or the projection width OPT uses)."""
    width = config.get("word_embed_proj_dim") or details["hidden_size"]
    expected = [details["vocab_size"], width]
    for name, entry in tensors.items():
        if name.endswith(EMBEDDING_SUFFIXES) and len(entry["shape"]) == 2 and entry["shape"] != expected:
            raise InspectionError(
                f"tensor {name!r} has shape {entry['shape']} but config.json says vocab_size × hidden_size = "
                f"{expected}; the weights do not belong to this config"
            )
