"""The worker's cache: LRU within its byte limit, one download for two concurrent fetches, entries in use kept,
and a new version of an object fetched again. Against local storage and a real S3 server."""

from __future__ import annotations

import multiprocessing
import subprocess
import time
from pathlib import Path

import pytest

from modelpress.storage import LocalStorage, Storage
from worker.cache import CacheFull, FileCache, NoRoomNow
from worker.job_files import CheckpointSync


def put(storage: Storage, tmp_path: Path, key: str, data: bytes) -> None:
    source = tmp_path / "src" / key.replace("/", "_")
    source.parent.mkdir(parents=True, exist_ok=True)
    source.write_bytes(data)
    storage.put_file(key, source)


class CountingStorage:
    """A storage that records each download in a file (shared by processes) and takes `delay` seconds for it."""

    def __init__(self, inner: Storage, record: Path, delay: float = 0.0) -> None:
        self.inner, self.record, self.delay = inner, record, delay

    def __getattr__(self, name: str):
        return getattr(self.inner, name)

    def fetch_file(self, key: str, dest: Path) -> None:
        with self.record.open("a") as handle:
            handle.write(key + "\n")
        time.sleep(self.delay)
        self.inner.fetch_file(key, dest)

    def downloads(self) -> list[str]:
        return self.record.read_text().split() if self.record.exists() else []


@pytest.fixture(params=["local", "s3"])
def storage(request: pytest.FixtureRequest, tmp_path: Path) -> CountingStorage:
    inner = (
        LocalStorage(tmp_path / "store")
        if request.param == "local"
        else request.getfixturevalue("s3_server").storage(tmp_path / "scratch")
    )
    return CountingStorage(inner, tmp_path / "downloads.log")


def test_fetch_once_then_hit(storage: CountingStorage, tmp_path: Path) -> None:
    put(storage, tmp_path, "datasets/a/data.txt", b"hello")
    cache = FileCache(tmp_path / "cache", 1000)
    with cache.file(storage, "datasets/a/data.txt") as path:
        assert path.read_bytes() == b"hello"
    with cache.file(storage, "datasets/a/data.txt") as again:
        assert again == path
    assert storage.downloads() == ["datasets/a/data.txt"]


def test_least_recently_used_is_evicted_within_the_limit(storage: CountingStorage, tmp_path: Path) -> None:
    for name in "abc":
        put(storage, tmp_path, f"datasets/{name}/data.txt", name.encode() * 400)
    cache = FileCache(tmp_path / "cache", 1000)  # room for two of the three
    for name in ("a", "b", "a", "c"):  # b is now the least recently used
        with cache.file(storage, f"datasets/{name}/data.txt"):
            pass
        assert cache.used_bytes() <= 1000
    with cache.file(storage, "datasets/a/data.txt"):
        pass  # still cached
    assert storage.downloads() == ["datasets/a/data.txt", "datasets/b/data.txt", "datasets/c/data.txt"]
    with cache.file(storage, "datasets/b/data.txt"):
        pass  # evicted before, so fetched again
    assert storage.downloads()[-1] == "datasets/b/data.txt" and len(storage.downloads()) == 4


def test_an_entry_in_use_is_never_evicted(storage: CountingStorage, tmp_path: Path) -> None:
    put(storage, tmp_path, "models/a/model.gguf", b"a" * 600)
    put(storage, tmp_path, "models/b/model.gguf", b"b" * 600)
    cache = FileCache(tmp_path / "cache", 1000)
    with cache.file(storage, "models/a/model.gguf") as held:
        with pytest.raises(NoRoomNow, match="held by running jobs"):  # another worker may have room
            with cache.file(storage, "models/b/model.gguf"):
                pass
        assert held.read_bytes() == b"a" * 600
    with cache.file(storage, "models/b/model.gguf") as path:  # a is free now: evicted to make room
        assert path.read_bytes() == b"b" * 600
    assert cache.used_bytes() == 600


def test_an_object_larger_than_the_cache_is_refused(storage: CountingStorage, tmp_path: Path) -> None:
    put(storage, tmp_path, "models/big/model.gguf", b"x" * 2000)
    with pytest.raises(CacheFull, match="MODELPRESS_CACHE_MAX_BYTES") as refused:
        with FileCache(tmp_path / "cache", 1000).file(storage, "models/big/model.gguf"):
            pass
    assert not isinstance(refused.value, NoRoomNow), "too big for this cache: no later attempt here would fit it"
    assert storage.downloads() == []


