"""Keys and tenants: every /v1 route needs a valid key (401), and another tenant's ids answer 404 everywhere."""

from __future__ import annotations

import hashlib
import uuid

import httpx
import pytest
from sqlalchemy import select

PRUNE = {"type": "prune", "method": "magnitude", "sparsity": 0.5}


@pytest.fixture(scope="module")
def owned(client: httpx.Client, model: dict, dataset: dict, migrated: dict) -> dict:
    """One of each resource owned by `acme`, an artifact included."""
    from modelpress.db import session_scope
    from modelpress.models import Artifact

    job = client.post("/v1/jobs", json={"model_id": model["id"], "recipe": [PRUNE]}).json()
    with session_scope() as session:
        row = Artifact(
            tenant="acme",
            job_id=job["id"],
            name="r.json",
            kind="report",
            media_type="application/json",
            size_bytes=2,
            sha256=hashlib.sha256(b"{}").hexdigest(),
            storage_key=f"jobs/{job['id']}/r.json",
        )
        session.add(row)
        session.flush()
        artifact_id = row.id
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
