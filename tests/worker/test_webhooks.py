"""Webhook delivery from the rows alone, against the real PostgreSQL (no worker process): the row is the truth,
so a delivery whose sender died is sent by the next pass, and one that keeps failing is given up in time."""

from __future__ import annotations

import secrets
from datetime import timedelta

import pytest
from sqlalchemy import select

from modelpress.db import session_scope
from modelpress.migrate import upgrade
from modelpress.models import Job, JobStatus, Webhook, WebhookAttempt, utcnow
from modelpress.settings import Settings, get_settings
from modelpress.webhooks import _claim, deliver_due
from tests.conftest import clear_caches, fresh_database, sqlalchemy_url
from tests.utils.receiver import Receiver
from tests.worker.test_lifecycle import make_job

SECRET = "a-secret-for-these-tests"


@pytest.fixture(scope="module")
def settings(migrated) -> Settings:
    """A database of this module's own, so no worker's sender elsewhere delivers these rows first."""
    with fresh_database() as libpq_url:
        patcher = pytest.MonkeyPatch()
        patcher.setenv("DATABASE_URL", sqlalchemy_url(libpq_url))
        patcher.setenv("MODELPRESS_QUEUE", f"webhooks-{secrets.token_hex(4)}")
        clear_caches()
        upgrade()
        yield get_settings().model_copy(update={"webhook_allow_private": True, "webhook_backoff_s": 0.1})
        patcher.undo()
        clear_caches()


def job_with_webhook(url: str, status: JobStatus, ended_ago_s: float = 0.0) -> str:
    finished = utcnow() - timedelta(seconds=ended_ago_s) if status != JobStatus.running else None
    job_id = make_job(status=status, finished_at=finished)
    with session_scope() as session:
        session.add(Webhook(job_id=job_id, tenant="acme", url=url, secret=SECRET))
    return job_id


def attempts(job_id: str) -> list[tuple[int, int | None, bool]]:
    with session_scope() as session:
        rows = session.scalars(select(WebhookAttempt).where(WebhookAttempt.job_id == job_id))
        return sorted((r.attempt, r.status_code, r.delivered) for r in rows)


def test_a_running_job_sends_nothing_until_it_ends(settings: Settings) -> None:
    receiver = Receiver()
    job_id = job_with_webhook(receiver.url, JobStatus.running)
    deliver_due(settings)
    assert receiver.requests == [] and attempts(job_id) == []
    with session_scope() as session:
        session.get(Job, job_id).status = JobStatus.failed
    deliver_due(settings)
    assert attempts(job_id) == [(1, 200, True)] and len(receiver.requests) == 1
    deliver_due(settings)
    assert len(receiver.requests) == 1  # taken: never sent again


def test_a_delivery_whose_sender_died_is_sent_once_its_claim_lapses(settings: Settings) -> None:
    receiver = Receiver()
    job_id = job_with_webhook(receiver.url, JobStatus.succeeded)
    assert _claim(job_id, settings) is not None  # a sender took it, then died before posting or recording
    deliver_due(settings)
    assert receiver.requests == []  # still claimed
    with session_scope() as session:
        session.get(Webhook, job_id).next_attempt_at = utcnow() - timedelta(seconds=1)
    deliver_due(settings)
    assert attempts(job_id) == [(2, 200, True)] and len(receiver.requests) == 1


def test_a_receiver_that_keeps_failing_is_given_up_after_the_retry_window(settings: Settings) -> None:
    receiver = Receiver(statuses=(500,) * 10)
    job_id = job_with_webhook(receiver.url, JobStatus.cancelled, ended_ago_s=59)
    short = settings.model_copy(update={"webhook_retry_for_s": 60.0, "webhook_backoff_s": 5.0})
    deliver_due(short)
    assert attempts(job_id) == [(1, 500, False)]
    with session_scope() as session:
        webhook = session.get(Webhook, job_id)
        assert webhook.given_up_at is not None and webhook.delivered_at is None
    deliver_due(short)
    assert len(receiver.requests) == 1
