"""Faults in a fleet on S3 storage: real processes on loopback, the API and each worker with a data folder of its
own and no disk shared, only PostgreSQL, Redis and a private SeaweedFS server between them.

- a worker killed with SIGKILL mid-job: another worker finishes the job;
- the store stopped for 30 s mid-job: the job's store operations wait and it succeeds; with a retry budget
  shorter than the outage it fails with `storage_unavailable` and leaves no artifact, object or row;
- a worker whose cache disk is full hands the job back to the queue and a worker with room completes it.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.utils.object_store import S3Server, running_server
from tests.utils.stack import Stack, job_status, kill_group, step_started, submit_prune, wait_for

OUTAGE_S = 30


@pytest.fixture
def store(tmp_path: Path) -> Iterator[S3Server]:
    """A SeaweedFS server of this test's own, so that stopping it hits nothing else."""
    with running_server(tmp_path / "s3") as server:
        yield server


@pytest.fixture
def fleet(stack: Stack, store: S3Server, tmp_path: Path) -> Stack:
    """The fault stack (private Redis, short leases) on S3 storage, with its API started; workers join per test.
    Workers preload the engine: a job's child starts at once, so the faults land where the tests aim them. The
    lease is longer than the other fault tests': on a loaded machine a 4 s lease can lapse between a claim and its
    commit, and a second worker would start the job while the first still runs it."""
    stack.env.update(store.env(f"fleet-{stack.env['MODELPRESS_QUEUE']}"), MODELPRESS_PRELOAD_ENGINE="true")
    stack.env["MODELPRESS_LEASE_S"] = "20"
    stack.start_api()
    return stack


def join(fleet: Stack, tmp_path: Path, name: str, **env: str):
    """A worker on a machine of its own: its own data folder (scratch and cache), reached by nothing else."""
    return fleet.start_worker(name, DATA_DIR=str(tmp_path / f"machine-{name}"), **env)


def stored_keys(store: S3Server, prefix: str) -> list[str]:
    listing = store.client().list_objects_v2(Bucket=store.bucket, Prefix=prefix)
    return [o["Key"] for o in listing.get("Contents", [])]


def test_the_job_of_a_killed_worker_is_finished_by_another(fleet: Stack, slow_model, tmp_path: Path) -> None:
    workers = {name: join(fleet, tmp_path, name) for name in ("a", "b")}
    client = fleet.client()
    job_id = submit_prune(fleet, slow_model["archive"], slow_model["text"], windows=20)
    wait_for(lambda: (job_status(client, job_id)["progress"].get("step") or "").startswith("evaluate"), 300, "a step")
    running_on = job_status(client, job_id)["attempt_history"][-1]["worker"].split("@")[0]
    survivor = "b" if running_on == "a" else "a"

    kill_group(workers[running_on], signal.SIGKILL)
    job = client.wait(job_id, 600, workers[survivor])
    assert job["status"] == "succeeded", job
    first, second = job["attempt_history"]
    assert (first["worker"].split("@")[0], first["outcome"]) == (running_on, "lost")
    assert (second["worker"].split("@")[0], second["outcome"]) == (survivor, "succeeded")
    artifacts = client.http.get(f"/v1/jobs/{job_id}/artifacts").json()["data"]
    assert {a["kind"] for a in artifacts} == {"model", "report"}
    assert client.download(artifacts[1], tmp_path / "download").stat().st_size == artifacts[1]["size_bytes"]
    assert not (Path(fleet.env["DATA_DIR"]) / "storage").exists(), "the API keeps nothing on its own disk"


def test_a_store_outage_mid_job_is_waited_out(fleet: Stack, store: S3Server, small_model, tmp_path: Path) -> None:
    worker = join(fleet, tmp_path, "a")
    client = fleet.client()
    job_id = submit_prune(fleet, small_model["archive"], small_model["text"], windows=4)
    wait_for(lambda: step_started(client, job_id), 300, "the job to fetch its inputs and start a step")

    store.stop()
    # the job finishes its steps, then finds the store gone: from its first failed upload, 30 s more of outage
    wait_for(lambda: "object store: storing" in worker.output(), 600, "the job to reach the store")
    time.sleep(OUTAGE_S)
    assert job_status(client, job_id)["status"] == "running", "the job waits for the store"
    store.start()

    job = client.wait(job_id, 300, worker)
    assert job["status"] == "succeeded", job
    assert job["attempts"] == 1, "the outage cost no attempt"
    prefix = f"fleet-{fleet.env['MODELPRESS_QUEUE']}/artifacts/{job_id}/"
    artifacts = client.http.get(f"/v1/jobs/{job_id}/artifacts").json()["data"]
    assert sorted(k.rsplit("/", 1)[1] for k in stored_keys(store, prefix)) == sorted(a["name"] for a in artifacts)


def test_past_its_retry_budget_a_job_fails_with_storage_unavailable_and_leaves_nothing(
    fleet: Stack, store: S3Server, small_model, tmp_path: Path
) -> None:
    worker = join(fleet, tmp_path, "a", MODELPRESS_STORAGE_RETRY_S="3")
    client = fleet.client()
    job_id = submit_prune(fleet, small_model["archive"], small_model["text"], windows=4)
    wait_for(lambda: step_started(client, job_id), 300, "the job to fetch its inputs and start a step")

    store.stop()
    job = client.wait(job_id, 600, worker)
    assert job["status"] == "failed", job
    assert job["error"]["code"] == "storage_unavailable", job["error"]
    assert "MODELPRESS_STORAGE_RETRY_S" in job["error"]["message"]
    assert client.http.get(f"/v1/jobs/{job_id}/artifacts").json()["data"] == []

    store.start()
    prefix = f"fleet-{fleet.env['MODELPRESS_QUEUE']}/artifacts/{job_id}/"
    assert stored_keys(store, prefix) == [], "a half-written artifact was left in the store"
    assert worker.process.poll() is None, "the worker goes on serving"


def test_a_worker_whose_cache_disk_is_full_hands_the_job_to_one_with_room(
    fleet: Stack, small_model, tmp_path: Path, tmpfs
) -> None:
    full_disk = tmpfs("256k")  # far smaller than the model; the cache's own byte limit is not what stops it
    # it passes the job on for the rest of the test, however slowly the machine runs
    full = join(fleet, tmp_path, "full", MODELPRESS_CACHE_DIR=str(full_disk), MODELPRESS_RELEASE_HOLD_S="3600")
    client = fleet.client()
    job_id = submit_prune(fleet, small_model["archive"], small_model["text"], windows=2)

    def released() -> bool:
        history = job_status(client, job_id)["attempt_history"]
        return bool(history) and history[0]["outcome"] == "released"

    wait_for(released, 300, "the full worker to hand the job back")
    assert job_status(client, job_id)["status"] == "queued", "handed back, not failed"
    roomy = join(fleet, tmp_path, "roomy")
    job = client.wait(job_id, 600, roomy)
    assert job["status"] == "succeeded", job
    first, second = job["attempt_history"]
    assert first["worker"].startswith("full@") and first["outcome"] == "released"
    assert second["worker"].startswith("roomy@") and second["outcome"] == "succeeded"
    # what it fetched whole (the small text) may stay; of the model it could not hold, nothing does
    entries = [p for p in full_disk.iterdir() if p.is_dir()]
    assert all((entry / "ready").exists() for entry in entries), "an unfinished cache entry was left"
    assert not [p for p in full_disk.rglob("*") if ".partial" in p.name], "a half-written file was left"
    assert full.process.poll() is None, "the full worker goes on serving"
