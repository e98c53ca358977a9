"""Fixtures shared by every test: a fresh PostgreSQL database, settings in a temporary folder, live servers.

Tests talk to the real PostgreSQL and Redis of the machine (127.0.0.1:5432 and :6379). Each test session
gets its own database and its own queue name, so parallel runs and leftovers cannot interfere.
"""

from __future__ import annotations

import os
import secrets
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import psycopg
import pytest

REPO = Path(__file__).resolve().parents[1]
PG_ADMIN_URL = os.environ.get("MODELPRESS_TEST_PG", "postgresql://postgres@127.0.0.1:5432/test")
REDIS_URL = os.environ.get("MODELPRESS_TEST_REDIS", "redis://127.0.0.1:6379/0")


def sqlalchemy_url(libpq_url: str) -> str:
    return libpq_url.replace("postgresql://", "postgresql+psycopg://", 1)


@contextmanager
def fresh_database() -> Iterator[str]:
    """A new, empty PostgreSQL database, dropped afterwards; yields its libpq URL."""
    name = f"modelpress_test_{secrets.token_hex(4)}"
    with psycopg.connect(PG_ADMIN_URL, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        yield PG_ADMIN_URL.rsplit("/", 1)[0] + f"/{name}"
    finally:
        with psycopg.connect(PG_ADMIN_URL, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(scope="session")
def pg_database() -> Iterator[str]:
    """This test session's database."""
    with fresh_database() as url:
        yield url


@pytest.fixture(scope="session")
def service_env(pg_database: str, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Environment variables that point the API, the worker and the CLI at this test session's resources."""
    data_dir = tmp_path_factory.mktemp("data")
    return {
        "MODELPRESS_ENV": "test",
        "DATA_DIR": str(data_dir),
        "DATABASE_URL": sqlalchemy_url(pg_database),
        "REDIS_URL": REDIS_URL,
        "MODELPRESS_QUEUE": f"gpu-test-{secrets.token_hex(4)}",
        "MODELPRESS_PROGRESS_INTERVAL_S": "0.2",
        # the suite uploads hundreds of models under one key within minutes; the upload limit itself is tested on
        # an API of its own (tests/api/test_rate_limit.py)
        "MODELPRESS_UPLOAD_RATE_LIMIT_PER_MINUTE": "100000",
    }


def clear_caches() -> None:
    """Forget cached settings, engines and Celery apps so a changed environment takes effect."""
    from modelpress import db, queue, settings

    settings.get_settings.cache_clear()
    db.reset()
    queue.sender.cache_clear()


@pytest.fixture(scope="session")
def migrated(service_env: dict[str, str]) -> dict[str, str]:
    """The service environment applied to this process, with the schema migrated to head."""
    patcher = pytest.MonkeyPatch()
    for key, value in service_env.items():
        patcher.setenv(key, value)
    clear_caches()
    from modelpress.migrate import upgrade

    upgrade()
    yield service_env
    patcher.undo()
    clear_caches()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class LiveProcess:
    process: subprocess.Popen
    url: str | None
    log: Path

    def stop(self, sig: int | None = None) -> None:
        if self.process.poll() is None:
            if sig is None:
                self.process.terminate()
            else:
                self.process.send_signal(sig)
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)

    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""


def start_api(env: dict[str, str], log: Path) -> LiveProcess:
    """Run the API under a real uvicorn on a free port and wait until /healthz answers."""
    import httpx

    port = free_port()
    handle = log.open("w")
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "uvicorn",
            "app.main:create_app",
            "--factory",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
        ],
        cwd=REPO,
        env={**os.environ, **env},
        stdout=handle,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"API exited early:\n{log.read_text()}")
        try:
            if httpx.get(f"{url}/healthz", timeout=2).status_code in (200, 503):
                return LiveProcess(process, url, log)
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    process.kill()
    raise RuntimeError(f"API did not start:\n{log.read_text()}")


def start_worker(env: dict[str, str], log: Path, name: str | None = None) -> LiveProcess:
    """Run a real Celery worker process on this test session's queue (as `name`@host, when given)."""
    handle = log.open("w")
    process = subprocess.Popen(
        [sys.executable, "-m", "worker", "--loglevel", "INFO", *(["--hostname", f"{name}@%h"] if name else [])],
        cwd=REPO,
        env={**os.environ, **env},
        stdout=handle,
        stderr=subprocess.STDOUT,
    )
    return LiveProcess(process, None, log)


@pytest.fixture(scope="session")
def live_api(migrated: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveProcess]:
    server = start_api(migrated, tmp_path_factory.mktemp("logs") / "api.log")
    yield server
    server.stop()


@pytest.fixture(scope="session")
def api_key(migrated: dict[str, str]) -> str:
    """A key for tenant `acme`."""
    return make_key("acme")


@pytest.fixture(scope="session")
def other_key(migrated: dict[str, str]) -> str:
    """A key for another tenant, `globex`."""
    return make_key("globex")


def make_key(tenant: str, database_url: str | None = None) -> str:
    """Create an API key in this test session's database (or the one at `database_url`); returns the secret."""
    from sqlalchemy import create_engine
    from sqlalchemy.orm import Session

    from modelpress.db import session_scope
    from modelpress.keys import create_key

    if database_url is None:
        with session_scope() as session:
            return create_key(session, tenant)[1]
    engine = create_engine(database_url)
    try:
        with Session(engine) as session, session.begin():
            return create_key(session, tenant)[1]
    finally:
        engine.dispose()


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator:
    """A SeaweedFS S3 server on loopback for the whole test session, with one bucket; stopped at the end."""
    from tests.utils.object_store import running_server

    with running_server(tmp_path_factory.mktemp("s3")) as server:
        yield server
