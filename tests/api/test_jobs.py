"""Jobs: submit (validated fully, idempotent), read, list and filter, cancel. No worker runs: jobs stay queued."""

from __future__ import annotations

import uuid
from pathlib import Path

import httpx
import pytest
from sqlalchemy import update

from tests.utils.factories import write_text_dataset

PRUNE = {"type": "prune", "method": "magnitude", "sparsity": 0.5}
RTN = {"type": "quantize", "method": "rtn", "weights": {"bits": 8, "group_size": None, "symmetric": True}}


def spec(model: dict, dataset: dict | None = None, recipe: list | None = None) -> dict:
    body: dict = {"model_id": model["id"], "recipe": recipe or [PRUNE, RTN]}
    if dataset:
        body["calibration"] = {"dataset_id": dataset["id"], "samples": 8, "seq_len": 64}
        body["evaluation"] = {"dataset_id": dataset["id"], "seq_len": 64, "max_windows": 4}
    return body


def set_status(job_id: str, status: str) -> None:
    from modelpress.db import session_scope
    from modelpress.models import Job

    with session_scope() as session:
        session.execute(update(Job).where(Job.id == job_id).values(status=status))


def test_create_and_get(client: httpx.Client, model: dict, dataset: dict) -> None:
    response = client.post("/v1/jobs", json=spec(model, dataset))
    assert response.status_code == 202, response.text
    job = response.json()
    assert response.headers["location"] == f"/v1/jobs/{job['id']}"
    assert job["status"] == "queued" and job["model_id"] == model["id"] and job["attempts"] == 0
    assert job["recipe"][0]["sparsity"] == 0.5 and job["recipe"][0]["ignore"] == ["lm_head", r"re:.*\.mlp\.gate$"]
    assert job["calibration"]["dataset_id"] == dataset["id"] and job["evaluation"]["max_windows"] == 4
    assert job["progress"] == {"step_index": 0, "total_steps": 2, "step": None, "fraction": 0.0, "message": "queued"}
    assert job["error"] is None and job["started_at"] is None and job["finished_at"] is None
    assert client.get(f"/v1/jobs/{job['id']}").json() == job


def test_list_filter_and_paginate(client: httpx.Client, other_client: httpx.Client, model: dict) -> None:
    ids = [client.post("/v1/jobs", json=spec(model)).json()["id"] for _ in range(3)]
    set_status(ids[0], "failed")
    failed = client.get("/v1/jobs", params={"status": "failed"}).json()
    assert ids[0] in {j["id"] for j in failed["data"]} and all(j["status"] == "failed" for j in failed["data"])
    page = client.get("/v1/jobs", params={"limit": 2}).json()
    assert [j["id"] for j in page["data"]] == ids[::-1][:2] and page["count"] >= 3
    assert client.get("/v1/jobs", params={"limit": 1, "offset": 1}).json()["data"][0]["id"] == ids[1]
    assert client.get("/v1/jobs", params={"status": "exploded"}).status_code == 422
    assert not {j["id"] for j in other_client.get("/v1/jobs").json()["data"]} & set(ids)


def test_list_by_model(client: httpx.Client, other_client: httpx.Client, model: dict) -> None:
    job = client.post("/v1/jobs", json=spec(model)).json()
    listed = client.get("/v1/jobs", params={"model_id": model["id"], "limit": 200}).json()
    assert job["id"] in {j["id"] for j in listed["data"]}
    assert all(j["model_id"] == model["id"] for j in listed["data"]) and listed["count"] >= 1
    assert client.get("/v1/jobs", params={"model_id": str(uuid.uuid4())}).json() == {"data": [], "count": 0}
    assert other_client.get("/v1/jobs", params={"model_id": model["id"]}).json() == {"data": [], "count": 0}
    refused = client.get("/v1/jobs", params={"model_id": "tiny\x00"})
    assert refused.status_code == 422 and "model_id" in refused.json()["detail"]


def test_cancel(client: httpx.Client, model: dict) -> None:
    queued = client.post("/v1/jobs", json=spec(model)).json()
    response = client.post(f"/v1/jobs/{queued['id']}/cancel")
    assert response.status_code == 200
    assert response.json()["status"] == "cancelled" and response.json()["finished_at"] is not None
    again = client.post(f"/v1/jobs/{queued['id']}/cancel")
    assert again.status_code == 409 and "already cancelled" in again.json()["detail"]

    running = client.post("/v1/jobs", json=spec(model)).json()
    set_status(running["id"], "running")
    response = client.post(f"/v1/jobs/{running['id']}/cancel")
    assert response.status_code == 202
    assert response.json()["status"] == "running" and response.json()["cancel_requested"] is True


