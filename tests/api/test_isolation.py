"""Keys and tenants: every /v1 route needs a valid key (401), and another tenant's ids answer 404 everywhere."""

from __future__ import annotations

import hashlib
import uuid
from datetime import UTC, datetime

import httpx
import pytest
from sqlalchemy import select

from tests.utils.factories import insert_artifact

PRUNE = {"type": "prune", "method": "magnitude", "sparsity": 0.5}


@pytest.fixture(scope="module")
def owned(client: httpx.Client, model: dict, dataset: dict, migrated: dict) -> dict:
    """One of each resource owned by `acme`, an artifact included."""
    job = client.post("/v1/jobs", json={"model_id": model["id"], "recipe": [PRUNE]}).json()
    artifact_id = insert_artifact(
        job["id"], "r.json", b"{}", f"jobs/{job['id']}/r.json", kind="report", media_type="application/json"
    )
    return {"model": model["id"], "dataset": dataset["id"], "job": job["id"], "artifact": artifact_id}


def routes(ids: dict) -> list[tuple[str, str]]:
    return [
        ("GET", f"/v1/models/{ids['model']}"),
        ("DELETE", f"/v1/models/{ids['model']}"),
        ("GET", f"/v1/datasets/{ids['dataset']}"),
        ("DELETE", f"/v1/datasets/{ids['dataset']}"),
        ("GET", f"/v1/jobs/{ids['job']}"),
        ("POST", f"/v1/jobs/{ids['job']}/cancel"),
        ("GET", f"/v1/jobs/{ids['job']}/report"),
        ("GET", f"/v1/jobs/{ids['job']}/artifacts"),
        ("GET", f"/v1/artifacts/{ids['artifact']}"),
    ]


def test_other_tenant_gets_404_everywhere(other_client: httpx.Client, client: httpx.Client, owned: dict) -> None:
    missing = {k: str(uuid.uuid4()) for k in owned}
    for (method, url), (_, missing_url) in zip(routes(owned), routes(missing), strict=True):
        foreign = other_client.request(method, url)
        absent = other_client.request(method, missing_url)
        assert foreign.status_code == 404, (method, url, foreign.text)
        assert absent.status_code == 404
        assert foreign.json()["detail"].split(" ")[0] == absent.json()["detail"].split(" ")[0]
    assert client.get(f"/v1/models/{owned['model']}").status_code == 200  # nothing was deleted
    assert client.get(f"/v1/jobs/{owned['job']}").json()["status"] == "queued"  # nor cancelled


def test_wrong_or_missing_key_is_401(anon: httpx.Client, owned: dict) -> None:
    from modelpress.db import new_session
    from modelpress.models import Job

    listing = [("GET", "/v1/models"), ("GET", "/v1/datasets"), ("GET", "/v1/jobs"), ("POST", "/v1/jobs")]
    for method, url in routes(owned) + listing:
        for headers in ({}, {"Authorization": "Bearer mp_wrong"}, {"Authorization": "Basic abc"}):
            response = anon.request(method, url, headers=headers, json={"model_id": owned["model"], "recipe": [PRUNE]})
            assert response.status_code == 401, (method, url, headers)
            assert response.headers["www-authenticate"].startswith("Bearer")
            assert "API key" in response.json()["detail"]
    with new_session() as session:
        assert session.scalars(select(Job.id).where(Job.tenant == "acme")).all()  # sanity: rows exist


def test_listings_hold_only_the_callers_rows(other_client: httpx.Client, owned: dict) -> None:
    for route, kind in (("/v1/models", "model"), ("/v1/datasets", "dataset"), ("/v1/jobs", "job")):
        listed = other_client.get(route, params={"limit": 200}).json()
        assert owned[kind] not in {row["id"] for row in listed["data"]}, route


def test_jobs_cannot_use_another_tenants_dataset(other_client: httpx.Client, tiny_tar, owned: dict) -> None:
    with tiny_tar.open("rb") as handle:
        own_model = other_client.post("/v1/models", files={"file": ("t.tar", handle)}).json()
    try:
        body = {
            "model_id": own_model["id"],
            "recipe": [PRUNE],
            "evaluation": {"dataset_id": owned["dataset"], "seq_len": 64},
        }
        response = other_client.post("/v1/jobs", json=body)
        assert response.status_code == 404 and owned["dataset"] in response.json()["detail"]
    finally:
        assert other_client.delete(f"/v1/models/{own_model['id']}").status_code == 204


def test_keys_are_stored_hashed_and_revocable(live_api, migrated: dict) -> None:
    from modelpress.db import session_scope
    from modelpress.models import ApiKey
    from tests.api.conftest import client_for
    from tests.conftest import make_key

    secret = make_key("hashed")
    with session_scope() as session:
        row = session.scalar(select(ApiKey).where(ApiKey.tenant == "hashed"))
        stored = [str(getattr(row, column.key)) for column in ApiKey.__table__.columns]
    assert row.key_hash == hashlib.sha256(secret.encode()).hexdigest()
    assert not any(secret in value for value in stored) and not any(secret[10:] in value for value in stored)
    with client_for(live_api.url, secret) as client:
        assert client.get("/v1/models").status_code == 200
        with session_scope() as session:
            session.get(ApiKey, row.id).revoked_at = datetime.now(UTC)
        response = client.get("/v1/models")
        assert response.status_code == 401 and "revoked" in response.json()["detail"]
