"""Job claiming and reconciling against the real PostgreSQL and Redis (no worker process needed)."""

from __future__ import annotations

import base64
import json
import secrets
from datetime import timedelta
from types import SimpleNamespace

import pytest
import redis

from modelpress.db import session_scope
from modelpress.migrate import upgrade
from modelpress.models import Job, JobStatus, Model, Worker, WorkerState, utcnow
from modelpress.queue import enqueue_job, job_queue, queue_keys
from modelpress.settings import get_settings
from tests.conftest import clear_caches, fresh_database, sqlalchemy_url
from worker.jobs import ProgressReporter, _record_end, claim
from worker.reconcile import already_handled, reconcile_once, requeue_lost


@pytest.fixture(scope="module")
def settings(migrated):
    """A database and queue of this module's own: no other test's worker or reconciler can touch them."""
    with fresh_database() as libpq_url:
        patcher = pytest.MonkeyPatch()
        patcher.setenv("DATABASE_URL", sqlalchemy_url(libpq_url))
        patcher.setenv("MODELPRESS_QUEUE", f"lifecycle-{secrets.token_hex(4)}")
        clear_caches()
        upgrade()
        yield get_settings()
        patcher.undo()
        clear_caches()


@pytest.fixture
def broker(settings) -> redis.Redis:
    client = redis.Redis.from_url(settings.broker_url)
    client.delete(
        *queue_keys(job_queue(settings, None)),
        *queue_keys(job_queue(settings, "gpu-80")),
        f"modelpress:broker-epoch:{settings.queue}",
    )
    yield client
    client.delete(
        *queue_keys(job_queue(settings, None)),
        *queue_keys(job_queue(settings, "gpu-80")),
        f"modelpress:broker-epoch:{settings.queue}",
        f"modelpress:reconciler:{settings.queue}",
    )


def make_job(**fields) -> str:
    with session_scope() as session:
        model = Model(
            tenant="acme",
            name="m",
            format="hf",
            architecture="LlamaForCausalLM",
            parameters=1,
            size_bytes=1,
            sha256="0" * 64,
            storage_key="models/x",
        )
        session.add(model)
        session.flush()
        job = Job(tenant="acme", model_id=model.id, spec={"recipe": []}, spec_sha256="0" * 64, **fields)
        session.add(job)
        session.flush()
        return job.id


def job_row(job_id: str) -> Job:
    with session_scope() as session:
        return session.get(Job, job_id)


def queued_ids(client: redis.Redis, queue: str) -> list[str]:
    """The job ids of the Celery messages waiting in a Redis queue, in the order a worker takes them (each list
    is popped from its right end, the lists in priority order)."""
    ids = []
    for key in queue_keys(queue):
        for raw in reversed(client.lrange(key, 0, -1)):
            args, _kwargs, _embed = json.loads(base64.b64decode(json.loads(raw)["body"]))
            ids.append(args[0])
    return ids


def test_claim_marks_running_once(settings) -> None:
    job_id = make_job()
    first = claim(job_id, "w1", settings)
    assert first is not None and first.status == JobStatus.running and first.attempts == 1
    assert claim(job_id, "w2", settings) is None, "a live lease must not be claimed twice"
    assert job_row(job_id).worker == "w1"


def test_progress_writes_each_stage_start_however_soon_it_follows(settings) -> None:
    """Reports within the interval are dropped, except a new stage's first: the row shows when each stage began."""
    job_id = make_job(status=JobStatus.running)
    report = ProgressReporter(job_id, interval_s=3600)

    def event(index: int, stage: str, fraction: float, message: str) -> SimpleNamespace:
        return SimpleNamespace(step_index=index, total_steps=3, step=stage, fraction=fraction, message=message)

    report(event(1, "load", 0.0, "loading"))
    report(event(1, "load", 0.5, "half loaded"))
    assert job_row(job_id).progress["message"] == "loading"
    report(event(2, "evaluate baseline", 0.0, "evaluating"))
    assert job_row(job_id).progress == {
        "step_index": 2,
        "total_steps": 3,
        "step": "evaluate baseline",
        "fraction": 0.0,
        "message": "evaluating",
    }
    report(event(2, "evaluate baseline", 0.4, "window 2/5"))
    assert job_row(job_id).progress["message"] == "evaluating"
    report(event(2, "evaluate baseline", 1.0, "evaluated"))
    assert job_row(job_id).progress["message"] == "evaluated"


def test_claim_retries_a_job_whose_heartbeat_stopped(settings) -> None:
    stale = utcnow() - timedelta(seconds=settings.lease_s + 5)
    job_id = make_job(status=JobStatus.running, attempts=1, heartbeat_at=stale, started_at=stale)
    job = claim(job_id, "w2", settings)
    assert job is not None and job.attempts == 2 and job.worker == "w2"


