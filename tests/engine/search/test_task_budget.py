"""A task accuracy budget on a tiny Llama with an uploaded cloze task (built by the product's cloze builder):
every candidate scored on the task beside the baseline, the choice or an honest "none met", the ladder that
proposes targets without a task predictor, and a resumed search that reuses the baseline's task scores."""

from __future__ import annotations

import dataclasses
import json
import math
import tarfile

import pytest
import torch
import yaml

from tests.engine.search.test_search import Killed, search_request, search_spec
from tests.utils.factories import unpack_task, write_cloze_task
from worker.engine import ProgressEvent
from worker.engine.evaluate import score_tasks, task_sources
from worker.engine.load.checkpoint import load_model
from worker.engine.search import run_search
from worker.engine.search.budget import DROP_TOLERANCE, LADDER_STEP, Budget
from worker.engine.search.pareto import pareto_front
from worker.engine.steps import EngineError

LIMIT = 24
TASKS = [{"dataset_id": "d-task", "limit": LIMIT}]


@pytest.fixture(scope="module")
def task_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("task")
    return unpack_task(write_cloze_task(folder / "cloze.tar"), folder / "task")


def task_search(budget: dict, task_folder, model_dir, text, out, checkpoint=None, **extra):
    spec = search_spec(budget, evaluation_tasks=TASKS, **extra)
    request = search_request(model_dir, text, out, spec, checkpoint)
    return dataclasses.replace(request, datasets={"d-task": (task_folder, "lm-eval")})


def check_task_entries(report: dict, limit: float) -> None:
    (base,) = report["baseline"]["tasks"]
    assert base["task"] == "cloze" and base["n"] == LIMIT and base["stderr"] is not None
    assert report["tasks"]["baseline"] == report["baseline"]["tasks"] and "predicted NLL" in report["tasks"]["proposal"]
    for c in report["candidates"]:
        (task,) = c["tasks"]
        assert task["error"] is None and task["n"] == LIMIT and task["stderr"] is not None
        assert task["baseline_accuracy"] == base["accuracy"] and task["baseline_stderr"] == base["stderr"]
        assert task["drop"] == pytest.approx(base["accuracy"] - task["accuracy"])
        assert task["predicted_drop"] is None and c["predicted"]["task_accuracy_drop"] is None
        assert c["meets_budget"] == (task["drop"] <= limit + DROP_TOLERANCE)


def test_a_loose_task_budget_chooses_the_cheapest_assignment_first_tried(
    tiny_model_dir, text_dataset, task_folder, tmp_path
):
    request = task_search({"task_accuracy_drop": 1.0}, task_folder, tiny_model_dir, text_dataset, tmp_path / "out")
    report = run_search(request, lambda event: None)
    check_task_entries(report, 1.0)
    # task-only: the ladder starts at the cheapest assignment; it meets, nothing cheaper exists, the loop stops
    (only,) = report["candidates"]
    assert set(only["formats"]) == {"int4_g32"} and report["chosen"] == only["id"]
    assert "worst task drop" in report["message"] and (tmp_path / "out" / "model.tar").is_file()

    # the candidate's task score is the chosen artifact's, reloaded from the downloadable tar
    folder = tmp_path / "chosen"
    with tarfile.open(tmp_path / "out" / "model.tar") as tar:
        tar.extractall(folder, filter="data")
    reloaded = load_model(folder, "hf", torch.device("cpu"))
    sources = task_sources(request.spec, request.datasets)
    (again,) = score_tasks(reloaded.model, reloaded.tokenizer, sources, tmp_path / "scratch", lambda f, m: None)
    assert again["accuracy"] == only["tasks"][0]["accuracy"] and again["stderr"] == only["tasks"][0]["stderr"]


def test_a_tight_task_budget_ends_with_a_choice_or_says_none_met(tiny_model_dir, text_dataset, task_folder, tmp_path):
    request = task_search(
        {"task_accuracy_drop": 0.0},
        task_folder,
        tiny_model_dir,
        text_dataset,
        tmp_path / "out",
        formats=("int8", "int4_g32"),
        max_candidates=3,
    )
    report = run_search(request, lambda event: None)
    check_task_entries(report, 0.0)
    meeting = [c for c in report["candidates"] if c["meets_budget"]]
    if report["chosen"] is None:
        assert not meeting and report["message"].startswith("no candidate met the budget (task accuracy -0 points)")
        assert not (tmp_path / "out" / "model.tar").exists()
    else:
        chosen = next(c for c in report["candidates"] if c["id"] == report["chosen"])
        assert chosen["tasks"][0]["drop"] <= DROP_TOLERANCE
        assert chosen["measured"]["size_bytes"] == min(c["measured"]["size_bytes"] for c in meeting)
    # the front weighs the objective against the worst task drop
    points = [(c["measured"]["size_bytes"], c["tasks"][0]["drop"]) for c in report["candidates"]]
    assert [c["pareto"] for c in report["candidates"]] == pareto_front(points)


def test_a_task_budget_beside_a_kl_limit_needs_both(tiny_model_dir, text_dataset, task_folder, tmp_path):
    request = task_search(
        {"task_accuracy_drop": 1.0, "kl_divergence": 1e-9},
        task_folder,
        tiny_model_dir,
        text_dataset,
        tmp_path / "out",
        formats=("int4_g32",),
    )
    report = run_search(request, lambda event: None)
    assert report["chosen"] is None and report["candidates"]
    assert "KL 1e-09 nats and task accuracy -100 points" in report["message"]
    assert all(not c["meets_budget"] and c["tasks"][0]["drop"] <= 1.0 for c in report["candidates"])


