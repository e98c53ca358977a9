"""The candidate loop of one family: which assignments to build, in which order, and when to stop.

The solver gives the cheapest assignment whose predicted damage (mean NLL increase, nats per token) fits a target,
first the budget itself (with only a task limit, the cheapest assignment's predicted damage). Each built candidate
is measured, and the next target is read off the measured against predicted damage of the candidates built so far
(the sensitivity rounds to nearest and assumes layers add up; the build rounds with GPTQ and layers interact):
interpolated between the best candidate that met the budget and the least damaged one above it that missed, or
scaled by the measured over predicted damage of the one nearest the budget while only one side is known (see
`budget`). When the next target gives an assignment already built, the target is bisected between the best
candidate that met the budget and the cheapest that missed it; the loop ends when that repeats too, or at
`max_candidates`. Every method in the space is tried on the first assignment; the best measured one builds the
rest. Building and measuring is the caller's (`build`): the loop only proposes.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from modelpress.specs import SearchMethod, SearchPruning
from worker.engine.search import candidates as cand
from worker.engine.search.budget import Budget
from worker.engine.search.solver import Options, cheapest, least_damage, solve, total


@dataclass(frozen=True)
class Plan:
    """One candidate to build: its method and assignment, and the target its assignment was solved for."""

    key: str
    method: SearchMethod
    assignment: dict[str, str]
    predicted: float  # summed predicted damage, nats per token
    target: float


Build = Callable[[int, Plan], dict]  # (its number in the family, the plan) -> the measured record


def explore(
    options: Options,
    methods: Sequence[SearchMethod],
    budget: Budget,
    max_candidates: int,
    build: Build,
    pruning: SearchPruning | None = None,
) -> list[dict]:
    """One family's candidates, each built and measured by `build`, in the order they were built."""
    records: list[dict] = []
    methods = list(methods)
    limit = min(budget.nats.values(), default=None)
    ceiling = total(options, cheapest(options), "damage")  # no target above it buys anything
    target, tried_targets = (ceiling if limit is None else limit), set()
    for _ in range(4 * max_candidates):  # every pass builds one or stops; bounded all the same
        if len(records) >= max_candidates:
            break
        assignment = solve(options, target)
        feasible = assignment is not None
        assignment = assignment or least_damage(options)
        method = methods[len(records)] if len(records) < len(methods) else best_method(records, methods, budget)
        key = cand.candidate_key(method, assignment, pruning)
        if any(r["key"] == key for r in records):
            target = bisect(records, tried_targets)
            if target is None:
                break
            continue
        tried_targets.add(round(target, 12))
        predicted = total(options, assignment, "damage")
        record = build(len(records), Plan(key, method, assignment, predicted, target))
        record["feasible_as_predicted"] = feasible
        records.append(record)
        if limit == 0 or (not feasible and len(records) >= len(methods)):
            break  # nothing looser is allowed, or nothing tighter exists
        if len(records) >= len(methods):
            target = next_target(records, methods, budget, target, ceiling)
            if target is None:
                break
    return records


def next_target(
    records: list[dict], methods: Sequence[SearchMethod], budget: Budget, target: float, ceiling: float
) -> float | None:
    """The least of what the perplexity/KL limits (read off the candidates the building method measured, see
    `budget`) and the task limit (along the ladder) ask for; None when neither asks for anything."""
    method = best_method(records, methods, budget).value
    proposals = [budget.nats_target([r for r in records if r["method"] == method], target)]
    proposals.append(budget.task_target(records, ceiling))
    return min((p for p in proposals if p is not None), default=None)


def best_method(records: list[dict], methods: Sequence[SearchMethod], budget: Budget) -> SearchMethod:
    """The method whose candidate on the first assignment measured the least damage."""
    first = records[: len(methods)]
    best = min(first, key=lambda r: (budget.shortfall(r), r["measured"]["nll_increase"]))
    return SearchMethod(best["method"])


def bisect(records: list[dict], tried: set[float]) -> float | None:
    """A target between the best candidate that met the budget and the cheapest one that missed it (by predicted
    damage), or None when there is no such gap left to try; a target returned is added to `tried`."""
    met = [r["predicted"]["nll_increase"] for r in records if r["meets_budget"]]
    missed = [r["predicted"]["nll_increase"] for r in records if not r["meets_budget"]]
    if not met or not missed:
        return None
    low, high = max(met), min(missed)
    middle = (low + high) / 2
    if high <= low or round(middle, 12) in tried:
        return None
    tried.add(round(middle, 12))
    return middle