def test_idempotency(client: httpx.Client, model: dict) -> None:
    key = {"Idempotency-Key": f"retry-{uuid.uuid4()}"}
    first = client.post("/v1/jobs", json=spec(model), headers=key)
    assert first.status_code == 202
    reordered = {"recipe": [PRUNE, RTN], "model_id": model["id"]}  # same spec, other key order
    second = client.post("/v1/jobs", json=reordered, headers=key)
    assert second.status_code == 202 and second.json()["id"] == first.json()["id"]
    assert second.headers["idempotent-replayed"] == "true"
    other = client.post("/v1/jobs", json=spec(model, recipe=[PRUNE]), headers=key)
    assert other.status_code == 422 and "Idempotency-Key" in other.json()["detail"]
    assert client.post("/v1/jobs", json=spec(model)).json()["id"] != first.json()["id"]


def test_report_and_artifacts_before_success(client: httpx.Client, model: dict) -> None:
    job = client.post("/v1/jobs", json=spec(model)).json()
    response = client.get(f"/v1/jobs/{job['id']}/report")
    assert response.status_code == 409 and "queued" in response.json()["detail"]
    assert client.get(f"/v1/jobs/{job['id']}/artifacts").json() == {"data": [], "count": 0}


def test_report_after_success(client: httpx.Client, model: dict) -> None:
    from modelpress.db import session_scope
    from modelpress.models import Job

    job = client.post("/v1/jobs", json=spec(model)).json()
    with session_scope() as session:
        session.execute(update(Job).where(Job.id == job["id"]).values(status="succeeded", report={"ratios": {"x": 1}}))
    assert client.get(f"/v1/jobs/{job['id']}/report").json() == {"ratios": {"x": 1}}


def test_broker_down_still_accepts(degraded: httpx.Client, model: dict) -> None:
    response = degraded.post("/v1/jobs", json=spec(model))
    assert response.status_code == 202, response.text
    assert degraded.get(f"/v1/jobs/{response.json()['id']}").json()["status"] == "queued"


@pytest.mark.usefixtures("nothing_stored")
class TestRefused:
    def test_unknown_method(self, client: httpx.Client, model: dict) -> None:
        response = client.post("/v1/jobs", json=spec(model, recipe=[{"type": "prune", "method": "wishful"}]))
        assert response.status_code == 422
        assert "unknown recipe step" in response.json()["detail"] and "prune:magnitude" in response.json()["detail"]

    def test_sparsity_out_of_range(self, client: httpx.Client, model: dict) -> None:
        response = client.post("/v1/jobs", json=spec(model, recipe=[{**PRUNE, "sparsity": 1.5}]))
        assert response.status_code == 422
        assert "sparsity" in response.json()["detail"] and "less than 1" in response.json()["detail"]

    def test_typo_is_refused(self, client: httpx.Client, model: dict) -> None:
        response = client.post("/v1/jobs", json=spec(model, recipe=[{**PRUNE, "sparsty": 0.5}]))
        assert response.status_code == 422 and "sparsty" in response.json()["detail"]

    def test_missing_model(self, client: httpx.Client) -> None:
        missing = str(uuid.uuid4())
        response = client.post("/v1/jobs", json={"model_id": missing, "recipe": [PRUNE]})
        assert response.status_code == 404 and missing in response.json()["detail"]

    def test_missing_dataset(self, client: httpx.Client, model: dict) -> None:
        missing = str(uuid.uuid4())
        body = {**spec(model), "calibration": {"dataset_id": missing}}
        response = client.post("/v1/jobs", json=body)
        assert response.status_code == 404
        assert missing in response.json()["detail"] and "calibration.dataset_id" in response.json()["detail"]

    def test_other_tenants_model_and_dataset(self, other_client: httpx.Client, model: dict, dataset: dict) -> None:
        response = other_client.post("/v1/jobs", json=spec(model))
        assert response.status_code == 404 and model["id"] in response.json()["detail"]

    def test_group_size_must_divide_widths(self, client: httpx.Client, model: dict) -> None:
        step = {**RTN, "weights": {"bits": 4, "group_size": 128}}
        response = client.post("/v1/jobs", json=spec(model, recipe=[step]))
        assert response.status_code == 422
        assert "group_size 128" in response.json()["detail"] and "64" in response.json()["detail"]

    def test_targets_must_match_a_linear_layer(self, client: httpx.Client, model: dict) -> None:
        step = {**PRUNE, "targets": ["re:.*no_such_proj"]}
        response = client.post("/v1/jobs", json=spec(model, recipe=[step]))
        assert response.status_code == 422, response.text
        detail = response.json()["detail"]
        assert "recipe.0 (prune:magnitude) matched no Linear layer" in detail
        assert "re:.*no_such_proj" in detail and "model.layers.0.mlp.down_proj" in detail

    @pytest.mark.parametrize("constant", ["NaN", "Infinity", "-Infinity"])
    def test_nan_and_infinity(self, client: httpx.Client, model: dict, constant: str) -> None:
        step = f'{{"type": "prune", "method": "magnitude", "sparsity": {constant}}}'
        raw = f'{{"model_id": "{model["id"]}", "recipe": [{step}]}}'
        response = client.post("/v1/jobs", content=raw, headers={"Content-Type": "application/json"})
        assert response.status_code == 422 and constant.lstrip("-") in response.json()["detail"]

    def test_deep_and_huge_json(self, client: httpx.Client) -> None:
        deep = client.post("/v1/jobs", content="[" * 100_000, headers={"Content-Type": "application/json"})
        assert deep.status_code == 422 and "nested" in deep.json()["detail"]
        huge = client.post("/v1/jobs", content=b" " * (2 * 1024 * 1024), headers={"Content-Type": "application/json"})
        assert huge.status_code == 413

    def test_not_json(self, client: httpx.Client) -> None:
        response = client.post("/v1/jobs", content="{model", headers={"Content-Type": "application/json"})
        assert response.status_code == 422 and "not valid JSON" in response.json()["detail"]

    def test_needs_tokenizer(self, client, model, dataset, tmp_path, tiny_model_dir) -> None:
        from tests.api.builders import copy_with_config
        from tests.utils.factories import tar_folder

        folder = copy_with_config(tiny_model_dir, tmp_path / "m")
        for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
            (folder / name).unlink(missing_ok=True)
        with tar_folder(folder, tmp_path / "m.tar").open("rb") as handle:
            bare = client.post("/v1/models", files={"file": ("m.tar", handle)}).json()
        assert bare["details"]["has_tokenizer"] is False
        try:
            response = client.post("/v1/jobs", json=spec(bare, dataset))
            assert response.status_code == 422 and "tokenizer" in response.json()["detail"]
        finally:
            assert client.delete(f"/v1/models/{bare['id']}").status_code == 204


