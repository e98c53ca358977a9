"""Faults on the upload and submit paths: an API killed mid-upload leaves nothing; racing retries make one job."""

from __future__ import annotations

import signal
import socket
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import urlparse

import httpx
import pytest
from sqlalchemy import func, select

from tests.api.conftest import storage_root, stored_state
from tests.conftest import start_api


def upload_folders(env: dict) -> list[Path]:
    scratch = storage_root(env) / "tmp"
    return [p for p in scratch.iterdir() if (p / ".upload.lock").exists()] if scratch.exists() else []


def test_api_killed_mid_upload_leaves_nothing(migrated: dict, api_key: str, tmp_path: Path) -> None:
    before = stored_state(migrated)
    server = start_api(migrated, tmp_path / "api-1.log")
    url = urlparse(server.url)
    head = (
        f"POST /v1/models HTTP/1.1\r\nHost: {url.netloc}\r\nAuthorization: Bearer {api_key}\r\n"
        "Content-Type: multipart/form-data; boundary=b0undary\r\nContent-Length: 50000000\r\n\r\n"
        '--b0undary\r\nContent-Disposition: form-data; name="file"; filename="m.tar"\r\n\r\n'
    ).encode()
    with socket.create_connection((url.hostname, url.port), timeout=30) as sock:
        sock.sendall(head + b"\0" * (3 * 1024 * 1024))
        deadline = time.monotonic() + 20
        while not any((p / "upload").exists() for p in upload_folders(migrated)) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert upload_folders(migrated), "the upload never reached the scratch folder"
        server.stop(signal.SIGKILL)
    restarted = start_api(migrated, tmp_path / "api-2.log")
    try:
        assert upload_folders(migrated) == []
        assert stored_state(migrated) == before
        with httpx.Client(base_url=restarted.url, headers={"Authorization": f"Bearer {api_key}"}) as client:
            response = client.post("/v1/datasets", files={"file": ("after.txt", b"the next upload works\n")})
            assert response.status_code == 201
            assert client.delete(f"/v1/datasets/{response.json()['id']}").status_code == 204
    finally:
        restarted.stop()


@pytest.mark.parametrize("attempts", [8])
def test_racing_retries_create_one_job(client: httpx.Client, model: dict, attempts: int) -> None:
    from modelpress.db import new_session
    from modelpress.models import Job

    key = f"race-{uuid.uuid4()}"
    body = {"model_id": model["id"], "recipe": [{"type": "prune", "method": "magnitude", "sparsity": 0.25}]}

    def submit(_: int) -> httpx.Response:
        with httpx.Client(base_url=str(client.base_url), headers=dict(client.headers)) as own:
            return own.post("/v1/jobs", json=body, headers={"Idempotency-Key": key})

    with ThreadPoolExecutor(attempts) as pool:
        responses = list(pool.map(submit, range(attempts)))
    assert {r.status_code for r in responses} == {202}
    assert len({r.json()["id"] for r in responses}) == 1
    with new_session() as session:
        assert session.scalar(select(func.count()).select_from(Job).where(Job.idempotency_key == key)) == 1
