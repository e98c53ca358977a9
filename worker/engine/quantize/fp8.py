"""`quantize:fp8`: FP8 E4M3 weights, one scale per output channel (absmax / 448), and dynamic per-token FP8
activation scales computed at run time (compressed-tensors `float-quantized`, llm-compressor's FP8_DYNAMIC).

Weights are rounded to nearest by default (no calibration needed; with calibration data the report adds each
layer's output error). With `gptq: true` they are rounded by GPTQ's column loop on the E4M3 grid instead, each
column's rounding error compensated on the columns still to come (as llm-compressor's GPTQ does for FP8): on a
small model the 3-bit mantissa costs more than on an 8B one, and this wins part of it back.
"""

from __future__ import annotations

import torch

from modelpress.specs import FP8Quantize
from worker.engine.quantize.common import (
    InputStats,
    attach_activation_quant_,
    quantize_layers,
    require_calibration,
    targeted_linears,
)
from worker.engine.quantize.gptq_math import gptq_quantize
from worker.engine.quantize.quant_math import fp8_fake_quantize, fp8_params
from worker.engine.steps import QuantizedWeight, StepContext, StepResult, register


@torch.no_grad()
def fp8_quantize_(linear: torch.nn.Linear, stats: InputStats | None = None) -> QuantizedWeight:
    """E4M3 weights in place (per-channel scales; GPTQ rounding when input statistics are given) and per-token
    FP8 inputs from now on."""
    if stats is None:
        scale = fp8_params(linear.weight)
        linear.weight.copy_(fp8_fake_quantize(linear.weight, scale))
    else:
        weight, scale, _ = gptq_quantize(linear.weight, stats.gram, 8, None, True, kind="float")
        linear.weight.copy_(weight.to(linear.weight.dtype))
    attach_activation_quant_(linear, "fp8")
    return QuantizedWeight(
        scale=scale, zero_point=None, bits=8, group_size=None, symmetric=True, kind="float", activations="fp8"
    )


@register(FP8Quantize)
def quantize_fp8(model: torch.nn.Module, spec: FP8Quantize, context: StepContext) -> StepResult:
    use_gptq = spec.gptq
    if use_gptq:
        require_calibration(context, f"{spec.key} with gptq")
    linears = targeted_linears(model, spec)
    rounded: list[str] = []

    def quantize(name: str, linear: torch.nn.Linear, stats: InputStats | None) -> QuantizedWeight:
        if use_gptq and stats is None:
            rounded.append(name)
        return fp8_quantize_(linear, stats if use_gptq else None)

    result = quantize_layers(model, context, linears, quantize, uses_stats=use_gptq)
    result.summary["gptq"] = use_gptq
    result.notes.append(
        "fp8: weights E4M3 per output channel"
        + (" rounded by GPTQ on calibration data" if use_gptq else " rounded to nearest")
        + ", activations quantized to E4M3 per token at run time; the report's output_error counts the weight "
        "rounding only"
    )
    if rounded:
        result.notes.append(f"fp8: {', '.join(rounded)} lie outside the decoder layers and were rounded to nearest")
    return result
