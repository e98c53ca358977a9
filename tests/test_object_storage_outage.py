"""The S3 backend waits out a store that stops answering, within its retry budget, and then says so clearly.

A private SeaweedFS server per test is stopped and started again on the same ports and data: an outage, not a
new store.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from modelpress.storage import StorageUnavailable
from tests.utils.object_store import S3Server, running_server

PAYLOAD = bytes(range(256)) * 4100


@pytest.fixture
def server(tmp_path: Path) -> Iterator[S3Server]:
    with running_server(tmp_path / "s3") as store:
        yield store


def source(tmp_path: Path, size: int = len(PAYLOAD)) -> Path:
    path = tmp_path / "upload.bin"
    path.write_bytes((PAYLOAD * (size // len(PAYLOAD) + 1))[:size])
    return path


def test_an_upload_during_an_outage_completes_once_the_store_is_back(server: S3Server, tmp_path: Path) -> None:
    storage = server.storage(tmp_path / "scratch", retry_s=60)
    storage.put_file("models/before/m.bin", source(tmp_path))
    server.stop()
    restart = threading.Timer(4.0, server.start)
    restart.start()
    began = time.monotonic()
    try:
        storage.put_file("models/during/m.bin", source(tmp_path))
    finally:
        restart.join()
    assert time.monotonic() - began >= 4.0, "the upload cannot have succeeded while the store was down"
    assert b"".join(storage.open_range("models/during/m.bin")) == PAYLOAD
    assert b"".join(storage.open_range("models/before/m.bin")) == PAYLOAD  # the store kept its data


def test_past_its_budget_an_operation_raises_storage_unavailable(server: S3Server, tmp_path: Path) -> None:
    storage = server.storage(tmp_path / "scratch", retry_s=2)
    storage.put_file("datasets/d/text.txt", source(tmp_path))
    server.stop()
    for operation in (
        lambda: storage.put_file("datasets/e/text.txt", source(tmp_path)),
        lambda: storage.fetch_file("datasets/d/text.txt", tmp_path / "copy"),
        lambda: storage.stat("datasets/d/text.txt"),
        lambda: storage.list_tree("datasets/d"),
        lambda: storage.delete("datasets/d"),
    ):
        began = time.monotonic()
        with pytest.raises(StorageUnavailable, match="MODELPRESS_STORAGE_RETRY_S") as raised:
            operation()
        assert 2 <= time.monotonic() - began < 15  # the budget, plus one attempt's connect timeout at most
        assert server.endpoint in str(raised.value)
    assert (tmp_path / "upload.bin").exists(), "a failed upload keeps its source for the caller"
    server.start()
    assert storage.stat("datasets/e/text.txt") is None, "nothing was written while the store was down"
    assert storage.stat("datasets/d/text.txt") is not None


def test_a_refusal_is_not_retried(server: S3Server, tmp_path: Path) -> None:
    """A 4xx (here a wrong secret key) fails at once: waiting would not change the answer."""
    server.secret_key, secret = "wrong-secret", server.secret_key
    storage = server.storage(tmp_path / "scratch", retry_s=30)
    server.secret_key = secret
    began = time.monotonic()
    with pytest.raises(Exception) as raised:
        storage.put_file("models/x/m.bin", source(tmp_path))
    assert not isinstance(raised.value, StorageUnavailable)
    assert time.monotonic() - began < 5


def test_an_unfinished_multipart_upload_is_aborted(server: S3Server, tmp_path: Path) -> None:
    storage = server.storage(tmp_path / "scratch")
    key = storage.object_key("artifacts/j/a/model.tar")
    upload = storage.client.create_multipart_upload(Bucket=server.bucket, Key=key)
    storage.client.upload_part(
        Bucket=server.bucket, Key=key, UploadId=upload["UploadId"], PartNumber=1, Body=PAYLOAD * 5
    )
    assert storage.abort_incomplete(key) == 1
    left = storage.client.list_multipart_uploads(Bucket=server.bucket, Prefix=key).get("Uploads", [])
    assert left == []
    assert storage.stat("artifacts/j/a/model.tar") is None
