"""Fixtures for the API tests: HTTP clients per tenant, a tiny model uploaded once, a constrained second API."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from sqlalchemy import func, select

from tests.conftest import LiveProcess, free_port, start_api
from tests.utils.factories import build_tiny_model, tar_folder, write_text_dataset

SMALL_LIMITS = {
    "MODELPRESS_MAX_UPLOAD_BYTES": str(512 * 1024),
    "MODELPRESS_MAX_EXTRACTED_BYTES": str(1024 * 1024),
    "MODELPRESS_MAX_ARCHIVE_MEMBERS": "20",
    "MODELPRESS_MAX_COMPRESSION_RATIO": "1000000",
}


def client_for(url: str, key: str | None) -> httpx.Client:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.Client(base_url=url, headers=headers, timeout=60)


@pytest.fixture(scope="session")
def client(live_api: LiveProcess, api_key: str) -> Iterator[httpx.Client]:
    with client_for(live_api.url, api_key) as c:
        yield c


@pytest.fixture(scope="session")
def other_client(live_api: LiveProcess, other_key: str) -> Iterator[httpx.Client]:
    with client_for(live_api.url, other_key) as c:
        yield c


@pytest.fixture(scope="session")
def anon(live_api: LiveProcess) -> Iterator[httpx.Client]:
    with client_for(live_api.url, None) as c:
        yield c


@pytest.fixture(scope="session")
def degraded_api(migrated: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveProcess]:
    """A second API on the same database and storage, with tiny upload limits and a dead broker."""
    env = {**migrated, **SMALL_LIMITS, "REDIS_URL": f"redis://127.0.0.1:{free_port()}/0"}
    server = start_api(env, tmp_path_factory.mktemp("logs") / "degraded-api.log")
    yield server
    server.stop()


@pytest.fixture(scope="session")
def degraded(degraded_api: LiveProcess, api_key: str) -> Iterator[httpx.Client]:
    with client_for(degraded_api.url, api_key) as c:
        yield c


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "tiny-llama")


@pytest.fixture(scope="session")
def tiny_tar(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tar_folder(tiny_model_dir, tmp_path_factory.mktemp("archives") / "tiny-llama.tar")


@pytest.fixture(scope="session")
def model(client: httpx.Client, tiny_tar: Path) -> dict:
    """The tiny model, uploaded once for the tenant `acme`."""
    with tiny_tar.open("rb") as handle:
        response = client.post("/v1/models", files={"file": ("tiny-llama.tar", handle)}, data={"name": "tiny"})
    assert response.status_code == 201, response.text
    return response.json()


def upload_text_dataset(client: httpx.Client, path: Path) -> dict:
    """The factory's sample text written to `path` and uploaded as a dataset."""
    with write_text_dataset(path).open("rb") as handle:
        response = client.post("/v1/datasets", files={"file": (path.name, handle)})
    assert response.status_code == 201, response.text
    return response.json()


@pytest.fixture(scope="session")
def dataset(client: httpx.Client, tmp_path_factory: pytest.TempPathFactory) -> dict:
    return upload_text_dataset(client, tmp_path_factory.mktemp("text") / "calib.txt")


def storage_root(env: dict[str, str]) -> Path:
    return Path(env["DATA_DIR"]) / "storage"


def stored_state(env: dict[str, str]) -> tuple[int, int, int, int, frozenset[str]]:
    """Row counts and every file under storage (scratch included): equal before and after a refusal."""
    from modelpress.db import new_session
    from modelpress.models import Artifact, Dataset, Job, Model

    with new_session() as session:
        counts = [session.scalar(select(func.count()).select_from(t)) or 0 for t in (Model, Dataset, Job, Artifact)]
    root = storage_root(env)
    files = frozenset(
        os.path.relpath(os.path.join(d, f), root) for d, _, names in os.walk(root) for f in names
    ) | frozenset(os.path.relpath(d, root) for d, _, _ in os.walk(root / "tmp") if Path(d) != root / "tmp")
    return counts[0], counts[1], counts[2], counts[3], files


@pytest.fixture
def nothing_stored(migrated: dict[str, str]) -> Iterator[None]:
    """Asserts that the test left no new row and no new file (scratch folders included)."""
    before = stored_state(migrated)
    yield
    after = stored_state(migrated)
    assert after == before, f"left behind: {sorted(after[4] - before[4])}, rows {after[:4]} vs {before[:4]}"
