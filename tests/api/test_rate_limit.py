"""Per-key rate limits, counted in the real Redis: 429 with Retry-After past the limit, per key, for a window.

A second API process runs with tiny limits and a short window; the test session's API keeps its defaults.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.api.conftest import client_for
from tests.conftest import LiveProcess, make_key, start_api

LIMIT = 3
UPLOAD_LIMIT = 2
WINDOW_S = 3


@pytest.fixture(scope="module")
def limited_env(migrated: dict) -> dict[str, str]:
    return {
        **migrated,
        "MODELPRESS_RATE_LIMIT_PER_MINUTE": str(LIMIT),
        "MODELPRESS_UPLOAD_RATE_LIMIT_PER_MINUTE": str(UPLOAD_LIMIT),
        "MODELPRESS_RATE_LIMIT_WINDOW_S": str(WINDOW_S),
    }


@pytest.fixture(scope="module")
def limited_api(limited_env: dict, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveProcess]:
    server = start_api(limited_env, tmp_path_factory.mktemp("logs") / "limited-api.log")
    yield server
    server.stop()


def limited_client(server: LiveProcess) -> httpx.Client:
    return client_for(server.url, make_key("limited"))


def assert_throttled(response: httpx.Response, limit: int, what: str) -> int:
    assert response.status_code == 429, response.text
    retry_after = int(response.headers["retry-after"])
    assert 1 <= retry_after <= WINDOW_S
    detail = response.json()["detail"]
    assert f"{limit} {what} per {WINDOW_S} s" in detail and f"retry in {retry_after} s" in detail, detail
    return retry_after


def test_over_the_limit_is_429_until_the_window_ends(limited_api: LiveProcess) -> None:
    with limited_client(limited_api) as client, limited_client(limited_api) as other:
        assert [client.get("/v1/models").status_code for _ in range(LIMIT)] == [200] * LIMIT
        retry_after = assert_throttled(client.get("/v1/jobs"), LIMIT, "requests")
        assert other.get("/v1/models").status_code == 200  # another key has its own counter
        time.sleep(retry_after + 0.2)
        assert client.get("/v1/models").status_code == 200


def test_counted_across_api_processes(limited_api: LiveProcess, limited_env: dict, tmp_path: Path) -> None:
    second = start_api(limited_env, tmp_path / "second.log")
    key = make_key("limited")
    try:
        with client_for(limited_api.url, key) as first_api, client_for(second.url, key) as second_api:
            statuses = [api.get("/v1/datasets").status_code for api in (first_api, second_api, first_api)]
            assert statuses == [200] * LIMIT
            assert second_api.get("/v1/datasets").status_code == 429
    finally:
        second.stop()


def test_uploads_have_their_own_lower_limit(limited_api: LiveProcess) -> None:
    with limited_client(limited_api) as client:
        for _ in range(UPLOAD_LIMIT):  # refused uploads (not multipart) still count
            assert client.post("/v1/datasets", content=b"x").status_code == 415
        assert_throttled(client.post("/v1/datasets", content=b"x"), UPLOAD_LIMIT, "uploads")


def test_unauthenticated_requests_are_not_counted(limited_api: LiveProcess) -> None:
    with client_for(limited_api.url, "mp_not-a-key") as anon:
        assert {anon.get("/v1/models").status_code for _ in range(LIMIT + 2)} == {401}


def test_redis_down_fails_open(degraded_api: LiveProcess, degraded: httpx.Client) -> None:
    """The degraded API's Redis is unreachable: requests go through, logged, and /healthz reports the broker."""
    assert {degraded.get("/v1/models").status_code for _ in range(5)} == {200}
    assert degraded.get("/healthz").json()["checks"]["broker"] == "down"
    assert "rate limits are not enforced: Redis is unreachable" in degraded_api.output()
