"""Live events and webhooks against the real stack: uvicorn, a Celery worker, PostgreSQL and Redis.

The stack allows loopback webhooks (`MODELPRESS_WEBHOOK_ALLOW_PRIVATE=true`), so receivers are tiny HTTP servers
on 127.0.0.1 started here; its heartbeat and retry delays are short so the tests are quick.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import threading
import time
from collections.abc import Iterator

import pytest

from tests.conftest import make_key
from tests.utils.factories import build_tiny_model, tar_folder
from tests.utils.receiver import Receiver
from tests.utils.sse import Event, parse
from tests.utils.stack import Client, Stack, open_stack, wait_for

SECRET = "a-webhook-secret-of-some-length"
RECIPE = [
    {"type": "prune", "method": "magnitude", "sparsity": 0.5},
    {"type": "quantize", "method": "rtn", "weights": {"bits": 8, "group_size": None}},
]


@pytest.fixture(scope="module")
def stack(migrated: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    with open_stack(
        migrated,
        tmp_path_factory.mktemp("events"),
        MODELPRESS_EVENTS_HEARTBEAT_S="1",
        MODELPRESS_PROGRESS_INTERVAL_S="0.05",
        MODELPRESS_WEBHOOK_ALLOW_PRIVATE="true",
        MODELPRESS_WEBHOOK_BACKOFF_S="0.3",
        MODELPRESS_WEBHOOK_POLL_S="0.2",
        MODELPRESS_WEBHOOK_TIMEOUT_S="5",
    ) as built:
        built.start_api()
        built.start_worker()
        yield built


@pytest.fixture(scope="module")
def client(stack: Stack) -> Client:
    return stack.client()


@pytest.fixture(scope="module")
def model_id(client: Client, tmp_path_factory: pytest.TempPathFactory) -> str:
    root = tmp_path_factory.mktemp("tiny")
    archive = tar_folder(build_tiny_model(root / "model"), root / "tiny.tar.gz", gzip=True)
    model = client.upload("/v1/models", archive, name="tiny")
    assert model.status_code == 201, model.text
    return model.json()["id"]


def read_stream(client: Client, job_id: str, last_event_id: str | None = None, comments: list | None = None):
    headers = {"Last-Event-ID": last_event_id} if last_event_id else {}
    with client.http.stream("GET", f"/v1/jobs/{job_id}/events", headers=headers, timeout=180) as response:
        assert response.status_code == 200, response.read()
        assert response.headers["content-type"].startswith("text/event-stream")
        return list(parse(response.iter_lines(), comments))


@pytest.fixture(scope="module")
def good_receiver() -> Receiver:
    return Receiver()


@pytest.fixture(scope="module")
def followed(client: Client, model_id: str, good_receiver: Receiver) -> tuple[str, list[Event], list[str]]:
    """A job with a webhook, followed over the stream from submission to its end."""
    body = {"model_id": model_id, "recipe": RECIPE, "notify": {"url": good_receiver.url, "secret": SECRET}}
    response = client.http.post("/v1/jobs", json=body)
    assert response.status_code == 202, response.text
    comments: list[str] = []
    job_id = response.json()["id"]
    return job_id, read_stream(client, job_id, comments=comments), comments


def test_stream_delivers_progress_then_the_final_status(followed: tuple[str, list[Event], list[str]]) -> None:
    job_id, events, _ = followed
    statuses = [e.data["status"] for e in events]
    assert statuses[-1] == "succeeded", statuses
    assert statuses.count("succeeded") == 1
    running = [e.data for e in events if e.data["status"] == "running"]
    assert any(0 < r["progress"]["fraction"] < 1 for r in running), [r["progress"] for r in running]
    steps = {r["progress"]["step"] for r in running if r["progress"]["step"]}  # none yet while it loads
    assert any("magnitude" in step for step in steps) and any("rtn" in step for step in steps), steps
    assert all(e.event == "job" and e.data["id"] == job_id for e in events)
    assert set(events[-1].data) == set(events[0].data)
    ids = [tuple(map(int, e.id.split("-"))) for e in events[1:]]
    assert ids == sorted(ids) and len(set(ids)) == len(ids)


def test_the_events_carry_the_job_resource(client: Client, followed: tuple[str, list[Event], list[str]]) -> None:
    job_id, events, _ = followed
    resource = client.http.get(f"/v1/jobs/{job_id}").json()
    assert events[-1].data == resource
    assert "notify" not in resource and SECRET not in json.dumps(resource)


def test_resuming_with_last_event_id_skips_delivered_events(
    client: Client, followed: tuple[str, list[Event], list[str]]
) -> None:
    job_id, events, _ = followed
    assert len(events) >= 4
    resumed = read_stream(client, job_id, last_event_id=events[1].id)
    assert [e.id for e in resumed] == [e.id for e in events[2:]]
    assert resumed[-1].data["status"] == "succeeded"


def test_a_client_after_the_end_gets_the_final_state_and_the_stream_closes(
    client: Client, followed: tuple[str, list[Event], list[str]]
) -> None:
    job_id, _, _ = followed
    started = time.monotonic()
    events = read_stream(client, job_id)
    assert len(events) == 1 and events[0].data["status"] == "succeeded"
    assert time.monotonic() - started < 5
    stale = read_stream(client, job_id, last_event_id="1-0")  # older than anything kept: the row first
    assert len(stale) == 1 and stale[0].data["status"] == "succeeded"


def test_another_tenant_gets_404(stack: Stack, followed: tuple[str, list[Event], list[str]]) -> None:
    job_id, _, _ = followed
    other = Client(stack.api.url, make_key("globex", stack.env["DATABASE_URL"]))
    for route in ("events", "deliveries"):
        response = other.http.get(f"/v1/jobs/{job_id}/{route}")
        assert response.status_code == 404 and "not found" in response.json()["detail"], response.text


def test_the_webhook_gets_a_correctly_signed_post(
    client: Client, followed: tuple[str, list[Event], list[str]], good_receiver: Receiver
) -> None:
    job_id, events, _ = followed
    wait_for(lambda: good_receiver.requests, 30, "the webhook POST")
    headers, body = good_receiver.requests[0]
    stamp, signature = (part.split("=", 1)[1] for part in headers["x-modelpress-signature"].split(","))
    expected = hmac.new(SECRET.encode(), f"{stamp}.".encode() + body, hashlib.sha256).hexdigest()
    assert hmac.compare_digest(signature, expected)
    assert abs(time.time() - int(stamp)) < 120
    assert json.loads(body) == events[-1].data
    forged = hmac.new(b"another-secret-entirely", f"{stamp}.".encode() + body, hashlib.sha256).hexdigest()
    assert signature != forged
    deliveries = client.http.get(f"/v1/jobs/{job_id}/deliveries").json()
    assert deliveries["count"] == 1
    assert deliveries["data"][0] | {"duration_ms": 0, "created_at": ""} == {
        "attempt": 1,
        "url": good_receiver.url,
        "job_status": "succeeded",
        "delivered": True,
        "status_code": 200,
        "error": None,
        "duration_ms": 0,
        "created_at": "",
    }
    assert len(good_receiver.requests) == 1


def test_a_receiver_that_fails_twice_gets_three_recorded_attempts(client: Client, model_id: str) -> None:
    receiver = Receiver(statuses=(500, 503))
    body = {"model_id": model_id, "recipe": RECIPE[:1], "notify": {"url": receiver.url, "secret": SECRET}}
    job_id = client.http.post("/v1/jobs", json=body).json()["id"]
    assert client.wait(job_id, 180)["status"] == "succeeded"
    deliveries = wait_for(
        lambda: (d := client.http.get(f"/v1/jobs/{job_id}/deliveries").json())["count"] >= 3 and d, 60, "3 attempts"
    )
    assert [(d["attempt"], d["status_code"], d["delivered"]) for d in deliveries["data"]] == [
        (1, 500, False),
        (2, 503, False),
        (3, 200, True),
    ]
    assert "500" in deliveries["data"][0]["error"]
    assert len(receiver.requests) == 3
    time.sleep(1)
    assert client.http.get(f"/v1/jobs/{job_id}/deliveries").json()["count"] == 3  # no more once taken


def test_the_heartbeat_keeps_a_quiet_stream_open(client: Client, model_id: str) -> None:
    """A job that waits in the queue (no matching worker) sends heartbeats while it waits, then its cancel."""
    response = client.http.post("/v1/jobs", json={"model_id": model_id, "recipe": RECIPE[:1]})
    job_id = response.json()["id"]
    comments: list[str] = []
    result: list[Event] = []

    def follow() -> None:
        result.extend(read_stream(client, job_id, comments=comments))

    thread = threading.Thread(target=follow)
    thread.start()
    wait_for(lambda: comments, 20, "a heartbeat")
    client.http.post(f"/v1/jobs/{job_id}/cancel")
    thread.join(30)
    assert not thread.is_alive()
    assert comments[0] == ": heartbeat"
    assert result[-1].data["status"] in ("cancelled", "succeeded")


def test_an_event_after_a_quiet_spell_arrives_at_once(
    migrated: dict[str, str], tmp_path_factory: pytest.TempPathFactory
) -> None:
    """The stream's blocking read waits a whole heartbeat, longer than redis-py's default socket timeout (5 s):
    an event published after 6 quiet seconds reaches the client at once, not a heartbeat later."""
    root = tmp_path_factory.mktemp("quiet")
    with open_stack(migrated, root, MODELPRESS_EVENTS_HEARTBEAT_S="12") as quiet:
        quiet.start_api()  # no worker: the job waits in the queue, and nothing is published until it is cancelled
        client = quiet.client()
        archive = tar_folder(build_tiny_model(root / "model"), root / "tiny.tar.gz", gzip=True)
        model_id = client.upload("/v1/models", archive, name="tiny").json()["id"]
        job_id = client.http.post("/v1/jobs", json={"model_id": model_id, "recipe": RECIPE[:1]}).json()["id"]
        arrivals: list[tuple[float, Event]] = []

        def follow() -> None:
            with client.http.stream("GET", f"/v1/jobs/{job_id}/events", timeout=60) as response:
                for event in parse(response.iter_lines()):
                    arrivals.append((time.monotonic(), event))

        thread = threading.Thread(target=follow, daemon=True)
        thread.start()
        wait_for(lambda: arrivals, 20, "the job as it stands")
        time.sleep(6)
        cancelled = time.monotonic()
        assert client.http.post(f"/v1/jobs/{job_id}/cancel").status_code == 200
        thread.join(30)
        arrived, final = arrivals[-1]
        assert final.data["status"] == "cancelled", [e.data["status"] for _, e in arrivals]
        assert arrived - cancelled < 3, f"the cancel arrived {arrived - cancelled:.1f} s after it was published"
        assert "reading events failed" not in quiet.api.log.read_text()
