"""Faults injected into the real stack: a worker killed mid-job, Redis losing its data, a cancel mid-run.

Each test runs a private Redis, API and worker (see conftest.py) and asserts that no job is lost and none
stays "running" forever.
"""

from __future__ import annotations

import os
import signal
import subprocess
from datetime import datetime
from pathlib import Path

import pytest

from tests.utils.factories import build_tiny_model, tar_folder, write_text_dataset
from tests.utils.stack import Stack, job_status, kill_group, submit_prune, wait_for


def submit(stack: Stack, slow_model: dict[str, Path], windows: int = 60) -> str:
    return submit_prune(stack, slow_model["archive"], slow_model["text"], windows=windows)


def test_worker_killed_mid_job_is_retried_on_another_worker(stack: Stack, slow_model) -> None:
    stack.start_api()
    first = stack.start_worker()
    job_id = submit(stack, slow_model)
    client = stack.client()
    wait_for(
        lambda: (
            job_status(client, job_id)["status"] == "running"
            and (job_status(client, job_id)["progress"].get("step") or "").startswith("evaluate")
        ),
        120,
        "the job to run",
    )

    kill_group(first, signal.SIGKILL)
    assert job_status(client, job_id)["status"] == "running"  # nobody has noticed yet
    stack.start_worker()
    job = client.wait(job_id, 300)
    assert job["status"] == "succeeded", job
    assert job["attempts"] == 2


def test_job_whose_worker_child_died_runs_before_jobs_queued_after_it(stack: Stack, slow_model) -> None:
    stack.start_api()
    worker = stack.start_worker()
    first = submit(stack, slow_model)
    client = stack.client()
    wait_for(
        lambda: (job_status(client, first)["progress"].get("step") or "").startswith("evaluate"), 120, "a job to run"
    )
    second = submit(stack, slow_model, windows=2)

    # the pool's child dies; the worker's parent lives on and forks a replacement
    children = subprocess.run(["pgrep", "-P", str(worker.process.pid)], capture_output=True, text=True).stdout
    assert children.split(), "the worker has no child process"
    for pid in children.split():
        os.kill(int(pid), signal.SIGKILL)

    a, b = client.wait(first, 300, worker), client.wait(second, 300, worker)
    assert a["status"] == b["status"] == "succeeded", (a, b)
    lost, retried = a["attempt_history"]
    assert lost["outcome"] == "lost" and retried["outcome"] == "succeeded"
    assert a["started_at"] == retried["started_at"]
    # one child: the retried job ran to its end before the job queued after it started
    assert datetime.fromisoformat(b["started_at"]) >= datetime.fromisoformat(a["finished_at"]), (a, b)


def test_job_fails_with_a_reason_when_its_workers_keep_dying(stack: Stack, slow_model) -> None:
    stack.env["MODELPRESS_MAX_ATTEMPTS"] = "1"
    stack.start_api()
    first = stack.start_worker()
    job_id = submit(stack, slow_model)
    client = stack.client()
    wait_for(lambda: job_status(client, job_id)["status"] == "running", 120, "the job to run")
    kill_group(first, signal.SIGKILL)
    stack.start_worker()
    job = client.wait(job_id, 60)
    assert job["status"] == "failed"
    assert job["error"]["code"] in {"worker_lost", "too_many_attempts"}
    assert "limit 1" in job["error"]["message"]


def test_queued_jobs_survive_redis_losing_its_data(stack: Stack, slow_model) -> None:
    stack.start_api()
    job_ids = [submit(stack, slow_model, windows=2) for _ in range(2)]
    client = stack.client()
    assert all(job_status(client, j)["status"] == "queued" for j in job_ids)

    stack.redis.stop()  # no persistence: the queued messages are gone
    stack.redis.start()
    stack.start_worker()
    for job_id in job_ids:
        assert client.wait(job_id, 300)["status"] == "succeeded"