def test_retried_job_records_each_attempt_and_times_the_last(settings) -> None:
    from app.schemas import JobPublic

    job_id = make_job()
    assert claim(job_id, "w1", settings) is not None
    stale = utcnow() - timedelta(seconds=settings.lease_s + 5)
    first_start = stale - timedelta(seconds=600)
    with session_scope() as session:  # the first worker died ten minutes in: its heartbeat stopped
        job = session.get(Job, job_id)
        job.heartbeat_at, job.started_at = stale, first_start
        job.attempt_history = [{**job.attempt_history[0], "started_at": first_start.isoformat()}]
    assert claim(job_id, "w2", settings) is not None
    _record_end(job_id, JobStatus.succeeded, None)

    public = JobPublic.of(job_row(job_id))
    first, second = public.attempt_history
    assert (first.worker, first.outcome, first.started_at, first.finished_at) == ("w1", "lost", first_start, stale)
    assert (second.worker, second.outcome) == ("w2", "succeeded")
    assert public.started_at == second.started_at > stale, "the job's start is its last attempt's start"
    assert public.finished_at == second.finished_at >= second.started_at
    assert public.attempts == 2


def test_claim_gives_up_after_max_attempts(settings) -> None:
    stale = utcnow() - timedelta(seconds=settings.lease_s + 5)
    job_id = make_job(status=JobStatus.running, attempts=settings.max_attempts, heartbeat_at=stale)
    assert claim(job_id, "w", settings) is None
    row = job_row(job_id)
    assert row.status == JobStatus.failed and row.error["code"] == "too_many_attempts"
    assert "limit" in row.error["message"]


def test_claim_honours_cancel_and_final_states(settings) -> None:
    cancelled = make_job(cancel_requested=True)
    assert claim(cancelled, "w", settings) is None
    assert job_row(cancelled).status == JobStatus.cancelled
    done = make_job(status=JobStatus.succeeded)
    assert claim(done, "w", settings) is None
    assert job_row(done).status == JobStatus.succeeded


def test_a_message_needs_no_child_only_for_a_job_that_ended_or_runs_under_a_live_lease(settings) -> None:
    queued = make_job()
    assert already_handled(queued, settings) is None, "a queued job's message goes to a child, which claims it"
    assert claim(queued, "w1", settings) is not None
    assert already_handled(queued, settings) == "running under a live lease"
    with session_scope() as session:
        session.get(Job, queued).heartbeat_at = utcnow() - timedelta(seconds=settings.lease_s + 1)
    assert already_handled(queued, settings) is None, "a stale lease is the child's to take over"
    assert already_handled(make_job(status=JobStatus.succeeded), settings) == "already succeeded"
    assert already_handled(make_job(cancel_requested=True), settings) is None, "the child records the cancel"
    assert already_handled("00000000-0000-0000-0000-000000000000", settings) == "no such job"


def test_reconciler_resends_everything_when_the_broker_lost_its_data(settings, broker) -> None:
    job_id = make_job(enqueued_at=utcnow())
    result = reconcile_once(settings, broker, "test")
    assert result["sent"] >= 1 and job_id in queued_ids(broker, job_queue(settings, None))
    # the epoch key now exists: a second pass sends nothing already sent
    broker.delete(job_queue(settings, None), f"modelpress:reconciler:{settings.queue}")
    assert reconcile_once(settings, broker, "test")["sent"] == 0
    assert broker.llen(job_queue(settings, None)) == 0


def test_reconciler_sends_jobs_whose_first_send_failed(settings, broker) -> None:
    broker.set(f"modelpress:broker-epoch:{settings.queue}", "x")
    old = utcnow() - timedelta(seconds=60)
    job_id = make_job(created_at=old, enqueued_at=None)
    reconcile_once(settings, broker, "test")
    assert job_id in queued_ids(broker, job_queue(settings, None))
    assert job_row(job_id).enqueued_at is not None


def test_reconciler_reaps_dead_workers_jobs(settings, broker) -> None:
    broker.set(f"modelpress:broker-epoch:{settings.queue}", "x")
    stale = utcnow() - timedelta(seconds=settings.lease_s + 5)
    retry = make_job(status=JobStatus.running, attempts=1, heartbeat_at=stale, enqueued_at=stale)
    give_up = make_job(status=JobStatus.running, attempts=settings.max_attempts, heartbeat_at=stale)
    live = make_job(status=JobStatus.running, attempts=1, heartbeat_at=utcnow(), enqueued_at=stale)
    running = {"started_at": stale.isoformat(), "finished_at": None, "worker": "w", "outcome": "running"}
    with session_scope() as session:
        session.get(Job, retry).attempt_history = [running]
    reconcile_once(settings, broker, "test")
    assert job_row(retry).status == JobStatus.queued and retry in queued_ids(broker, job_queue(settings, None))
    assert [(a["worker"], a["outcome"]) for a in job_row(retry).attempt_history] == [("w", "lost")]
    assert job_row(give_up).status == JobStatus.failed and job_row(give_up).error["code"] == "worker_lost"
    assert job_row(live).status == JobStatus.running


