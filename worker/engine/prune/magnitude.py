"""`prune:magnitude`: unstructured or N:M magnitude pruning of the targeted Linear layers (zeroed in place)."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable

import torch

from modelpress.specs import MagnitudePrune
from worker.engine.calibrate import fitted_linears, layer_damage
from worker.engine.prune.masks import global_masks, layer_mask, nm_mask, row_mask, sparsity_of
from worker.engine.steps import StepContext, StepResult, register

log = logging.getLogger(__name__)

MaskFn = Callable[[list[torch.Tensor], float], Iterable[torch.Tensor]]

SCOPES: dict[str, MaskFn] = {  # row and layer masks are made lazily, one layer at a time
    "row": lambda weights, sparsity: (row_mask(w, sparsity) for w in weights),
    "layer": lambda weights, sparsity: (layer_mask(w, sparsity) for w in weights),
    "global": global_masks,
}


@torch.no_grad()
def prune_(weight: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Zero the weights where `keep` is False, in place."""
    return weight.mul_(keep.to(weight.dtype))


@register(MagnitudePrune)
def prune_magnitude(model: torch.nn.Module, spec: MagnitudePrune, context: StepContext) -> StepResult:
    pattern = spec.pattern.ratio if spec.pattern is not None else None
    scope, sparsity = spec.scope.value, spec.target_sparsity
    linears = fitted_linears(model, spec)
    names = list(linears)
    with torch.no_grad():
        weights = [linears[n].weight for n in names]
        if pattern is not None:
            masks = (nm_mask(w.abs(), *pattern) for w in weights)
        else:
            masks = SCOPES[scope](weights, sparsity)
        layers = []
        for i, (name, keep) in enumerate(zip(names, masks, strict=True)):
            weight = linears[name].weight
            original = weight.detach().clone()
            prune_(weight, keep)
            record = {"name": name, "shape": list(weight.shape), "sparsity": sparsity_of(weight)}
            layers.append({**record, **layer_damage(original, weight)})  # no calibration statistics: weight error
            del original
            context.report_progress((i + 1) / len(names), f"pruned {name}")
    total = sum(linears[n].weight.numel() for n in names)
    zeros = sum(round(layer["sparsity"] * linears[layer["name"]].weight.numel()) for layer in layers)
    dense_bytes = sum(linears[n].weight.numel() * linears[n].weight.element_size() for n in names)
    summary = {
        "scope": scope,
        "pattern": spec.pattern.value if spec.pattern is not None else None,
        "target_sparsity": sparsity,
        "layers": len(names),
        "targeted_parameters": total,
        "sparsity": zeros / total,
        "mean_layer_sparsity": sum(layer["sparsity"] for layer in layers) / len(layers),
        "targeted_weight_bytes_before": dense_bytes,
        "targeted_weight_bytes_after": dense_bytes,
    }
    note = "pruned weights are stored dense (zeros kept in the float tensors); sparsity is in the manifest"
    return StepResult(layers=layers, summary=summary, notes=[note], sparsified=names)
