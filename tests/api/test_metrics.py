"""`/metrics` against a live API on the test PostgreSQL and Redis: the guard, the figures it reports and how they
move after a request, an upload, a submitted job, finished job rows and worker reports; the separate port; the
request id on the API's JSON log lines.
"""

from __future__ import annotations

import json
import time
import uuid
from collections import defaultdict
from collections.abc import Iterator
from datetime import datetime, timedelta
from pathlib import Path

import httpx
import pytest
import redis
from prometheus_client.parser import text_string_to_metric_families
from pydantic import ValidationError
from sqlalchemy import delete, select

from app.metrics import JOB_DURATION_BUCKETS, QUEUE_WAIT_BUCKETS, ServiceCollector, port_app
from modelpress.models import FINAL_STATUSES, Job, JobStatus, Worker, utcnow
from modelpress.settings import Settings
from modelpress.telemetry import GpuMemory, gpu_memory_key, record_gpu_memory, record_heartbeat, workers_key
from tests.api.conftest import client_for
from tests.conftest import LiveProcess, free_port, start_api

TOKEN = "metrics-token-for-tests-0123456789"
FAMILIES = {
    "modelpress_http_requests",
    "modelpress_http_request_duration_seconds",
    "modelpress_upload_bytes",
    "modelpress_jobs",
    "modelpress_job_duration_seconds",
    "modelpress_job_queue_wait_seconds",
    "modelpress_queue_depth",
    "modelpress_worker_heartbeat_age_seconds",
    "modelpress_worker_gpu_memory_bytes",
    "modelpress_workers",
    "modelpress_worker_registration_heartbeat_age_seconds",
    "modelpress_worker_gpu_total_bytes",
    "modelpress_worker_gpu_used_bytes",
    "modelpress_metrics_source_up",
}


def samples(text: str) -> dict[tuple[str, frozenset], float]:
    """Every sample of a Prometheus text page, keyed by sample name and labels."""
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(page: dict, name: str, **labels: str) -> float:
    return page.get((name, frozenset(labels.items())), 0.0)


@pytest.fixture(scope="module")
def metrics_api(migrated: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveProcess]:
    """An API on the test database guarded by a metrics token, logging JSON lines."""
    env = {**migrated, "MODELPRESS_METRICS_TOKEN": TOKEN, "MODELPRESS_LOG_FORMAT": "json"}
    server = start_api(env, tmp_path_factory.mktemp("logs") / "metrics-api.log")
    yield server
    server.stop()


@pytest.fixture(scope="module")
def scrape(metrics_api: LiveProcess) -> Iterator:
    with httpx.Client(base_url=metrics_api.url, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=30) as http:

        def read() -> dict:
            response = http.get("/metrics")
            assert response.status_code == 200, response.text
            return samples(response.text)

        yield read


@pytest.fixture(scope="module")
def acme(metrics_api: LiveProcess, api_key: str) -> Iterator[httpx.Client]:
    with client_for(metrics_api.url, api_key) as client:
        yield client


def test_metrics_need_the_operator_token(metrics_api: LiveProcess) -> None:
    missing = httpx.get(f"{metrics_api.url}/metrics")
    assert missing.status_code == 401 and missing.headers["www-authenticate"] == "Bearer"
    assert "MODELPRESS_METRICS_TOKEN" in missing.json()["detail"]
    wrong = httpx.get(f"{metrics_api.url}/metrics", headers={"Authorization": f"Bearer {TOKEN}x"})
    assert wrong.status_code == 401
    ok = httpx.get(f"{metrics_api.url}/metrics", headers={"Authorization": f"Bearer {TOKEN}"})
    assert ok.status_code == 200 and ok.headers["content-type"].startswith("text/plain")
    names = {family.name for family in text_string_to_metric_families(ok.text)}
    assert names >= FAMILIES, FAMILIES - names
    page = samples(ok.text)
    assert value(page, "modelpress_metrics_source_up", source="database") == 1
    assert value(page, "modelpress_metrics_source_up", source="redis") == 1


