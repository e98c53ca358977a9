"""`prune:magnitude`: unstructured or N:M magnitude pruning of the targeted Linear layers (zeroed in place)."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable

import torch

from worker.engine.calibrate.targets import select_from_spec
from worker.engine.prune.masks import (
    global_masks,
    layer_mask,
    nm_mask,
    parse_pattern,
    row_mask,
    sparsity_of,
    target_sparsity,
)
from worker.engine.steps import EngineError, StepContext, StepResult, register

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


@register("prune", "magnitude")
def magnitude_prune(model: torch.nn.Module, context: StepContext) -> StepResult:
    spec = context.spec
    pattern, scope = parse_pattern(spec.get("pattern")), spec.get("scope", "row")
    sparsity = target_sparsity(spec)
    if pattern is not None and scope != "row":
        raise EngineError("bad_spec", 'an N:M pattern is chosen within each row: leave "scope" at "row"')
    if not 0.0 < sparsity < 1.0:
        raise EngineError("bad_spec", f"sparsity must be in (0, 1), got {sparsity}")
    if scope not in SCOPES:
        raise EngineError("bad_spec", f"scope {scope!r} is not one of {sorted(SCOPES)}")
    linears = select_from_spec(model, spec)
    if not linears:
        raise EngineError("no_targets", "prune:magnitude matched no Linear layer: check 'targets' and 'ignore'")
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
            prune_(weight, keep)
            layers.append({"name": name, "shape": list(weight.shape), "sparsity": sparsity_of(weight)})
            context.report_progress((i + 1) / len(names), f"pruned {name}")
    total = sum(linears[n].weight.numel() for n in names)
    zeros = sum(round(layer["sparsity"] * linears[layer["name"]].weight.numel()) for layer in layers)
    dense_bytes = sum(linears[n].weight.numel() * linears[n].weight.element_size() for n in names)
    summary = {
        "scope": scope,
        "pattern": spec.get("pattern"),
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
