"""Schemathesis against the API's OpenAPI schema: a bounded, deterministic run per operation, and no 5xx.

The schema is the one the live API serves (checked equal); the cases go to the live uvicorn on 127.0.0.1 with
a valid key of a tenant of their own, so the random uploads and jobs stay out of the other tests' listings, and a
fresh key every 400 requests, so the run stays under the default per-key rate limit (600 a minute).
It is built from `create_app()` at collection time because `schemathesis.pytest.from_fixture` does not work
with pytest 9 (it reads `request.node._nodeid`).
"""

from __future__ import annotations

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error

from app.main import create_app
from tests.conftest import LiveProcess, make_key

OPENAPI = create_app().openapi()
schema = schemathesis.openapi.from_dict(OPENAPI, config=schemathesis.Config.from_dict({"seed": 0}))


class FuzzKeys:
    """Keys of the `fuzz` tenant, a new one every `per_key` requests: under the default per-key rate limit."""

    def __init__(self, per_key: int = 400) -> None:
        self.per_key = per_key
        self.sent = 0
        self.key = ""

    def next(self) -> str:
        if self.sent % self.per_key == 0:
            self.key = make_key("fuzz")
        self.sent += 1
        return self.key


@pytest.fixture(scope="module")
def fuzz_keys(migrated: dict) -> FuzzKeys:
    return FuzzKeys()


def test_live_api_serves_this_schema(live_api: LiveProcess) -> None:
    assert httpx.get(f"{live_api.url}/openapi.json").json() == OPENAPI


@schema.parametrize()
@settings(max_examples=25, derandomize=True, database=None, deadline=None, suppress_health_check=list(HealthCheck))
def test_no_server_errors(case, live_api: LiveProcess, fuzz_keys: FuzzKeys) -> None:
    case.call_and_validate(
        base_url=live_api.url,
        headers={"Authorization": f"Bearer {fuzz_keys.next()}"},
        checks=[not_a_server_error],
        timeout=30,
    )
