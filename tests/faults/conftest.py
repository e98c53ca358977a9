"""A private stack per fault test: its own database, Redis server, API and workers, so faults hit nothing else.

Leases and heartbeats are short so that recovery happens within seconds.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

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
