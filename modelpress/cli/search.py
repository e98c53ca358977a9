"""`modelpress search`: the body of a quality-budget search from command-line options, and its result as a
table of every candidate with the Pareto front marked."""

from __future__ import annotations

import re
from typing import Any

from rich.table import Table

from modelpress.cli.render import human_bytes

BUDGET_NAMES = {"ppl": "perplexity_increase", "perplexity": "perplexity_increase", "kl": "kl_divergence"}


class BudgetError(ValueError):
    """A --budget option that is not `ppl=<percent>%`, `ppl=<fraction>` or `kl=<nats>`."""


def parse_budget(items: list[str]) -> dict[str, float]:
    """`["ppl=2%", "kl=0.01"]` → `{"perplexity_increase": 0.02, "kl_divergence": 0.01}`."""
    budget: dict[str, float] = {}
    for item in items:
        match = re.fullmatch(r"\s*(\w+)\s*=\s*([0-9.eE+-]+)\s*(%?)\s*", item)
        if match is None or match[1].lower() not in BUDGET_NAMES:
            raise BudgetError(f"--budget {item!r}: write ppl=2% (perplexity increase) or kl=0.01 (mean KL, nats)")
        try:
            value = float(match[2])
        except ValueError:
            raise BudgetError(f"--budget {item!r}: {match[2]!r} is not a number") from None
        budget[BUDGET_NAMES[match[1].lower()]] = value / 100 if match[3] else value
    if not budget:
        raise BudgetError("give a --budget, e.g. --budget ppl=2%")
    return budget


def search_body(
    model: str,
    budget: list[str],
    objective: str,
    calibration: str,
    evaluation: str,
    formats: list[str] | None = None,
    methods: list[str] | None = None,
    max_candidates: int | None = None,
) -> dict[str, Any]:
    """The JSON body of POST /v1/searches (options left out take the server's defaults)."""
    body: dict[str, Any] = {
        "model_id": model,
        "calibration": {"dataset_id": calibration},
        "evaluation": {"dataset_id": evaluation},
        "budget": parse_budget(budget),
        "objective": objective,
    }
    space = {name: values for name, values in (("formats", formats), ("methods", methods)) if values}
    if space:
        body["space"] = space
    if max_candidates is not None:
        body["max_candidates"] = max_candidates
    return body


def front_table(search: dict[str, Any]) -> Table:
    """Every candidate of a finished search: size, quality measured and predicted, front and choice marked."""
    result = search.get("result") or {}
    table = Table(title=f"search {search.get('id')}: {result.get('message', search.get('status'))}")
    for column in ("", "candidate", "method", "formats", "size", "perplexity", "predicted", "KL", "meets"):
        table.add_column(column, overflow="fold")
    for c in result.get("candidates", []):
        mark = "chosen" if c["id"] == result.get("chosen") else ("front" if c["pareto"] else "")
        kl = c.get("kl_divergence")
        table.add_row(
            mark,
            c["id"],
            c["method"],
            ", ".join(f"{name} {count}" for name, count in c["formats"].items()),
            human_bytes(c["size_bytes"]),
            f"{c['perplexity']:.4g} ({100 * c['perplexity_increase']:+.2f}%)",
            f"{100 * c['predicted_perplexity_increase']:+.2f}%",
            "not measured" if kl is None else f"{kl:.4g}",
            "yes" if c["meets_budget"] else "no",
        )
    return table
