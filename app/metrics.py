"""Prometheus metrics of the API process, and of the service as PostgreSQL and Redis show it at scrape time.

The API's own counters (requests by route template and status, their durations, upload bytes) live in this
process. Everything else is read when Prometheus scrapes, by `ServiceCollector`: the job rows are the truth and
workers are other processes (Celery prefork children that come and go with each job), so nothing a worker
counts in memory could be trusted. Reading at scrape also gives every API replica the same figures.

Job duration (the last attempt's, as `started_at` holds it) and queue wait (submission to the latest attempt's
start: a retried job's lost attempts count as waiting) are cumulative histograms, computed in one aggregate query
per scrape rather than observed by the API: the API never sees a job end (the worker writes the row), an
observation would be lost on restart and counted once per replica, and the rows already hold the start, end
and submission times. Jobs are hours of GPU work each, so the table stays small enough to aggregate whole.
"""

from __future__ import annotations

import hmac
import logging
import re
import secrets
import threading
import time
from collections import Counter as Tally
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

import redis
from prometheus_client import CollectorRegistry, Counter, Histogram, make_wsgi_app
from prometheus_client.core import GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from sqlalchemy import ColumnElement, case, func, select
from sqlalchemy.exc import SQLAlchemyError
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from modelpress.db import new_session
from modelpress.fleet import is_live
from modelpress.logs import request_id_var
from modelpress.models import FINAL_STATUSES, Job, JobStatus, Worker, WorkerState, utcnow
from modelpress.queue import all_queues, queue_keys
from modelpress.settings import Settings
from modelpress.telemetry import WORKER_FORGET_S, gpu_memory, heartbeat_ages

logger = logging.getLogger(__name__)

JOB_DURATION_BUCKETS = (10, 30, 60, 120, 300, 600, 1800, 3600, 7200, 14400, 28800, 86400)
QUEUE_WAIT_BUCKETS = (1, 5, 15, 30, 60, 300, 900, 1800, 3600, 14400)
REDIS_TIMEOUT_S = 0.5
REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,64}")
"""An `X-Request-ID` a client or proxy sends is kept when it looks like an id; anything else is replaced."""


@dataclass
class Metrics:
    """This API process's registry and the instruments its middleware and upload routes update."""

    registry: CollectorRegistry
    requests: Counter
    request_duration: Histogram
    upload_bytes: Counter


def build_metrics(settings: Settings) -> Metrics:
    """A registry of its own per app (never the global one), so two apps in one process do not collide."""
    registry = CollectorRegistry()
    metrics = Metrics(
        registry=registry,
        requests=Counter(
            "modelpress_http_requests",
            "HTTP requests answered, by method, route template and status",
            ["method", "route", "status"],
            registry=registry,
        ),
        request_duration=Histogram(
            "modelpress_http_request_duration_seconds",
            "Time to answer an HTTP request (to the end of its body), by method and route template",
            ["method", "route"],
            registry=registry,
        ),
        upload_bytes=Counter(
            "modelpress_upload_bytes",
            "Bytes of uploaded files received, by route template",
            ["route"],
            registry=registry,
        ),
    )
    registry.register(ServiceCollector(settings))
    return metrics


def route_template(scope: Scope) -> str:
    """The matched route's path template (`/v1/jobs/{job_id}`), never the raw path: ids would explode the series."""
    route = scope.get("route")
    return getattr(route, "path", None) or "unmatched"


