"""The API on S3 storage (a real SeaweedFS server): uploads land in the bucket, artifact downloads are proxied
or redirected to a presigned URL by configuration, and a model can be imported by naming an object."""

from __future__ import annotations

import hashlib
import os
import secrets
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.api.conftest import client_for
from tests.api.test_uploads_refused import refused
from tests.conftest import LiveProcess, start_api

CONTENT = os.urandom(2 * 1024 * 1024 + 5)
PREFIX = f"api-{secrets.token_hex(4)}"


@pytest.fixture(scope="module")
def s3_env(migrated: dict[str, str], s3_server) -> dict[str, str]:
    return {**migrated, **s3_server.env(PREFIX)}


def _api(env: dict[str, str], tmp_path_factory: pytest.TempPathFactory, name: str) -> Iterator[LiveProcess]:
    server = start_api(env, tmp_path_factory.mktemp("logs") / f"{name}.log")
    yield server
    server.stop()


@pytest.fixture(scope="module")
def proxying(s3_env: dict[str, str], api_key: str, tmp_path_factory) -> Iterator[httpx.Client]:
    for server in _api(s3_env, tmp_path_factory, "s3-proxy-api"):
        with client_for(server.url, api_key) as client:
            yield client


@pytest.fixture(scope="module")
def redirecting(s3_env: dict[str, str], api_key: str, tmp_path_factory) -> Iterator[httpx.Client]:
    env = {**s3_env, "MODELPRESS_DOWNLOAD_REDIRECT": "true", "MODELPRESS_DOWNLOAD_URL_TTL_S": "60"}
    for server in _api(env, tmp_path_factory, "s3-redirect-api"):
        with client_for(server.url, api_key) as client:
            yield client


@pytest.fixture(scope="module")
def s3_model(proxying: httpx.Client, tiny_tar: Path, s3_server) -> dict:
    with tiny_tar.open("rb") as handle:
        response = proxying.post("/v1/models", files={"file": ("tiny-llama.tar", handle)}, data={"name": "tiny"})
    assert response.status_code == 201, response.text
    return response.json()


@pytest.fixture(scope="module")
def artifact(proxying: httpx.Client, s3_model: dict, s3_server, migrated: dict) -> dict:
    """A job's artifact: an object put in the bucket and a row, as the worker writes them."""
    from modelpress.db import session_scope
    from modelpress.models import Artifact

    job = proxying.post(
        "/v1/jobs",
        json={"model_id": s3_model["id"], "recipe": [{"type": "prune", "method": "magnitude", "sparsity": 0.5}]},
    ).json()
    key = f"artifacts/{job['id']}/a/model.tar"
    s3_server.client().put_object(Bucket=s3_server.bucket, Key=f"{PREFIX}/{key}", Body=CONTENT)
    with session_scope() as session:
        row = Artifact(
            tenant="acme",
            job_id=job["id"],
            name="optimized model ü.tar",
            kind="model",
            media_type="application/x-tar",
            size_bytes=len(CONTENT),
            sha256=hashlib.sha256(CONTENT).hexdigest(),
            storage_key=key,
        )
        session.add(row)
        session.flush()
        return {"id": row.id, "job_id": job["id"]}


def test_an_upload_lands_in_the_bucket(s3_model: dict, s3_server, migrated: dict) -> None:
    listed = s3_server.client().list_objects_v2(Bucket=s3_server.bucket, Prefix=f"{PREFIX}/models/{s3_model['id']}/")
    names = {item["Key"].rsplit("/", 1)[1] for item in listed.get("Contents", [])}
    assert "config.json" in names and "model.safetensors" in names
    assert not (Path(migrated["DATA_DIR"]) / "storage" / "models" / s3_model["id"]).exists()  # not on local disk
    scratch = Path(migrated["DATA_DIR"]) / "tmp"
    assert not scratch.exists() or not any(scratch.iterdir())  # the upload's scratch folder is gone


def test_proxied_download_from_s3(proxying: httpx.Client, artifact: dict) -> None:
    whole = proxying.get(f"/v1/artifacts/{artifact['id']}")
    assert whole.status_code == 200 and whole.content == CONTENT
    part = proxying.get(f"/v1/artifacts/{artifact['id']}", headers={"Range": "bytes=1048570-1048580"})
    assert part.status_code == 206 and part.content == CONTENT[1048570:1048581]
    assert part.headers["content-range"] == f"bytes 1048570-1048580/{len(CONTENT)}"


