"""`quantize:rtn`: round-to-nearest weight-only int8 / int4 quantization of the targeted Linear layers.

The step leaves fake-quantized float weights in the model (what the quantized layer computes with) and returns
each layer's scales and zero points; export writes the integers with them (see ct_export).
"""

from __future__ import annotations

import logging

import torch

from worker.engine.ct_export import require_compressed_tensors, storage_format, stored_weight_bytes
from worker.engine.errors import EngineError
from worker.engine.quant_math import fake_quantize, relative_error, rtn_params
from worker.engine.registry import QuantizedWeight, StepContext, StepResult, register
from worker.engine.targets import select_from_spec

log = logging.getLogger(__name__)

BITS = (4, 8)


@torch.no_grad()
def quantize_(weight: torch.Tensor, bits: int, group_size: int | None, symmetric: bool) -> QuantizedWeight:
    """Replace `weight` in place by its round-to-nearest quantized values; return the scales used."""
    scale, zero_point = rtn_params(weight, bits, group_size, symmetric)
    weight.copy_(fake_quantize(weight, scale, zero_point, bits, group_size))
    return QuantizedWeight(scale=scale, zero_point=zero_point, bits=bits, group_size=group_size, symmetric=symmetric)


def _weight_args(spec: dict) -> tuple[int, int | None, bool]:
    weights = spec.get("weights") or {}
    bits, group_size = int(weights.get("bits", 8)), weights.get("group_size")
    if bits not in BITS:
        raise EngineError("bad_spec", f"quantize:rtn supports bits {BITS}, got {bits}")
    return bits, (int(group_size) if group_size is not None else None), bool(weights.get("symmetric", True))


@register("quantize", "rtn")
def rtn_quantize(model: torch.nn.Module, context: StepContext) -> StepResult:
    bits, group_size, symmetric = _weight_args(context.spec)
    require_compressed_tensors()  # the artifact cannot be written without it: fail before the work
    linears = select_from_spec(model, context.spec)
    if not linears:
        raise EngineError("no_targets", "quantize:rtn matched no Linear layer: check 'targets' and 'ignore'")
    for name, linear in linears.items():
        if group_size is not None and linear.in_features % group_size:
            raise EngineError(
                "bad_group_size",
                f"group_size {group_size} does not divide the input width {linear.in_features} of {name}: "
                "choose a group size that divides it, or ignore that layer",
            )
    layers, quantized, before, after = [], {}, 0, 0
    for i, (name, linear) in enumerate(linears.items()):
        original = linear.weight.detach().clone()
        q = quantize_(linear.weight, bits, group_size, symmetric)
        quantized[name] = q
        before += original.numel() * original.element_size()
        after += stored_weight_bytes(tuple(original.shape), q)
        layers.append(
            {
                "name": name,
                "shape": list(original.shape),
                "bits": bits,
                "group_size": group_size,
                "symmetric": symmetric,
                "relative_error": relative_error(original, linear.weight),
                "format": storage_format(q),
            }
        )
        context.report_progress((i + 1) / len(linears), f"quantized {name}")
    errors = [layer["relative_error"] for layer in layers]
    summary = {
        "bits": bits,
        "group_size": group_size,
        "symmetric": symmetric,
        "format": storage_format(next(iter(quantized.values()))),
        "layers": len(layers),
        "targeted_parameters": sum(m.weight.numel() for m in linears.values()),
        "mean_relative_error": sum(errors) / len(errors),
        "max_relative_error": max(errors),
        "targeted_weight_bytes_before": before,
        "targeted_weight_bytes_after": after,
    }
    return StepResult(layers=layers, summary=summary, quantized=quantized)