def test_unguarded_metrics_are_not_served_outside_development(live_api: LiveProcess) -> None:
    response = httpx.get(f"{live_api.url}/metrics")
    assert response.status_code == 404
    assert "MODELPRESS_METRICS_TOKEN" in response.json()["detail"]


def test_metrics_stay_out_of_the_openapi_schema(live_api: LiveProcess) -> None:
    assert "/metrics" not in httpx.get(f"{live_api.url}/openapi.json").json()["paths"]


def test_requests_are_counted_by_route_template(scrape, acme: httpx.Client) -> None:
    labels = {"method": "GET", "route": "/v1/models/{model_id}", "status": "404"}
    before = scrape()
    missing = str(uuid.uuid4())
    assert acme.get(f"/v1/models/{missing}").status_code == 404
    assert acme.get(f"/v1/models/{uuid.uuid4()}").status_code == 404
    after = scrape()
    assert (
        value(after, "modelpress_http_requests_total", **labels)
        == value(before, "modelpress_http_requests_total", **labels) + 2
    )
    durations = ("modelpress_http_request_duration_seconds_count", {"method": "GET", "route": labels["route"]})
    assert value(after, durations[0], **durations[1]) == value(before, durations[0], **durations[1]) + 2
    assert not any(missing in str(key) for key in after), "a raw path leaked into a label"


def test_upload_bytes_grow_by_the_uploaded_size(scrape, acme: httpx.Client, tiny_tar: Path) -> None:
    before = value(scrape(), "modelpress_upload_bytes_total", route="/v1/models")
    with tiny_tar.open("rb") as handle:
        response = acme.post("/v1/models", files={"file": ("tiny-llama.tar", handle)})
    assert response.status_code == 201, response.text
    after = value(scrape(), "modelpress_upload_bytes_total", route="/v1/models")
    assert after - before == tiny_tar.stat().st_size


def test_resumable_upload_parts_count_as_upload_bytes(scrape, acme: httpx.Client, tiny_tar: Path) -> None:
    from tests.api.test_resumable import create, put

    route = "/v1/uploads/{upload_id}/parts/{number}"
    data = tiny_tar.read_bytes()
    before = value(scrape(), "modelpress_upload_bytes_total", route=route)
    upload = create(acme, data, parts=2)
    assert put(acme, upload, 1, data).status_code == 200
    assert value(scrape(), "modelpress_upload_bytes_total", route=route) - before == upload["part_size"]
    assert acme.delete(f"/v1/uploads/{upload['id']}").status_code == 204


def test_a_submitted_job_counts_as_queued_and_in_the_queue(scrape, acme: httpx.Client, model: dict) -> None:
    from modelpress.queue import job_queue
    from modelpress.settings import get_settings

    queue = job_queue(get_settings(), "cpu")  # a tiny model's job needs no GPU
    before = scrape()
    recipe = [{"type": "prune", "method": "magnitude", "sparsity": 0.5}]
    response = acme.post("/v1/jobs", json={"model_id": model["id"], "recipe": recipe})
    assert response.status_code == 202, response.text
    after = scrape()
    assert value(after, "modelpress_jobs", status="queued") == value(before, "modelpress_jobs", status="queued") + 1
    assert (
        value(after, "modelpress_queue_depth", queue=queue) == value(before, "modelpress_queue_depth", queue=queue) + 1
    )


def insert_finished_job(
    model_id: str, waited_s: float, ran_s: float | None, status: JobStatus, created: datetime | None = None
) -> str:
    """A job row submitted at `created` (an hour ago by default), started `waited_s` later and ended `ran_s` after
    its start (`ran_s` None: not ended)."""
    from modelpress.db import session_scope

    created = created or utcnow() - timedelta(hours=1)
    started = created + timedelta(seconds=waited_s)
    with session_scope() as session:
        job = Job(
            tenant="acme",
            model_id=model_id,
            spec={"recipe": []},
            spec_sha256="0" * 64,
            status=status,
            created_at=created,
            started_at=started,
            finished_at=None if ran_s is None else started + timedelta(seconds=ran_s),
        )
        session.add(job)
        session.flush()
        return job.id