def test_cancel_stops_a_running_job_within_seconds(stack: Stack, slow_model) -> None:
    stack.start_api()
    worker = stack.start_worker()
    job_id = submit(stack, slow_model, windows=400)
    client = stack.client()
    wait_for(lambda: (job_status(client, job_id)["progress"].get("step") or "").startswith("evaluate"), 120, "a step")

    assert client.http.post(f"/v1/jobs/{job_id}/cancel").status_code in (200, 202)
    job = client.wait(job_id, 15)
    assert job["status"] == "cancelled"
    assert client.http.get(f"/v1/jobs/{job_id}/artifacts").json()["data"] == []
    scratch = Path(stack.env["DATA_DIR"]) / "storage" / "tmp"
    wait_for(lambda: not any(scratch.rglob("*.safetensors")), 10, "partial outputs to be removed")

    # the worker goes on serving: a new child runs the next job
    next_job = submit(stack, slow_model, windows=2)
    assert client.wait(next_job, 120, worker)["status"] == "succeeded"


CHECKPOINT_EVERY = 50


@pytest.mark.parametrize("store", ["local", "s3"])
def test_distillation_resumes_from_its_checkpoint_after_a_crash(
    stack: Stack, tmp_path: Path, store: str, request: pytest.FixtureRequest
) -> None:
    """On S3 storage the second worker has a data folder of its own: the checkpoint reaches it through the store."""
    second_worker, steps = {}, 3000
    if store == "s3":  # fewer steps: the crash comes past step 120 all the same, and the retry has less to run
        steps = 400
        stack.env.update(request.getfixturevalue("s3_server").env(f"faults-{stack.env['MODELPRESS_QUEUE']}"))
        second_worker = {"DATA_DIR": str(tmp_path / "second-machine")}
    root = tmp_path / "distill"
    archive = tar_folder(build_tiny_model(root / "model"), root / "model.tar")
    text = write_text_dataset(root / "text.txt", lines=800)
    stack.start_api()
    first = stack.start_worker()
    client = stack.client()
    model = client.upload("/v1/models", archive).json()
    dataset = client.upload("/v1/datasets", text).json()
    body = {
        "model_id": model["id"],
        "recipe": [
            {
                "type": "distill",
                "dataset_id": dataset["id"],
                "steps": steps,
                "batch_size": 2,
                "seq_len": 32,
                "checkpoint_every": CHECKPOINT_EVERY,
            }
        ],
    }
    job_id = client.http.post("/v1/jobs", json=body).json()["id"]

    def trained_past_a_checkpoint() -> bool:
        progress = job_status(client, job_id)["progress"]
        message = progress.get("message") or ""
        return (
            (progress.get("step") or "").startswith("distill")
            and message.startswith("step ")
            and int(message.split()[1].split("/")[0]) > 120
        )

    wait_for(trained_past_a_checkpoint, 180, "distillation to pass two checkpoints")
    kill_group(first, signal.SIGKILL)
    stack.start_worker(**second_worker)
    job = client.wait(job_id, 300)
    assert job["status"] == "succeeded", job
    assert job["attempts"] == 2
    summary = client.http.get(f"/v1/jobs/{job_id}/report").json()["steps"][0]["summary"]
    # killed past step 120: it resumes from a checkpoint at or after step 50, at a multiple of checkpoint_every
    assert summary["resumed_from_step"] >= CHECKPOINT_EVERY and summary["resumed_from_step"] % CHECKPOINT_EVERY == 0
    assert not (Path(stack.env["DATA_DIR"]) / "storage" / "checkpoints" / job_id).exists()
    if store == "s3":
        server = request.getfixturevalue("s3_server")
        left = server.client().list_objects_v2(Bucket=server.bucket, Prefix=f"faults-{stack.env['MODELPRESS_QUEUE']}/")
        assert not any("/checkpoints/" in o["Key"] for o in left.get("Contents", []))
