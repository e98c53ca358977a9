"""What workers report for the API's /metrics, kept in Redis: the API cannot see a worker's process.

Two hashes per queue, one field per worker (its Celery hostname):
- `modelpress:workers:<queue>`: when the worker last beat (Unix seconds). The worker's parent process writes
  it on every reconciler tick, busy or idle, so its age tells whether the worker is alive.
- `modelpress:gpu-memory:<queue>`: the CUDA memory the job's process holds, written with the job's heartbeat
  and removed when the job ends. A worker without CUDA (or between jobs) has no field: absent, not zero.
Ages are measured against the API's clock, so a worker's clock should be kept in time (NTP), as the lease is.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass

import redis

WORKER_FORGET_S = 24 * 3600.0
"""A worker silent for longer than this is left out of /metrics (a replaced container's hostname)."""


def workers_key(queue: str) -> str:
    return f"modelpress:workers:{queue}"


def gpu_memory_key(queue: str) -> str:
    return f"modelpress:gpu-memory:{queue}"


@dataclass(frozen=True)
class GpuMemory:
    allocated: int  # bytes held by live tensors
    reserved: int  # bytes the caching allocator holds from the driver
    at: float  # Unix seconds of the report


def record_heartbeat(client: redis.Redis, queue: str, worker: str, now: float | None = None) -> None:
    client.hset(workers_key(queue), worker, repr(time.time() if now is None else now))


def record_gpu_memory(client: redis.Redis, queue: str, worker: str, memory: GpuMemory) -> None:
    payload = {"allocated": memory.allocated, "reserved": memory.reserved, "at": memory.at}
    client.hset(gpu_memory_key(queue), worker, json.dumps(payload))


def forget_gpu_memory(client: redis.Redis, queue: str, worker: str) -> None:
    client.hdel(gpu_memory_key(queue), worker)


def heartbeat_ages(client: redis.Redis, queue: str, now: float | None = None) -> dict[str, float]:
    """Seconds since each worker's newest heartbeat, for workers heard from within `WORKER_FORGET_S`."""
    now = time.time() if now is None else now
    ages = {}
    for worker, at in client.hgetall(workers_key(queue)).items():
        age = max(0.0, now - float(at))
        if age <= WORKER_FORGET_S:
            ages[worker.decode()] = age
    return ages


def gpu_memory(client: redis.Redis, queue: str, fresh_s: float, now: float | None = None) -> dict[str, GpuMemory]:
    """Each worker's latest CUDA memory report, when it is younger than `fresh_s` (a killed job's report ages out)."""
    now = time.time() if now is None else now
    reports = {}
    for worker, raw in client.hgetall(gpu_memory_key(queue)).items():
        entry = json.loads(raw)
        if now - float(entry["at"]) <= fresh_s:
            reports[worker.decode()] = GpuMemory(int(entry["allocated"]), int(entry["reserved"]), float(entry["at"]))
    return reports
