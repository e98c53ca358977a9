"""The whole stack for end-to-end tests: a real uvicorn API and a real Celery worker process."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.conftest import LiveProcess, start_worker

FINAL = {"succeeded", "failed", "cancelled"}


@pytest.fixture(scope="session")
def live_worker(migrated: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveProcess]:
    worker = start_worker(migrated, tmp_path_factory.mktemp("worker-logs") / "worker.log")
    yield worker
    worker.stop()


class Client:
    """A thin HTTP client for tests: the API's own routes, nothing from the project."""

    def __init__(self, base_url: str, key: str) -> None:
        self.http = httpx.Client(base_url=base_url, headers={"Authorization": f"Bearer {key}"}, timeout=120)

    def upload(self, route: str, path: Path, name: str | None = None) -> httpx.Response:
        with path.open("rb") as handle:
            data = {"name": name} if name else {}
            return self.http.post(route, files={"file": (path.name, handle)}, data=data)

    def wait(self, job_id: str, timeout: float, worker: LiveProcess | None = None) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            job = self.http.get(f"/v1/jobs/{job_id}").json()
            if job["status"] in FINAL:
                return job
            if worker is not None and worker.process.poll() is not None:
                raise AssertionError(f"worker died:\n{worker.output()[-4000:]}")
            time.sleep(0.5)
        log = worker.output()[-4000:] if worker else ""
        raise AssertionError(f"job {job_id} did not finish in {timeout}s: {job}\n{log}")

    def download(self, artifact: dict, target: Path) -> Path:
        with self.http.stream("GET", f"/v1/artifacts/{artifact['id']}") as response:
            response.raise_for_status()
            with target.open("wb") as handle:
                for chunk in response.iter_bytes():
                    handle.write(chunk)
        return target
