"""The assignment solver on hand-made tables: exact where a greedy pick by damage per byte saved is not."""

from __future__ import annotations

import itertools
import random

import pytest

from worker.engine.search.pareto import pareto_front
from worker.engine.search.solver import Option, least_damage, solve, total


def table(**layers: list[tuple[str, float, float]]) -> dict[str, list[Option]]:
    return {name: [Option(*option) for option in options] for name, options in layers.items()}


def greedy(options, budget: float) -> dict[str, str]:
    """Start from the least damaging options; repeatedly take the move that saves most bytes per unit of damage
    while it still fits the budget (the heuristic the solver must beat)."""
    assignment = least_damage(options)
    while True:
        used = total(options, assignment, "damage")
        moves = []
        for layer, opts in options.items():
            current = next(o for o in opts if o.name == assignment[layer])
            for o in opts:
                saved, added = current.cost - o.cost, o.damage - current.damage
                if saved > 0 and used + added <= budget:
                    moves.append((saved / max(added, 1e-12), layer, o.name))
        if not moves:
            return assignment
        _, layer, name = max(moves)
        assignment[layer] = name


def brute_force(options, budget: float) -> float:
    best = float("inf")
    for names in itertools.product(*(opts for opts in options.values())):
        if sum(o.damage for o in names) <= budget:
            best = min(best, sum(o.cost for o in names))
    return best


# a: int4 saves 9 bytes for 6 damage (the best ratio); b and c save 5 for 5 each. With a budget of 10 the
# greedy takes a first, after which neither b nor c fits: cost 21. Taking b and c instead costs 20.
GREEDY_TRAP = table(
    a=[("bf16", 10, 0), ("int4", 1, 6)],
    b=[("bf16", 10, 0), ("int4", 5, 5)],
    c=[("bf16", 10, 0), ("int4", 5, 5)],
)


def test_exact_where_greedy_is_wrong():
    assert total(GREEDY_TRAP, greedy(GREEDY_TRAP, 10), "cost") == 21
    assignment = solve(GREEDY_TRAP, 10)
    assert assignment == {"a": "bf16", "b": "int4", "c": "int4"}
    assert total(GREEDY_TRAP, assignment, "cost") == 20 == brute_force(GREEDY_TRAP, 10)


def test_budget_zero_keeps_every_layer_undamaged_and_loose_budget_takes_the_cheapest():
    assert solve(GREEDY_TRAP, 0) == {"a": "bf16", "b": "bf16", "c": "bf16"}
    assert solve(GREEDY_TRAP, 100) == {"a": "int4", "b": "int4", "c": "int4"}


def test_no_assignment_within_the_budget_is_none():
    only_int4 = table(a=[("int4", 1, 6)], b=[("int4", 5, 5)])
    assert solve(only_int4, 10) is None
    assert solve(only_int4, 0) is None
    # damages round up to whole grid steps (budget / bins): an exact fit needs a step per layer of room
    assert solve(only_int4, 11 * (1 + 2 / 4000)) == {"a": "int4", "b": "int4"}
    with pytest.raises(ValueError, match="at least 0"):
        solve(only_int4, -1)


@pytest.mark.parametrize("seed", range(5))
def test_matches_brute_force_on_random_tables(seed: int):
    rng = random.Random(seed)
    options = {
        f"l{i}": [Option("bf16", 8.0, 0.0)]
        + [Option(f"f{j}", rng.uniform(1, 7), rng.uniform(0.01, 1.0)) for j in range(rng.randint(1, 3))]
        for i in range(6)
    }
    budget = rng.uniform(0.3, 2.0)
    assignment = solve(options, budget, bins=20_000)
    assert total(options, assignment, "damage") <= budget
    # damages are rounded up to the grid: never over the budget, at most one grid step per layer of slack lost
    assert total(options, assignment, "cost") <= brute_force(options, budget - 6 * budget / 20_000) + 1e-9
    assert total(options, assignment, "cost") >= brute_force(options, budget) - 1e-9


def test_pareto_front_keeps_the_points_nothing_beats():
    points = [(10, 0.0), (5, 0.1), (6, 0.2), (5, 0.1), (1, 0.5), (2, 0.5)]
    assert pareto_front(points) == [True, True, False, True, True, False]
