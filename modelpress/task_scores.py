"""Reading task accuracy out of a job's report (`quality.tasks`), for whatever compares jobs by it: the command
line's report, a budget search. No torch: the report is JSON."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class TaskScore:
    """One task's accuracy before and after the recipe (None where it could not be scored, `error` says why)."""

    task: str
    baseline: float | None
    baseline_stderr: float | None
    optimized: float | None
    optimized_stderr: float | None
    n: int | None
    drop: float | None
    error: str | None


def task_scores(report: dict[str, Any] | None) -> dict[str, TaskScore]:
    """The report's task accuracies by task name (empty when the job asked for none)."""
    quality = (report or {}).get("quality") or {}
    scores = {}
    for entry in quality.get("tasks") or []:
        baseline, optimized = entry.get("baseline") or {}, entry.get("optimized") or {}
        name = entry.get("task") or str(entry.get("source"))
        scores[name] = TaskScore(
            task=name,
            baseline=baseline.get("accuracy"),
            baseline_stderr=baseline.get("stderr"),
            optimized=optimized.get("accuracy"),
            optimized_stderr=optimized.get("stderr"),
            n=optimized.get("n", baseline.get("n")),
            drop=entry.get("drop"),
            error=entry.get("error"),
        )
    return scores
