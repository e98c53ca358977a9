"""/healthz answers without a key: 200 when the database and broker answer, 503 naming what is down."""

from __future__ import annotations

import httpx

from tests.conftest import LiveProcess


def test_healthy(anon: httpx.Client) -> None:
    response = anon.get("/healthz")
    assert response.status_code == 200
    assert response.json() == {"status": "ok", "checks": {"database": "ok", "broker": "ok"}}


def test_dead_broker(degraded_api: LiveProcess) -> None:
    response = httpx.get(f"{degraded_api.url}/healthz", timeout=10)
    assert response.status_code == 503
    body = response.json()
    assert body["checks"] == {"database": "ok", "broker": "down"} and "broker" in body["detail"]


def test_docs_and_schema(anon: httpx.Client) -> None:
    assert anon.get("/docs").status_code == 200
    schema = anon.get("/openapi.json").json()
    upload = schema["paths"]["/v1/models"]["post"]["requestBody"]["content"]["multipart/form-data"]["schema"]
    assert upload["properties"]["file"]["format"] == "binary"
    job_body = schema["paths"]["/v1/jobs"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert job_body == {"$ref": "#/components/schemas/JobCreate"} and "JobCreate" in schema["components"]["schemas"]
    assert "HTTPBearer" in schema["components"]["securitySchemes"]
