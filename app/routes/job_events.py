"""A job's live events (server-sent events) and its webhook deliveries.

The stream relays the job's Redis stream (`modelpress.events`), and the row stays the truth: a client that
connects, or resumes from an id the stream no longer holds, first gets the row as it stands; a job already
ended answers that and closes; and at each heartbeat the row is read again, so an event lost on its way to
Redis still ends the stream.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from datetime import datetime
from typing import Annotated

import redis.asyncio as aioredis
from fastapi import APIRouter, Header
from fastapi.responses import StreamingResponse
from pydantic import BaseModel
from redis.exceptions import RedisError
from starlette.concurrency import run_in_threadpool

from app.deps import JobDep, SessionDep, SettingsDep
from app.resources import job_rows_page
from modelpress.db import session_scope
from modelpress.events import EVENT_ID, parse_id, stream_key
from modelpress.job_resource import JobPublic
from modelpress.models import FINAL_STATUSES, Job, WebhookAttempt
from modelpress.settings import Settings

log = logging.getLogger(__name__)
router = APIRouter(prefix="/v1/jobs", tags=["jobs"])

FINAL = frozenset(s.value for s in FINAL_STATUSES)
NO_EVENTS_YET = "0-0"
READ_MARGIN_S = 5.0
"""How much longer than a blocking read (one heartbeat) the socket waits for Redis's answer."""

EVENTS_OPENAPI = {
    200: {
        "description": "`text/event-stream`: one `job` event per change, each with an `id` to resume from and the "
        "job resource (`JobPublic`) as JSON `data`, ending after the job's final status; a `: heartbeat` comment "
        "every `MODELPRESS_EVENTS_HEARTBEAT_S` seconds. The first event is the job as it stands, unless "
        "`Last-Event-ID` resumes a stream whose later events are all still kept.",
        "content": {"text/event-stream": {"schema": {"type": "string"}}},
    },
    404: {"description": "no such job"},
}


def _sse(event_id: str, data: str) -> bytes:
    return f"id: {event_id}\nevent: job\ndata: {data}\n\n".encode()


def _row_state(job_id: str) -> JobPublic | None:
    with session_scope() as session:
        job = session.get(Job, job_id)
        return JobPublic.of(job) if job is not None else None


async def _newest_id(client: aioredis.Redis, key: str) -> str:
    newest = await client.xrevrange(key, count=1)
    return newest[0][0] if newest else NO_EVENTS_YET


async def _still_kept(client: aioredis.Redis, key: str, last_id: str) -> bool:
    """Every event after `last_id` is still in the stream (none trimmed or expired), and `last_id` is real."""
    oldest = await client.xrange(key, count=1)
    if not oldest:
        return False
    return parse_id(oldest[0][0]) <= parse_id(last_id) <= parse_id(await _newest_id(client, key))


async def job_events(job_id: str, last_event_id: str | None, settings: Settings) -> AsyncIterator[bytes]:
    """The job's events from `last_event_id` on (or from the row's state), until its final status."""
    # the blocking read waits up to a heartbeat: a shorter socket timeout (redis-py's default is 5 s) would cut
    # it off, and an event arriving after a quiet spell would wait for the heartbeat after the retry
    client = aioredis.Redis.from_url(
        settings.broker_url,
        decode_responses=True,
        socket_connect_timeout=5,
        socket_timeout=settings.events_heartbeat_s + READ_MARGIN_S,
    )
    key = stream_key(job_id)
    heartbeat_ms = int(settings.events_heartbeat_s * 1000)
    try:
        try:
            resumed = last_event_id is not None and await _still_kept(client, key, last_event_id)
            cursor = last_event_id if resumed else await _newest_id(client, key)
            if resumed and cursor == await _newest_id(client, key):
                state = await run_in_threadpool(_row_state, job_id)
                if state is None or state.status in FINAL:  # the client already has the final event
                    return
        except RedisError:
            log.warning("job %s: events unavailable; following the row", job_id, exc_info=True)
            resumed, cursor = False, last_event_id or NO_EVENTS_YET
        last_sent = ""
        if not resumed:
            state = await run_in_threadpool(_row_state, job_id)
            if state is None:
                return
            last_sent = state.model_dump_json()
            yield _sse(cursor, last_sent)
            if state.status in FINAL:
                return
        while True:
            try:
                batches = await client.xread({key: cursor}, block=heartbeat_ms, count=100)
            except RedisError:
                log.warning("job %s: reading events failed; retrying after a heartbeat", job_id, exc_info=True)
                batches = []
                await asyncio.sleep(settings.events_heartbeat_s)
            for _key, entries in batches:
                for entry_id, fields in entries:
                    cursor, last_sent = entry_id, fields["data"]
                    yield _sse(cursor, last_sent)
                    if JobPublic.model_validate_json(last_sent).status in FINAL:
                        return
            if not batches:
                yield b": heartbeat\n\n"
                state = await run_in_threadpool(_row_state, job_id)
                if state is None:
                    return
                if state.status in FINAL:  # its final event never reached Redis: the row says how it ended
                    yield _sse(cursor, state.model_dump_json())
                    return
    finally:
        await client.aclose()


@router.get(
    "/{job_id}/events",
    response_class=StreamingResponse,
    responses=EVENTS_OPENAPI,
    summary="Follow a job's progress and status live (server-sent events)",
)
async def stream_events(
    job: JobDep,
    session: SessionDep,
    settings: SettingsDep,
    last_event_id: Annotated[
        str | None,
        Header(
            alias="Last-Event-ID",
            pattern=EVENT_ID.pattern,
            max_length=41,
            description="the `id` of the last event received: resume after it",
        ),
    ] = None,
) -> StreamingResponse:
    session.close()  # the stream reads the row in short sessions of its own: hold no connection while it waits
    headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
    return StreamingResponse(
        job_events(job.id, last_event_id, settings), media_type="text/event-stream", headers=headers
    )


class DeliveryPublic(BaseModel):
    """One attempt to POST the job's final resource to its webhook."""

    attempt: int
    url: str
    job_status: str
    delivered: bool
    status_code: int | None
    error: str | None
    duration_ms: int
    created_at: datetime


class DeliveriesPublic(BaseModel):
    data: list[DeliveryPublic]
    count: int


@router.get("/{job_id}/deliveries", response_model=DeliveriesPublic, responses={404: {"description": "no such job"}})
def list_deliveries(job: JobDep, session: SessionDep) -> DeliveriesPublic:
    """Every attempt at the job's webhook (`notify`), oldest first; empty until the job ends."""
    return job_rows_page(
        session,
        WebhookAttempt,
        job,
        lambda row: DeliveryPublic.model_validate(row, from_attributes=True),
        DeliveriesPublic,
        WebhookAttempt.attempt,
        WebhookAttempt.created_at,
    )
