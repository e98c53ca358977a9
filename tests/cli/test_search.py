"""`modelpress search`: budget options become the search body; --watch follows it and prints the front."""

from __future__ import annotations

import pytest
from rich.console import Console

from modelpress.cli.search import BudgetError, front_table, parse_budget
from tests.cli.fake_api import FakeApi
from tests.cli.test_client import fake, invoke  # noqa: F401  (the fixture)

CANDIDATE = {
    "method": "gptq",
    "formats": {"int4_g64": 150, "int8": 60},
    "perplexity": 26.1,
    "kl_divergence": 0.021,
    "predicted_perplexity_increase": 0.012,
    "predicted_size_bytes": 1,
    "linear_weight_bytes": 1,
}


def test_budgets_read_as_percent_or_fraction():
    assert parse_budget(["ppl=2%"]) == {"perplexity_increase": 0.02}
    assert parse_budget(["ppl=0.05", "kl=0.01"]) == {"perplexity_increase": 0.05, "kl_divergence": 0.01}
    for bad in (["speed=2"], ["ppl=two"], []):
        with pytest.raises(BudgetError):
            parse_budget(bad)


def test_search_sends_the_body_and_watch_prints_the_front(fake: FakeApi) -> None:  # noqa: F811
    fake.script = [
        {"status": "running", "progress": {"step_index": 3, "total_steps": 8, "step": "sensitivity"}},
        {"status": "succeeded", "progress": {"fraction": 1.0, "message": "done"}},
    ]
    fake.search_result = {
        "chosen": "c2",
        "message": "c2 meets the budget",
        "pareto_front": ["c1", "c2"],
        "candidates": [
            {
                **CANDIDATE,
                "id": "c1",
                "size_bytes": 90_000_000,
                "perplexity_increase": 0.005,
                "meets_budget": True,
                "pareto": True,
            },
            {
                **CANDIDATE,
                "id": "c2",
                "size_bytes": 80_000_000,
                "perplexity_increase": 0.018,
                "meets_budget": True,
                "pareto": True,
            },
            {
                **CANDIDATE,
                "id": "c3",
                "size_bytes": 85_000_000,
                "perplexity_increase": 0.03,
                "meets_budget": False,
                "pareto": False,
            },
        ],
    }
    result = invoke(
        "search",
        "--model",
        "m1",
        "--budget",
        "ppl=2%",
        "--calibration",
        "d1",
        "--evaluation",
        "d2",
        "--format",
        "bf16",
        "--format",
        "int4_g64",
        "--objective",
        "size",
        "--watch",
    )
    assert result.exit_code == 0, result.output
    body, _key = fake.job_bodies[0]
    assert body == {
        "model_id": "m1",
        "calibration": {"dataset_id": "d1"},
        "evaluation": {"dataset_id": "d2"},
        "budget": {"perplexity_increase": 0.02},
        "objective": "size",
        "space": {"formats": ["bf16", "int4_g64"]},
    }
    assert "c2 meets the budget" in result.output and "chosen" in result.output
    wide = Console(width=200, record=True)
    wide.print(front_table({"id": "search1", "result": fake.search_result}))
    rows = {line.split("│")[2].strip(): line for line in wide.export_text().splitlines() if line.count("│") > 5}
    assert "chosen" in rows["c2"] and "+1.80%" in rows["c2"] and "int4_g64 150, int8 60" in rows["c2"]
    assert "front" in rows["c1"] and "front" not in rows["c3"] and rows["c3"].rstrip("│ ").endswith("no")


def test_a_bad_budget_is_refused_before_anything_is_sent(fake: FakeApi) -> None:  # noqa: F811
    result = invoke("search", "--model", "m1", "--budget", "size=3", "--calibration", "d1", "--evaluation", "d2")
    assert result.exit_code == 1 and "ppl=2%" in result.output and not fake.job_bodies


def test_task_budgets_and_tasks_go_into_the_body_and_the_front_shows_their_scores(fake: FakeApi) -> None:  # noqa: F811
    assert parse_budget(["task=2%"]) == {"task_accuracy_drop": 0.02}
    assert parse_budget(["acc=0.01", "kl=0.1"]) == {"task_accuracy_drop": 0.01, "kl_divergence": 0.1}
    fake.script = [{"status": "succeeded", "progress": {"fraction": 1.0, "message": "done"}}]
    task = {"task": "cloze", "baseline_accuracy": 0.5, "baseline_stderr": 0.1, "predicted_drop": None, "n": 24}
    fake.search_result = {
        "chosen": "c1",
        "message": "c1 meets the budget",
        "pareto_front": ["c1"],
        "candidates": [
            {
                **CANDIDATE,
                "id": "c1",
                "size_bytes": 80_000_000,
                "perplexity_increase": 0.01,
                "speed_source": "measured",
                "decode_tokens_per_s": 812.4,
                "tasks": [{**task, "accuracy": 0.485, "stderr": 0.104, "drop": 0.015, "error": None}],
                "meets_budget": True,
                "pareto": True,
            },
            {
                **CANDIDATE,
                "id": "c2",
                "size_bytes": 70_000_000,
                "perplexity_increase": 0.03,
                "speed_source": "model",
                "decode_tokens_per_s": None,
                "linear_weight_bytes": 3 * 2**20,
                "tasks": [{**task, "accuracy": None, "stderr": None, "drop": None, "error": "it failed"}],
                "meets_budget": False,
                "pareto": True,
            },
        ],
    }
    args = ["--model", "m1", "--budget", "task=2%", "--calibration", "d1", "--evaluation", "d2"]
    result = invoke("search", *args, "--task", "t1", "--task", "t2", "--task-limit", "200", "--watch")
    assert result.exit_code == 0, result.output
    body, _key = fake.job_bodies[0]
    assert body["budget"] == {"task_accuracy_drop": 0.02}
    assert body["evaluation"] == {
        "dataset_id": "d2",
        "tasks": [{"dataset_id": "t1", "limit": 200}, {"dataset_id": "t2", "limit": 200}],
    }
    wide = Console(width=260, record=True)
    wide.print(front_table({"id": "search1", "result": fake.search_result}))
    rows = {line.split("│")[2].strip(): line for line in wide.export_text().splitlines() if line.count("│") > 5}
    assert "cloze 0.485 ± 0.104 (-1.5 pts)" in rows["c1"] and "812.4 tokens/s" in rows["c1"]
    assert "cloze: not scored" in rows["c2"] and "3.00 MiB/token (model)" in rows["c2"]
