"""Resumable uploads through the live API: parts in any order, their state, refusals, expiry and tenants."""

from __future__ import annotations

import hashlib
import time
from collections.abc import Iterator
from datetime import datetime, timedelta
from pathlib import Path

import httpx
import pytest

from app import resumable
from modelpress.db import new_session
from modelpress.models import UploadSession
from tests.api.conftest import client_for
from tests.api.test_uploads_refused import refused
from tests.conftest import LiveProcess, start_api


def create(client: httpx.Client, data: bytes, *, parts: int = 3, **fields) -> dict:
    part_size = -(-len(data) // parts)
    body = {"kind": "model", "filename": "tiny.tar", "size": len(data), "part_size": part_size, **fields}
    response = client.post("/v1/uploads", json=body)
    assert response.status_code == 201, response.text
    return response.json()


def put(client: httpx.Client, upload: dict, number: int, data: bytes) -> httpx.Response:
    size = upload["part_size"]
    return client.put(f"/v1/uploads/{upload['id']}/parts/{number}", content=data[(number - 1) * size : number * size])


def folder_of(upload_id: str) -> Path | None:
    with new_session() as session:
        row = session.get(UploadSession, upload_id)
        return None if row is None else Path(row.folder)


@pytest.fixture(scope="module")
def tar_bytes(tiny_tar: Path) -> bytes:
    return tiny_tar.read_bytes()


def test_three_parts_out_of_order_make_a_usable_model(client: httpx.Client, tar_bytes: bytes) -> None:
    digest = hashlib.sha256(tar_bytes).hexdigest()
    upload = create(client, tar_bytes, sha256=digest, name="resumed")
    assert upload["parts"] == 3 and upload["received"] == []
    for number in (3, 1):
        assert put(client, upload, number, tar_bytes).status_code == 200
    state = client.get(f"/v1/uploads/{upload['id']}").json()
    assert state["received"] == [1, 3]
    assert put(client, upload, 2, tar_bytes).json()["received"] == [1, 2, 3]
    folder = folder_of(upload["id"])
    done = client.post(f"/v1/uploads/{upload['id']}/complete")
    assert done.status_code == 201, done.text
    model = done.json()
    assert model["name"] == "resumed" and model["sha256"] == digest and model["format"] == "hf"
    assert client.get(f"/v1/models/{model['id']}").status_code == 200
    assert folder is not None and not folder.exists() and folder_of(upload["id"]) is None
    assert client.get(f"/v1/uploads/{upload['id']}").status_code == 404
    recipe = [{"type": "prune", "method": "magnitude", "sparsity": 0.5}]
    job = client.post("/v1/jobs", json={"model_id": model["id"], "recipe": recipe})
    assert job.status_code == 202, job.text


def test_dataset_in_parts(client: httpx.Client) -> None:
    text = "".join(f"line {i} of the text\n" for i in range(500)).encode()
    upload = create(client, text, kind="dataset", filename="calib.txt", parts=2)
    for number in (2, 1):
        assert put(client, upload, number, text).status_code == 200
    done = client.post(f"/v1/uploads/{upload['id']}/complete")
    assert done.status_code == 201, done.text
    assert done.json()["records"] == 500 and done.json()["name"] == "calib"


def test_a_part_of_the_wrong_size_is_refused(client: httpx.Client, tar_bytes: bytes) -> None:
    upload = create(client, tar_bytes)
    path = f"/v1/uploads/{upload['id']}/parts"
    size = upload["part_size"]
    refused(client.put(f"{path}/1", content=tar_bytes[: size - 1]), 422, "part 1 must be exactly", str(size))
    refused(client.put(f"{path}/2", content=tar_bytes[:size] + b"x"), 422, "part 2", "from offset " + str(size))
    refused(client.put(f"{path}/4", content=b"x"), 422, "past the last part", "parts 1 to 3")
    refused(client.put(f"{path}/1", content=tar_bytes[:size], headers={"Content-Type": "text/plain"}), 415)

    def chunked() -> Iterator[bytes]:  # no Content-Length: the size is counted while streaming
        yield tar_bytes[:10]

    refused(client.put(f"{path}/1", content=chunked()), 422, "this one has 10")
    assert client.get(f"/v1/uploads/{upload['id']}").json()["received"] == []


def test_completing_with_missing_parts_names_them(client: httpx.Client, tar_bytes: bytes) -> None:
    upload = create(client, tar_bytes)
    assert put(client, upload, 2, tar_bytes).status_code == 200
    refused(client.post(f"/v1/uploads/{upload['id']}/complete"), 409, "2 part(s) missing: 1, 3")
    assert client.get(f"/v1/uploads/{upload['id']}").json()["received"] == [2]  # still there to finish


def test_a_wrong_sha256_is_refused_and_the_upload_removed(client: httpx.Client, tar_bytes: bytes) -> None:
    upload = create(client, tar_bytes, sha256="0" * 64)
    for number in (1, 2, 3):
        put(client, upload, number, tar_bytes)
    folder = folder_of(upload["id"])
    refused(client.post(f"/v1/uploads/{upload['id']}/complete"), 422, "sha256", "0" * 64, "start a new upload")
    assert folder is not None and not folder.exists()


def test_a_file_that_is_not_a_model_is_refused_as_a_single_upload_is(client: httpx.Client) -> None:
    data = b"just text, not an archive\n" * 100
    upload = create(client, data, parts=2)
    for number in (1, 2):
        put(client, upload, number, data)
    refused(client.post(f"/v1/uploads/{upload['id']}/complete"), 422, "not a supported file")


@pytest.mark.parametrize(
    ("fields", "status", "fragment"),
    [
        ({"size": 2**40}, 413, "MODELPRESS_MAX_UPLOAD_BYTES"),
        ({"size": 10**6, "part_size": 10}, 422, "part_size must be between 100"),
        ({"kind": "dataset", "filename": "data.csv"}, 422, ".txt"),
        ({"filename": "../x.tar"}, 422, "filename"),
    ],
)
def test_create_refusals(client: httpx.Client, fields: dict, status: int, fragment: str) -> None:
    body = {"kind": "model", "filename": "m.tar", "size": 1000, **fields}
    refused(client.post("/v1/uploads", json=body), status, fragment)


def test_another_tenant_cannot_see_send_or_complete(
    client: httpx.Client, other_client: httpx.Client, tar_bytes: bytes
) -> None:
    upload = create(client, tar_bytes)
    for number in (1, 2, 3):
        put(client, upload, number, tar_bytes)
    path = f"/v1/uploads/{upload['id']}"
    assert other_client.get(path).status_code == 404
    assert put(other_client, upload, 1, tar_bytes).status_code == 404
    assert other_client.post(f"{path}/complete").status_code == 404
    assert other_client.delete(path).status_code == 404
    assert client.get(path).json()["received"] == [1, 2, 3]
    assert client.delete(path).status_code == 204 and client.get(path).status_code == 404


@pytest.fixture(scope="module")
def short_lived(migrated: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveProcess]:
    """An API on the same database whose uploads expire one second after their last part (no periodic sweep)."""
    env = {**migrated, "MODELPRESS_UPLOAD_TTL_S": "1", "MODELPRESS_UPLOAD_SWEEP_INTERVAL_S": "3600"}
    server = start_api(env, tmp_path_factory.mktemp("logs") / "short-ttl-api.log")
    yield server
    server.stop()


def test_an_expired_upload_is_removed_on_access(short_lived: LiveProcess, api_key: str, tar_bytes: bytes) -> None:
    with client_for(short_lived.url, api_key) as client:
        upload = create(client, tar_bytes)
        assert put(client, upload, 1, tar_bytes).status_code == 200
        folder = folder_of(upload["id"])
        assert folder is not None and (folder / "parts" / "1").exists()
        time.sleep(1.2)
        refused(client.get(f"/v1/uploads/{upload['id']}"), 404, "expired", "start a new upload")
        assert not folder.exists() and folder_of(upload["id"]) is None


def test_the_sweep_removes_expired_uploads_only(short_lived: LiveProcess, api_key: str, tar_bytes: bytes) -> None:
    with client_for(short_lived.url, api_key) as client:
        old = create(client, tar_bytes)
        assert put(client, old, 2, tar_bytes).status_code == 200
        time.sleep(1.2)
        fresh = create(client, tar_bytes)
    old_folder, fresh_folder = folder_of(old["id"]), folder_of(fresh["id"])
    assert old_folder is not None and old_folder.exists()
    halfway = datetime.fromisoformat(fresh["created_at"]) + timedelta(seconds=0.5)  # past old's expiry, not fresh's
    assert resumable.sweep_expired(now=halfway) >= 1
    assert not old_folder.exists() and folder_of(old["id"]) is None
    assert fresh_folder is not None and fresh_folder.exists() and folder_of(fresh["id"]) is not None
