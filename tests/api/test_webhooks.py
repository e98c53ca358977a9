"""A job's `notify` webhook at submission: private addresses refused unless allowed, the secret never answered.

The session's API runs with the defaults (no `MODELPRESS_WEBHOOK_ALLOW_PRIVATE`), so loopback is refused here;
deliveries themselves are tested against a real worker in tests/e2e/test_events.py.
"""

from __future__ import annotations

import json

import httpx
import pytest
from sqlalchemy import select

from modelpress.settings import Settings
from modelpress.webhooks import RefusedUrl, backoff_s, check_url, sign

PRUNE = {"type": "prune", "method": "magnitude", "sparsity": 0.5}
SECRET = "s3cret-s3cret-s3cret"


def body(model: dict, url: str, secret: str = SECRET) -> dict:
    return {"model_id": model["id"], "recipe": [PRUNE], "notify": {"url": url, "secret": secret}}


@pytest.mark.parametrize(
    ("url", "address"),
    [
        ("http://127.0.0.1:8000/hook", "127.0.0.1"),
        ("http://localhost/hook", ""),  # 127.0.0.1 or ::1, whichever the resolver answers first
        ("http://10.1.2.3/hook", "10.1.2.3"),
        ("https://192.168.0.10/hook", "192.168.0.10"),
        ("http://169.254.169.254/latest/meta-data", "169.254.169.254"),
        ("http://[::1]:9000/", "::1"),
        ("http://[::ffff:127.0.0.1]/", "127.0.0.1"),
    ],
)
def test_a_private_url_is_refused_without_the_allow_setting(
    client: httpx.Client, model: dict, url: str, address: str, nothing_stored: None
) -> None:
    response = client.post("/v1/jobs", json=body(model, url))
    assert response.status_code == 422, response.text
    detail = response.json()["detail"]
    assert f"resolves to {address}" in detail and "MODELPRESS_WEBHOOK_ALLOW_PRIVATE" in detail


def test_a_malformed_notify_is_a_422_naming_the_field(client: httpx.Client, model: dict, nothing_stored: None) -> None:
    not_http = client.post("/v1/jobs", json=body(model, "ftp://example.com/x"))
    assert not_http.status_code == 422 and "notify.url" in not_http.json()["detail"]
    short = client.post("/v1/jobs", json=body(model, "https://example.com/x", secret="short"))
    assert short.status_code == 422 and "notify.secret" in short.json()["detail"]


def test_the_secret_is_stored_for_delivery_but_never_answered(client: httpx.Client, model: dict) -> None:
    from modelpress.db import new_session
    from modelpress.models import Job, Webhook

    url = "http://93.184.215.14/hook"  # a public address: accepted without resolving a name
    created = client.post("/v1/jobs", json=body(model, url))
    assert created.status_code == 202, created.text
    job_id = created.json()["id"]
    for answer in (created, client.get(f"/v1/jobs/{job_id}"), client.get("/v1/jobs")):
        assert SECRET not in answer.text
    with new_session() as session:
        assert SECRET not in json.dumps(session.get(Job, job_id).spec)
        webhook = session.scalar(select(Webhook).where(Webhook.job_id == job_id))
        assert (webhook.url, webhook.secret, webhook.tenant) == (url, SECRET, "acme")
    assert client.get(f"/v1/jobs/{job_id}/deliveries").json() == {"data": [], "count": 0}


def test_the_same_idempotency_key_with_another_secret_is_a_conflict(client: httpx.Client, model: dict) -> None:
    headers = {"Idempotency-Key": "webhook-secret-change"}
    first = client.post("/v1/jobs", json=body(model, "http://93.184.215.14/a"), headers=headers)
    assert first.status_code == 202, first.text
    again = client.post("/v1/jobs", json=body(model, "http://93.184.215.14/a"), headers=headers)
    assert again.json()["id"] == first.json()["id"]
    changed = body(model, "http://93.184.215.14/a", secret="another-secret-x")
    other = client.post("/v1/jobs", json=changed, headers=headers)
    assert other.status_code == 422 and "different body" in other.json()["detail"]


def test_the_operator_can_allow_private_addresses_or_list_hosts() -> None:
    with pytest.raises(RefusedUrl, match="resolves to 127.0.0.1"):
        check_url("http://127.0.0.1/hook", Settings(webhook_allow_private=False))
    check_url("http://127.0.0.1/hook", Settings(webhook_allow_private=True))
    check_url("http://127.0.0.1/hook", Settings(webhook_allowed_hosts=["127.0.0.0/8"]))
    check_url("http://localhost/hook", Settings(webhook_allowed_hosts=["localhost"]))
    with pytest.raises(RefusedUrl, match="resolves to 10.0.0.1"):
        check_url("http://10.0.0.1/hook", Settings(webhook_allowed_hosts=["127.0.0.0/8"]))


def test_the_signature_is_hmac_sha256_of_timestamp_dot_body() -> None:
    # the reference value is computed independently with openssl:
    # printf '1700000000.{"id":"x"}' | openssl dgst -sha256 -hmac whsec_test
    reference = "80e8d098018f757aa814ab1abb924f35d304affa1d93d29611a54696207eb7c3"
    assert sign("whsec_test", 1700000000, b'{"id":"x"}') == f"t=1700000000,v1={reference}"
    assert sign("whsec_other", 1700000000, b'{"id":"x"}') != f"t=1700000000,v1={reference}"


def test_backoff_doubles_up_to_its_cap() -> None:
    settings = Settings(webhook_backoff_s=2, webhook_max_backoff_s=10)
    assert [backoff_s(n, settings) for n in (1, 2, 3, 4, 5)] == [2, 4, 8, 10, 10]
