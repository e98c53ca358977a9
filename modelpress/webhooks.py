"""Webhooks: when a job ends, its resource is POSTed to the URL its spec named, signed, until it is taken.

The `webhooks` row is the truth. A worker's sender thread looks for rows whose job has ended and whose delivery
is neither done nor given up, claims one for the length of an attempt (so two workers never send it at once),
POSTs, records the attempt in `webhook_attempts` and schedules the next with exponential backoff, until
`webhook_retry_for_s` after the job ended. A worker that dies mid-attempt leaves the row due again once the
claim lapses: deliveries are at least once, and the receiver tells repeats apart by the job id.

The signature is Stripe's scheme: `X-Modelpress-Signature: t=<unix seconds>,v1=<hex HMAC-SHA256 of "<t>.<body>">`
keyed with the spec's `secret`; a receiver recomputes it and refuses old timestamps.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import logging
import socket
import threading
import time
from datetime import timedelta
from urllib.parse import urlsplit

import httpx
from sqlalchemy import or_, select, update

from modelpress.db import session_scope
from modelpress.job_resource import JobPublic
from modelpress.models import FINAL_STATUSES, Job, Webhook, WebhookAttempt, utcnow
from modelpress.settings import Settings

log = logging.getLogger(__name__)

SIGNATURE_HEADER = "X-Modelpress-Signature"


def sign(secret: str, timestamp: int, body: bytes) -> str:
    """The signature header's value for `body` sent at `timestamp`."""
    digest = hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256).hexdigest()
    return f"t={timestamp},v1={digest}"


class RefusedUrl(ValueError):
    """A webhook URL this service will not call; the message says why and what the operator can allow."""


def _allowed_by_operator(host: str, address: ipaddress.IPv4Address | ipaddress.IPv6Address, settings: Settings) -> bool:
    for entry in settings.webhook_allowed_hosts:
        if entry.lower() == host.lower():
            return True
        try:
            if address in ipaddress.ip_network(entry, strict=False):
                return True
        except ValueError:
            continue
    return False


def check_url(url: str, settings: Settings) -> None:
    """Refuse a URL whose host resolves to loopback, link-local, private or reserved addresses.

    Checked at submission and again before each attempt, since a name may resolve elsewhere later.
    """
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise RefusedUrl(f"notify.url {url!r} is not an http(s) URL with a host")
    if settings.webhook_allow_private:
        return
    host = parts.hostname
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
        infos = socket.getaddrinfo(host, port, proto=socket.IPPROTO_TCP)
    except (OSError, ValueError) as exc:
        raise RefusedUrl(f"notify.url host {host!r} does not resolve ({exc}); give a reachable public URL") from exc
    for info in infos:
        address = ipaddress.ip_address(info[4][0].split("%")[0])
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
            address = address.ipv4_mapped
        if address.is_global and not address.is_multicast:
            continue
        if _allowed_by_operator(host, address, settings):
            continue
        raise RefusedUrl(
            f"notify.url host {host!r} resolves to {address}, an address on a private, loopback or link-local "
            "network, which this service does not call; give a public URL, or ask the operator to set "
            "MODELPRESS_WEBHOOK_ALLOW_PRIVATE=true or list the host in MODELPRESS_WEBHOOK_ALLOWED_HOSTS"
        )


def backoff_s(attempt: int, settings: Settings) -> float:
    """The wait after failed attempt number `attempt` (1-based): doubling from `webhook_backoff_s`, capped."""
    return min(settings.webhook_backoff_s * 2 ** (attempt - 1), settings.webhook_max_backoff_s)


def due_job_ids(settings: Settings, limit: int = 20) -> list[str]:
    """Jobs that have ended whose webhook is neither delivered nor given up, and due now."""
    now = utcnow()
    with session_scope() as session:
        rows = session.scalars(
            select(Webhook.job_id)
            .join(Job, Job.id == Webhook.job_id)
            .where(
                Job.status.in_([s.value for s in FINAL_STATUSES]),
                Webhook.delivered_at.is_(None),
                Webhook.given_up_at.is_(None),
                or_(Webhook.next_attempt_at.is_(None), Webhook.next_attempt_at <= now),
            )
            .order_by(Webhook.next_attempt_at.nulls_first())
            .limit(limit)
        )
        return list(rows)


