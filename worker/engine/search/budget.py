"""The budget: whether a built candidate meets it as measured, how far it is from meeting it, and, for the task
accuracy limit (which the sensitivity does not predict), where the next target goes on the candidate ladder.

Perplexity and KL limits are on the sensitivity's scale (predicted mean NLL increase, nats per token): log(1 + r)
for a perplexity increase r, the KL itself for a KL limit. A task limit is an absolute accuracy drop allowed on
every task; no per-layer task predictor exists, so the predicted NLL increase stands in for it: a candidate
that drops a task by more than the limit puts every later target below its predicted damage, one that keeps
every task within it lets the targets rise above its own, and the next target is the geometric middle of the
two (a step of `LADDER_STEP` down or up while only one side is known).

For the perplexity and KL limits the sensitivity over-predicts (it rounds to nearest where the build rounds with
GPTQ or AWQ, and it assumes layers add up), so the next target is read off what was measured: the line through the
most damaged candidate (as predicted) that met the limit and the least damaged one above it that missed, aimed at
`TARGET_MARGIN` of the limit (regula falsi on the predicted scale); while only one side is known, the line through
the origin and the candidate nearest the limit, rising at most `LADDER_STEP` times (a small measured damage is
mostly noise: its ratio to the prediction says little). A candidate that met the limit above that aim lifts the
aim halfway to the limit, so the next one is cheaper still.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from modelpress.specs import SearchBudget

LADDER_STEP = 4.0  # a target moves by at most this factor (a task-only one: by it) until both sides are built
TARGET_MARGIN = 0.9  # aim under the limit: the line through the measured candidates is an estimate, and they scatter
DROP_TOLERANCE = 1e-9  # accuracies are shares of n documents: 0.55 - 0.53 must meet a limit of 0.02


def limits_in_nats(budget: SearchBudget) -> dict[str, float]:
    """Each perplexity or KL limit on the scale the sensitivity predicts (nats per token)."""
    limits = {}
    if budget.perplexity_increase is not None:
        limits["perplexity_increase"] = math.log1p(budget.perplexity_increase)
    if budget.kl_divergence is not None:
        limits["kl_divergence"] = budget.kl_divergence
    return limits


def measured_in_nats(measured: dict) -> dict[str, float]:
    """A candidate's measured damage on each limit's scale."""
    kl = measured.get("kl_divergence") or {}
    return {"perplexity_increase": measured["nll_increase"], "kl_divergence": kl.get("mean", math.inf)}


def compare_tasks(baseline: list[dict[str, Any]], scored: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per task, in order: the candidate's accuracy and standard error beside the baseline's, the drop
    (baseline − candidate; positive: accuracy lost), and `predicted_drop` null (no predictor for tasks); a task the
    candidate could not be scored on carries `error` and no drop."""
    entries = []
    for before, after in zip(baseline, scored, strict=True):
        entry: dict[str, Any] = {
            "task": before.get("task") or after.get("task"),
            "source": before["source"],
            "baseline_accuracy": before["accuracy"],
            "baseline_stderr": before.get("stderr"),
            "predicted_drop": None,
        }
        if after.get("error") is not None:
            entries.append(
                {**entry, "accuracy": None, "stderr": None, "n": None, "drop": None, "error": after["error"]}
            )
            continue
        entries.append(
            {
                **entry,
                "accuracy": after["accuracy"],
                "stderr": after.get("stderr"),
                "n": after["n"],
                "drop": before["accuracy"] - after["accuracy"],
                "error": None,
            }
        )
    return entries


def worst_task_drop(record: dict) -> float:
    """The largest accuracy drop over the candidate's tasks (infinite when one could not be scored; 0 without
    tasks)."""
    drops = [math.inf if t["drop"] is None else t["drop"] for t in record.get("tasks") or []]
    return max(drops, default=0.0)