def test_delete_in_use_is_refused(client: httpx.Client, model: dict, dataset: dict, tiny_tar) -> None:
    with tiny_tar.open("rb") as handle:
        other = client.post("/v1/models", files={"file": ("t.tar", handle)}).json()
    job = client.post("/v1/jobs", json=spec(other, dataset)).json()
    assert client.delete(f"/v1/models/{other['id']}").status_code == 409
    refused = client.delete(f"/v1/datasets/{dataset['id']}")
    assert refused.status_code == 409 and job["id"] in refused.json()["detail"]
    assert client.post(f"/v1/jobs/{job['id']}/cancel").status_code == 200
    assert client.delete(f"/v1/models/{other['id']}").status_code == 204
    assert client.get(f"/v1/jobs/{job['id']}").json()["model_id"] == other["id"]


def test_delete_of_a_dataset_a_distill_step_trains_on_is_refused(
    client: httpx.Client, model: dict, tmp_path: Path
) -> None:
    with write_text_dataset(tmp_path / "train.txt").open("rb") as handle:
        train = client.post("/v1/datasets", files={"file": ("train.txt", handle)}).json()
    body = {"model_id": model["id"], "recipe": [{"type": "distill", "dataset_id": train["id"], "steps": 1}]}
    job = client.post("/v1/jobs", json=body).json()
    refused = client.delete(f"/v1/datasets/{train['id']}")
    assert refused.status_code == 409 and job["id"] in refused.json()["detail"]
    assert client.post(f"/v1/jobs/{job['id']}/cancel").status_code == 200
    assert client.delete(f"/v1/datasets/{train['id']}").status_code == 204


def test_group_size_must_divide_only_the_targeted_widths(client: httpx.Client, model: dict) -> None:
    """down_proj reads 128 features (the tiny model's other Linears read 64): group 128 fits it alone."""
    step = {**RTN, "weights": {"bits": 4, "group_size": 128}, "targets": ["re:.*down_proj"]}
    response = client.post("/v1/jobs", json=spec(model, recipe=[step]))
    assert response.status_code == 202, response.text


def test_without_a_layer_table_only_group_sizes_are_checked(client: httpx.Client, model: dict) -> None:
    """A model inspected without per-layer shapes (a GGUF upload) is checked against the config's widths; what
    needs layer names is left to the engine."""
    from modelpress.db import session_scope
    from modelpress.models import Model

    with session_scope() as session:
        row = session.get(Model, model["id"])
        details = dict(row.details)
        row.details = {k: v for k, v in details.items() if k != "linears"}
    try:
        step = {**RTN, "weights": {"bits": 4, "group_size": 128}, "targets": ["re:.*down_proj"]}
        response = client.post("/v1/jobs", json=spec(model, recipe=[step]))
        assert response.status_code == 422 and "group_size 128" in response.json()["detail"]
        unknown = client.post("/v1/jobs", json=spec(model, recipe=[{**PRUNE, "targets": ["re:.*no_such_proj"]}]))
        assert unknown.status_code == 202, unknown.text
    finally:
        with session_scope() as session:
            session.get(Model, model["id"]).details = details
