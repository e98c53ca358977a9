"""The Pareto front of the built candidates: none of the others is at least as good on every axis and better on
one (every axis is minimized: the objective's cost and each measured quality loss).
The dashboard's `paretoFront` (charts.js) spans all jobs and searches of a model, which the engine never sees."""

from __future__ import annotations

from collections.abc import Sequence


def pareto_front(points: Sequence[tuple[float, ...]]) -> list[bool]:
    """For each (cost, loss, …) point, whether it is on the front (duplicates of a front point are on it too)."""
    return [
        not any(_dominates(other, point) for j, other in enumerate(points) if j != i) for i, point in enumerate(points)
    ]


def _dominates(other: tuple[float, ...], point: tuple[float, ...]) -> bool:
    return all(o <= p for o, p in zip(other, point, strict=True)) and any(
        o < p for o, p in zip(other, point, strict=True)
    )
