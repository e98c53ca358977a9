"""`quantize:fp8`: FP8 E4M3 weights, one scale per output channel (absmax / 448), and dynamic per-token FP8
activation scales computed at run time (compressed-tensors `float-quantized`, llm-compressor's FP8_DYNAMIC).
Needs no calibration; with calibration data the report adds each layer's output error."""

from __future__ import annotations

import torch

from worker.engine.quant_math import fp8_fake_quantize, fp8_params
from worker.engine.quantization import attach_activation_quant_, quantize_layers, targeted_linears
from worker.engine.registry import QuantizedWeight, StepContext, StepResult, register


@torch.no_grad()
def fp8_quantize_(linear: torch.nn.Linear) -> QuantizedWeight:
    """E4M3 weights in place (per-channel scales) and per-token FP8 inputs from now on."""
    scale = fp8_params(linear.weight)
    linear.weight.copy_(fp8_fake_quantize(linear.weight, scale))
    attach_activation_quant_(linear, "fp8")
    return QuantizedWeight(
        scale=scale, zero_point=None, bits=8, group_size=None, symmetric=True, kind="float", activations="fp8"
    )


@register("quantize", "fp8")
def fp8_quantize(model: torch.nn.Module, context: StepContext) -> StepResult:
    linears = targeted_linears(model, context.spec, "fp8")
    result = quantize_layers(model, context, linears, lambda _name, linear, _stats: fp8_quantize_(linear))
    result.notes.append(
        "fp8: weights E4M3 per output channel, activations quantized to E4M3 per token at run time; the report's "
        "output_error counts the weight rounding only"
    )
    return result