class RequestMiddleware:
    """Gives each request an id (for log lines and the `X-Request-ID` answer header) and counts it."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        sent = dict(scope.get("headers") or []).get(b"x-request-id", b"").decode("latin-1")
        request_id = sent if REQUEST_ID.fullmatch(sent) else secrets.token_hex(8)
        token = request_id_var.set(request_id)
        status = 500
        start = time.perf_counter()

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message["headers"] = [*message.get("headers", []), (b"x-request-id", request_id.encode())]
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            route = route_template(scope)
            self.metrics.requests.labels(scope["method"], route, str(status)).inc()
            self.metrics.request_duration.labels(scope["method"], route).observe(time.perf_counter() - start)
            request_id_var.reset(token)


def seconds_between(start: Any, end: Any, dialect: str) -> ColumnElement[float]:
    """`end - start` in seconds, in SQL: PostgreSQL in production, SQLite for the embedded default."""
    if dialect == "sqlite":
        return (func.julianday(end) - func.julianday(start)) * 86400.0
    return func.extract("epoch", end - start)


def histogram_query(seconds: ColumnElement[float], buckets: Iterable[float], *group: Any) -> Any:
    """Per group: how many, their sum, and how many fall at or below each bucket bound (cumulative, as Prometheus
    histograms are)."""
    counts = [func.sum(case((seconds <= bound, 1), else_=0)) for bound in buckets]
    return select(*group, func.count(), func.coalesce(func.sum(seconds), 0.0), *counts)


def histogram_buckets(row: Iterable[Any], buckets: Iterable[float]) -> tuple[list[tuple[str, float]], float]:
    count, total, *below = row
    pairs = [(str(float(bound)), float(n or 0)) for bound, n in zip(buckets, below, strict=True)]
    return [*pairs, ("+Inf", float(count))], float(total or 0.0)


class ServiceCollector(Collector):
    """Reads jobs from the database and queue depth and worker reports from Redis each time Prometheus scrapes.

    Each source is read with short timeouts; one that fails is reported by `modelpress_metrics_source_up` as 0
    and its metrics are left out, so a scrape never fails because the database or Redis does.
    """

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._redis: redis.Redis | None = None

    def collect(self) -> Iterator[Metric]:
        up = GaugeMetricFamily(
            "modelpress_metrics_source_up", "1 when the source answered this scrape, else 0", labels=["source"]
        )
        for source, read in (("database", self._database), ("redis", self._redis_metrics)):
            try:
                families = list(read())
            except (SQLAlchemyError, redis.RedisError, OSError) as exc:
                logger.warning("metrics: %s did not answer: %s", source, exc)
                up.add_metric([source], 0)
                continue
            up.add_metric([source], 1)
            yield from families
        yield up

    def _database(self) -> Iterator[Metric]:
        with new_session() as session:
            dialect = session.get_bind().dialect.name
            counts = dict(session.execute(select(Job.status, func.count()).group_by(Job.status)).all())
            ran = seconds_between(Job.started_at, Job.finished_at, dialect)
            durations = session.execute(
                histogram_query(ran, JOB_DURATION_BUCKETS, Job.status)
                .where(Job.status.in_([s.value for s in FINAL_STATUSES]), Job.started_at.is_not(None))
                .where(Job.finished_at.is_not(None))
                .group_by(Job.status)
            ).all()
            waited = seconds_between(Job.created_at, Job.started_at, dialect)
            waits = session.execute(histogram_query(waited, QUEUE_WAIT_BUCKETS).where(Job.started_at.is_not(None)))
            wait_row = waits.one()
        jobs = GaugeMetricFamily("modelpress_jobs", "Jobs in the database, by status", labels=["status"])
        for status in JobStatus:
            jobs.add_metric([status.value], counts.get(status.value, 0))
        yield jobs
        duration = HistogramMetricFamily(
            "modelpress_job_duration_seconds",
            "From the start of a job's last attempt to its end, over every finished job, by final status",
            labels=["status"],
        )
        for status, *row in durations:
            buckets, total = histogram_buckets(row, JOB_DURATION_BUCKETS)
            duration.add_metric([status], buckets, total)
        yield duration
        wait = HistogramMetricFamily(
            "modelpress_job_queue_wait_seconds",
            "From a job's submission to the start of its latest attempt, over every started job",
        )
        buckets, total = histogram_buckets(wait_row, QUEUE_WAIT_BUCKETS)
        wait.add_metric([], buckets, total)
        yield wait
        yield from self._fleet()

    def _fleet(self) -> Iterator[Metric]:
        """The workers table: how many workers per state, each one's heartbeat age and its GPUs' memory."""
        now = utcnow()
        with new_session() as session:
            rows = session.scalars(
                select(Worker).where(Worker.heartbeat_at >= now - timedelta(seconds=WORKER_FORGET_S))
            ).all()
        states = GaugeMetricFamily(
            "modelpress_workers",
            "Registered workers by state; `stopped`: no heartbeat within MODELPRESS_WORKER_LIVE_S",
            labels=["state"],
        )
        counts = Tally(row.state if is_live(row, self.settings, now) else "stopped" for row in rows)
        for state in [*WorkerState, "stopped"]:
            states.add_metric([str(state)], counts.get(state, 0))
        ages = GaugeMetricFamily(
            "modelpress_worker_registration_heartbeat_age_seconds",
            "Seconds since each registered worker's newest heartbeat in the workers table",
            labels=["worker", "host"],
        )
        total = GaugeMetricFamily(
            "modelpress_worker_gpu_total_bytes", "Memory of each GPU a worker runs jobs on", labels=["worker", "gpu"]
        )
        used = GaugeMetricFamily(
            "modelpress_worker_gpu_used_bytes",
            "Memory in use on each GPU of a worker at its last heartbeat (nvidia-smi: every process on the card); "
            "absent where unknown",
            labels=["worker", "gpu"],
        )
        for row in sorted(rows, key=lambda r: r.name):
            beat = row.heartbeat_at if row.heartbeat_at.tzinfo else row.heartbeat_at.replace(tzinfo=now.tzinfo)
            ages.add_metric([row.name, row.host], max(0.0, (now - beat).total_seconds()))
            for gpu in row.gpus or []:
                total.add_metric([row.name, str(gpu["index"])], gpu["memory_bytes"])
                if gpu.get("memory_used_bytes") is not None:
                    used.add_metric([row.name, str(gpu["index"])], gpu["memory_used_bytes"])
        yield from (states, ages, total, used)

    def _client(self) -> redis.Redis:
        if self._redis is None:
            if not self.settings.redis_url:
                raise redis.ConnectionError("REDIS_URL is not set")
            self._redis = redis.Redis.from_url(
                self.settings.redis_url, socket_timeout=REDIS_TIMEOUT_S, socket_connect_timeout=REDIS_TIMEOUT_S
            )
        return self._redis

    def _redis_metrics(self) -> Iterator[Metric]:
        client = self._client()
        queue = self.settings.queue
        depth = GaugeMetricFamily(
            "modelpress_queue_depth",
            "Messages waiting in each capability queue, over its Redis lists (one per priority)",
            labels=["queue"],
        )
        queues = all_queues(self.settings)
        pipeline = client.pipeline(transaction=False)
        for name in queues:
            for key in queue_keys(name):
                pipeline.llen(key)
        lengths = pipeline.execute()
        per_queue = len(lengths) // len(queues)
        for i, name in enumerate(queues):
            depth.add_metric([name], sum(lengths[i * per_queue : (i + 1) * per_queue]))
        ages = GaugeMetricFamily(
            "modelpress_worker_heartbeat_age_seconds",
            "Seconds since each worker's newest heartbeat (workers silent for a day are left out)",
            labels=["worker"],
        )
        for worker, age in sorted(heartbeat_ages(client, queue).items()):
            ages.add_metric([worker], age)
        memory = GaugeMetricFamily(
            "modelpress_worker_gpu_memory_bytes",
            "CUDA memory held by the job each worker runs (allocated by tensors, reserved by the allocator); "
            "absent for a worker without CUDA or without a job",
            labels=["worker", "kind"],
        )
        fresh_s = max(3 * self.settings.heartbeat_interval_s, 30.0)
        for worker, report in sorted(gpu_memory(client, queue, fresh_s).items()):
            memory.add_metric([worker, "allocated"], report.allocated)
            memory.add_metric([worker, "reserved"], report.reserved)
        yield from (depth, ages, memory)


def bearer_token_ok(authorization: str | None, token: str) -> bool:
    """Whether an `Authorization` header carries exactly `Bearer <token>` (compared in constant time)."""
    scheme, _, presented = (authorization or "").partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(presented.strip().encode(), token.encode())


def port_app(metrics: Metrics, token: str | None) -> Any:
    """The WSGI app of the metrics port: `/metrics` only, behind the token when one is set."""
    exposition = make_wsgi_app(metrics.registry)

    def app(environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
        if environ.get("PATH_INFO") != "/metrics":
            start_response("404 Not Found", [("Content-Type", "text/plain")])
            return [b"only /metrics is served on this port\n"]
        if token and not bearer_token_ok(environ.get("HTTP_AUTHORIZATION"), token):
            start_response("401 Unauthorized", [("Content-Type", "text/plain"), ("WWW-Authenticate", "Bearer")])
            return [b"send 'Authorization: Bearer <MODELPRESS_METRICS_TOKEN>'\n"]
        return exposition(environ, start_response)

    return app


class _ThreadingServer(ThreadingMixIn, WSGIServer):
    daemon_threads = True


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        logger.debug("metrics port: " + format, *args)


@contextmanager
def serving_port(metrics: Metrics, settings: Settings) -> Iterator[None]:
    """Serve /metrics on `MODELPRESS_METRICS_PORT` for as long as the API runs (nothing when it is unset).

    One API process per port: a second process on the same port fails to start, with a message.
    """
    if settings.metrics_port is None:
        yield
        return
    try:
        server = make_server(
            settings.metrics_host,
            settings.metrics_port,
            port_app(metrics, settings.metrics_token),
            server_class=_ThreadingServer,
            handler_class=_QuietHandler,
        )
    except OSError as exc:
        raise RuntimeError(
            f"cannot serve metrics on {settings.metrics_host}:{settings.metrics_port} "
            f"(MODELPRESS_METRICS_HOST/MODELPRESS_METRICS_PORT): {exc}; choose a free port, one per API process"
        ) from exc
    thread = threading.Thread(target=server.serve_forever, name="metrics-port", daemon=True)
    thread.start()
    logger.info("metrics served on http://%s:%d/metrics", settings.metrics_host, settings.metrics_port)
    try:
        yield
    finally:
        server.shutdown()
        server.server_close()
