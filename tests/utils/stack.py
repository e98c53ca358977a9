"""A whole modelpress stack for tests: its own database and queue, an API, workers, optionally its own Redis.

A worker's reconciler acts on every queued job of its deployment (its database), so every test that runs a
worker gets a database of its own; only the API-only tests share the test session's.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import redis

from modelpress.migrate import upgrade
from tests.conftest import (
    REDIS_URL,
    LiveProcess,
    free_port,
    fresh_database,
    make_key,
    sqlalchemy_url,
    start_api,
    start_worker,
)

FINAL = {"succeeded", "failed", "cancelled"}

REDIS_SERVER = shutil.which("redis-server")


class RedisServer:
    """A redis-server without persistence on a free port: restarting it loses every queued message."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.port = free_port()
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.process = subprocess.Popen(
            [
                REDIS_SERVER,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(self.folder),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        client = redis.Redis.from_url(self.url)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                client.ping()
                return
            except redis.ConnectionError:
                time.sleep(0.05)
        raise RuntimeError("private redis-server did not start")

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=10)


@dataclass
class Stack:
    env: dict[str, str]
    logs: Path
    key: str
    redis: RedisServer | None = None  # a private Redis this stack owns, if any
    api: LiveProcess | None = None
    workers: list[LiveProcess] = field(default_factory=list)

    def start_api(self) -> LiveProcess:
        self.api = start_api(self.env, self.logs / f"api-{secrets.token_hex(2)}.log")
        return self.api

    def start_worker(self, name: str | None = None, **extra_env: str) -> LiveProcess:
        log = self.logs / f"worker-{len(self.workers)}.log"
        worker = start_worker({**self.env, **extra_env}, log, name)
        self.workers.append(worker)
        return worker

    def client(self) -> Client:
        return Client(self.api.url, self.key)

    def stop(self) -> None:
        for worker in self.workers:
            kill_group(worker, signal.SIGKILL)
        if self.api:
            self.api.stop()
        if self.redis:
            self.redis.stop()


def kill_group(worker: LiveProcess, sig: int) -> None:
    """Signal a worker and every child it forked (the job runs in a child)."""
    if worker.process.poll() is not None:
        return
    children = subprocess.run(["pgrep", "-P", str(worker.process.pid)], capture_output=True, text=True).stdout.split()
    for pid in [worker.process.pid, *map(int, children)]:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass
    worker.process.wait(timeout=30)


@contextmanager
def open_stack(
    base_env: dict[str, str], tmp_path: Path, redis: RedisServer | None = None, **overrides: str
) -> Iterator[Stack]:
    """A fresh database (migrated), a unique queue and data folder; processes are started by the caller."""
    with fresh_database() as libpq_url:
        database_url = sqlalchemy_url(libpq_url)
        upgrade(database_url)
        built = Stack(
            env={
                **base_env,
                "DATABASE_URL": database_url,
                "REDIS_URL": redis.url if redis else REDIS_URL,
                "DATA_DIR": str(tmp_path / "data"),
                "MODELPRESS_QUEUE": f"test-{secrets.token_hex(4)}",
                **overrides,
            },
            logs=_logs(tmp_path),
            key=make_key("acme", database_url),
            redis=redis,
        )
        try:
            yield built
        finally:
            built.stop()


@contextmanager
def running_stack(base_env: dict[str, str], tmp_path: Path) -> Iterator[Stack]:
    """`open_stack` with the API and one worker started: the whole service, as a user meets it."""
    with open_stack(base_env, tmp_path) as stack:
        stack.start_api()
        stack.start_worker()
        yield stack


def _logs(tmp_path: Path) -> Path:
    logs = tmp_path / "logs"
    logs.mkdir(exist_ok=True)
    return logs


def wait_for(predicate, timeout: float, what: str, interval: float = 0.2):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def job_status(client: Client, job_id: str) -> dict:
    return client.http.get(f"/v1/jobs/{job_id}").json()


def submit_prune(stack: Stack, archive: Path, text: Path, seq_len: int = 128, windows: int = 60) -> str:
    """Upload a model and a text, then submit a 50% magnitude prune evaluated on `windows` windows; the job id."""
    client = stack.client()
    model = client.upload("/v1/models", archive)
    assert model.status_code == 201, model.text
    dataset = client.upload("/v1/datasets", text)
    assert dataset.status_code == 201, dataset.text
    body = {
        "model_id": model.json()["id"],
        "recipe": [{"type": "prune", "method": "magnitude", "sparsity": 0.5}],
        "evaluation": {"dataset_id": dataset.json()["id"], "seq_len": seq_len, "max_windows": windows},
    }
    response = client.http.post("/v1/jobs", json=body)
    assert response.status_code == 202, response.text
    return response.json()["id"]


def step_started(client: Client, job_id: str) -> bool:
    """The job runs an engine step: its inputs are already in its worker's cache."""
    job = job_status(client, job_id)
    return job["status"] == "running" and bool(job["progress"].get("step"))


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
