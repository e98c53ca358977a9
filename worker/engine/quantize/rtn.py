"""`quantize:rtn`: round-to-nearest weight-only int8 / int4 quantization, per channel or per group."""

from __future__ import annotations

import torch

from modelpress.specs import RTNQuantize
from worker.engine.quantize.common import quantize_, quantize_layers, targeted_linears
from worker.engine.steps import StepContext, StepResult, register


@register(RTNQuantize)
def quantize_rtn(model: torch.nn.Module, spec: RTNQuantize, context: StepContext) -> StepResult:
    bits, group_size, symmetric = spec.weights.bits, spec.weights.group_size, spec.weights.symmetric
    linears = targeted_linears(model, spec)
    return quantize_layers(
        model,
        context,
        linears,
        lambda _name, linear, _stats: quantize_(linear.weight, bits, group_size, symmetric),
        uses_stats=False,
    )
