"""Prometheus metrics of the API process, and of the service as PostgreSQL and Redis show it at scrape time.

The API's own counters (requests by route template and status, their durations, upload bytes) live in this
process. Everything else is read when Prometheus scrapes, by `ServiceCollector`: the job rows are the truth and
workers are other processes (Celery prefork children that come and go with each job), so nothing a worker
counts in memory could be trusted. Reading at scrape also gives every API replica the same figures.

Job duration (the last attempt's, as `started_at` holds it) and queue wait (submission to the latest attempt's
start: a retried job's lost attempts count as waiting) are cumulative histograms, aggregated in SQL at scrape
rather than observed by the API: the API never sees a job end (the worker writes the row), an observation would
be lost on restart and counted once per replica, and the rows already hold the start, end and submission times.

A job that has ended never changes again (`finished_at` is set once, with its final status), so a scrape does
not read it twice: once it ended more than `FOLD_AFTER` ago its figures are folded into totals this process
keeps, and each scrape reads only the jobs not ended and those that ended since the last fold (the `finished_at`
index). Each row is in exactly one of the two, so the figures are the whole table's; a scrape's cost follows the
recent jobs, not the table's history, and only a process's first scrape reads the whole table. `FOLD_AFTER` is
far longer than a worker takes from stamping `finished_at` to committing it, and than the clock drift between
machines, so no job is stamped as ended before a fold it missed.
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
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

import redis
from prometheus_client import CollectorRegistry, Counter, Histogram, make_wsgi_app
from prometheus_client.core import GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from sqlalchemy import ColumnElement, and_, case, func, or_, select
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session
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
FOLD_AFTER = timedelta(hours=1)
FINAL_VALUES = sorted(s.value for s in FINAL_STATUSES)
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


def _added(a: list[float], b: list[float]) -> list[float]:
    return [x + y for x, y in zip(a, b, strict=True)] if a and b else a or b


@dataclass
class JobFigures:
    """Jobs by status, the duration histogram by final status and the queue-wait histogram, each histogram as
    `[count, sum, at or below each bound...]`. The figures of two disjoint sets of rows add up."""

    jobs: dict[str, float] = field(default_factory=dict)
    ran: dict[str, list[float]] = field(default_factory=dict)
    waited: list[float] = field(default_factory=list)

    def __add__(self, other: JobFigures) -> JobFigures:
        return JobFigures(
            jobs={k: self.jobs.get(k, 0) + other.jobs.get(k, 0) for k in self.jobs.keys() | other.jobs.keys()},
            ran={k: _added(self.ran.get(k, []), other.ran.get(k, [])) for k in self.ran.keys() | other.ran.keys()},
            waited=_added(self.waited, other.waited),
        )


def job_figures(session: Session, where: ColumnElement[bool]) -> JobFigures:
    """The figures of the job rows that match `where`, aggregated in SQL (three queries)."""
    dialect = session.get_bind().dialect.name
    counts = session.execute(select(Job.status, func.count()).where(where).group_by(Job.status)).all()
    ran = seconds_between(Job.started_at, Job.finished_at, dialect)
    durations = session.execute(
        histogram_query(ran, JOB_DURATION_BUCKETS, Job.status)
        .where(where, Job.status.in_(FINAL_VALUES), Job.started_at.is_not(None))
        .where(Job.finished_at.is_not(None))
        .group_by(Job.status)
    ).all()
    waited = seconds_between(Job.created_at, Job.started_at, dialect)
    waits = session.execute(histogram_query(waited, QUEUE_WAIT_BUCKETS).where(where, Job.started_at.is_not(None)))
    return JobFigures(
        jobs={status: float(n) for status, n in counts},
        ran={status: [float(v or 0) for v in row] for status, *row in durations},
        waited=[float(v or 0) for v in waits.one()],
    )


class ServiceCollector(Collector):
    """Reads jobs from the database and queue depth and worker reports from Redis each time Prometheus scrapes.

    Each source is read with short timeouts; one that fails is reported by `modelpress_metrics_source_up` as 0
    and its metrics are left out, so a scrape never fails because the database or Redis does.
    """

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._redis: redis.Redis | None = None
        self._folded = JobFigures()  # the jobs that ended before `_through`
        self._through: datetime | None = None
        self._fold_lock = threading.Lock()

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

    def _job_figures(self, session: Session) -> JobFigures:
        """Every job's figures: the folded totals, after folding in the jobs that ended since the last fold and
        more than `FOLD_AFTER` ago, plus the rows of the jobs still active or ended since."""
        with self._fold_lock:
            until = utcnow() - FOLD_AFTER
            ended = Job.finished_at < until
            if self._through is not None:
                ended = and_(ended, Job.finished_at >= self._through)
            self._folded = self._folded + job_figures(session, ended)
            self._through = until
            folded, through = self._folded, self._through
        return folded + job_figures(session, or_(Job.finished_at.is_(None), Job.finished_at >= through))

    def _database(self) -> Iterator[Metric]:
        with new_session() as session:
            figures = self._job_figures(session)
        jobs = GaugeMetricFamily("modelpress_jobs", "Jobs in the database, by status", labels=["status"])
        for status in JobStatus:
            jobs.add_metric([status.value], figures.jobs.get(status.value, 0))
        yield jobs
        duration = HistogramMetricFamily(
            "modelpress_job_duration_seconds",
            "From the start of a job's last attempt to its end, over every finished job, by final status",
            labels=["status"],
        )
        for status, row in sorted(figures.ran.items()):
            buckets, total = histogram_buckets(row, JOB_DURATION_BUCKETS)
            duration.add_metric([status], buckets, total)
        yield duration
        wait = HistogramMetricFamily(
            "modelpress_job_queue_wait_seconds",
            "From a job's submission to the start of its latest attempt, over every started job",
        )
        buckets, total = histogram_buckets(figures.waited, QUEUE_WAIT_BUCKETS)
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
