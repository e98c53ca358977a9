"""Both storage backends pass one suite: local folder and S3 (a real SeaweedFS server on loopback)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from modelpress.storage import LocalStorage, Storage
from tests.conftest import REPO

PAYLOAD = bytes(range(256)) * 4100  # a little over 1 MiB: crosses the 1 MiB read chunk


@pytest.fixture(params=["local", "s3"])
def storage(request: pytest.FixtureRequest, tmp_path: Path) -> Storage:
    if request.param == "local":
        return LocalStorage(tmp_path / "store")
    return request.getfixturevalue("s3_server").storage(tmp_path / "scratch")


def written(folder: Path, name: str, data: bytes) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_bytes(data)
    return path


def test_put_then_read_back(storage: Storage, tmp_path: Path) -> None:
    storage.put_file("models/a/model.gguf", written(tmp_path / "src", "m", PAYLOAD))
    assert storage.exists("models/a/model.gguf") and storage.exists("models/a")
    assert storage.size("models/a/model.gguf") == len(PAYLOAD)
    info = storage.stat("models/a/model.gguf")
    assert info is not None and info.size == len(PAYLOAD) and info.etag
    assert b"".join(storage.open_range("models/a/model.gguf")) == PAYLOAD
    storage.fetch_file("models/a/model.gguf", tmp_path / "out" / "copy")
    assert (tmp_path / "out" / "copy").read_bytes() == PAYLOAD


@pytest.mark.parametrize(("start", "end"), [(0, 0), (10, 99), (1024 * 1024 - 3, 1024 * 1024 + 5), (5, None)])
def test_range_reads(storage: Storage, tmp_path: Path, start: int, end: int | None) -> None:
    storage.put_file("datasets/r/data.txt", written(tmp_path, "d", PAYLOAD))
    expected = PAYLOAD[start:] if end is None else PAYLOAD[start : end + 1]
    assert b"".join(storage.open_range("datasets/r/data.txt", start, end)) == expected


def test_missing_objects(storage: Storage, tmp_path: Path) -> None:
    assert not storage.exists("models/none/model.gguf")
    assert storage.stat("models/none/model.gguf") is None
    assert storage.list_tree("models/none") == []
    with pytest.raises(FileNotFoundError):
        storage.size("models/none/model.gguf")
    with pytest.raises(FileNotFoundError):
        storage.fetch_file("models/none/model.gguf", tmp_path / "x")


def test_tree_put_list_delete(storage: Storage, tmp_path: Path) -> None:
    source = tmp_path / "model"
    written(source, "config.json", b"{}")
    written(source / "sub", "weights.bin", PAYLOAD)
    storage.put_tree("models/t", source)
    listing = storage.list_tree("models/t")
    assert [(o.key, o.size) for o in listing] == [("config.json", 2), ("sub/weights.bin", len(PAYLOAD))]
    storage.put_file("models/other/x", written(tmp_path, "x", b"x"))
    storage.delete("models/t")
    assert not storage.exists("models/t") and storage.list_tree("models/t") == []
    assert storage.exists("models/other/x")  # a sibling key is untouched


def test_delete_one_object(storage: Storage, tmp_path: Path) -> None:
    storage.put_file("artifacts/j/a/model.tar", written(tmp_path, "a", b"abc"))
    storage.delete("artifacts/j/a/model.tar")
    assert not storage.exists("artifacts/j/a/model.tar")
    storage.delete("artifacts/j/a/model.tar")  # deleting what is gone is not an error


def test_replacing_an_object_changes_its_version(storage: Storage, tmp_path: Path) -> None:
    storage.put_file("checkpoints/j/step-0/kd.pt", written(tmp_path, "c1", b"first"))
    first = storage.stat("checkpoints/j/step-0/kd.pt")
    storage.put_file("checkpoints/j/step-0/kd.pt", written(tmp_path, "c2", b"second!"))
    second = storage.stat("checkpoints/j/step-0/kd.pt")
    assert (second.size, second.etag) != (first.size, first.etag)
    assert b"".join(storage.open_range("checkpoints/j/step-0/kd.pt")) == b"second!"


@pytest.mark.parametrize("key", ["../escape", "/abs/path", "models/../../x", "models//x", ""])
def test_unclean_keys_are_refused(storage: Storage, key: str) -> None:
    with pytest.raises(ValueError):
        storage.stat(key)


def test_download_url_only_on_object_storage(storage: Storage, tmp_path: Path) -> None:
    import httpx

    storage.put_file("artifacts/j/a/report.json", written(tmp_path, "r", b'{"ok": true}'))
    url = storage.download_url("artifacts/j/a/report.json", "report.json", 60)
    if isinstance(storage, LocalStorage):
        assert url is None
        return
    response = httpx.get(url)
    assert response.status_code == 200 and response.content == b'{"ok": true}'
    assert "report.json" in response.headers["content-disposition"]
    tampered = url.replace("Signature=", "Signature=0")
    assert httpx.get(tampered).status_code == 403


UPLOAD_SCRIPT = textwrap.dedent(
    """
    import json, resource, sys
    from pathlib import Path
    from modelpress.object_storage import S3Storage
    from tests.utils.object_store import S3Server

    endpoint, key, secret, bucket, prefix, small, big = sys.argv[1:]
    server = S3Server(Path("."), access_key=key, secret_key=secret, bucket=bucket)
    server.port = int(endpoint.rsplit(":", 1)[1])
    storage = S3Storage(server.client(), bucket, prefix, Path(big).parent, part_size=5 * 1024**2)
    storage.put_file("warm", Path(small))  # imports, connections and transfer threads, before measuring
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    storage.put_file("big", Path(big))
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"before": before, "after": after}))
    """
)


def test_multipart_upload_streams_from_disk(s3_server, tmp_path: Path) -> None:
    """A file of 24 parts goes up in parts, and the uploading process's peak memory grows by a fraction of it."""
    part, parts = 5 * 1024**2, 24
    big = tmp_path / "big.bin"
    with big.open("wb") as handle:
        for _ in range(parts):
            handle.write(os.urandom(part))
    size = big.stat().st_size
    small = written(tmp_path, "small.bin", os.urandom(2 * part + 1))
    prefix = f"mp-{os.getpid()}"
    args = [s3_server.endpoint, s3_server.access_key, s3_server.secret_key, s3_server.bucket, prefix]
    result = subprocess.run(
        [sys.executable, "-c", UPLOAD_SCRIPT, *args, str(small), str(big)],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    import json

    rss = json.loads(result.stdout.strip().splitlines()[-1])
    growth = rss["after"] - rss["before"]
    assert growth < size / 4, f"peak RSS grew by {growth / 2**20:.0f} MiB uploading {size / 2**20:.0f} MiB"
    head = s3_server.client().head_object(Bucket=s3_server.bucket, Key=f"{prefix}/big")
    assert head["ContentLength"] == size
    assert head["ETag"].strip('"').endswith(f"-{parts}")  # a completed multipart upload of `parts` parts
    assert not big.exists()  # put_file consumes its source
