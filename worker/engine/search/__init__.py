"""Search: the per-layer format assignment that makes a model smallest (or fastest) within a quality budget.

One module per concern: `sensitivity` (each layer's predicted damage per format, one calibrated pass), `solver`
(the cheapest assignment within a predicted budget), `candidates` (build, export and measure one assignment),
`pareto` (the front of the built candidates), `state` (what survives a retried attempt) and `runner`, the loop.
"""

from worker.engine.search.runner import run_search

__all__ = ["run_search"]
