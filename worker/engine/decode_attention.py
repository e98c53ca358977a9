"""Attention for compiled one-token decode steps of grouped-query models, without copying the KV cache.

transformers' sdpa attention serves a grouped-query model (Llama-3: 32 query heads on 8 key/value heads) under
torch.compile by `repeat_kv`: every layer, every step, it copies its whole static cache to one key/value head
per query head before calling SDPA (its copy-free path, `pack_gqa`, is switched off while compiling). On the
8B shape that copy and SDPA's kernel took about 20 µs a layer of a 110 µs int4 layer (benchmarks/gpu.md).

With one query token the copy is not needed: the query heads that share a key/value head become that head's
query rows, (batch, kv_heads, group, dim), each attended to the shared keys and values; the mask of the one
token broadcasts over the rows. It is written as matmul, masked float32 softmax, matmul (the arithmetic of
transformers' eager attention), which Inductor turns into two small cuBLAS products and one fused softmax: on
the 8B shape that measured 9 µs a layer less than the same grouping through SDPA's kernel, and 11 µs less than
transformers' sdpa with its copy (`python benchmarks/gpu_probe.py --part step`, benchmarks/gpu.md, session 6).
Anything else (prefill, a model without grouped heads, a per-head mask) goes to transformers' own sdpa.

`use_grouped_decode_attention_(model)` switches a loaded model to it; the speed measurement (evaluation.py and
benchmarks/gpu_speed.py) does so for the baseline and the optimized model alike.
"""

from __future__ import annotations

import torch

GROUPED_DECODE = "modelpress_grouped_decode"


def _sdpa_forward():
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    return sdpa_attention_forward


def grouped_decode_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """transformers' attention-function signature: query (batch, heads, q_len, dim), key and value
    (batch, kv_heads, kv_len, dim); returns (batch, q_len, heads, dim) and no weights."""
    batch, heads, q_len, dim = query.shape
    kv_heads = key.shape[1]
    per_head_mask = attention_mask is not None and attention_mask.shape[1] != 1
    if q_len != 1 or kv_heads == heads or heads % kv_heads or per_head_mask or dropout or kwargs.get("softcap"):
        return _sdpa_forward()(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    rows = query.reshape(batch, kv_heads, heads // kv_heads, dim)  # query head h: kv head h // group, row h % group
    scores = torch.matmul(rows, key.transpose(-1, -2)).float() * (dim**-0.5 if scaling is None else scaling)
    if attention_mask is not None:  # sdpa's mask: True where a position may be attended; or an additive one
        if attention_mask.dtype == torch.bool:
            scores = scores.masked_fill(~attention_mask, float("-inf"))
        else:
            scores = scores + attention_mask
    out = torch.matmul(scores.softmax(dim=-1).to(value.dtype), value)
    return out.reshape(batch, heads, 1, value.shape[-1]).transpose(1, 2).contiguous(), None


def register() -> None:
    """Make GROUPED_DECODE a name transformers' attention and mask dispatch know (idempotent)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    AttentionInterface.register(GROUPED_DECODE, grouped_decode_attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(GROUPED_DECODE, sdpa_mask)


def use_grouped_decode_attention_(model: torch.nn.Module) -> bool:
    """Switch a transformers model that uses sdpa attention to GROUPED_DECODE; False (and nothing changed)
    for any other attention implementation, or a model with as many key/value heads as query heads."""
    config = getattr(model, "config", None)
    if config is None or getattr(config, "_attn_implementation", None) != "sdpa":
        return False
    heads = getattr(config, "num_attention_heads", None)
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    if not heads or kv_heads == heads:
        return False
    register()
    try:
        model.set_attn_implementation(GROUPED_DECODE)
    except (ValueError, AttributeError):  # a model class that does not take registered attention functions
        return False
    return True
