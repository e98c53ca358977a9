"""`modelpress workers` and `modelpress workers drain` against an in-memory answer of the API: the admin key is
sent, the table shows each worker's state, GPUs and classes, and a refusal prints the server's detail."""

from __future__ import annotations

import functools

import httpx
import pytest
from typer.testing import CliRunner

from modelpress.cli import main as cli
from modelpress.cli.client import Client

ADMIN = "admin-key-for-cli-tests-0123456789abcdef"
H100 = {"index": 0, "uuid": "GPU-1", "name": "NVIDIA H100 80GB HBM3", "memory_bytes": 85_520_809_984}
WORKERS = [
    {
        "name": "gpu0@box", "host": "box", "pid": 7, "version": "0.1.0", "state": "busy", "live": True,
        "gpus": [{**H100, "memory_used_bytes": 42 * 1024**3}], "memory_classes": ["cpu", "gpu-24", "gpu-48", "gpu-80"],
        "queues": [], "free_disk_bytes": 500 * 1024**3, "current_job_id": "job-1",
        "started_at": "2026-12-06T05:00:00Z", "heartbeat_at": "2026-12-06T05:10:00Z",
    },
    {
        "name": "celery@old", "host": "old", "pid": 8, "version": "0.0.9", "state": "idle", "live": False,
        "gpus": [], "memory_classes": ["cpu"], "queues": [], "free_disk_bytes": None, "current_job_id": None,
        "started_at": "2026-12-05T05:00:00Z", "heartbeat_at": "2026-12-05T06:00:00Z",
    },
]  # fmt: skip


@pytest.fixture
def sent(monkeypatch: pytest.MonkeyPatch) -> list[httpx.Request]:
    requests: list[httpx.Request] = []

    def handle(request: httpx.Request) -> httpx.Response:
        requests.append(request)
        if request.headers.get("authorization") != f"Bearer {ADMIN}":
            return httpx.Response(401, json={"detail": "this route needs the admin key"})
        if request.url.path == "/v1/workers":
            return httpx.Response(200, json={"data": WORKERS, "count": len(WORKERS)})
        if request.url.path == "/v1/workers/gpu0@box/drain" and request.method == "POST":
            return httpx.Response(202, json={**WORKERS[0], "state": "draining"})
        return httpx.Response(404, json={"detail": "no worker named 'x'"})

    monkeypatch.setattr(cli, "Client", functools.partial(Client, transport=httpx.MockTransport(handle)))
    monkeypatch.setenv("MODELPRESS_URL", "http://fake")
    monkeypatch.delenv("MODELPRESS_ADMIN_KEY", raising=False)
    return requests


def invoke(*args: str):
    return CliRunner().invoke(cli.app, list(args), env={"COLUMNS": "200"})


def test_workers_lists_state_gpus_and_classes(sent: list[httpx.Request]) -> None:
    result = invoke("workers", "--admin-key", ADMIN)
    assert result.exit_code == 0, result.output
    assert "gpu0@box" in result.output and "NVIDIA H100 80GB HBM3" in result.output
    assert "42.00 GiB / 79.65 GiB" in result.output and "gpu-80" in result.output and "job-1" in result.output
    assert "stopped" in result.output and "none (CPU)" in result.output  # the worker whose heartbeat is old
    assert sent[-1].url.path == "/v1/workers"


def test_drain_posts_to_the_worker_and_a_refusal_shows_the_detail(sent: list[httpx.Request]) -> None:
    result = invoke("workers", "drain", "gpu0@box", "--admin-key", ADMIN)
    assert result.exit_code == 0 and "gpu0@box is draining" in result.output
    assert (sent[-1].method, sent[-1].url.path) == ("POST", "/v1/workers/gpu0@box/drain")
    refused = invoke("workers", "--admin-key", "wrong")
    assert refused.exit_code == 1 and "admin key" in refused.output


def test_a_waiting_job_shows_its_reason_in_lists_and_watch() -> None:
    from modelpress.cli import render

    reason = "waiting for a worker with ≥ 48 GB of GPU memory (the job needs about 37.2 GB); none is running"
    queued = {"id": "j", "status": "queued", "progress": {"total_steps": 1}, "waiting_reason": reason}
    assert render.progress_text(queued) == reason
    running = {**queued, "status": "running", "progress": {"total_steps": 2, "step_index": 0, "fraction": 0.5}}
    assert render.progress_text(running) == "step 1/2 · 50%", "a reason is shown only while the job is queued"
