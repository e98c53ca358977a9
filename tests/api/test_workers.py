"""The fleet through the real API and real workers: `GET /v1/workers` behind the admin key, a job that needs more
GPU memory than any running worker has waits with a visible reason (job resource and event stream), a CPU worker
never takes it, and it runs once a worker with enough (declared) GPU memory registers."""

from __future__ import annotations

import json
from pathlib import Path

import httpx

from tests.utils import sse
from tests.utils.factories import build_tiny_model, tar_folder
from tests.utils.stack import open_stack, wait_for

ADMIN_KEY = "admin-key-for-tests-0123456789abcdef"
PRUNE = [{"type": "prune", "method": "magnitude", "sparsity": 0.5}]
RTX_4090 = [{"name": "NVIDIA GeForce RTX 4090", "memory_bytes": 25_757_220_864}]
FAST = {
    "MODELPRESS_ADMIN_KEY": ADMIN_KEY,
    "MODELPRESS_RECONCILE_INTERVAL_S": "0.5",
    "MODELPRESS_HEARTBEAT_INTERVAL_S": "0.5",
    "MODELPRESS_WORKER_LIVE_S": "5",
    "MODELPRESS_CPU_JOB_MAX_BYTES": "0",  # every job needs a GPU: the smallest class, gpu-24
}


def first_event(http: httpx.Client, job_id: str) -> dict:
    with http.stream("GET", f"/v1/jobs/{job_id}/events", timeout=30) as response:
        assert response.status_code == 200
        return next(sse.parse(response.iter_lines())).data


def test_a_job_waits_for_a_capable_worker_and_runs_once_one_registers(migrated, tmp_path: Path) -> None:
    archive = tar_folder(build_tiny_model(tmp_path / "tiny"), tmp_path / "tiny.tar")
    with open_stack(migrated, tmp_path, **FAST) as stack:
        api = stack.start_api()
        client = stack.client()
        admin = httpx.Client(base_url=api.url, headers={"Authorization": f"Bearer {ADMIN_KEY}"}, timeout=30)
        assert client.http.get("/v1/workers").status_code == 401, "a tenant's key is not the admin key"
        assert httpx.get(f"{api.url}/v1/workers").status_code == 401

        cpu = stack.start_worker(MODELPRESS_DEVICE="cpu", MODELPRESS_WORKER_NAME="cpu@fleet-test")
        workers = wait_for(lambda: admin.get("/v1/workers").json()["data"], 60, "the CPU worker's row")
        assert [(w["gpus"], w["memory_classes"], w["live"]) for w in workers] == [([], ["cpu"], True)]
        assert workers[0]["queues"] == [f"{stack.env['MODELPRESS_QUEUE']}.cpu"]
        assert workers[0]["free_disk_bytes"] > 0 and workers[0]["state"] == "idle"

        model = client.upload("/v1/models", archive).json()
        response = client.http.post("/v1/jobs", json={"model_id": model["id"], "recipe": PRUNE})
        assert response.status_code == 202, response.text
        job = response.json()
        assert job["memory_class"] == "gpu-24" and job["estimated_memory_bytes"] > 0
        assert job["waiting_reason"].startswith("waiting for a worker with ≥ 24 GB of GPU memory")
        assert first_event(client.http, job["id"])["waiting_reason"] == job["waiting_reason"]
        assert cpu.process.poll() is None

        gpu = stack.start_worker(MODELPRESS_GPUS=json.dumps(RTX_4090), MODELPRESS_WORKER_NAME="gpu0@fleet-test")
        done = client.wait(job["id"], 300, gpu)
        assert done["status"] == "succeeded", done
        assert done["waiting_reason"] is None
        assert [attempt["worker"] for attempt in done["attempt_history"]] == ["gpu0@fleet-test"]
        rows = {w["name"]: w for w in admin.get("/v1/workers").json()["data"]}
        assert rows["gpu0@fleet-test"]["gpus"][0]["name"] == "NVIDIA GeForce RTX 4090"
        assert rows["gpu0@fleet-test"]["memory_classes"] == ["cpu", "gpu-24"]
        assert rows["gpu0@fleet-test"]["queues"] == [f"{stack.env['MODELPRESS_QUEUE']}.{c}" for c in ("gpu-24", "cpu")]
        assert rows["cpu@fleet-test"]["live"] and rows["cpu@fleet-test"]["state"] == "idle"

        assert admin.post("/v1/workers/nobody@nowhere/drain").status_code == 404
        assert client.http.post("/v1/workers/gpu0@fleet-test/drain").status_code == 401
        drained = admin.post("/v1/workers/gpu0@fleet-test/drain")
        assert drained.status_code == 202 and drained.json()["state"] == "draining"
        assert gpu.process.wait(timeout=120) == 0, "a drained worker finishes and exits cleanly"
        names = {w["name"] for w in admin.get("/v1/workers").json()["data"]}
        assert names == {"cpu@fleet-test"}, "the drained worker removed its row"


def test_worker_routes_are_off_without_an_admin_key(live_api, api_key: str) -> None:
    answer = httpx.get(f"{live_api.url}/v1/workers", headers={"Authorization": f"Bearer {api_key}"})
    assert answer.status_code == 403 and "MODELPRESS_ADMIN_KEY" in answer.json()["detail"]
    assert httpx.get(f"{live_api.url}/v1/workers").status_code == 401, "no key at all is a 401 either way"
