"""`quantize:rtn`: round-to-nearest weight-only int8 / int4 quantization, per channel or per group."""

from __future__ import annotations

import torch

from worker.engine.quantize.common import quantize_, quantize_layers, targeted_linears, weight_args
from worker.engine.steps import StepContext, StepResult, register


@register("quantize", "rtn")
def rtn_quantize(model: torch.nn.Module, context: StepContext) -> StepResult:
    bits, group_size, symmetric = weight_args(context.spec, "rtn")
    linears = targeted_linears(model, context.spec, "rtn", group_size)
    return quantize_layers(
        model, context, linears, lambda _name, linear, _stats: quantize_(linear.weight, bits, group_size, symmetric)
    )
