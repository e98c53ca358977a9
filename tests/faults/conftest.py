"""A private stack per fault test: its own Redis server, API and worker, so faults hit nothing else.

The database is the session's PostgreSQL database; the queue name, data folder and Redis are private.
Leases and heartbeats are short so that recovery happens within seconds.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
import redis

from modelpress.migrate import upgrade
from tests.conftest import LiveProcess, free_port, fresh_database, make_key, sqlalchemy_url, start_api, start_worker
from tests.e2e.conftest import Client

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
    redis: RedisServer
    api: LiveProcess | None = None
    workers: list[LiveProcess] = field(default_factory=list)
    key: str = ""

    def start_api(self) -> LiveProcess:
        self.api = start_api(self.env, self.logs / f"api-{secrets.token_hex(2)}.log")
        return self.api

    def start_worker(self, **extra_env: str) -> LiveProcess:
        worker = start_worker({**self.env, **extra_env}, self.logs / f"worker-{len(self.workers)}.log")
        self.workers.append(worker)
        return worker

    def client(self) -> Client:
        return Client(self.api.url, self.key)

    def stop(self) -> None:
        for worker in self.workers:
            kill_group(worker, signal.SIGKILL)
        if self.api:
            self.api.stop()
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


@pytest.fixture
def stack(migrated: dict[str, str], tmp_path: Path) -> Iterator[Stack]:
    """Its own database too: the reconciler acts on every queued job of a deployment, and this is one."""
    if REDIS_SERVER is None:
        pytest.fail("redis-server is not on PATH; the fault tests start their own")
    with fresh_database() as libpq_url:
        database_url = sqlalchemy_url(libpq_url)
        upgrade(database_url)
        server = RedisServer(tmp_path)
        server.start()
        built = private_stack(migrated, tmp_path, server, database_url)
        try:
            yield built
        finally:
            built.stop()


def private_stack(base_env: dict[str, str], tmp_path: Path, server: RedisServer, database_url: str) -> Stack:
    env = {
        **base_env,
        "DATABASE_URL": database_url,
        "REDIS_URL": server.url,
        "DATA_DIR": str(tmp_path / "data"),
        "MODELPRESS_QUEUE": f"faults-{secrets.token_hex(4)}",
        "MODELPRESS_LEASE_S": "4",
        "MODELPRESS_HEARTBEAT_INTERVAL_S": "0.5",
        "MODELPRESS_RECONCILE_INTERVAL_S": "0.5",
        "MODELPRESS_PROGRESS_INTERVAL_S": "0.1",
    }
    logs = tmp_path / "logs"
    logs.mkdir()
    return Stack(env=env, logs=logs, redis=server, key=make_key("acme", database_url))


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


__all__ = ["Stack", "kill_group", "wait_for", "job_status", "httpx"]
