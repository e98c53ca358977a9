"""`quantize:awq`: activation-aware weight quantization (Lin et al., 2023), sequential over decoder layers.

In each decoder layer, for each (producer → consumers) pair below whose consumers are all targeted, search
α ∈ [0, 1] (`grid` points) for per-channel scales s = mean|x|^α (or, with `duo_scaling`, AutoAWQ's and
llm-compressor's s = mean|x|^α / (mean|Ŵ|^(1−α) + 1e-4), Ŵ the weights relative to their group's range; "both"
tries both families) that minimize the consumers' output error with quantized weights, then fold s into the
model (producer outputs ÷ s, consumer input columns × s: the same function before quantization). Then
each targeted Linear's weight range is clipped per group by a searched ratio and rounded to nearest. A targeted
Linear outside the decoder layers is rounded to nearest, with a note. Phi-3 fuses q/k/v into qkv_proj and gate/up
into gate_up_proj: the norms fold into each fused Linear whole, v → o into qkv_proj's value rows only and
up → down into gate_up_proj's up rows only (down_proj reads up · act(gate)).

The output error is computed from the consumers' input Gram matrix by default (`loss: "gram"`); with
`loss: "block"` the two norm folds are scored, as AutoAWQ and llm-compressor do, on the output of the module
holding the consumers (self_attn, mlp) over the cached calibration windows (awq_block.py).
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch

from modelpress.specs import AWQQuantize
from worker.engine.quantize.awq_block import block_loss, containing_module
from worker.engine.quantize.awq_math import (
    clip_search,
    expand_scales,
    fold_scales_,
    per_producer_channel,
    scale_candidates,
    scale_inputs_,
    scaled_error,
    search_scales,
    weight_means,
)
from worker.engine.quantize.common import (
    InputStats,
    LayerGroup,
    quantize_,
    quantize_layers,
    require_calibration,
    targeted_linears,
)
from worker.engine.quantize.quant_math import fake_quantize
from worker.engine.steps import QuantizedWeight, StepContext, StepResult, register

log = logging.getLogger(__name__)


def _value_rows(layer: torch.nn.Module) -> slice:
    """Phi-3's qkv_proj stacks q | k | v rows; o_proj reads the attention over v (q's width, heads repeated)."""
    fused, q_width = layer.self_attn.qkv_proj.out_features, layer.self_attn.o_proj.in_features
    return slice(q_width + (fused - q_width) // 2, fused)


def _up_rows(layer: torch.nn.Module) -> slice:
    """Phi-3's gate_up_proj stacks gate | up rows; down_proj reads up · act(gate), linear in the up half only."""
    width = layer.mlp.down_proj.in_features
    return slice(width, 2 * width)


@dataclass(frozen=True)
class Fold:
    """A producer whose output (or the `rows` of it, in a fused projection) the consumers read linearly."""

    producer: str
    consumers: tuple[str, ...]
    rows: Callable[[torch.nn.Module], slice] | None = None


FOLDS = (  # by name inside a decoder layer, in AWQ's order: the Llama layout, then Phi-3's fused projections
    Fold("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
    Fold("self_attn.v_proj", ("self_attn.o_proj",)),
    Fold("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj")),
    Fold("mlp.up_proj", ("mlp.down_proj",)),
    Fold("input_layernorm", ("self_attn.qkv_proj",)),
    Fold("self_attn.qkv_proj", ("self_attn.o_proj",), _value_rows),
    Fold("post_attention_layernorm", ("mlp.gate_up_proj",)),
    Fold("mlp.gate_up_proj", ("mlp.down_proj",), _up_rows),
)
NORM_FOLDS = tuple(f for f in FOLDS if f.producer.endswith("layernorm"))  # SmoothQuant smooths only these


@dataclass(frozen=True)
class FoldSite:
    """A fold found in one layer: the producer module, the consumers' full names, the head size when the
    consumers read repeated heads, and the producer's output rows the consumers read (None: all)."""

    producer: torch.nn.Module
    consumers: list[str]
    head_dim: int | None
    rows: slice | None

    @property
    def features(self) -> int:
        """How many of the producer's output channels the consumers read."""
        if self.rows is not None:
            return self.rows.stop - self.rows.start
        if isinstance(self.producer, torch.nn.Linear):
            return self.producer.out_features
        return self.producer.weight.numel()


