"""Searches: submit (idempotent, answered with `Location`), racing retries, a dead broker. No worker runs: searches
stay queued."""

from __future__ import annotations

import uuid
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from sqlalchemy import func, select

from tests.api.conftest import upload_text_dataset


@pytest.fixture(scope="module")
def dataset(client: httpx.Client, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Text of this module's own: the searches left queued here keep no other test's dataset in use."""
    return upload_text_dataset(client, tmp_path_factory.mktemp("text") / "search.txt")


def body(model: dict, dataset: dict, perplexity_increase: float = 0.05) -> dict:
    return {
        "model_id": model["id"],
        "calibration": {"dataset_id": dataset["id"], "samples": 4, "seq_len": 32},
        "evaluation": {"dataset_id": dataset["id"], "seq_len": 32, "max_windows": 4},
        "budget": {"perplexity_increase": perplexity_increase},
        "space": {"formats": ["int8"], "methods": ["rtn"]},
    }


def test_submit_answers_location_and_replays_a_key(client: httpx.Client, model: dict, dataset: dict) -> None:
    key = {"Idempotency-Key": f"search-{uuid.uuid4()}"}
    first = client.post("/v1/searches", json=body(model, dataset), headers=key)
    assert first.status_code == 202, first.text
    search = first.json()
    assert first.headers["location"] == f"/v1/searches/{search['id']}" and search["status"] == "queued"
    assert "idempotent-replayed" not in first.headers
    again = client.post("/v1/searches", json=body(model, dataset), headers=key)
    assert again.status_code == 202 and again.json()["id"] == search["id"]
    assert again.headers["idempotent-replayed"] == "true" and again.headers["location"] == first.headers["location"]
    other = client.post("/v1/searches", json=body(model, dataset, 0.1), headers=key)
    assert other.status_code == 422 and "Idempotency-Key" in other.json()["detail"]
    assert client.post("/v1/searches", json=body(model, dataset)).json()["id"] != search["id"]


def test_a_key_used_by_a_job_is_not_replayed_as_a_search(client: httpx.Client, model: dict, dataset: dict) -> None:
    key = {"Idempotency-Key": f"shared-{uuid.uuid4()}"}
    job = {"model_id": model["id"], "recipe": [{"type": "prune", "method": "magnitude", "sparsity": 0.25}]}
    assert client.post("/v1/jobs", json=job, headers=key).status_code == 202
    refused = client.post("/v1/searches", json=body(model, dataset), headers=key)
    assert refused.status_code == 422 and "different body" in refused.json()["detail"]


def test_racing_retries_create_one_search(client: httpx.Client, model: dict, dataset: dict) -> None:
    from modelpress.db import new_session
    from modelpress.models import Job

    key = f"race-{uuid.uuid4()}"

    def submit(_: int) -> httpx.Response:
        with httpx.Client(base_url=str(client.base_url), headers=dict(client.headers)) as own:
            return own.post("/v1/searches", json=body(model, dataset), headers={"Idempotency-Key": key})

    with ThreadPoolExecutor(6) as pool:
        responses = list(pool.map(submit, range(6)))
    assert {r.status_code for r in responses} == {202}
    assert len({r.json()["id"] for r in responses}) == 1
    with new_session() as session:
        assert session.scalar(select(func.count()).select_from(Job).where(Job.idempotency_key == key)) == 1


def test_broker_down_still_accepts(degraded: httpx.Client, model: dict, dataset: dict) -> None:
    response = degraded.post("/v1/searches", json=body(model, dataset))
    assert response.status_code == 202, response.text
    assert degraded.get(f"/v1/searches/{response.json()['id']}").json()["status"] == "queued"
