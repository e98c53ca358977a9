"""Job events: each change of a job's row is also appended to a Redis stream, which the API relays as SSE.

The row stays the truth; the stream only says "this is what the row became", in order, with ids a client can
resume from. Each job has its own stream, bounded (`events_max_len`) and expiring (`events_ttl_s`) after its last
event. Publishing never fails a job: a lost event is covered by the API re-reading the row.
"""

from __future__ import annotations

import logging
import re
from functools import lru_cache

import redis

from modelpress.db import session_scope
from modelpress.job_resource import JobPublic
from modelpress.models import Job
from modelpress.settings import Settings, get_settings

log = logging.getLogger(__name__)

EVENT_ID = re.compile(r"^\d{1,20}-\d{1,20}$")
"""The shape of a Redis stream id, which is each event's SSE `id`."""


def stream_key(job_id: str) -> str:
    return f"modelpress:events:{job_id}"


def parse_id(event_id: str) -> tuple[int, int]:
    milliseconds, sequence = event_id.split("-")
    return int(milliseconds), int(sequence)


@lru_cache
def _client(url: str) -> redis.Redis:
    return redis.Redis.from_url(url, socket_timeout=5, socket_connect_timeout=5)


def publish(job: Job, settings: Settings | None = None) -> None:
    """Append the job's resource, as its row now stands, to its stream; logged, never raised, on failure."""
    settings = settings or get_settings()
    if not settings.redis_url:
        return
    try:
        client = _client(settings.redis_url)
        key = stream_key(job.id)
        data = JobPublic.of(job).model_dump_json()
        pipe = client.pipeline(transaction=False)
        pipe.xadd(key, {"data": data}, maxlen=settings.events_max_len, approximate=True)
        pipe.expire(key, settings.events_ttl_s)
        pipe.execute()
    except redis.RedisError:
        log.warning("job %s: could not publish its event; readers fall back to the row", job.id, exc_info=True)


def publish_job(job_id: str) -> None:
    """`publish` the job as it is committed now; a database error is logged, never raised (the row is the truth)."""
    try:
        with session_scope() as session:
            job = session.get(Job, job_id)
            if job is not None:
                publish(job)
    except Exception:  # the event is a courtesy: readers re-read the row at their next heartbeat
        log.warning("job %s: could not read the row to publish its event", job_id, exc_info=True)