def _mlp_input_norm(layer: torch.nn.Module, producer_name: str) -> str:
    """Gemma 2 and 3 normalize the attention output with `post_attention_layernorm` and the MLP input with
    `pre_feedforward_layernorm`: there the latter is what produces gate/up's input."""
    if producer_name == "post_attention_layernorm" and hasattr(layer, "pre_feedforward_layernorm"):
        return "pre_feedforward_layernorm"
    return producer_name


def fold_groups(group: LayerGroup, folds=FOLDS) -> list[FoldSite]:
    """The folds that apply here: every module exists, every consumer is targeted, and the shapes line up."""
    found = []
    layer = group.step.layer
    for fold in folds:
        producer_name = _mlp_input_norm(layer, fold.producer)
        try:
            producer = layer.get_submodule(producer_name)
        except AttributeError:
            continue
        consumers = [f"{group.step.name}.{c}" for c in fold.consumers]
        if not all(c in group.linears for c in consumers):
            continue
        head_dim, rows = None, fold.rows(layer) if fold.rows else None
        if isinstance(producer, torch.nn.Linear):
            site = FoldSite(producer, consumers, None, rows)
            width, features = group.linears[consumers[0]].in_features, site.features
            if width != features:
                head_dim = getattr(layer.get_submodule(producer_name.rsplit(".", 1)[0]), "head_dim", None)
                if head_dim is None or width % features or features % head_dim:
                    continue
        found.append(FoldSite(producer, consumers, head_dim, rows))
    return found


@torch.no_grad()
def fold_checked_(site: FoldSite, consumers: list[torch.nn.Linear], s: torch.Tensor) -> bool:
    """Fold s; for a norm, first check on a random input that its output really scales by 1/s (a norm that
    computes x · (1 + weight) would not), and leave everything untouched when it does not. The check allows
    the rounding of the norm's dtype (bf16 models)."""
    producer = site.producer
    if not isinstance(producer, torch.nn.Linear):
        dtype = producer.weight.dtype
        probe = torch.randn(4, s.numel(), dtype=dtype, device=producer.weight.device)
        before = producer(probe).float()
        fold_scales_(producer, [], s)
        rtol = max(1e-4, 4 * torch.finfo(dtype).eps)  # bf16 weights and outputs are rounded: 2⁻⁸ each
        if not torch.allclose((producer(probe) * s).float(), before, rtol=rtol, atol=1e-5):
            fold_scales_(producer, [], 1 / s)
            return False
        scale_inputs_(consumers, s, site.head_dim)
        return True
    fold_scales_(producer, consumers, s, site.head_dim, site.rows)
    return True


def rescale_inputs_(group: LayerGroup, consumers: list[str], factors: torch.Tensor) -> None:
    """The consumers now read x / factors: update their (possibly shared) statistics once each."""
    for stats in {id(group.stats[c]): group.stats[c] for c in consumers}.values():
        stats.rescale_(factors)


WeightArgsOf = Callable[[str], "tuple[int, int | None, bool] | None"]  # (bits, group_size, symmetric) or None