def _claim(job_id: str, settings: Settings) -> tuple[Webhook, Job] | None:
    """Take the delivery for one attempt: push its due time past the attempt, so no other worker sends it."""
    now = utcnow()
    lease = timedelta(seconds=settings.webhook_timeout_s + 30)
    with session_scope() as session:
        claimed = session.execute(
            update(Webhook)
            .where(
                Webhook.job_id == job_id,
                Webhook.delivered_at.is_(None),
                Webhook.given_up_at.is_(None),
                or_(Webhook.next_attempt_at.is_(None), Webhook.next_attempt_at <= now),
            )
            .values(next_attempt_at=now + lease, attempts=Webhook.attempts + 1)
        )
        if claimed.rowcount != 1:
            return None
        webhook = session.get(Webhook, job_id)
        job = session.get(Job, job_id)
        session.expunge_all()
        return webhook, job


def _post(webhook: Webhook, job: Job, settings: Settings) -> tuple[int | None, str | None]:
    """One POST; (the receiver's status, None) or (status or None, why it failed)."""
    try:
        check_url(webhook.url, settings)
    except RefusedUrl as exc:
        return None, str(exc)
    body = JobPublic.of(job).model_dump_json().encode()
    headers = {
        "Content-Type": "application/json",
        "User-Agent": "modelpress-webhook",
        SIGNATURE_HEADER: sign(webhook.secret, int(time.time()), body),
    }
    try:
        response = httpx.post(
            webhook.url, content=body, headers=headers, timeout=settings.webhook_timeout_s, follow_redirects=False
        )
    except httpx.HTTPError as exc:
        return None, f"{type(exc).__name__}: {exc}"[:1024]
    if response.is_success:
        return response.status_code, None
    return response.status_code, f"the receiver answered {response.status_code}"


def deliver(job_id: str, settings: Settings) -> bool | None:
    """One attempt at the job's webhook, recorded; True when taken, False when failed, None when not ours."""
    claimed = _claim(job_id, settings)
    if claimed is None:
        return None
    webhook, job = claimed
    started = time.monotonic()
    status_code, error = _post(webhook, job, settings)
    now = utcnow()
    delivered = error is None
    with session_scope() as session:
        session.add(
            WebhookAttempt(
                tenant=webhook.tenant,
                job_id=job_id,
                attempt=webhook.attempts,
                url=webhook.url,
                job_status=job.status,
                status_code=status_code,
                error=error[:1024] if error else None,
                delivered=delivered,
                duration_ms=int((time.monotonic() - started) * 1000),
                created_at=now,
            )
        )
        values: dict[str, object] = {"next_attempt_at": None, "delivered_at": now}
        if not delivered:
            ended = job.finished_at or now
            next_at = now + timedelta(seconds=backoff_s(webhook.attempts, settings))
            if next_at - ended > timedelta(seconds=settings.webhook_retry_for_s):
                values = {"next_attempt_at": None, "given_up_at": now}
                log.warning("job %s: webhook given up after %d attempts: %s", job_id, webhook.attempts, error)
            else:
                values = {"next_attempt_at": next_at}
        session.execute(update(Webhook).where(Webhook.job_id == job_id).values(**values))
    return delivered


def deliver_due(settings: Settings) -> int:
    """One pass over the deliveries that are due; returns how many attempts it made."""
    made = 0
    for job_id in due_job_ids(settings):
        if deliver(job_id, settings) is not None:
            made += 1
    return made


class WebhookSender(threading.Thread):
    """Calls `deliver_due` every `webhook_poll_s` in a worker's parent process; errors are logged, never fatal."""

    def __init__(self, settings: Settings) -> None:
        super().__init__(name="modelpress-webhooks", daemon=True)
        self.settings = settings
        self.stopped = threading.Event()

    def run(self) -> None:
        while not self.stopped.wait(self.settings.webhook_poll_s):
            try:
                deliver_due(self.settings)
            except Exception:  # the database is down: try again next tick
                log.exception("webhook delivery pass failed")