def test_finished_jobs_fill_the_duration_and_wait_histograms(scrape, model: dict) -> None:
    duration, wait = "modelpress_job_duration_seconds", "modelpress_job_queue_wait_seconds"
    before = scrape()
    insert_finished_job(model["id"], waited_s=42.5, ran_s=75.25, status=JobStatus.failed)
    after = scrape()

    def grew(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert grew(f"{duration}_count", status="failed") == 1
    assert grew(f"{duration}_sum", status="failed") == pytest.approx(75.25, abs=1e-3)
    assert grew(f"{duration}_bucket", status="failed", le="60.0") == 0
    assert grew(f"{duration}_bucket", status="failed", le="120.0") == 1
    assert grew(f"{duration}_count", status="succeeded") == 0
    assert grew(f"{wait}_count") == 1
    assert grew(f"{wait}_sum") == pytest.approx(42.5, abs=1e-3)
    assert grew(f"{wait}_bucket", le="30.0") == 0 and grew(f"{wait}_bucket", le="60.0") == 1


JOB_FAMILIES = ("modelpress_jobs", "modelpress_job_duration_seconds", "modelpress_job_queue_wait_seconds")


def job_samples(collector: ServiceCollector) -> dict[tuple[str, frozenset], float]:
    """The job families of one scrape by `collector`."""
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in collector.collect()
        if family.name in JOB_FAMILIES
        for s in family.samples
    }


def whole_table_job_samples() -> dict[tuple[str, frozenset], float]:
    """The job families computed here, in Python, from every row of the jobs table."""
    from modelpress.db import new_session

    page: dict[tuple[str, frozenset], float] = defaultdict(float)

    def observe(name: str, buckets: tuple, seconds: float, **labels: str) -> None:
        for bound in [*map(str, map(float, buckets)), "+Inf"]:
            page[(f"{name}_bucket", frozenset({**labels, "le": bound}.items()))] += bound == "+Inf" or seconds <= float(
                bound
            )
        page[(f"{name}_count", frozenset(labels.items()))] += 1
        page[(f"{name}_sum", frozenset(labels.items()))] += seconds

    for status in JobStatus:
        page[("modelpress_jobs", frozenset({"status": status.value}.items()))] = 0
    with new_session() as session:
        rows = session.execute(select(Job.status, Job.created_at, Job.started_at, Job.finished_at)).all()
    for status, created, started, finished in rows:
        page[("modelpress_jobs", frozenset({"status": status}.items()))] += 1
        if started is not None:
            observe("modelpress_job_queue_wait_seconds", QUEUE_WAIT_BUCKETS, (started - created).total_seconds())
        if status in FINAL_STATUSES and started is not None and finished is not None:
            seconds = (finished - started).total_seconds()
            observe("modelpress_job_duration_seconds", JOB_DURATION_BUCKETS, seconds, status=status)
    return dict(page)


def test_job_figures_match_the_whole_table_and_ended_jobs_are_read_once(migrated, model: dict) -> None:
    from modelpress.db import session_scope
    from modelpress.settings import get_settings

    days_ago = utcnow() - timedelta(days=3)
    ended_long_ago = [
        insert_finished_job(model["id"], waited_s=5, ran_s=700, status=JobStatus.failed, created=days_ago),
        insert_finished_job(model["id"], waited_s=95, ran_s=4000, status=JobStatus.succeeded, created=days_ago),
        insert_finished_job(model["id"], waited_s=20, ran_s=30, status=JobStatus.cancelled, created=days_ago),
    ]
    recent = [
        insert_finished_job(model["id"], waited_s=3, ran_s=50, status=JobStatus.succeeded),
        insert_finished_job(model["id"], waited_s=12, ran_s=None, status=JobStatus.running, created=utcnow()),
    ]
    try:
        expected = whole_table_job_samples()
        collector = ServiceCollector(get_settings())
        assert job_samples(collector) == pytest.approx(expected, abs=1e-6)  # folds every job that ended an hour ago
        assert job_samples(collector) == pytest.approx(expected, abs=1e-6)  # the folded totals plus the recent rows
        with session_scope() as session:
            session.execute(delete(Job).where(Job.id.in_(ended_long_ago)))
        assert whole_table_job_samples() != pytest.approx(expected, abs=1e-6)
        assert job_samples(collector) == pytest.approx(expected, abs=1e-6), "a folded job was read again"
    finally:
        with session_scope() as session:
            session.execute(delete(Job).where(Job.id.in_(ended_long_ago + recent)))


