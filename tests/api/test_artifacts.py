"""Artifact downloads: whole file, byte ranges (206), unsatisfiable ranges (416), headers."""

from __future__ import annotations

import hashlib
import os

import httpx
import pytest

from tests.api.conftest import storage_root
from tests.utils.factories import insert_artifact

CONTENT = os.urandom(3 * 1024 * 1024 + 17)


@pytest.fixture(scope="module")
def artifact(client: httpx.Client, model: dict, migrated: dict) -> dict:
    """A job of `acme` with one artifact: a row and a file written directly, as the worker would."""
    job = client.post(
        "/v1/jobs",
        json={"model_id": model["id"], "recipe": [{"type": "prune", "method": "magnitude", "sparsity": 0.5}]},
    ).json()
    key = f"jobs/{job['id']}/optimized model.tar"
    path = storage_root(migrated) / key
    path.parent.mkdir(parents=True)
    path.write_bytes(CONTENT)
    artifact_id = insert_artifact(
        job["id"], "optimized model ü.tar", CONTENT, key, kind="model", media_type="application/x-tar"
    )
    return {"id": artifact_id, "job_id": job["id"]}


def test_listed_with_download_url(client: httpx.Client, artifact: dict) -> None:
    (listed,) = client.get(f"/v1/jobs/{artifact['job_id']}/artifacts").json()["data"]
    assert listed["id"] == artifact["id"] and listed["download_url"] == f"/v1/artifacts/{artifact['id']}"
    assert listed["size_bytes"] == len(CONTENT) and listed["kind"] == "model"


def test_whole_download(client: httpx.Client, artifact: dict) -> None:
    response = client.get(f"/v1/artifacts/{artifact['id']}")
    assert response.status_code == 200 and response.content == CONTENT
    assert response.headers["accept-ranges"] == "bytes"
    assert response.headers["etag"] == f'"{hashlib.sha256(CONTENT).hexdigest()}"'
    assert response.headers["content-type"] == "application/x-tar"
    disposition = response.headers["content-disposition"]
    assert disposition.startswith("attachment;") and "filename*=UTF-8''optimized%20model%20%C3%BC.tar" in disposition


@pytest.mark.parametrize(
    ("header", "start", "end"),
    [
        ("bytes=0-99", 0, 99),
        ("bytes=1048570-1048600", 1048570, 1048600),
        ("bytes=3145000-", 3145000, None),
        ("bytes=-500", len(CONTENT) - 500, None),
        ("bytes=10-99999999", 10, None),
        ("bytes=-99999999", 0, None),
    ],
)
def test_ranges(client: httpx.Client, artifact: dict, header: str, start: int, end: int | None) -> None:
    last = len(CONTENT) - 1 if end is None else end
    response = client.get(f"/v1/artifacts/{artifact['id']}", headers={"Range": header})
    assert response.status_code == 206
    assert response.content == CONTENT[start : last + 1]
    assert response.headers["content-range"] == f"bytes {start}-{last}/{len(CONTENT)}"
    assert int(response.headers["content-length"]) == last - start + 1


@pytest.mark.parametrize(
    "header", [f"bytes={len(CONTENT)}-", f"bytes={len(CONTENT) + 5}-{len(CONTENT) + 9}", "bytes=-0"]
)
def test_unsatisfiable(client: httpx.Client, artifact: dict, header: str) -> None:
    response = client.get(f"/v1/artifacts/{artifact['id']}", headers={"Range": header})
    assert response.status_code == 416
    assert response.headers["content-range"] == f"bytes */{len(CONTENT)}"
    assert f"selects no byte of the file, which has {len(CONTENT)} bytes" in response.json()["detail"]


@pytest.mark.parametrize("header", ["bytes=0-1,5-6", "lines=1-2", "bytes=9-2"])
def test_ignored_ranges_send_everything(client: httpx.Client, artifact: dict, header: str) -> None:
    response = client.get(f"/v1/artifacts/{artifact['id']}", headers={"Range": header})
    assert response.status_code == 200 and len(response.content) == len(CONTENT)


def test_other_tenant_cannot_download(other_client: httpx.Client, artifact: dict) -> None:
    assert other_client.get(f"/v1/artifacts/{artifact['id']}").status_code == 404
    assert other_client.get(f"/v1/jobs/{artifact['job_id']}/artifacts").status_code == 404


SECRET = b"root:x:0:0:not for download\n"


def forge_artifact(job_id: str, storage_key: str) -> str:
    """An artifact row of `acme` whose storage key was tampered with (the worker never writes such keys)."""
    return insert_artifact(
        job_id, "forged.bin", SECRET, storage_key, kind="model", media_type="application/octet-stream"
    )


@pytest.mark.parametrize(
    ("key", "outside"),
    [
        ("../secret.txt", True),
        ("jobs/../../secret.txt", True),
        ("../../../../../../../../etc/passwd", True),
        ("/etc/passwd", True),
        ("{secret}", True),
        ("jobs/{job}/link-out", True),
        ("", True),
        ("jobs", False),
        ("jobs/{job}/never-written", False),
    ],
    ids=["dotdot", "nested-dotdot", "etc-passwd", "absolute", "absolute-secret", "symlink-out", "root", "dir", "gone"],
)
def test_download_cannot_leave_storage(client, artifact, migrated, live_api, key: str, outside: bool) -> None:
    root = storage_root(migrated)
    secret = root.parent / "secret.txt"
    secret.write_bytes(SECRET)
    link = root / "jobs" / artifact["job_id"] / "link-out"
    if not link.is_symlink():
        link.symlink_to(secret)
    artifact_id = forge_artifact(artifact["job_id"], key.format(secret=secret, job=artifact["job_id"]))
    response = client.get(f"/v1/artifacts/{artifact_id}", headers={"Range": "bytes=0-10"})
    assert response.status_code == 404, response.text
    assert response.json() == {"detail": f"the file of artifact {artifact_id} is missing"}
    assert b"root:" not in response.content
    if outside:
        assert f"refusing to serve artifact {artifact_id}: storage key" in live_api.output()
    else:
        assert f"artifact {artifact_id} has no readable file" in live_api.output()
