"""Attention for compiled one-token decode steps of grouped-query models, without copying the KV cache.

transformers' sdpa attention serves a grouped-query model (Llama-3: 32 query heads on 8 key/value heads) under
torch.compile by `repeat_kv`: every layer, every step, it copies its whole static cache to one key/value head
per query head before calling SDPA (its copy-free path, `pack_gqa`, is switched off while compiling). On the
8B shape that copy and SDPA's kernel took about 20 µs a layer of a 110 µs int4 layer (docs/speed.md).

With one query token the copy is not needed: the query heads that share a key/value head become that head's
query rows, (batch, kv_heads, group, dim), each attended to the shared keys and values; the mask of the one
token broadcasts over the rows. It is written as matmul, masked float32 softmax, matmul (the arithmetic of
transformers' eager attention), which Inductor turns into two small cuBLAS products and one fused softmax: on
the 8B shape that measured 9 µs a layer less than the same grouping through SDPA's kernel, and 11 µs less than
transformers' sdpa with its copy (`python benchmarks/gpu_probe.py --part step` on one H200, docs/speed.md).
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


def query_rows(
    query: torch.Tensor, key: torch.Tensor, attention_mask: torch.Tensor | None, dropout: float = 0.0, softcap=None
) -> torch.Tensor | None:
    """A one-token query (batch, heads, 1, dim) as (batch, kv_heads, group, dim): query head h becomes row
    h % group of key/value head h // group. None where the grouping does not apply: more than one query token,
    no grouped heads, a per-head mask, dropout or a softcap."""
    batch, heads, q_len, dim = query.shape
    kv_heads = key.shape[1]
    per_head_mask = attention_mask is not None and attention_mask.shape[1] != 1
    if q_len != 1 or kv_heads == heads or heads % kv_heads or per_head_mask or dropout or softcap:
        return None
    return query.reshape(batch, kv_heads, heads // kv_heads, dim)


def heads_output(rows_out: torch.Tensor, heads: int) -> torch.Tensor:
    """The attention output of `query_rows` rows, (batch, kv_heads, group, dim), as transformers' attention
    functions return it: (batch, 1, heads, dim)."""
    return rows_out.reshape(rows_out.shape[0], heads, 1, rows_out.shape[-1]).transpose(1, 2).contiguous()


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
    rows = query_rows(query, key, attention_mask, dropout, kwargs.get("softcap"))
    if rows is None:
        return _sdpa_forward()(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    scale = query.shape[-1] ** -0.5 if scaling is None else scaling
    scores = torch.matmul(rows, key.transpose(-1, -2)).float() * scale
    if attention_mask is not None:  # sdpa's mask: True where a position may be attended; or an additive one
        if attention_mask.dtype == torch.bool:
            scores = scores.masked_fill(~attention_mask, float("-inf"))
        else:
            scores = scores + attention_mask
    out = torch.matmul(scores.softmax(dim=-1).to(value.dtype), value)
    return heads_output(out, query.shape[1]), None


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


def attention_label(model: torch.nn.Module) -> str:
    """What a speed result reports under `attention`: the model's attention implementation, spelt out for
    GROUPED_DECODE (which prefills with transformers' sdpa)."""
    name = model.config._attn_implementation
    return f"{GROUPED_DECODE} (decode), sdpa (prefill)" if name == GROUPED_DECODE else name
