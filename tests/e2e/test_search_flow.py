"""Searches over real HTTP with a real Celery worker on a tiny model: refused bodies, a budget of 0 (the
unquantized model), a budget nobody meets (succeeded, nothing chosen), a mixed-precision choice whose
downloaded artifact transformers alone reloads at the perplexity the result states, and a task accuracy budget
on an uploaded cloze task."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.utils.checks import perplexity_in_clean_process, unpack
from tests.utils.factories import build_tiny_model, tar_folder, write_cloze_task, write_text_dataset
from tests.utils.stack import Client, Stack

SEQ_LEN, WINDOWS = 32, 4


@pytest.fixture(scope="module")
def client(e2e_stack: Stack) -> Client:
    return e2e_stack.client()


@pytest.fixture(scope="module")
def uploaded(client: Client, tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("tiny")
    archive = tar_folder(build_tiny_model(root / "model"), root / "tiny.tar")
    text = write_text_dataset(root / "text.txt")
    model = client.upload("/v1/models", archive, name="tiny").json()
    dataset = client.upload("/v1/datasets", text, name="text").json()
    task = client.upload("/v1/datasets", write_cloze_task(root / "cloze.tar"), name="cloze").json()
    return {"model": model["id"], "dataset": dataset["id"], "text": text, "task": task["id"]}


def body(uploaded: dict, budget: dict, formats=("bf16", "int8", "int4_g32"), **extra) -> dict:
    return {
        "model_id": uploaded["model"],
        "calibration": {"dataset_id": uploaded["dataset"], "samples": WINDOWS, "seq_len": SEQ_LEN},
        "evaluation": {"dataset_id": uploaded["dataset"], "seq_len": SEQ_LEN, "max_windows": WINDOWS},
        "budget": budget,
        "space": {"formats": list(formats), "methods": ["rtn"]},
        "sensitivity_windows": 2,
        **extra,
    }


def run_search(client: Client, e2e_stack: Stack, data: dict) -> tuple[dict, dict[str, dict]]:
    response = client.http.post("/v1/searches", json=data)
    assert response.status_code == 202, response.text
    assert response.headers["location"] == f"/v1/searches/{response.json()['id']}"
    assert client.wait(response.json()["id"], 300, e2e_stack.workers[0])["status"] == "succeeded"
    search = client.http.get(f"/v1/searches/{response.json()['id']}").json()
    artifacts = client.http.get(f"/v1/searches/{search['id']}/artifacts").json()["data"]
    return search, {a["kind"]: a for a in artifacts}


def test_bad_searches_are_refused_with_what_to_fix(client: Client, uploaded: dict) -> None:
    no_limit = client.http.post("/v1/searches", json=body(uploaded, {}))
    assert no_limit.status_code == 422 and "perplexity_increase" in no_limit.text
    assert client.http.post("/v1/searches", json=body(uploaded, {"ppl": 0.1})).status_code == 422
    unknown = client.http.post("/v1/searches", json={**body(uploaded, {"kl_divergence": 1}), "model_id": "x" * 8})
    assert unknown.status_code == 404
    nothing = client.http.post(
        "/v1/searches", json=body(uploaded, {"kl_divergence": 1}) | {"space": {"targets": ["x"]}}
    )
    assert nothing.status_code == 422 and "select none" in nothing.json()["detail"]


def test_budget_zero_chooses_the_unquantized_model(client: Client, e2e_stack: Stack, uploaded: dict) -> None:
    search, artifacts = run_search(client, e2e_stack, body(uploaded, {"perplexity_increase": 0}))
    result = search["result"]
    assert result["chosen"] == "c1" and result["candidates"][0]["formats"] == {"bf16": 14}
    assert result["candidates"][0]["perplexity_increase"] == pytest.approx(0, abs=1e-6)
    assert set(artifacts) == {"model", "report"}
    jobs = client.http.get("/v1/jobs").json()["data"]
    assert any(j["id"] == search["id"] and j["kind"] == "search" for j in jobs)  # a job underneath


def test_a_budget_nobody_meets_succeeds_with_nothing_chosen(client: Client, e2e_stack: Stack, uploaded: dict) -> None:
    search, artifacts = run_search(client, e2e_stack, body(uploaded, {"kl_divergence": 1e-9}, formats=("int4_g32",)))
    assert search["status"] == "succeeded" and search["result"]["chosen"] is None
    assert search["result"]["message"].startswith("no candidate met the budget")
    assert set(artifacts) == {"report"}  # no model to download


def test_the_chosen_mix_reloads_with_transformers_alone(
    client: Client, e2e_stack: Stack, uploaded: dict, tmp_path: Path
) -> None:
    data = body(uploaded, {"kl_divergence": 2e-4}, formats=("bf16", "int8", "int4_g32", "fp8"), max_candidates=2)
    search, artifacts = run_search(client, e2e_stack, data)
    result = client.http.get(f"/v1/searches/{search['id']}/result").json()
    chosen = next(c for c in result["candidates"] if c["id"] == result["chosen"])
    assert chosen["measured"]["kl_divergence"]["mean"] <= 2e-4 and chosen["meets_budget"]
    assert len(chosen["assignment"]) == 14 and search["result"]["pareto_front"]
    archive = client.download(artifacts["model"], tmp_path / "model.tar")
    folder = unpack(archive, tmp_path / "model")
    measured = perplexity_in_clean_process(folder, uploaded["text"], SEQ_LEN, WINDOWS)
    assert measured["perplexity"] == pytest.approx(chosen["measured"]["perplexity"], rel=0.01)


def test_awq_and_a_pruning_family_through_the_service(client: Client, e2e_stack: Stack, uploaded: dict) -> None:
    data = body(uploaded, {"kl_divergence": 5.0}, formats=("bf16", "int8"), max_candidates=2)
    data["space"] |= {"methods": ["rtn", "awq"], "pruning": [{"method": "wanda", "pattern": "2:4"}]}
    search, _ = run_search(client, e2e_stack, data)
    assert search["progress"]["total_steps"] == 3 + 2 * 2 + 1 + 1  # prune 1 and its candidates counted
    candidates = search["result"]["candidates"]
    assert [(c["method"], c["pruning"]) for c in candidates] == [
        ("rtn", None),
        ("awq", None),
        ("rtn", "wanda 2:4"),
        ("awq", "wanda 2:4"),
    ]
    assert all(c["sparsity"] is None for c in candidates[:2]) and all(c["sparsity"] >= 0.5 for c in candidates[2:])
    result = client.http.get(f"/v1/searches/{search['id']}/result").json()
    assert [f["candidates"] for f in result["families"]] == [2, 2] and result["families"][1]["label"] == "wanda 2:4"


def test_a_task_budget_scores_every_candidate_on_the_uploaded_task(
    client: Client, e2e_stack: Stack, uploaded: dict
) -> None:
    data = body(uploaded, {"task_accuracy_drop": 1.0}, objective="decode_speed")
    data["evaluation"]["tasks"] = [{"dataset_id": uploaded["task"], "limit": 16}]
    search, artifacts = run_search(client, e2e_stack, data)
    result = search["result"]
    (only,) = result["candidates"]  # task-only: the cheapest assignment first; it meets, nothing is cheaper
    assert result["chosen"] == only["id"] and only["formats"] == {"int4_g32": 14}
    assert set(artifacts) == {"model", "report"}
    (task,) = only["tasks"]
    assert task["task"] == "cloze" and task["n"] == 16 and task["error"] is None and task["predicted_drop"] is None
    assert task["stderr"] is not None and task["baseline_stderr"] is not None
    assert task["drop"] == pytest.approx(task["baseline_accuracy"] - task["accuracy"])
    assert only["speed_source"] == "model" and only["decode_tokens_per_s"] is None  # the worker runs on a CPU
    full = client.http.get(f"/v1/searches/{search['id']}/result").json()
    assert full["tasks"]["baseline"][0]["accuracy"] == task["baseline_accuracy"]
    assert full["objective"]["speed_source"] == "model"
