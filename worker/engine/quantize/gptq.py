"""`quantize:gptq`: GPTQ weight-only int4 / int8, sequential over decoder layers (see gptq_math for the math).

Each decoder layer's Hessians come from inputs that went through the already quantized earlier layers and, with
`true_sequential` (default), the already quantized earlier Linears of the same layer. `clip_search` (default)
picks each group's range by its Hessian-weighted rounding error; docs/quantization.md gives what each costs and
buys on SmolLM2-135M. A targeted Linear outside the decoder layers (an untied lm_head) has no calibration inputs
here and is rounded to nearest instead, with a note.
"""

from __future__ import annotations

import torch

from modelpress.specs import GPTQQuantize
from worker.engine.calibrate.layerwise import MIN_ROUTED_TOKENS
from worker.engine.load.experts import is_expert_linear
from worker.engine.quantize.common import (
    InputStats,
    quantize_,
    quantize_layers,
    require_calibration,
    targeted_linears,
)
from worker.engine.quantize.gptq_math import gptq_quantize
from worker.engine.steps import QuantizedWeight, StepContext, StepResult, register


@register(GPTQQuantize)
def quantize_gptq(model: torch.nn.Module, spec: GPTQQuantize, context: StepContext) -> StepResult:
    bits, group_size, symmetric = spec.weights.bits, spec.weights.group_size, spec.weights.symmetric
    act_order, block_size, dampening = spec.act_order, spec.block_size, spec.dampening
    true_sequential, clip_search = spec.true_sequential, spec.clip_search
    require_calibration(context, spec.key)
    linears = targeted_linears(model, spec)
    rounded: list[str] = []
    few_tokens: dict[str, int] = {}

    @torch.no_grad()
    def quantize(name: str, linear: torch.nn.Linear, stats: InputStats | None) -> QuantizedWeight:
        if stats is None:
            rounded.append(name)
            return quantize_(linear.weight, bits, group_size, symmetric)
        if is_expert_linear(name) and stats.hessian.count < MIN_ROUTED_TOKENS:  # too few tokens for a Hessian
            few_tokens[name] = stats.hessian.count
            return quantize_(linear.weight, bits, group_size, symmetric)
        weight, scale, zero = gptq_quantize(
            linear.weight,
            stats.gram,
            bits,
            group_size,
            symmetric,
            block_size,
            dampening,
            act_order,
            clip_search=clip_search,
        )
        linear.weight.copy_(weight.to(linear.weight.dtype))
        return QuantizedWeight(
            scale=scale,
            zero_point=zero,
            bits=bits,
            group_size=group_size,
            symmetric=symmetric,
            actorder="static" if act_order else None,
        )

    result = quantize_layers(model, context, linears, quantize, true_sequential=true_sequential)
    result.summary.update(
        {
            "act_order": act_order,
            "block_size": block_size,
            "dampening": dampening,
            "true_sequential": true_sequential,
            "clip_search": clip_search,
        }
    )
    for layer in result.layers:
        if layer["name"] in few_tokens:
            layer["calibration"] = f"rtn: only {few_tokens[layer['name']]} calibration tokens reached this layer"
    if few_tokens:
        result.notes.append(
            f"gptq: {len(few_tokens)} layers read fewer than {MIN_ROUTED_TOKENS} calibration tokens (experts the "
            "router rarely picked) and were rounded to nearest; their per-layer records say so"
        )
    if rounded:
        result.notes.append(f"gptq: {', '.join(rounded)} lie outside the decoder layers and were rounded to nearest")
    return result