def test_a_resumed_search_reuses_the_baseline_task_scores(tiny_model_dir, text_dataset, task_folder, tmp_path):
    checkpoint = tmp_path / "checkpoint"
    budget = {"task_accuracy_drop": 0.05}

    def die_after_first(event: ProgressEvent) -> None:
        if event.step == "candidate 2" and event.fraction == 0.0:
            raise Killed

    first_request = task_search(
        budget, task_folder, tiny_model_dir, text_dataset, tmp_path / "a", checkpoint, methods=("rtn", "gptq")
    )
    with pytest.raises(Killed):
        run_search(first_request, die_after_first)
    saved = json.loads((checkpoint / "search" / "baseline-tasks.json").read_text())
    first = json.loads(next((checkpoint / "search" / "candidates").glob("*.json")).read_text())

    events: list[ProgressEvent] = []
    stored: list[str] = []
    request = task_search(
        budget, task_folder, tiny_model_dir, text_dataset, tmp_path / "b", checkpoint, methods=("rtn", "gptq")
    )
    request = dataclasses.replace(request, on_checkpoint=lambda path: stored.append(path.name))
    report = run_search(request, events.append)
    messages = [e.message for e in events]
    assert "baseline task scores measured by an earlier attempt" in messages
    assert not any(
        m == "task dataset:d-task" for e, m in zip(events, messages, strict=True) if e.step == "evaluate baseline"
    )
    assert "baseline-tasks.json" not in stored and report["baseline"]["tasks"] == saved
    assert report["candidates"][0]["tasks"] == first["tasks"]  # read back with the candidate
    assert len(report["candidates"]) >= 2 and all(c["tasks"] for c in report["candidates"])


# --- The budget's logic on records alone ------------------------------------------------------------------------


def record(predicted: float, drop: float | None, nll: float = 0.0, kl: float = 0.0) -> dict:
    tasks = [{"drop": drop}]
    return {
        "predicted": {"nll_increase": predicted},
        "measured": {"nll_increase": nll, "kl_divergence": {"mean": kl}},
        "tasks": tasks,
    }


def test_the_task_ladder_tightens_loosens_and_bisects():
    budget = Budget(nats={}, task_drop=0.02)
    ceiling = 1.0
    assert budget.task_target([record(1.0, 0.1)], ceiling) == pytest.approx(1.0 / LADDER_STEP)  # missed: down
    assert budget.task_target([record(0.01, 0.0)], ceiling) == pytest.approx(0.01 * LADDER_STEP)  # met: up
    assert budget.task_target([record(0.5, 0.0)], ceiling) == ceiling  # never above the cheapest assignment
    assert budget.task_target([record(0.0, 0.0)], ceiling) == ceiling  # the unquantized model met: try the cheapest
    between = budget.task_target([record(0.04, 0.01), record(0.16, 0.05)], ceiling)
    assert between == pytest.approx(math.sqrt(0.04 * 0.16))  # the geometric middle
    assert budget.task_target([record(0.16, 0.0), record(0.04, 0.05)], ceiling) is None  # no gap: not monotone
    assert budget.task_target([record(0.1, None)], ceiling) == pytest.approx(0.1 / LADDER_STEP)  # not scored: missed
    assert Budget(nats={"kl_divergence": 0.1}, task_drop=None).task_target([record(1.0, 0.5)], ceiling) is None


def test_a_candidate_meets_only_when_every_limit_holds():
    budget = Budget(nats={"kl_divergence": 0.1}, task_drop=0.02)
    assert budget.meets(record(0.0, 0.55 - 0.53, kl=0.05))  # 0.020000000000000018 is within 0.02
    assert not budget.meets(record(0.0, 0.03, kl=0.05))
    assert not budget.meets(record(0.0, 0.0, kl=0.2))
    assert not budget.meets(record(0.0, None, kl=0.0))  # a task that could not be scored does not meet
    two = {**record(0.0, 0.01, kl=0.05), "tasks": [{"drop": 0.01}, {"drop": 0.021}]}
    assert not budget.meets(two) and budget.losses(two) == (0.05, 0.021)
    assert budget.shortfall(two) == pytest.approx(0.021 / 0.02)


def test_a_task_the_baseline_cannot_be_scored_on_fails_the_search_saying_why(
    tiny_model_dir, text_dataset, task_folder, tmp_path
):
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "test.jsonl").write_text((task_folder / "test.jsonl").read_text())
    config = yaml.safe_load((task_folder / "task.yaml").read_text())
    config["doc_to_text"] = "{{ context.__class__.__mro__[1].__subclasses__() }}"  # refused by the sandbox
    (broken / "task.yaml").write_text(yaml.safe_dump(config))
    request = task_search({"task_accuracy_drop": 0.05}, broken, tiny_model_dir, text_dataset, tmp_path / "out")
    with pytest.raises(EngineError) as failed:
        run_search(request, lambda event: None)
    assert failed.value.code == "task_failed"
    assert "evaluation.tasks dataset:d-task could not be scored on the model as uploaded" in str(failed.value)
    assert "budget.task_accuracy_drop cannot be checked" in str(failed.value) and "SecurityError" in str(failed.value)