def test_presigned_redirect(redirecting: httpx.Client, artifact: dict, s3_server) -> None:
    response = redirecting.get(f"/v1/artifacts/{artifact['id']}", follow_redirects=False)
    assert response.status_code == 307, response.text
    assert response.headers["cache-control"] == "no-store"
    location = response.headers["location"]
    assert location.startswith(f"{s3_server.endpoint}/{s3_server.bucket}/{PREFIX}/artifacts/")
    assert "X-Amz-Expires=60" in location
    direct = httpx.get(location)  # no API key: the URL itself is the permission
    assert direct.status_code == 200 and direct.content == CONTENT
    assert "optimized%20model%20%C3%BC.tar" in direct.headers["content-disposition"]
    ranged = httpx.get(location, headers={"Range": "bytes=0-9"})
    assert ranged.status_code == 206 and ranged.content == CONTENT[:10]


def test_missing_object_is_404_not_a_redirect(redirecting: httpx.Client, artifact: dict, s3_server) -> None:
    from modelpress.db import session_scope
    from modelpress.models import Artifact

    with session_scope() as session:
        row = session.get(Artifact, artifact["id"])
        clone = Artifact(**{c: getattr(row, c) for c in ("tenant", "job_id", "name", "kind", "media_type", "sha256")})
        clone.size_bytes, clone.storage_key = 1, f"artifacts/{artifact['job_id']}/gone/model.tar"
        session.add(clone)
        session.flush()
        clone_id = clone.id
    refused(redirecting.get(f"/v1/artifacts/{clone_id}", follow_redirects=False), 404, "missing")


def put_object(s3_server, key: str, path: Path) -> str:
    s3_server.client().upload_file(str(path), s3_server.bucket, key)
    return f"s3://{s3_server.bucket}/{key}"


def test_import_by_reference(proxying: httpx.Client, s3_model: dict, tiny_tar: Path, s3_server) -> None:
    url = put_object(s3_server, f"incoming-{PREFIX}/tiny-llama.tar", tiny_tar)
    response = proxying.post("/v1/models", json={"storage_url": url, "name": "by reference"})
    assert response.status_code == 201, response.text
    imported = response.json()
    assert imported["name"] == "by reference" and imported["id"] != s3_model["id"]
    for field in ("format", "architecture", "parameters", "size_bytes"):
        assert imported[field] == s3_model[field], field
    assert imported["sha256"] == hashlib.sha256(tiny_tar.read_bytes()).hexdigest()
    assert proxying.get(f"/v1/models/{imported['id']}").status_code == 200


def test_a_bad_object_is_refused_as_its_upload_is(proxying: httpx.Client, s3_server, tmp_path: Path) -> None:
    path = tmp_path / "model.tar.gz"
    path.write_text("just some text, not an archive\n" * 50)
    with path.open("rb") as handle:
        uploaded = proxying.post("/v1/models", files={"file": (path.name, handle)})
    referenced = proxying.post("/v1/models", json={"storage_url": put_object(s3_server, "incoming/model.tar.gz", path)})
    refused(referenced, 422, "not a supported file")
    assert (referenced.status_code, referenced.json()) == (uploaded.status_code, uploaded.json())


@pytest.mark.parametrize(
    ("url", "fragment"),
    [
        ("s3://modelpress-test/incoming/absent.tar", "does not exist"),
        (f"s3://modelpress-test/{PREFIX}/models/x/model.gguf", "service's own storage area"),
        ("s3://modelpress-test/", "s3://bucket/key"),
        ("https://example.com/model.tar", "s3://bucket/key"),
    ],
)
def test_bad_references(proxying: httpx.Client, migrated: dict, url: str, fragment: str) -> None:
    refused(proxying.post("/v1/models", json={"storage_url": url}), 422, fragment)
    scratch = Path(migrated["DATA_DIR"]) / "tmp"
    assert not scratch.exists() or not any(scratch.iterdir())


def test_a_resumable_upload_lands_in_the_bucket(proxying: httpx.Client, tiny_tar: Path, s3_server) -> None:
    data = tiny_tar.read_bytes()
    half = len(data) // 2 + 1
    body = {"kind": "model", "filename": "tiny.tar", "size": len(data), "part_size": half}
    upload = proxying.post("/v1/uploads", json=body).json()
    for number in (2, 1):
        part = proxying.put(f"/v1/uploads/{upload['id']}/parts/{number}", content=data[(number - 1) * half :][:half])
        assert part.status_code == 200, part.text
    model = proxying.post(f"/v1/uploads/{upload['id']}/complete")
    assert model.status_code == 201, model.text
    listed = s3_server.client().list_objects_v2(
        Bucket=s3_server.bucket, Prefix=f"{PREFIX}/models/{model.json()['id']}/"
    )
    assert "config.json" in {item["Key"].rsplit("/", 1)[1] for item in listed.get("Contents", [])}
