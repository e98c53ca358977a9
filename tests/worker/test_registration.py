"""Worker registration: GPUs read from nvidia-smi (faked here) and filtered as CUDA filters them, the queues they
serve, and the worker's row written, refreshed, drained and removed in the test database."""

from __future__ import annotations

import json
import subprocess
import sys
from datetime import timedelta

import pytest

from modelpress.db import session_scope
from modelpress.models import Job, JobStatus, Worker, utcnow
from modelpress.settings import DeclaredGpu, Settings
from worker.registration import (
    TORCH_QUERY,
    Gpu,
    Registration,
    consumed_queues,
    detect_gpus,
    query_gpus,
    query_torch_gpus,
    visible,
)

SMI_OUTPUT = """0, GPU-aaaa-1111, NVIDIA H100 80GB HBM3, 81559, 1024
1, GPU-bbbb-2222, NVIDIA H100 80GB HBM3, 81559, 70000
2, GPU-cccc-3333, NVIDIA GeForce RTX 4090, 24564, 0
"""
MiB = 1024**2


def fake_smi(stdout: str = SMI_OUTPUT, error: Exception | None = None):
    def run(argv, **_kwargs):
        if error is not None:
            raise error
        assert argv[0] == "nvidia-smi"
        return subprocess.CompletedProcess(argv, 0, stdout=stdout, stderr="")

    return run


def test_nvidia_smi_lines_become_gpus() -> None:
    gpus = query_gpus(fake_smi())
    assert [g.index for g in gpus] == [0, 1, 2]
    assert gpus[1] == Gpu(1, "GPU-bbbb-2222", "NVIDIA H100 80GB HBM3", 81559 * MiB, 70000 * MiB)
    assert query_gpus(fake_smi(error=FileNotFoundError("nvidia-smi"))) == []
    assert query_gpus(fake_smi(error=subprocess.CalledProcessError(9, "nvidia-smi"))) == []


@pytest.mark.parametrize(
    ("devices", "indices"),
    [
        (None, [0, 1, 2]),
        ("1", [1]),
        ("2,0", [2, 0]),
        ("GPU-bbbb", [1]),  # a UUID prefix, as CUDA accepts
        ("", []),
        ("-1", []),
        ("0,7,1", [0]),  # CUDA stops at the first entry that names no device
    ],
)
def test_cuda_visible_devices_filters_as_cuda_does(devices: str | None, indices: list[int]) -> None:
    assert [g.index for g in visible(query_gpus(fake_smi()), devices)] == indices


def test_declared_gpus_win_then_the_cpu_device_then_nvidia_smi_then_torch() -> None:
    declared = Settings(gpus=[DeclaredGpu(name="Fake", memory_bytes=50 * 10**9)] * 2, device="cpu")
    assert [(g.index, g.name) for g in detect_gpus(declared, {"CUDA_VISIBLE_DEVICES": "1"})] == [(1, "Fake")]
    assert detect_gpus(Settings(device="cpu"), {}, lambda: query_gpus(fake_smi())) == []
    assert len(detect_gpus(Settings(), {}, lambda: query_gpus(fake_smi()))) == 3
    torch_gpus = [Gpu(0, "GPU-cccc", "NVIDIA L4", 23_034 * MiB)]  # already filtered by CUDA in its process
    found = detect_gpus(Settings(), {"CUDA_VISIBLE_DEVICES": "2"}, lambda: [], lambda: torch_gpus)
    assert found == torch_gpus


def test_torch_is_asked_in_a_child_process() -> None:
    def run(argv, **_kwargs):
        assert argv[1] == "-c" and "torch.cuda" in argv[2]
        stdout = '[[0, "GPU-5f3c", "NVIDIA H200", 150754820096]]\n'
        return subprocess.CompletedProcess(argv, 0, stdout=stdout, stderr="")

    assert query_torch_gpus(run) == [Gpu(0, "GPU-5f3c", "NVIDIA H200", 150_754_820_096)]
    assert query_torch_gpus(fake_smi(error=subprocess.CalledProcessError(1, "python"))) == []
    real = subprocess.run([sys.executable, "-c", TORCH_QUERY], capture_output=True, text=True, timeout=300)
    assert real.returncode == 0, real.stderr  # the query itself runs under this torch (no GPU here: an empty list)
    assert isinstance(json.loads(real.stdout.strip().splitlines()[-1]), list)


def test_a_worker_consumes_the_queues_of_its_smallest_card_largest_class_first() -> None:
    settings = Settings(queue="fleet")
    gpus = query_gpus(fake_smi())
    assert consumed_queues(settings, gpus[:1]) == ["fleet.gpu-80", "fleet.gpu-48", "fleet.gpu-24", "fleet.cpu"]
    assert consumed_queues(settings, gpus) == ["fleet.gpu-24", "fleet.cpu"]
    assert consumed_queues(settings, []) == ["fleet.cpu"]


def row(name: str) -> Worker | None:
    with session_scope() as session:
        return session.get(Worker, name)


def test_the_row_follows_the_worker(migrated, tmp_path) -> None:
    settings = Settings(queue="fleet", cache_dir=tmp_path / "cache")
    gpus = query_gpus(fake_smi())[:1]
    used_now = [Gpu(0, "GPU-aaaa-1111", "NVIDIA H100 80GB HBM3", 81559 * MiB, 40000 * MiB)]
    registration = Registration(settings, "gpu0@regtest", gpus, query=lambda: used_now)
    registration.register()
    registered = row("gpu0@regtest")
    assert registered.state == "idle" and registered.current_job_id is None
    assert registered.memory_classes == ["cpu", "gpu-24", "gpu-48", "gpu-80"]
    assert registered.queues[0] == "fleet.gpu-80" and registered.free_disk_bytes > 0
    assert registered.gpus[0]["memory_used_bytes"] == 1024 * MiB

    with session_scope() as session:
        job = Job(tenant="acme", spec={"recipe": []}, spec_sha256="0" * 64, status=JobStatus.running)
        job.worker = "gpu0@regtest"
        session.add(job)
        session.flush()
        job_id = job.id
    before = registered.heartbeat_at
    registration.beat()
    beaten = row("gpu0@regtest")
    assert beaten.state == "busy" and beaten.current_job_id == job_id
    assert beaten.heartbeat_at > before and beaten.gpus[0]["memory_used_bytes"] == 40000 * MiB

    registration.drain()
    assert row("gpu0@regtest").state == "draining"
    registration.beat()
    assert row("gpu0@regtest").state == "draining", "a heartbeat does not undo a drain"
    with session_scope() as session:
        session.get(Job, job_id).status = JobStatus.succeeded

    registration.remove()
    assert row("gpu0@regtest") is None
    registration.beat()  # a row removed under a live worker comes back with its next heartbeat
    assert row("gpu0@regtest") is not None
    registration.remove()


def test_a_drain_written_by_the_api_holds(migrated, tmp_path) -> None:
    registration = Registration(Settings(cache_dir=tmp_path), "cpu@regtest", [])
    registration.register()
    with session_scope() as session:
        session.get(Worker, "cpu@regtest").state = "draining"
        session.get(Worker, "cpu@regtest").heartbeat_at = utcnow() - timedelta(seconds=30)
    registration.beat()
    assert row("cpu@regtest").state == "draining" and registration.draining
    registration.remove()