@dataclass(frozen=True)
class Budget:
    """A search's budget on the scales it is checked on."""

    nats: dict[str, float]  # perplexity_increase / kl_divergence limits, nats per token
    task_drop: float | None  # absolute accuracy drop allowed per task

    @classmethod
    def of(cls, budget: SearchBudget) -> Budget:
        return cls(limits_in_nats(budget), budget.task_accuracy_drop)

    def meets_tasks(self, record: dict) -> bool:
        return self.task_drop is None or worst_task_drop(record) <= self.task_drop + DROP_TOLERANCE

    def meets(self, record: dict) -> bool:
        """Every limit holds as measured."""
        damage = measured_in_nats(record["measured"])
        return all(damage[name] <= limit for name, limit in self.nats.items()) and self.meets_tasks(record)

    def losses(self, record: dict) -> tuple[float, ...]:
        """What the Pareto front weighs against the objective, each axis minimized: the largest measured damage
        over the perplexity and KL limits (when given) and the worst task drop (when a task limit is given)."""
        axes = []
        if self.nats:
            damage = measured_in_nats(record["measured"])
            axes.append(max(damage[name] for name in self.nats))
        if self.task_drop is not None:
            axes.append(worst_task_drop(record))
        return tuple(axes)

    def shortfall(self, record: dict) -> float:
        """How much of the budget the candidate uses, as the largest measured / allowed over the limits (≤ 1:
        within it); a limit of 0 counts any damage as infinitely over."""
        damage = measured_in_nats(record["measured"])
        pairs = [(damage[name], limit) for name, limit in self.nats.items()]
        if self.task_drop is not None:
            pairs.append((max(worst_task_drop(record), 0.0), self.task_drop))
        return max((_ratio(used, allowed) for used, allowed in pairs), default=0.0)

    def nats_target(self, records: list[dict], target: float) -> float | None:
        """The next target (predicted NLL increase) the perplexity/KL limits ask for, from the candidates built so
        far: the least over the limits of `corrected_target`; None without such a limit or candidates."""
        if not self.nats or not records:
            return None
        predicted = [r["predicted"]["nll_increase"] for r in records]
        measured = [measured_in_nats(r["measured"]) for r in records]
        return min(
            corrected_target([(p, m[name]) for p, m in zip(predicted, measured, strict=True)], limit, target)
            for name, limit in self.nats.items()
        )

    def task_target(self, records: list[dict], ceiling: float) -> float | None:
        """The next target (predicted NLL increase) the task limit asks for, from the candidates built so far:
        between the most damaged (as predicted) that kept every task within the limit and the least damaged that
        did not; `LADDER_STEP` times lower or higher while only one side exists, at most `ceiling` (the cheapest
        assignment's damage). None without a task limit, or when the measured tasks leave no gap (a more damaged
        candidate met them while a less damaged one missed)."""
        if self.task_drop is None or not records:
            return None
        met = [r["predicted"]["nll_increase"] for r in records if self.meets_tasks(r)]
        missed = [r["predicted"]["nll_increase"] for r in records if not self.meets_tasks(r)]
        low, high = max(met, default=None), min(missed, default=None)
        if high is None:
            return ceiling if low <= 0 else min(ceiling, low * LADDER_STEP)
        if low is None or low <= 0:
            return high / LADDER_STEP
        return math.sqrt(low * high) if low < high else None


def corrected_target(points: list[tuple[float, float]], limit: float, target: float) -> float:
    """The predicted damage at which the measured damage is expected to reach the aim, from (predicted, measured)
    pairs of built candidates. The aim is `TARGET_MARGIN` × `limit`, or halfway from the best pair that met the
    limit to the limit where that pair is above it already. On the line through the most predicted pair that met
    the limit (the origin if none) and the least predicted pair above it that missed; without the latter, on the
    line through the origin and the former, at most `LADDER_STEP` times its prediction (that much when it measured
    no damage; `target` when nothing was predicted)."""
    low_p, low_m = max(((p, m) for p, m in points if m <= limit), default=(0.0, 0.0))
    aim = max(TARGET_MARGIN * limit, (low_m + limit) / 2)
    above = [(p, m) for p, m in points if m > limit and p > low_p]
    if above:
        high_p, high_m = min(above)
        if not math.isfinite(high_m):
            return (low_p + high_p) / 2
        return low_p + (aim - low_m) * (high_p - low_p) / (high_m - low_m)
    if low_p <= 0:
        return target
    return low_p * (LADDER_STEP if low_m <= 0 else min(aim / low_m, LADDER_STEP))  # small damages are mostly noise


def _ratio(used: float, allowed: float) -> float:
    if allowed > 0:
        return used / allowed
    return 0.0 if used <= 0 else math.inf
