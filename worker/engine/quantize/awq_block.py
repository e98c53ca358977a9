"""AWQ's scale-search loss on the output of the module that holds the consumers, as AutoAWQ and llm-compressor
measure it: for input_layernorm → q/k/v the output of `self_attn` (softmax and the float o_proj included), for
post_attention_layernorm → gate/up the output of `mlp` (the float down_proj included).

The Gram loss (awq_math.scaled_error) sees each consumer alone and linearly; this one sees how the rounding
errors of the consumers combine through the module's nonlinearity, at the price of running the module over
every calibration window for every candidate scale. The layer runs only until the module has returned.

Memory: the module's float outputs are kept for every window (windows × tokens × hidden in the model's dtype:
64 × 512 × 576 bf16 is 36 MiB for SmolLM2-135M, 64 × 512 × 4096 bf16 is 256 MiB at 8B).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from worker.engine.calibrate.layerwise import LayerPass
from worker.engine.quantize.awq_math import scaled_rtn


class _Returned(Exception):
    """Raised by the output hook once the module has returned: the rest of the decoder layer is not needed."""


@torch.no_grad()
def each_module_output(step: LayerPass, module: torch.nn.Module, fn: Callable[[torch.Tensor], None]) -> None:
    """Call fn(module output) for every calibration window in order, stopping each layer run there."""

    def hook(_module: torch.nn.Module, _args: tuple, output) -> None:
        fn(output[0] if isinstance(output, tuple) else output)  # attention returns (output, weights)
        raise _Returned

    handle = module.register_forward_hook(hook)
    try:
        for hidden in step.inputs():
            try:
                step.layer(hidden, **step.kwargs)
            except _Returned:
                continue
            raise RuntimeError(f"{type(module).__name__} did not run in the decoder layer {step.name}")
    finally:
        handle.remove()


def containing_module(step: LayerPass, consumers: list[str]) -> torch.nn.Module:
    """The module whose children the consumers (full names, such as "model.layers.3.self_attn.q_proj") are."""
    parents = {name.rsplit(".", 1)[0] for name in consumers}
    if len(parents) != 1 or not next(iter(parents)).startswith(step.name + "."):
        raise ValueError(f"{consumers} do not share one parent module inside {step.name}")
    return step.layer.get_submodule(parents.pop().removeprefix(step.name + "."))


@torch.no_grad()
def block_loss(
    step: LayerPass,
    module: torch.nn.Module,
    consumers: list[torch.nn.Linear],
    bits: int,
    group_size: int | None,
    symmetric: bool,
) -> Callable[[torch.Tensor], float]:
    """A loss for awq_math.search_scales: for scales s over the consumers' inputs, the summed squared difference
    between `module`'s output with each consumer's weight set to Q(W · s) / s and its output with the current
    float weights (computed here, once). Each call puts the float weights back exactly before it returns."""
    reference: list[torch.Tensor] = []
    each_module_output(step, module, lambda out: reference.append(out.detach().clone()))
    originals = [consumer.weight.detach().clone() for consumer in consumers]

    @torch.no_grad()
    def loss(s: torch.Tensor) -> float:
        total = torch.zeros((), dtype=torch.float64, device=originals[0].device)
        expected = iter(reference)

        def add(out: torch.Tensor) -> None:
            total.add_((out.float() - next(expected).float()).pow(2).sum())

        try:
            for consumer, weight in zip(consumers, originals, strict=True):
                consumer.weight.copy_(scaled_rtn(weight, s, bits, group_size, symmetric))
            each_module_output(step, module, add)
        finally:
            for consumer, weight in zip(consumers, originals, strict=True):
                consumer.weight.copy_(weight)
        return float(total)

    return loss