def test_a_job_whose_worker_died_goes_to_the_front_of_the_queue(settings, broker) -> None:
    lost = make_job()
    assert claim(lost, "celery@gpu1", settings) is not None
    later = make_job()
    enqueue_job(later, settings)
    assert queued_ids(broker, job_queue(settings, None)) == [later]

    assert requeue_lost(lost, settings, "celery@gpu1")
    assert queued_ids(broker, job_queue(settings, None)) == [lost, later]
    row = job_row(lost)
    assert row.status == JobStatus.queued and [a["outcome"] for a in row.attempt_history] == ["lost"]

    stale = utcnow() - timedelta(seconds=settings.lease_s + 5)  # the reconciler's path: a lease ran out
    reaped = make_job(status=JobStatus.running, attempts=1, heartbeat_at=stale, enqueued_at=stale)
    broker.set(f"modelpress:broker-epoch:{settings.queue}", "x")
    broker.delete(f"modelpress:reconciler:{settings.queue}")
    reconcile_once(settings, broker, "test")
    ids = queued_ids(broker, job_queue(settings, None))
    assert ids[:2] == [lost, reaped] and later in ids[2:]


def test_a_lost_job_goes_back_to_its_own_capability_queue(settings, broker) -> None:
    lost = make_job(memory_class="gpu-80", memory_bytes=70 * 10**9)
    assert claim(lost, "gpu0@box", settings) is not None
    assert requeue_lost(lost, settings, "gpu0@box")
    assert queued_ids(broker, job_queue(settings, "gpu-80")) == [lost]
    assert lost not in queued_ids(broker, job_queue(settings, None))


def test_the_reconciler_sets_and_clears_waiting_reasons(settings, broker) -> None:
    broker.set(f"modelpress:broker-epoch:{settings.queue}", "x")
    job_id = make_job(memory_class="gpu-48", memory_bytes=40 * 10**9, enqueued_at=utcnow())

    def tick() -> str | None:
        broker.delete(f"modelpress:reconciler:{settings.queue}")
        reconcile_once(settings, broker, "test")
        return job_row(job_id).waiting_reason

    assert "≥ 48 GB of GPU memory" in tick()
    now, stale = utcnow(), utcnow() - timedelta(seconds=settings.worker_live_s + 5)
    with session_scope() as session:
        for name, classes, beat in (("small@box", ["cpu", "gpu-24"], now), ("big@box", ["cpu", "gpu-48"], stale)):
            session.add(Worker(name=name, host="box", pid=1, version="t", memory_classes=classes, heartbeat_at=beat))
    assert "≥ 48 GB" in tick(), "a worker whose heartbeat is stale is not live"
    with session_scope() as session:
        session.get(Worker, "big@box").heartbeat_at = utcnow()
    assert tick() is None
    with session_scope() as session:
        session.get(Worker, "big@box").state = WorkerState.draining
    assert "≥ 48 GB" in tick(), "a draining worker takes no new job"
    with session_scope() as session:
        session.execute(Worker.__table__.delete())


def test_a_dead_child_does_not_requeue_a_job_running_elsewhere(settings, broker) -> None:
    job_id = make_job()
    assert claim(job_id, "celery@gpu1", settings) is not None
    assert requeue_lost(job_id, settings, "celery@gpu2")  # gpu2's child only held a duplicate message
    assert job_row(job_id).status == JobStatus.running and queued_ids(broker, job_queue(settings, None)) == []


def test_only_one_reconciler_acts_per_tick(settings, broker) -> None:
    broker.delete(f"modelpress:reconciler:{settings.queue}")
    assert reconcile_once(settings, broker, "a") != {}
    assert reconcile_once(settings, broker, "b") == {}


def test_a_model_larger_than_the_cache_fails_the_job_with_a_reason(settings, tmp_path, monkeypatch) -> None:
    from modelpress.storage import get_storage
    from worker.jobs import execute

    job_id, key = make_job(), "models/x"  # the model row make_job writes
    with session_scope() as session:
        job = session.get(Job, job_id)
        job.spec = {"model_id": job.model_id, "recipe": [{"type": "prune", "method": "magnitude", "sparsity": 0.5}]}
    source = tmp_path / "model"
    source.mkdir()
    (source / "config.json").write_text("{}" * 50)
    get_storage().delete(key)
    get_storage().put_tree(key, source)
    monkeypatch.setenv("MODELPRESS_CACHE_MAX_BYTES", "10")
    monkeypatch.setenv("MODELPRESS_CACHE_DIR", str(tmp_path / "cache"))
    get_settings.cache_clear()
    try:
        execute(job_id, "test-worker")
    finally:
        get_settings.cache_clear()
    job = job_row(job_id)
    assert job.status == JobStatus.failed
    assert job.error["code"] == "cache_full" and "MODELPRESS_CACHE_MAX_BYTES" in job.error["message"], job.error
