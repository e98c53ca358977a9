"""A private stack per fault test: its own database, Redis server, API and workers, so faults hit nothing else.

Leases and heartbeats are short so that recovery happens within seconds.
"""

from __future__ import annotations

import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.utils.factories import build_tiny_model, tar_folder, write_text_dataset
from tests.utils.stack import REDIS_SERVER, RedisServer, Stack, open_stack

FAST_RECOVERY = {
    "MODELPRESS_LEASE_S": "4",
    "MODELPRESS_HEARTBEAT_INTERVAL_S": "0.5",
    "MODELPRESS_RECONCILE_INTERVAL_S": "0.5",
    "MODELPRESS_PROGRESS_INTERVAL_S": "0.1",
}


@pytest.fixture
def stack(migrated: dict[str, str], tmp_path: Path) -> Iterator[Stack]:
    if REDIS_SERVER is None:
        pytest.fail("redis-server is not on PATH; the fault tests start their own")
    server = RedisServer(tmp_path)
    server.start()
    with open_stack(migrated, tmp_path, redis=server, **FAST_RECOVERY) as built:
        yield built


@pytest.fixture(scope="session")
def slow_model(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A model and text big enough that evaluating it takes seconds on the CPU: time to inject a fault."""
    root = tmp_path_factory.mktemp("slow-model")
    archive = tar_folder(build_tiny_model(root / "model", hidden=256, layers=4), root / "model.tar")
    return {"archive": archive, "text": write_text_dataset(root / "text.txt", lines=6000)}


@pytest.fixture(scope="session")
def small_model(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The default tiny model and a short text: a job that takes seconds, for faults aimed at its storage."""
    root = tmp_path_factory.mktemp("small-model")
    archive = tar_folder(build_tiny_model(root / "model"), root / "model.tar")
    return {"archive": archive, "text": write_text_dataset(root / "text.txt", lines=400)}


@pytest.fixture
def tmpfs(tmp_path: Path) -> Iterator[Callable[[str], Path]]:
    """Mounts small tmpfs file systems (`tmpfs("4608k")`): a disk that really fills (ENOSPC). Needs root, as CI
    runs; the test is skipped where mounting is not permitted. Unmounted at the end."""
    mounts: list[Path] = []

    def mount(size: str) -> Path:
        folder = tmp_path / f"disk-{len(mounts)}"
        folder.mkdir()
        result = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)], capture_output=True
        )
        if result.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here (needs root): {result.stderr.decode().strip()}")
        mounts.append(folder)
        return folder

    yield mount
    for folder in mounts:
        subprocess.run(["umount", "-l", str(folder)], check=False)
