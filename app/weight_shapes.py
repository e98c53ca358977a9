"""Every known weight of a Llama-family checkpoint must have the shape its config.json implies.

A checkpoint whose tensors do not fit its config (another model's weights, a hand-edited config, a truncated
shard set) would only fail on a GPU worker, minutes later; here it is refused at upload with the tensor, its
shape and the expected one. Only the safetensors headers are read.

The names are those of transformers' Llama-style decoders (llama, mistral, qwen2, qwen3, gemma, gemma2, gemma3_text,
phi3): `model.embed_tokens`, `model.layers.<i>.self_attn.{q,k,v,o}_proj` (phi3: fused `qkv_proj`), the
`mlp.{gate,up,down}_proj` (phi3: fused `gate_up_proj`), the norms, `model.norm` and `lm_head`. Tensors with
other names are left alone, and so are integer tensors, which quantized checkpoints pack into other shapes.
"""

from __future__ import annotations

import re
from typing import Any

from app.archives import ArchiveError

LLAMA_FAMILY = frozenset({"llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "phi3"})
FLOAT_DTYPES = frozenset({"F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2"})
_LAYER = re.compile(r"model\.layers\.(\d+)\.(.+)")

Expected = dict[str, tuple[list[int], str]]
"""Tensor name (or name inside a layer) → (shape, the config sizes it comes from)."""


class ShapeMismatch(ArchiveError):
    """A weight's shape does not follow from config.json."""


def expected_shapes(details: dict[str, Any]) -> tuple[Expected, Expected]:
    """(top-level tensors, tensors inside each decoder layer) with their shapes from the config's sizes."""
    hidden, inter, vocab = details["hidden_size"], details["intermediate_size"], details["vocab_size"]
    head_dim = details["head_dim"]
    q, kv = details["num_attention_heads"] * head_dim, details["num_key_value_heads"] * head_dim
    q_why, kv_why = "num_attention_heads × head_dim", "num_key_value_heads × head_dim"
    top = {
        "model.embed_tokens.weight": ([vocab, hidden], "vocab_size, hidden_size"),
        "lm_head.weight": ([vocab, hidden], "vocab_size, hidden_size"),
        "model.norm.weight": ([hidden], "hidden_size"),
    }
    layer = {
        "self_attn.q_proj.weight": ([q, hidden], f"{q_why}, hidden_size"),
        "self_attn.q_proj.bias": ([q], q_why),
        "self_attn.k_proj.weight": ([kv, hidden], f"{kv_why}, hidden_size"),
        "self_attn.k_proj.bias": ([kv], kv_why),
        "self_attn.v_proj.weight": ([kv, hidden], f"{kv_why}, hidden_size"),
        "self_attn.v_proj.bias": ([kv], kv_why),
        "self_attn.o_proj.weight": ([hidden, q], f"hidden_size, {q_why}"),
        "self_attn.qkv_proj.weight": ([q + 2 * kv, hidden], f"({q_why}) + 2 × ({kv_why}), hidden_size"),
        "self_attn.q_norm.weight": ([head_dim], "head_dim"),
        "self_attn.k_norm.weight": ([head_dim], "head_dim"),
        "mlp.gate_proj.weight": ([inter, hidden], "intermediate_size, hidden_size"),
        "mlp.up_proj.weight": ([inter, hidden], "intermediate_size, hidden_size"),
        "mlp.gate_up_proj.weight": ([2 * inter, hidden], "2 × intermediate_size, hidden_size"),
        "mlp.down_proj.weight": ([hidden, inter], "hidden_size, intermediate_size"),
    }
    norms = ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm", "post_feedforward_layernorm")
    layer.update({f"{norm}.weight": ([hidden], "hidden_size") for norm in norms})
    return top, layer


def check_weight_shapes(tensors: dict[str, dict[str, Any]], details: dict[str, Any]) -> None:
    """Refuse the first known tensor whose shape is not the config's, and layers missing or beyond the count."""
    if details.get("model_type") not in LLAMA_FAMILY:
        return
    top, layer = expected_shapes(details)
    layers = details["num_hidden_layers"]
    seen: set[int] = set()
    for name, entry in sorted(tensors.items()):
        match = _LAYER.fullmatch(name)
        if match:
            index = int(match.group(1))
            if index >= layers:
                raise ShapeMismatch(
                    f"tensor {name!r} belongs to layer {index}, but config.json says num_hidden_layers = {layers} "
                    f"(layers 0 to {layers - 1}); the weights do not match this config"
                )
            seen.add(index)
            expected = layer.get(match.group(2))
        else:
            expected = top.get(name)
        if expected is not None and entry["dtype"] in FLOAT_DTYPES and entry["shape"] != expected[0]:
            shape, why = expected
            raise ShapeMismatch(
                f"tensor {name!r} has shape {entry['shape']} but config.json implies {shape} ({why}); "
                "the weights do not match this config"
            )
    missing = sorted(set(range(layers)) - seen)
    if seen and missing:
        shown = ", ".join(map(str, missing[:8])) + (" ..." if len(missing) > 8 else "")
        raise ShapeMismatch(
            f"config.json says num_hidden_layers = {layers}, but the weights have no tensors for layer(s) {shown}; "
            "upload every shard of the checkpoint"
        )