@pytest.fixture
def broker(migrated: dict[str, str]) -> Iterator[tuple[redis.Redis, str]]:
    from modelpress.settings import get_settings

    settings = get_settings()
    client = redis.Redis.from_url(settings.broker_url)
    yield client, settings.queue
    client.delete(workers_key(settings.queue), gpu_memory_key(settings.queue))
    client.close()


def test_worker_heartbeats_and_gpu_memory_come_from_worker_reports(scrape, broker) -> None:
    client, queue = broker
    now = time.time()
    record_heartbeat(client, queue, "gpu@box", now - 7)
    record_heartbeat(client, queue, "cpu@box", now - 1)
    record_heartbeat(client, queue, "gone@box", now - 3 * 86400)
    record_gpu_memory(client, queue, "gpu@box", GpuMemory(allocated=123_456, reserved=1 << 30, at=now))
    record_gpu_memory(client, queue, "gone@box", GpuMemory(allocated=1, reserved=1, at=now - 3600))
    page = scrape()
    age = value(page, "modelpress_worker_heartbeat_age_seconds", worker="gpu@box")
    assert 7 <= age < 37
    assert 1 <= value(page, "modelpress_worker_heartbeat_age_seconds", worker="cpu@box") < 31
    assert value(page, "modelpress_worker_gpu_memory_bytes", worker="gpu@box", kind="allocated") == 123_456
    assert value(page, "modelpress_worker_gpu_memory_bytes", worker="gpu@box", kind="reserved") == 1 << 30
    workers = {dict(labels).get("worker") for name, labels in page if name.startswith("modelpress_worker_")}
    assert "gone@box" not in workers
    memory_of = {dict(labels)["worker"] for name, labels in page if name == "modelpress_worker_gpu_memory_bytes"}
    assert memory_of == {"gpu@box"}, "a worker without a CUDA report must have no GPU memory sample, not a zero"


def test_worker_heartbeats_and_gpu_memory_come_from_the_workers_table(scrape, migrated) -> None:
    from modelpress.db import session_scope

    now = utcnow()
    gpu = {"index": 0, "uuid": "GPU-1", "name": "NVIDIA H100", "memory_bytes": 85_520_809_984}

    def worker(name: str, state: str, age_s: float, gpus: list[dict]) -> Worker:
        beat = now - timedelta(seconds=age_s)
        return Worker(name=name, host="metrics", pid=1, version="t", state=state, heartbeat_at=beat, gpus=gpus)

    rows = [
        worker("gpu0@metrics", "busy", 4, [{**gpu, "memory_used_bytes": 1_234_567_890}]),
        worker("gpu1@metrics", "idle", 0, [{**gpu, "index": 1, "memory_used_bytes": None}]),
        worker("cpu@metrics", "idle", 3600, []),
    ]
    before = scrape()
    with session_scope() as session:
        session.add_all(rows)
    try:
        page = scrape()
    finally:
        with session_scope() as session:
            session.execute(Worker.__table__.delete().where(Worker.host == "metrics"))
    age = value(page, "modelpress_worker_registration_heartbeat_age_seconds", worker="gpu0@metrics", host="metrics")
    assert 4 <= age < 34
    assert value(page, "modelpress_worker_gpu_used_bytes", worker="gpu0@metrics", gpu="0") == 1_234_567_890
    assert value(page, "modelpress_worker_gpu_total_bytes", worker="gpu1@metrics", gpu="1") == 85_520_809_984
    used_of = {dict(labels)["worker"] for name, labels in page if name == "modelpress_worker_gpu_used_bytes"}
    assert "gpu1@metrics" not in used_of, "memory in use that nvidia-smi did not report is absent, not zero"

    def grew(state: str) -> float:
        return value(page, "modelpress_workers", state=state) - value(before, "modelpress_workers", state=state)

    assert (grew("busy"), grew("idle"), grew("stopped")) == (1, 1, 1)


