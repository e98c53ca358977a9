"""Search: the per-layer format assignment that makes a model smallest (or fastest) within a quality budget.

One module per concern: `sensitivity` (each layer's predicted damage per format, one calibrated pass), `solver`
(the cheapest assignment within a predicted budget), `candidates` (build, export and measure one assignment),
`budget` (whether a candidate meets the budget, and the task limit's ladder of targets), `speed` (the
decode_speed objective, timed or modelled), `pareto` (the front of the built candidates), `choice` (the objective,
the front and the chosen candidate), `state` (what survives a retried attempt) and `runner`, the loop.
"""

from worker.engine.search.runner import run_search

__all__ = ["run_search"]
