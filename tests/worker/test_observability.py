"""What operators see of a real worker: its JSON log lines carry the job id for the whole job, and /metrics
shows its heartbeat, the finished job and no GPU memory on a CPU-only worker. Also the log formatters alone.
"""

from __future__ import annotations

import io
import json
import logging
import secrets
import sys
import types
from pathlib import Path

import httpx
import redis
from prometheus_client.parser import text_string_to_metric_families

from modelpress.logs import ContextFilter, JsonFormatter, configure_logging, job_context, request_id_var
from tests.utils.factories import build_tiny_model, tar_folder
from tests.utils.stack import open_stack, wait_for

TOKEN = "metrics-token-for-tests-0123456789"
PRUNE = [{"type": "prune", "method": "magnitude", "sparsity": 0.5}]


def json_lines(text: str) -> list[dict]:
    """The log's JSON lines (Celery prints its banner to stdout as plain text; that is skipped)."""
    return [json.loads(line) for line in text.splitlines() if line.startswith("{")]


def test_worker_json_lines_carry_the_job_id_and_metrics_show_the_worker(migrated, tmp_path: Path) -> None:
    archive = tar_folder(build_tiny_model(tmp_path / "tiny"), tmp_path / "tiny.tar")
    overrides = {
        "MODELPRESS_LOG_FORMAT": "json",
        "MODELPRESS_METRICS_TOKEN": TOKEN,
        "MODELPRESS_RECONCILE_INTERVAL_S": "0.5",
        "MODELPRESS_HEARTBEAT_INTERVAL_S": "0.5",
    }
    with open_stack(migrated, tmp_path, **overrides) as stack:
        stack.start_api()
        worker = stack.start_worker()
        client = stack.client()
        model = client.upload("/v1/models", archive).json()
        response = client.http.post("/v1/jobs", json={"model_id": model["id"], "recipe": PRUNE})
        assert response.status_code == 202, response.text
        job_id = response.json()["id"]
        assert client.wait(job_id, 300, worker)["status"] == "succeeded"

        lines = wait_for(
            lambda: (
                (found := json_lines(worker.output()))
                and any("succeeded" in line["message"] and line.get("job_id") for line in found)
                and found
            ),
            30,
            "the task's last line",
        )
        ours = [line for line in lines if line.get("job_id") == job_id]
        loggers = {line["logger"] for line in ours}
        assert {"worker.jobs", "celery.app.trace"} <= loggers, loggers
        child = next(line["process"] for line in ours if line["logger"] == "worker.jobs")
        assert child != worker.process.pid, "the job runs in a prefork child"
        untagged = [line for line in lines if line["process"] == child and line.get("job_id") != job_id]
        assert not untagged, untagged
        assert not [line for line in ours if "Traceback" in line["message"]], "the job's process logged an error"
        assert all(line.get("job_id") is None for line in lines if line["process"] == worker.process.pid)

        metrics = httpx.get(f"{stack.api.url}/metrics", headers={"Authorization": f"Bearer {TOKEN}"})
        assert metrics.status_code == 200
        page = {
            (s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(metrics.text)
            for s in family.samples
        }
        age = "modelpress_worker_heartbeat_age_seconds"
        ages = {dict(labels)["worker"]: v for (name, labels), v in page.items() if name == age}
        assert len(ages) == 1 and 0 <= next(iter(ages.values())) < 10, ages
        assert page[("modelpress_jobs", frozenset({("status", "succeeded")}))] == 1
        assert page[("modelpress_job_duration_seconds_count", frozenset({("status", "succeeded")}))] == 1
        assert not [key for key in page if key[0] == "modelpress_worker_gpu_memory_bytes"], "CPU: absent, not zero"


def format_line(formatter: logging.Formatter, message: str) -> str:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.addFilter(ContextFilter())
    handler.setFormatter(formatter)
    logger = logging.getLogger("modelpress.test.logs")
    logger.addHandler(handler)
    logger.propagate = False
    try:
        logger.warning(message)
    finally:
        logger.removeHandler(handler)
    return stream.getvalue().strip()


def test_json_lines_carry_the_context_ids_only_inside_their_context() -> None:
    with job_context("job-1"):
        inside = json.loads(format_line(JsonFormatter(), "during"))
    outside = json.loads(format_line(JsonFormatter(), "after"))
    assert inside["job_id"] == "job-1" and inside["message"] == "during" and inside["level"] == "WARNING"
    assert "job_id" not in outside
    token = request_id_var.set("req-9")
    try:
        assert json.loads(format_line(JsonFormatter(), "served"))["request_id"] == "req-9"
    finally:
        request_id_var.reset(token)


def test_text_stays_the_default_format() -> None:
    from modelpress.settings import Settings

    assert Settings().log_format == "text"
    root = logging.getLogger()
    before = list(root.handlers), root.level
    try:
        configure_logging("text")
        configure_logging("text")  # a second call replaces its handler rather than doubling every line
        ours = [h for h in root.handlers if h not in before[0]]
        assert len(ours) == 1 and not isinstance(ours[0].formatter, JsonFormatter)
        assert not format_line(ours[0].formatter, "plain").startswith("{")
    finally:
        for handler in [h for h in root.handlers if h not in before[0]]:
            root.removeHandler(handler)
        root.setLevel(before[1])


class FakeCuda:
    """torch.cuda as a job on two GPUs sees it."""

    def __init__(self, initialized: bool) -> None:
        self.initialized = initialized

    def is_available(self) -> bool:
        return True

    def is_initialized(self) -> bool:
        return self.initialized

    def device_count(self) -> int:
        return 2

    def memory_allocated(self, device: int) -> int:
        return 1000 * (device + 1)

    def memory_reserved(self, device: int) -> int:
        return 4096 * (device + 1)


def fake_torch(initialized: bool, importing: bool = False) -> types.SimpleNamespace:
    return types.SimpleNamespace(cuda=FakeCuda(initialized), __spec__=types.SimpleNamespace(_initializing=importing))


def test_gpu_memory_is_reported_while_the_job_runs_and_removed_after(migrated, monkeypatch) -> None:
    from modelpress.settings import Settings
    from modelpress.telemetry import gpu_memory
    from worker.observe import GpuMemoryReporter, cuda_memory

    monkeypatch.setitem(sys.modules, "torch", fake_torch(initialized=False))
    assert cuda_memory() is None, "CUDA not initialised (a CPU job): nothing to report"
    monkeypatch.setitem(sys.modules, "torch", fake_torch(initialized=True, importing=True))
    assert cuda_memory() is None, "torch half-imported by the job's thread must not be touched"
    monkeypatch.setitem(sys.modules, "torch", fake_torch(initialized=True))
    settings = Settings(queue=f"observe-{secrets.token_hex(4)}", heartbeat_interval_s=0.05)
    client = redis.Redis.from_url(settings.broker_url)
    reporter = GpuMemoryReporter("job-1", "gpu@box", settings)
    reporter.start()
    try:
        report = wait_for(lambda: gpu_memory(client, settings.queue, fresh_s=60).get("gpu@box"), 10, "a report")
        assert (report.allocated, report.reserved) == (3000, 3 * 4096)
    finally:
        reporter.stop()
    assert gpu_memory(client, settings.queue, fresh_s=60) == {}
    client.close()