def test_api_json_log_lines_carry_the_request_id(metrics_api: LiveProcess, acme: httpx.Client) -> None:
    response = acme.get("/v1/models", headers={"X-Request-ID": "trace-4f2a"})
    assert response.status_code == 200 and response.headers["x-request-id"] == "trace-4f2a"
    generated = acme.get("/v1/models", headers={"X-Request-ID": "not {an} id"}).headers["x-request-id"]
    assert generated != "not {an} id" and len(generated) == 16
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        lines = [json.loads(line) for line in metrics_api.output().splitlines() if line.startswith("{")]
        tagged = [line for line in lines if line.get("request_id") == "trace-4f2a"]
        if tagged:
            break
        time.sleep(0.1)
    assert tagged, metrics_api.output()[-2000:]
    assert any("/v1/models" in line["message"] for line in tagged)
    assert all({"time", "level", "logger", "message"} <= set(line) for line in lines)


def test_separate_port_serves_metrics_there_and_not_on_the_api_port(migrated: dict[str, str], tmp_path: Path) -> None:
    port = free_port()
    env = {**migrated, "MODELPRESS_METRICS_PORT": str(port), "MODELPRESS_METRICS_TOKEN": TOKEN}
    server = start_api(env, tmp_path / "api.log")
    try:
        on_api = httpx.get(f"{server.url}/metrics", headers={"Authorization": f"Bearer {TOKEN}"})
        assert on_api.status_code == 404 and f"port {port}" in on_api.json()["detail"]
        there = f"http://127.0.0.1:{port}/metrics"
        assert httpx.get(there).status_code == 401
        served = httpx.get(there, headers={"Authorization": f"Bearer {TOKEN}"})
        assert served.status_code == 200
        assert {family.name for family in text_string_to_metric_families(served.text)} >= FAMILIES
        assert httpx.get(f"http://127.0.0.1:{port}/v1/models").status_code == 404
    finally:
        server.stop()


def test_separate_port_without_a_token_is_open(migrated: dict[str, str]) -> None:
    """The port's own app: with no token the network is the guard; any other path is a 404."""
    from app.metrics import build_metrics

    app = port_app(build_metrics(Settings()), token=None)
    answers: list[str] = []
    body = b"".join(app({"PATH_INFO": "/metrics", "REQUEST_METHOD": "GET"}, lambda s, h: answers.append(s)))
    assert answers == ["200 OK"] and b"modelpress_jobs" in body
    app({"PATH_INFO": "/", "REQUEST_METHOD": "GET"}, lambda s, h: answers.append(s))
    assert answers[-1] == "404 Not Found"


def test_production_refuses_unguarded_metrics() -> None:
    production = {"env": "production", "DATABASE_URL": "postgresql+psycopg://db/x", "REDIS_URL": "redis://r"}
    with pytest.raises(ValidationError, match="MODELPRESS_METRICS_TOKEN"):
        Settings(**production)
    assert not Settings(**production, metrics_port=9464).metrics_on_api_port
    assert Settings(**production, metrics_token=TOKEN).metrics_on_api_port
    with pytest.raises(ValidationError, match="at least 16"):
        Settings(**production, metrics_token="short")
    assert Settings(env="development").metrics_on_api_port
    assert not Settings(env="test").metrics_on_api_port
