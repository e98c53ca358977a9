"""`modelpress search`: the body of a quality-budget search from command-line options, and its result as a
table of every candidate with the Pareto front marked."""

from __future__ import annotations

import re
from typing import Any

from rich.table import Table

from modelpress.cli.render import human_bytes

BUDGET_NAMES = {
    "ppl": "perplexity_increase",
    "perplexity": "perplexity_increase",
    "kl": "kl_divergence",
    "task": "task_accuracy_drop",
    "acc": "task_accuracy_drop",
}


class BudgetError(ValueError):
    """A --budget option that is not `ppl=<percent>%`, `ppl=<fraction>`, `kl=<nats>` or `task=<points>%`."""


def parse_budget(items: list[str]) -> dict[str, float]:
    """`["ppl=2%", "kl=0.01", "task=1%"]` → `{"perplexity_increase": 0.02, "kl_divergence": 0.01,
    "task_accuracy_drop": 0.01}` (a task drop in percent is in accuracy points)."""
    budget: dict[str, float] = {}
    for item in items:
        match = re.fullmatch(r"\s*(\w+)\s*=\s*([0-9.eE+-]+)\s*(%?)\s*", item)
        if match is None or match[1].lower() not in BUDGET_NAMES:
            raise BudgetError(
                f"--budget {item!r}: write ppl=2% (perplexity increase), kl=0.01 (mean KL, nats) or task=2% (accuracy "
                "points each --task may lose)"
            )
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
    tasks: list[str] | None = None,
    task_limit: int | None = None,
) -> dict[str, Any]:
    """The JSON body of POST /v1/searches (options left out take the server's defaults); `tasks` are uploaded
    lm-eval task dataset ids, each scored on at most `task_limit` documents."""
    limit = {} if task_limit is None else {"limit": task_limit}
    body: dict[str, Any] = {
        "model_id": model,
        "calibration": {"dataset_id": calibration},
        "evaluation": {"dataset_id": evaluation}
        | ({"tasks": [{"dataset_id": task, **limit} for task in tasks]} if tasks else {}),
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
    """Every candidate of a finished search: size, quality measured and predicted, front and choice marked; the
    decode speed (timed, or the weight bytes read per token) for a decode_speed search, and the task accuracies
    with their standard errors where the budget limits tasks."""
    result = search.get("result") or {}
    candidates = result.get("candidates", [])
    objective = (search.get("search") or {}).get("objective")
    with_decode = objective == "decode_speed" or any(c.get("speed_source") == "measured" for c in candidates)
    with_tasks = any(c.get("tasks") for c in candidates)
    table = Table(title=f"search {search.get('id')}: {result.get('message', search.get('status'))}")
    columns = ["", "candidate", "method", "formats", "size", "perplexity", "predicted", "KL"]
    columns += ["decode"] * with_decode + ["tasks"] * with_tasks + ["meets"]
    for column in columns:
        table.add_column(column, overflow="fold")
    for c in candidates:
        mark = "chosen" if c["id"] == result.get("chosen") else ("front" if c["pareto"] else "")
        kl = c.get("kl_divergence")
        row = [
            mark,
            c["id"],
            c["method"],
            ", ".join(f"{name} {count}" for name, count in c["formats"].items()),
            human_bytes(c["size_bytes"]),
            f"{c['perplexity']:.4g} ({100 * c['perplexity_increase']:+.2f}%)",
            f"{100 * c['predicted_perplexity_increase']:+.2f}%",
            "not measured" if kl is None else f"{kl:.4g}",
        ]
        row += [decode_text(c)] * with_decode + [tasks_text(c.get("tasks"))] * with_tasks
        table.add_row(*row, "yes" if c["meets_budget"] else "no")
    return table


def decode_text(candidate: dict[str, Any]) -> str:
    """ "812 tokens/s" where the decode was timed, else "1.2 MiB/token (model)"."""
    if candidate.get("speed_source") == "measured" and candidate.get("decode_tokens_per_s") is not None:
        return f"{candidate['decode_tokens_per_s']:.4g} tokens/s"
    return f"{human_bytes(candidate['linear_weight_bytes'])}/token (model)"


def tasks_text(tasks: list[dict[str, Any]] | None) -> str:
    """ "cloze 0.412 ± 0.031 (-1.5 pts)" per task, one a line; "-" when the search scored none."""
    if not tasks:
        return "-"
    lines = []
    for t in tasks:
        if t.get("accuracy") is None:
            lines.append(f"{t.get('task')}: not scored")
            continue
        stderr = "" if t.get("stderr") is None else f" ± {t['stderr']:.3f}"
        lines.append(f"{t.get('task')} {t['accuracy']:.3f}{stderr} ({-100 * t['drop']:+.1f} pts)")
    return "\n".join(lines)
