"""The Pareto front of the built candidates: none of the others is at least as good on both axes and better
on one (both axes are minimized: the objective's cost and the measured quality loss).
The dashboard's `paretoFront` (charts.js) spans all jobs and searches of a model, which the engine never sees."""

from __future__ import annotations

from collections.abc import Sequence


def pareto_front(points: Sequence[tuple[float, float]]) -> list[bool]:
    """For each (cost, loss) point, whether it is on the front (duplicates of a front point are on it too)."""
    return [
        not any((oc <= c and ol <= loss) and (oc < c or ol < loss) for j, (oc, ol) in enumerate(points) if j != i)
        for i, (c, loss) in enumerate(points)
    ]
