"""The per-layer assignment: the cheapest choice of one option per layer whose summed predicted damage stays
within a budget (a multiple-choice knapsack).

Solved exactly on a grid: the budget is cut into `bins` equal units, each option's damage is rounded up to whole
units (so an answer never exceeds the budget as predicted), and a dynamic programme over (layer, units used)
keeps the cheapest cost. A Lagrangian or greedy pick by damage per byte saved only reaches the corners of the
convex hull and can miss the optimum (tests/engine/search/test_solver.py has such a table); the grid costs
layers × bins × options array operations, milliseconds for a few hundred layers.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

DEFAULT_BINS = 4000


@dataclass(frozen=True)
class Option:
    """One way to store one layer: its name (a format), its cost (bytes) and its predicted damage (nats/token)."""

    name: str
    cost: float
    damage: float


Options = Mapping[str, Sequence[Option]]
Assignment = dict[str, str]


def total(options: Options, assignment: Mapping[str, str], field: str) -> float:
    """The summed `cost` or `damage` of an assignment."""
    return sum(getattr(next(o for o in options[layer] if o.name == name), field) for layer, name in assignment.items())


def least_damage(options: Options) -> Assignment:
    """Each layer's least damaging option (the cheapest among equals): the assignment closest to the original."""
    return {layer: min(opts, key=lambda o: (o.damage, o.cost)).name for layer, opts in options.items()}


def cheapest(options: Options) -> Assignment:
    """Each layer's cheapest option (the least damaging among equals), whatever the damage."""
    return {layer: min(opts, key=lambda o: (o.cost, o.damage)).name for layer, opts in options.items()}


def solve(options: Options, budget: float, bins: int = DEFAULT_BINS) -> Assignment | None:
    """The assignment of least total cost whose total damage is at most `budget`; None when even the least
    damaging one exceeds it. Damages are rounded up to multiples of budget / bins (a budget of 0 allows only
    options without damage); a budget that the cheapest assignment fits gets it."""
    if budget < 0:
        raise ValueError(f"the budget must be at least 0, got {budget}")
    least_cost = cheapest(options)
    if total(options, least_cost, "damage") <= budget:
        return least_cost  # the cheapest of all fits: no rounding of damages may take it away
    if budget == 0:
        free = {layer: [o for o in opts if o.damage <= 0] for layer, opts in options.items()}
        if any(not opts for opts in free.values()):
            return None
        return cheapest(free)
    unit = budget / bins
    layers = list(options)
    best = np.zeros(bins + 1)  # best[b]: least cost of the layers so far with at most b units of damage
    choice = np.full((len(layers), bins + 1), -1, dtype=np.int32)
    weights: list[list[int]] = []
    for i, layer in enumerate(layers):
        units = [max(0, math.ceil(o.damage / unit - 1e-6)) for o in options[layer]]  # float noise
        weights.append(units)
        row = np.full(bins + 1, np.inf)
        for j, (option, w) in enumerate(zip(options[layer], units, strict=True)):
            if w > bins:
                continue
            candidate = np.full(bins + 1, np.inf)
            candidate[w:] = best[: bins + 1 - w] + option.cost
            better = candidate < row
            row[better] = candidate[better]
            choice[i, better] = j
        best = row
    if not np.isfinite(best[bins]):
        return None
    assignment: Assignment = {}
    b = bins
    for i in range(len(layers) - 1, -1, -1):
        j = int(choice[i, b])
        assignment[layers[i]] = options[layers[i]][j].name
        b -= weights[i][j]
    return {layer: assignment[layer] for layer in layers}
