"""Orchestration shared by the calibrated unstructured pruners (Wanda, SparseGPT).

Layer by layer through `calibration.sequential_layers`: gather a statistic of every targeted Linear's inputs
inside the layer, prune those Linears, advance (the next layer then sees the pruned layer's outputs).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any, Protocol

import torch

from worker.engine.calibration import sequential_layers
from worker.engine.errors import EngineError
from worker.engine.pruning_math import parse_pattern, sparsity_of, target_sparsity
from worker.engine.registry import StepContext, StepResult
from worker.engine.targets import select_from_spec

log = logging.getLogger(__name__)


class InputStatistic(Protocol):
    def add(self, x: torch.Tensor) -> None: ...


NewStatistic = Callable[[torch.nn.Linear], InputStatistic]
PruneLinear = Callable[[torch.nn.Linear, Any, float, tuple[int, int] | None], dict[str, Any]]


def model_device(model: torch.nn.Module, context: StepContext) -> torch.device:
    if context.device is not None:
        return torch.device(context.device)
    return next(model.parameters()).device


def prune_sequentially(
    model: torch.nn.Module, context: StepContext, new_statistic: NewStatistic, prune_linear_: PruneLinear
) -> StepResult:
    """Run a calibrated pruner over the targeted Linears of every decoder layer; report per layer."""
    spec, method = context.spec, context.spec.get("method")
    if context.calibration is None:
        raise EngineError("missing_dataset", f"prune:{method} needs calibration data: add a calibration dataset")
    pattern, sparsity = parse_pattern(spec.get("pattern")), target_sparsity(spec)
    linears = select_from_spec(model, spec)
    if not linears:
        raise EngineError("no_targets", f"prune:{method} matched no Linear layer: check 'targets' and 'ignore'")
    for name, linear in linears.items():
        if pattern is not None and linear.in_features % pattern[1]:
            raise EngineError(
                "bad_spec", f"{name} has {linear.in_features} inputs, not a multiple of M={pattern[1]}: ignore it"
            )
    layers: list[dict[str, Any]] = []
    seen: set[str] = set()
    for step in sequential_layers(model, context.calibration, model_device(model, context), context.report_progress):
        inside = {n: linear for n, linear in linears.items() if n.startswith(step.name + ".")}
        if not inside:
            continue
        statistics = {n: new_statistic(linear) for n, linear in inside.items()}
        step.observe({n: stat.add for n, stat in statistics.items()})
        for name, linear in inside.items():
            details = prune_linear_(linear, statistics[name], sparsity, pattern)
            layers.append({"name": name, "shape": list(linear.weight.shape), **details})
            layers[-1]["sparsity"] = sparsity_of(linear.weight)
            seen.add(name)
        del statistics
    outside = sorted(set(linears) - seen)
    notes = []
    if outside:
        notes.append(f"prune:{method} prunes Linears inside decoder layers only; left dense: {', '.join(outside)}")
    total = sum(linears[n].weight.numel() for n in seen)
    zeros = sum(int((linears[n].weight == 0).sum()) for n in seen)
    summary = {
        "target_sparsity": sparsity,
        "pattern": spec.get("pattern"),
        "layers": len(seen),
        "targeted_parameters": total,
        "sparsity": zeros / total if total else 0.0,
        "calibration_windows": int(context.calibration.shape[0]),
    }
    notes.append("pruned weights are stored dense (zeros kept in the float tensors); sparsity is in the manifest")
    return StepResult(layers=layers, summary=summary, notes=notes, sparsified=sorted(seen))
