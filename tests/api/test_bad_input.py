"""Inputs that reached PostgreSQL and failed there (500s found by schemathesis) answer 4xx instead."""

from __future__ import annotations

import httpx
import pytest

PRUNE = {"type": "prune", "method": "magnitude", "sparsity": 0.5}


@pytest.mark.parametrize("route", ["/v1/models", "/v1/datasets", "/v1/jobs"])
def test_offset_past_bigint(client: httpx.Client, route: str) -> None:
    response = client.get(route, params={"offset": 2**70})
    assert response.status_code == 422 and "offset" in response.json()["detail"]


@pytest.mark.parametrize("route", ["/v1/models/{}", "/v1/datasets/{}", "/v1/jobs/{}", "/v1/artifacts/{}"])
@pytest.mark.parametrize("row_id", ["%00", "a%00b", "x" * 36, "%F0%9F%87%BA"])
def test_malformed_ids_are_404(client: httpx.Client, route: str, row_id: str) -> None:
    response = client.get(route.format(row_id))
    assert response.status_code == 404 and "not found" in response.json()["detail"]


def test_nul_in_json_strings(client: httpx.Client, model: dict) -> None:
    for body in ({"model_id": "a\x00b", "recipe": [PRUNE]}, {"model_id": model["id"], "recipe": [PRUNE], "\x00": 1}):
        response = client.post("/v1/jobs", json=body)
        assert response.status_code == 422 and "\\u0000" in response.json()["detail"], response.text


@pytest.mark.usefixtures("nothing_stored")
def test_nul_in_upload_name(client: httpx.Client) -> None:
    response = client.post("/v1/datasets", files={"file": ("a.txt", b"some text\n" * 20)}, data={"name": "a\x00b"})
    assert response.status_code == 422 and "control characters" in response.json()["detail"]


def test_control_characters_are_dropped_from_file_names(client: httpx.Client) -> None:
    body = (
        b'--b0\r\nContent-Disposition: form-data; name="file"; filename="ca\x00l\x1fib.txt"\r\n\r\n'
        + b"some text\n" * 20
        + b"\r\n--b0--\r\n"
    )
    response = client.post("/v1/datasets", content=body, headers={"Content-Type": "multipart/form-data; boundary=b0"})
    assert response.status_code == 201, response.text
    assert response.json()["name"] == "calib"
    assert client.delete(f"/v1/datasets/{response.json()['id']}").status_code == 204