def test_a_full_disk_leaves_no_half_written_entry(storage: CountingStorage, tmp_path: Path) -> None:
    """A real ENOSPC (a 64 KiB tmpfs under a cache whose own limit is far larger): no partial file is kept, and
    the room reserved for the object is given back."""
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(disk)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {mounted.stderr.decode().strip()}")
    try:
        put(storage, tmp_path, "models/big/model.gguf", b"x" * 256 * 1024)
        put(storage, tmp_path, "datasets/small/data.txt", b"y" * 1000)
        cache = FileCache(disk, 10**9)
        with pytest.raises(NoRoomNow, match="No space left on device"):
            with cache.file(storage, "models/big/model.gguf"):
                pass
        assert [p.name for p in disk.iterdir() if p.is_dir()] == [] and cache.used_bytes() == 0
        with cache.file(storage, "datasets/small/data.txt") as path:  # the disk is usable again
            assert path.read_bytes() == b"y" * 1000
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)


def test_a_replaced_object_is_fetched_again(storage: CountingStorage, tmp_path: Path) -> None:
    cache = FileCache(tmp_path / "cache", 10_000)
    put(storage, tmp_path, "datasets/v/data.txt", b"old")
    with cache.file(storage, "datasets/v/data.txt") as path:
        assert path.read_bytes() == b"old"
    put(storage, tmp_path, "datasets/v/data.txt", b"newer")
    with cache.file(storage, "datasets/v/data.txt") as path:
        assert path.read_bytes() == b"newer"


def test_tree_is_fetched_as_a_folder(storage: CountingStorage, tmp_path: Path) -> None:
    source = tmp_path / "model"
    (source / "sub").mkdir(parents=True)
    (source / "config.json").write_text("{}")
    (source / "sub" / "w.bin").write_bytes(b"w" * 100)
    storage.put_tree("models/t", source)
    cache = FileCache(tmp_path / "cache", 1000)
    with cache.tree(storage, "models/t") as folder:
        assert (folder / "config.json").read_text() == "{}" and (folder / "sub" / "w.bin").read_bytes() == b"w" * 100
    assert cache.used_bytes() == 102


def _fetch_in_child(storage: CountingStorage, root: Path, key: str, out: Path) -> None:
    with FileCache(root, 10_000).file(storage, key) as path:
        out.write_text(f"{path}\n{path.read_bytes().decode()}")


def test_two_processes_fetching_one_key_download_it_once(storage: CountingStorage, tmp_path: Path) -> None:
    put(storage, tmp_path, "datasets/s/data.txt", b"shared")
    storage.delay = 1.0  # both processes ask while the first download is still running
    context = multiprocessing.get_context("fork")
    outs = [tmp_path / f"out-{i}" for i in range(2)]
    children = [
        context.Process(target=_fetch_in_child, args=(storage, tmp_path / "cache", "datasets/s/data.txt", out))
        for out in outs
    ]
    for child in children:
        child.start()
    for child in children:
        child.join(timeout=60)
        assert child.exitcode == 0
    results = [out.read_text().split("\n") for out in outs]
    assert results[0] == results[1] and results[0][1] == "shared"
    assert storage.downloads() == ["datasets/s/data.txt"]


def test_checkpoints_move_between_machines_through_the_store(storage: CountingStorage, tmp_path: Path) -> None:
    """What one worker's engine wrote is back in a fresh folder on another (here: another folder)."""
    first = CheckpointSync(storage, "checkpoints/j", tmp_path / "machine-a")
    assert first.restore() == 0
    written = first.folder / "step-1" / "kd.pt"
    written.parent.mkdir(parents=True)
    written.write_bytes(b"state-at-step-4")
    first(written)
    assert written.read_bytes() == b"state-at-step-4"  # the engine's own file stays
    written.write_bytes(b"state-at-step-8")  # the engine replaces it at the next checkpoint
    first(written)
    second = CheckpointSync(storage, "checkpoints/j", tmp_path / "machine-b")
    assert second.restore() == 1
    assert (second.folder / "step-1" / "kd.pt").read_bytes() == b"state-at-step-8"
