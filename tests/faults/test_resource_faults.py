"""Resource faults on the real stack: a job that outgrows its memory limit, a disk that fills during export."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.utils.factories import build_tiny_model, tar_folder, write_text_dataset
from tests.utils.stack import Stack, submit_prune


def test_job_over_its_memory_limit_fails_and_the_worker_serves_on(stack: Stack, tmp_path: Path) -> None:
    archive = tar_folder(build_tiny_model(tmp_path / "model", hidden=256, layers=4), tmp_path / "model.tar")
    big_text = write_text_dataset(tmp_path / "big.txt", lines=6000)
    small_text = write_text_dataset(tmp_path / "small.txt", lines=400)
    stack.start_api()
    # measured on this model: 16384-token windows add about 350 MiB to the job process, 128-token ones ~20 MiB
    worker = stack.start_worker(MODELPRESS_JOB_MEMORY_LIMIT_BYTES=str(150 * 2**20))
    client = stack.client()

    hungry = submit_prune(stack, archive, big_text, seq_len=16384, windows=2)
    job = client.wait(hungry, 180, worker)
    assert job["status"] == "failed", job
    assert job["error"]["code"] == "out_of_memory"
    assert "MODELPRESS_JOB_MEMORY_LIMIT_BYTES" in job["error"]["message"]
    assert client.http.get(f"/v1/jobs/{hungry}/artifacts").json()["data"] == []

    modest = submit_prune(stack, archive, small_text, seq_len=128, windows=2)
    assert client.wait(modest, 180, worker)["status"] == "succeeded"
    assert worker.process.poll() is None


@pytest.fixture
def small_disk(tmpfs) -> Path:
    """A 4.5 MiB tmpfs: room for the upload, not for the upload plus its exported copy."""
    return tmpfs("4608k")


def test_disk_filling_during_export_fails_the_job_cleanly(stack: Stack, tmp_path: Path, small_disk: Path) -> None:
    folder = build_tiny_model(tmp_path / "model", hidden=128, layers=2)
    archive = tar_folder(folder, tmp_path / "model.tar.gz", gzip=True)
    text = write_text_dataset(tmp_path / "text.txt", lines=100)
    stack.env["DATA_DIR"] = str(small_disk)
    stack.start_api()
    worker = stack.start_worker()
    client = stack.client()

    job_id = submit_prune(stack, archive, text, seq_len=64, windows=2)
    job = client.wait(job_id, 180, worker)
    assert job["status"] == "failed", job
    assert job["error"]["code"] == "disk_full", job["error"]
    assert client.http.get(f"/v1/jobs/{job_id}/artifacts").json()["data"] == []
    leftovers = [p for p in (small_disk / "storage").rglob("*") if p.is_file() and "artifacts" in p.parts]
    assert leftovers == [], "a half-written artifact was left in storage"
    scratch = small_disk / "storage" / "tmp"
    assert not any(p.is_file() for p in scratch.rglob("*") if "uploads" not in p.parts), "scratch not cleaned"
    assert os.statvfs(small_disk).f_bfree > 0
    assert worker.process.poll() is None
