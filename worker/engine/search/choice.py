"""The choice among the built candidates: the objective each is weighed by, the Pareto front, the chosen one (the
least objective among those that meet the budget as measured) and the message that says why, or why none."""

from __future__ import annotations

import math

from modelpress.specs import SearchBudget, SearchObjective, SearchPruning
from worker.engine.search import speed
from worker.engine.search.budget import Budget, worst_task_drop
from worker.engine.search.pareto import pareto_front


def is_timed(objective: SearchObjective, records: list[dict]) -> bool:
    """Whether the decode_speed objective is weighed by measured timings (every candidate has one)."""
    return objective == SearchObjective.decode_speed and speed.all_measured(records)


def objective_value(objective: SearchObjective, record: dict, timed: bool) -> float:
    """What the choice makes least: bytes on disk; for decode_speed, the measured milliseconds per decoded token
    when every candidate was `timed`, else the Linear weight bytes read per token."""
    if objective == SearchObjective.size:
        return float(record["measured"]["size_bytes"])
    if timed:
        return float(record["measured"]["decode"]["ms_per_token"])
    return float(record["predicted"]["linear_weight_bytes"])


def objective_section(objective: SearchObjective, timed: bool) -> dict:
    """The report's `objective`: its name, how it was measured, and where the decode figure came from."""
    if objective == SearchObjective.size:
        method = "bytes of the artifact's *.safetensors files on disk"
    elif timed:
        method = (
            "decode measured: milliseconds per token at batch 1 (worker/engine/search/speed.py), on a bfloat16 copy "
            "whose quantized Linears run the low-bit kernels, the decode step compiled, after a prompt cut from the "
            "first evaluation window"
        )
    else:
        method = (
            "bytes-moved model: weight bytes of every Linear (output head included) as stored, read once per decoded "
            "token; fewer bytes decode faster where decoding is bound by memory bandwidth (predicted, not timed: "
            "the worker has no CUDA device, where the low-bit kernels run)"
        )
    return {"name": objective.value, "method": method, "speed_source": speed.MEASURED if timed else speed.MODEL}


def choose_(objective: SearchObjective, budget: Budget, records: list[dict]) -> dict | None:
    """Number the candidates (`id`), mark the Pareto front (`pareto`: the objective against each measured loss)
    and return the chosen one (ties: the less damaged), or None when none meets the budget."""
    timed = is_timed(objective, records)
    front = pareto_front([(objective_value(objective, r, timed), *budget.losses(r)) for r in records])
    for i, (record, on_front) in enumerate(zip(records, front, strict=True)):
        record["id"] = f"c{i + 1}"
        record["pareto"] = on_front
    meeting = [r for r in records if r["meets_budget"]]
    return min(
        meeting, key=lambda r: (objective_value(objective, r, timed), r["measured"]["nll_increase"]), default=None
    )


def message(limits: SearchBudget, budget: Budget, chosen: dict | None, records: list[dict], baseline: dict) -> str:
    """One sentence: the chosen candidate and what it measured, or that none met the budget and the closest."""
    wanted = []
    if limits.perplexity_increase is not None:
        wanted.append(f"perplexity +{100 * limits.perplexity_increase:.3g}%")
    if limits.kl_divergence is not None:
        wanted.append(f"KL {limits.kl_divergence:.3g} nats")
    if limits.task_accuracy_drop is not None:
        wanted.append(f"task accuracy -{100 * limits.task_accuracy_drop:.3g} points")
    wanted_text = " and ".join(wanted)
    if chosen is not None:
        measured = chosen["measured"]
        share = measured["size_bytes"] / baseline["size_bytes"]
        decode = measured.get("decode")
        timing = "" if decode is None else f", decoding {decode['tokens_per_s']:.4g} tokens/s"
        pruned = "" if chosen.get("pruning") is None else f", pruned {SearchPruning(**chosen['pruning']).label}"
        return (
            f"{chosen['id']}{pruned} meets the budget ({wanted_text}) as measured: perplexity "
            f"{100 * measured['perplexity_increase']:+.2f}%{_task_text(chosen)}, {measured['size_bytes']} bytes on "
            f"disk ({100 * share:.1f}% of the model as uploaded){timing}"
        )
    closest = min(records, key=lambda r: (budget.shortfall(r), r["measured"]["nll_increase"]))
    return (
        f"no candidate met the budget ({wanted_text}) as measured; the closest, {closest['id']}, measured perplexity "
        f"{100 * closest['measured']['perplexity_increase']:+.2f}%{_task_text(closest)}: allow more loss or more "
        "formats (bf16)"
    )


def _task_text(record: dict) -> str:
    """ ", worst task drop 1.2 points" for a candidate scored on tasks; empty otherwise."""
    if not record.get("tasks"):
        return ""
    worst = worst_task_drop(record)
    return ", a task not scored" if math.isinf(worst) else f", worst task drop {100 * worst:.3g} points"
