"""`quantize:smoothquant`: SmoothQuant W8A8 (Xiao et al., 2022), sequential over decoder layers.

Per decoder layer, the inputs of the norms' consumers (q/k/v after input_layernorm, gate/up after
post_attention_layernorm; Phi-3's fused qkv_proj and gate_up_proj, each one Linear reading the norm) are
smoothed: s_j = max|X_j|^α / max|W_j|^(1−α) (W over all consumers), folded into
the norm. Then every targeted Linear gets int8 symmetric per-channel weights and dynamic symmetric per-token
int8 input activations, saved as compressed-tensors `int-quantized` (llm-compressor's W8A8 scheme). The model
in memory fake-quantizes the activations too, as compressed-tensors does when transformers runs the artifact.
"""

from __future__ import annotations

import torch

from modelpress.specs import SmoothQuant
from worker.engine.quantize.awq import NORM_FOLDS, fold_checked_, fold_groups, rescale_inputs_
from worker.engine.quantize.common import (
    InputStats,
    LayerGroup,
    attach_activation_quant_,
    quantize_,
    quantize_layers,
    require_calibration,
    targeted_linears,
)
from worker.engine.steps import QuantizedWeight, StepContext, StepResult, register

MIN_SCALE = 1e-5


def smoothing_factors(x_absmax: torch.Tensor, weights: list[torch.Tensor], alpha: float) -> torch.Tensor:
    """s_j = max|X_j|^α / max|W_j|^(1−α), 1 where a channel never fired or has no weight."""
    w_absmax = torch.stack([w.detach().float().abs().amax(dim=0) for w in weights]).amax(dim=0)
    s = x_absmax.float().clamp(min=MIN_SCALE).pow(alpha) / w_absmax.clamp(min=MIN_SCALE).pow(1 - alpha)
    dead = (x_absmax == 0) | (w_absmax == 0)
    return torch.where(dead, torch.ones_like(s), s.clamp(min=MIN_SCALE))


@register(SmoothQuant)
def quantize_smoothquant(model: torch.nn.Module, spec: SmoothQuant, context: StepContext) -> StepResult:
    alpha = spec.alpha
    require_calibration(context, spec.key)
    linears = targeted_linears(model, spec)
    smoothed: set[str] = set()

    def prepare(group: LayerGroup) -> None:
        for site in fold_groups(group, NORM_FOLDS):
            consumers = site.consumers
            weights = [group.linears[c].weight for c in consumers]
            s = smoothing_factors(group.stats[consumers[0]].abs_max, weights, alpha)
            s = s.to(weights[0].dtype).float()  # the factors as folding applies them in the model's dtype
            if fold_checked_(site, [group.linears[c] for c in consumers], s):
                rescale_inputs_(group, consumers, s)
                smoothed.update(consumers)

    @torch.no_grad()
    def quantize(name: str, linear: torch.nn.Linear, stats: InputStats | None) -> QuantizedWeight:
        q = quantize_(linear.weight, 8, None, True)
        attach_activation_quant_(linear, "int8")
        return QuantizedWeight(
            scale=q.scale, zero_point=None, bits=8, group_size=None, symmetric=True, activations="int8"
        )

    result = quantize_layers(model, context, linears, quantize, prepare)
    for layer in result.layers:
        layer["smoothed"] = layer["name"] in smoothed
    result.summary.update({"alpha": alpha, "smoothed_layers": len(smoothed)})
    result.notes.append(
        "smoothquant: int8 weights per channel and int8 activations per token (dynamic); the report's "
        "output_error counts the weight rounding only"
    )
    return result