def fold_awq_scales_(
    group: LayerGroup,
    spec: AWQQuantize,
    args_of: WeightArgsOf,
    notes: list[str],
    untouched: tuple[torch.nn.Module, ...] = (),
) -> dict[str, dict]:
    """Search and fold AWQ's scales into every fold site of one decoder layer; returns each scaled consumer's
    record. A site applies when all its consumers are in `group.linears` and its producer is not one of the
    `untouched` modules. `args_of(name)` gives the int format a consumer will be rounded to, or None for one
    that is not rounded to int (fp8): it takes the fold (it computes the same function) but adds nothing to the
    loss, and a site with no int consumer is left alone. Consumers of one site may have different formats (a
    search's mixed assignment): the Gram loss sums each one's error in its own format; the block loss needs one
    format for the whole site and falls back to the Gram loss otherwise."""
    candidates = scale_candidates(spec.grid, spec.duo_scaling)
    chosen: dict[str, dict] = {}
    for site in fold_groups(group):
        producer, consumers, head_dim = site.producer, site.consumers, site.head_dim
        rounded = [c for c in consumers if args_of(c) is not None]
        if not rounded or any(producer is module for module in untouched):
            continue
        stats = group.stats[consumers[0]]
        weights = [group.linears[c].weight for c in rounded]
        formats = {args_of(c) for c in rounded}
        # o_proj may read each value head several times: one scale per value channel
        features = weights[0].shape[1] if head_dim is None else site.features
        x_mean = per_producer_channel(stats.abs_mean, features, head_dim)
        w_mean = per_producer_channel(weight_means(weights, args_of(rounded[0])[1]), features, head_dim)
        # v → o and up → down: the module holding the one consumer outputs what the Gram loss measures
        uniform = len(formats) == 1 and len(rounded) == len(consumers)
        block = spec.loss.value == "block" and uniform and not isinstance(producer, torch.nn.Linear)
        if block:
            module = containing_module(group.step, consumers)
            score = block_loss(group.step, module, [group.linears[c] for c in consumers], *args_of(rounded[0]))
        else:
            score = functools.partial(
                _mixed_error, [(w, args_of(c)) for w, c in zip(weights, rounded, strict=True)], stats.gram, spec
            )
        s, alpha, duo, loss, plain = search_scales(score, weights[0].shape[1], x_mean, w_mean, candidates, head_dim)
        s = s.to(weights[0].dtype).float()  # the scales as folding applies them in the model's dtype
        if not fold_checked_(site, [group.linears[c] for c in consumers], s):
            notes.append(f"awq: {type(producer).__name__} does not scale linearly; its consumers kept s = 1")
            continue
        rescale_inputs_(group, consumers, expand_scales(s, weights[0].shape[1], head_dim))
        for c in rounded:
            chosen[c] = {
                "awq_alpha": alpha,
                "awq_duo": duo,
                "awq_loss": "block" if block else "gram",
                "awq_loss_vs_rtn": loss / plain if plain > 0 else None,
            }
    return chosen


def _mixed_error(weighted: list, gram: torch.Tensor, spec: AWQQuantize, s: torch.Tensor) -> float:
    """The Gram loss summed over consumers that may each have their own (bits, group_size, symmetric)."""
    return sum(scaled_error([w], gram, s, *args, clipped=spec.clipped_search) for w, args in weighted)


@torch.no_grad()
def awq_round_(
    linear: torch.nn.Linear, stats: InputStats, bits: int, group_size: int | None, symmetric: bool
) -> QuantizedWeight:
    """AWQ's final rounding of one (already scaled) Linear: its weight range clipped per group by the searched
    ratio, then rounded to nearest, in place."""
    scale, zero = clip_search(linear.weight, stats.gram, bits, group_size, symmetric)
    linear.weight.copy_(fake_quantize(linear.weight.float(), scale, zero, bits, group_size))
    return QuantizedWeight(scale=scale, zero_point=zero, bits=bits, group_size=group_size, symmetric=symmetric)


@register(AWQQuantize)
def quantize_awq(model: torch.nn.Module, spec: AWQQuantize, context: StepContext) -> StepResult:
    bits, group_size, symmetric = spec.weights.bits, spec.weights.group_size, spec.weights.symmetric
    require_calibration(context, spec.key)
    linears = targeted_linears(model, spec)
    chosen: dict[str, dict] = {}
    notes: list[str] = []

    def prepare(group: LayerGroup) -> None:
        chosen.update(fold_awq_scales_(group, spec, lambda name: (bits, group_size, symmetric), notes))

    def quantize(name: str, linear: torch.nn.Linear, stats: InputStats | None) -> QuantizedWeight:
        if stats is None:
            notes.append(f"awq: {name} lies outside the decoder layers and was rounded to nearest")
            return quantize_(linear.weight, bits, group_size, symmetric)
        return awq_round_(linear, stats, bits, group_size, symmetric)

    result = quantize_layers(model, context, linears, quantize, prepare, true_sequential=spec.true_sequential)
    for layer in result.layers:
        unscaled = {"awq_alpha": None, "awq_duo": None, "awq_loss": None, "awq_loss_vs_rtn": None}
        layer.update(chosen.get(layer["name"], unscaled))
    result.summary.update(
        {
            "grid": spec.grid,
            "duo_scaling": spec.duo_scaling,
            "loss": spec.loss.value,
            "true_sequential": spec.true_sequential,
            "clipped_search": spec.clipped_search,
            "scaled_layers": len(chosen),
        }
    )
    result.notes.extend(dict.fromkeys(notes))
    return result
