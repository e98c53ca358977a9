"""Orchestration shared by the calibrated unstructured pruners (Wanda, SparseGPT).

Layer by layer through `calibration.sequential_layers`: gather a statistic of every targeted Linear's inputs
inside the layer, prune those Linears, advance (the next layer then sees the pruned layer's outputs). Linears
that read the very same tensor (q/k/v, gate/up) share one statistic, and a pruner may take them together.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any, Protocol

import torch

from modelpress.specs import SparseGPTPrune, WandaPrune
from worker.engine.calibrate import fitted_linears, layer_damage, observe_shared, sequential_layers
from worker.engine.prune.masks import sparsity_of
from worker.engine.steps import EngineError, StepContext, StepResult

log = logging.getLogger(__name__)


class InputStatistic(Protocol):
    def add(self, x: torch.Tensor) -> None: ...


NewStatistic = Callable[[torch.nn.Linear], InputStatistic]
PruneLinear = Callable[[torch.nn.Linear, Any, float, tuple[int, int] | None], dict[str, Any]]
PruneShared = Callable[[list[torch.nn.Linear], Any, float, tuple[int, int] | None], list[dict[str, Any]]]
DamageInputs = Callable[[Any], dict[str, torch.Tensor]]  # statistic -> layer_damage's gram= or input_norms=


def model_device(model: torch.nn.Module, context: StepContext) -> torch.device:
    if context.device is not None:
        return torch.device(context.device)
    return next(model.parameters()).device


def prune_sequentially(
    model: torch.nn.Module,
    spec: WandaPrune | SparseGPTPrune,
    context: StepContext,
    new_statistic: NewStatistic,
    prune_linear_: PruneLinear | None = None,
    prune_shared_: PruneShared | None = None,
    damage_inputs: DamageInputs | None = None,
) -> StepResult:
    """Run a calibrated pruner over the targeted Linears of every decoder layer; report per layer.

    The pruner is `prune_linear_(linear, statistic, sparsity, pattern) -> details`, called per Linear, or
    `prune_shared_(linears, statistic, sparsity, pattern) -> [details]`, called once per group of Linears that
    share an input (and so a statistic). Each layer's damage fields (`calibrate.layer_damage`) come from the
    same statistic through `damage_inputs(statistic)` (None: the weight error alone)."""
    if prune_shared_ is None:
        if prune_linear_ is None:
            raise ValueError("prune_sequentially needs prune_linear_ or prune_shared_")
        prune_shared_ = _one_by_one(prune_linear_)
    if context.calibration is None:
        raise EngineError("missing_dataset", f"{spec.key} needs calibration data: add a calibration dataset")
    pattern = spec.pattern.ratio if spec.pattern is not None else None
    sparsity = spec.target_sparsity
    linears = fitted_linears(model, spec)
    layers: list[dict[str, Any]] = []
    seen: set[str] = set()
    for step in sequential_layers(model, context.calibration, model_device(model, context), context.report_progress):
        inside = {n: linear for n, linear in linears.items() if n.startswith(step.name + ".")}
        if not inside:
            continue
        statistics = observe_shared(step, list(inside), lambda n, inside=inside: new_statistic(inside[n]))
        for names in _sharing_groups(statistics):
            group = [inside[n] for n in names]
            statistic = statistics[names[0]]
            originals = [linear.weight.detach().clone() for linear in group]
            damage_from = damage_inputs(statistic) if damage_inputs is not None else {}
            for name, linear, original, details in zip(
                names, group, originals, prune_shared_(group, statistic, sparsity, pattern), strict=True
            ):
                layers.append({"name": name, "shape": list(linear.weight.shape), **details})
                layers[-1]["sparsity"] = sparsity_of(linear.weight)
                layers[-1].update(layer_damage(original, linear.weight, **damage_from))
                seen.add(name)
            del originals
        del statistics
    outside = sorted(set(linears) - seen)
    notes = []
    if outside:
        notes.append(f"{spec.key} prunes Linears inside decoder layers only; left dense: {', '.join(outside)}")
    total = sum(linears[n].weight.numel() for n in seen)
    zeros = sum(int((linears[n].weight == 0).sum()) for n in seen)
    summary = {
        "target_sparsity": sparsity,
        "pattern": spec.pattern.value if spec.pattern is not None else None,
        "layers": len(seen),
        "targeted_parameters": total,
        "sparsity": zeros / total if total else 0.0,
        "calibration_windows": int(context.calibration.shape[0]),
    }
    notes.append("pruned weights are stored dense (zeros kept in the float tensors); sparsity is in the manifest")
    return StepResult(layers=layers, summary=summary, notes=notes, sparsified=sorted(seen))


def _sharing_groups(statistics: dict[str, Any]) -> list[list[str]]:
    """Names grouped by the statistic object they share, in order of first appearance."""
    groups: dict[int, list[str]] = {}
    for name, statistic in statistics.items():
        groups.setdefault(id(statistic), []).append(name)
    return list(groups.values())


def _one_by_one(prune_linear_: PruneLinear) -> PruneShared:
    def prune_shared_(linears, statistic, sparsity, pattern) -> list[dict[str, Any]]:
        return [prune_linear_(linear, statistic, sparsity, pattern) for linear in linears]

    return prune_shared_
