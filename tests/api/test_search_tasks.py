"""A search's task accuracy budget over real HTTP: it needs its tasks and they need it (422 saying what to fix),
tasks must be uploaded lm-eval tasks and text must be text, and a task a queued search reads is not deleted."""

from __future__ import annotations

import httpx
import pytest

from tests.utils.factories import write_cloze_task


@pytest.fixture(scope="module")
def task_dataset(client: httpx.Client, tmp_path_factory: pytest.TempPathFactory) -> dict:
    archive = write_cloze_task(tmp_path_factory.mktemp("task") / "cloze.tar")
    response = client.post("/v1/datasets", files={"file": ("cloze.tar", archive.read_bytes())})
    assert response.status_code == 201, response.text
    return response.json()


def body(model: dict, dataset: dict, budget: dict, tasks: list | None = None) -> dict:
    return {
        "model_id": model["id"],
        "calibration": {"dataset_id": dataset["id"], "samples": 4, "seq_len": 32},
        "evaluation": {"dataset_id": dataset["id"], "seq_len": 32, "max_windows": 4, "tasks": tasks or []},
        "budget": budget,
        "space": {"formats": ["bf16", "int8", "int4_g32"], "methods": ["rtn"]},
    }


def detail(response: httpx.Response) -> str:
    assert response.status_code == 422, response.text
    return str(response.json()["detail"])


def test_a_task_budget_and_its_tasks_go_together(
    client: httpx.Client, model: dict, dataset: dict, task_dataset: dict
) -> None:
    tasks = [{"dataset_id": task_dataset["id"], "limit": 10}]
    no_tasks = client.post("/v1/searches", json=body(model, dataset, {"task_accuracy_drop": 0.02}))
    assert "budget.task_accuracy_drop needs the tasks it limits: list them in evaluation.tasks" in detail(no_tasks)
    no_limit = client.post("/v1/searches", json=body(model, dataset, {"kl_divergence": 0.01}, tasks))
    assert "give that limit" in detail(no_limit) and "task_accuracy_drop" in detail(no_limit)
    too_much = client.post("/v1/searches", json=body(model, dataset, {"task_accuracy_drop": 2}, tasks))
    assert "task_accuracy_drop" in detail(too_much)
    nothing = client.post("/v1/searches", json=body(model, dataset, {}))
    assert "task_accuracy_drop" in detail(nothing)  # the limits a budget may give are all named

    accepted = client.post("/v1/searches", json=body(model, dataset, {"task_accuracy_drop": 0.02}, tasks))
    assert accepted.status_code == 202, accepted.text
    search = accepted.json()
    assert search["search"]["budget"]["task_accuracy_drop"] == 0.02
    assert search["search"]["evaluation"]["tasks"] == [{"dataset_id": task_dataset["id"], "name": None, "limit": 10}]
    assert client.post(f"/v1/searches/{search['id']}/cancel").status_code in (200, 202)


def test_tasks_are_lm_eval_tasks_and_text_is_text(
    client: httpx.Client, model: dict, dataset: dict, task_dataset: dict
) -> None:
    text_as_task = body(model, dataset, {"task_accuracy_drop": 0.02}, [{"dataset_id": dataset["id"]}])
    assert "is text, not an lm-eval task" in detail(client.post("/v1/searches", json=text_as_task))
    task_as_text = body(model, dataset, {"task_accuracy_drop": 0.02}, [{"dataset_id": task_dataset["id"]}])
    task_as_text["evaluation"]["dataset_id"] = task_dataset["id"]
    assert "evaluation.dataset_id) is an lm-eval task" in detail(client.post("/v1/searches", json=task_as_text))
    missing = body(model, dataset, {"task_accuracy_drop": 0.02}, [{"dataset_id": "nope1234"}])
    response = client.post("/v1/searches", json=missing)
    assert response.status_code == 404 and "evaluation.tasks.0.dataset_id" in response.json()["detail"]


def test_a_task_a_queued_search_reads_is_not_deleted(
    client: httpx.Client, model: dict, dataset: dict, task_dataset: dict
) -> None:
    data = body(model, dataset, {"task_accuracy_drop": 0.05}, [{"dataset_id": task_dataset["id"]}])
    search = client.post("/v1/searches", json=data).json()
    response = client.delete(f"/v1/datasets/{task_dataset['id']}")
    assert response.status_code == 409 and search["id"] in response.json()["detail"]
    assert client.post(f"/v1/searches/{search['id']}/cancel").status_code in (200, 202)
