"""The whole flow on S3 storage: API and worker share no disk (each has its own data folder), only PostgreSQL,
Redis and the object store. The worker fetches inputs into its cache and puts the artifacts in the bucket;
the download is a presigned redirect to the store."""

from __future__ import annotations

import hashlib
import json
import secrets
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.utils.checks import unpack
from tests.utils.factories import build_tiny_model, tar_folder, write_text_dataset
from tests.utils.stack import Stack, open_stack

PREFIX = f"e2e-{secrets.token_hex(4)}"


@pytest.fixture(scope="module")
def s3_stack(migrated: dict[str, str], s3_server, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    root = tmp_path_factory.mktemp("e2e-s3")
    env = {**s3_server.env(PREFIX), "MODELPRESS_DOWNLOAD_REDIRECT": "true"}
    with open_stack(migrated, root, **env) as stack:
        stack.start_api()
        stack.start_worker(DATA_DIR=str(root / "worker-data"))
        yield stack


def test_job_on_s3_storage_end_to_end(s3_stack: Stack, s3_server, tmp_path: Path) -> None:
    client, worker = s3_stack.client(), s3_stack.workers[0]
    archive = tar_folder(build_tiny_model(tmp_path / "model"), tmp_path / "tiny.tar.gz", gzip=True)
    text = write_text_dataset(tmp_path / "text.txt")
    model = client.upload("/v1/models", archive, name="tiny").json()
    dataset = client.upload("/v1/datasets", text, name="text").json()
    body = {
        "model_id": model["id"],
        "recipe": [
            {"type": "prune", "method": "structured", "mlp_sparsity": 0.5},
            {"type": "distill", "dataset_id": dataset["id"], "steps": 4, "batch_size": 2, "seq_len": 64,
             "checkpoint_every": 2},
        ],
        "calibration": {"dataset_id": dataset["id"], "samples": 4, "seq_len": 64},
        "evaluation": {"dataset_id": dataset["id"], "seq_len": 64, "max_windows": 4},
    }  # fmt: skip
    response = client.http.post("/v1/jobs", json=body)
    assert response.status_code == 202, response.text
    job = client.wait(response.json()["id"], 300, worker)
    assert job["status"] == "succeeded", job

    artifacts = {a["kind"]: a for a in client.http.get(f"/v1/jobs/{job['id']}/artifacts").json()["data"]}
    redirect = client.http.get(f"/v1/artifacts/{artifacts['model']['id']}")
    assert redirect.status_code == 307 and redirect.headers["location"].startswith(s3_server.endpoint)
    download = httpx.get(redirect.headers["location"])
    assert download.status_code == 200
    assert len(download.content) == artifacts["model"]["size_bytes"]
    assert hashlib.sha256(download.content).hexdigest() == artifacts["model"]["sha256"]
    (tmp_path / "model.tar").write_bytes(download.content)
    folder = unpack(tmp_path / "model.tar", tmp_path / "out")
    assert json.loads((folder / "config.json").read_text())["intermediate_size"] == 64

    bucket = s3_server.client()
    keys = [o["Key"] for o in bucket.list_objects_v2(Bucket=s3_server.bucket, Prefix=f"{PREFIX}/").get("Contents", [])]
    assert any(k.startswith(f"{PREFIX}/artifacts/{job['id']}/") for k in keys)
    assert not any(k.startswith(f"{PREFIX}/checkpoints/") for k in keys)  # removed when the job ended
    assert not (Path(s3_stack.env["DATA_DIR"]) / "storage").exists()  # nothing stored on the API's disk
    cache = Path(s3_stack.env["DATA_DIR"]).parent / "worker-data" / "cache"
    assert len(list(cache.glob("*/ready"))) == 2  # the model and the dataset, fetched once each
