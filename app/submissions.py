"""What the submitting routes share (jobs, searches): the JSON body validated as the route's schema, its
digest and the `Idempotency-Key` replay, the commit that a concurrent request with the same key may win, the
enqueue, the `Location` answer, and the responses such a POST and its cancel declare.

Each route keeps its own checks, row and wording of its 422; these helpers hold the plumbing once, so a fix to
the replay or to the enqueue's fallback reaches both resources.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Annotated, Any, Generic, TypeVar

from fastapi import Header, HTTPException, Request, Response, status
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ValidationError
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from app.json_body import read_json
from modelpress.models import Job
from modelpress.queue import enqueue_job
from modelpress.specs import JobSpec, SearchSpec

logger = logging.getLogger(__name__)

Body = TypeVar("Body", bound=BaseModel)
Public = TypeVar("Public")

IdempotencyKey = Annotated[str | None, Header(alias="Idempotency-Key", min_length=1, max_length=255)]


def validated_body(schema: type[Body]) -> Callable[[Request], Awaitable[Body]]:
    """A dependency that reads the request body as a validated `schema` (bounded, finite JSON; 422 naming each
    problem)."""

    async def body(request: Request) -> Body:
        data = await read_json(request)
        try:
            return schema.model_validate(data)
        except ValidationError as exc:
            raise RequestValidationError(exc.errors(include_url=False)) from exc

    return body


def body_openapi(schema_name: str) -> dict[str, Any]:
    """The `openapi_extra` that declares the body a route parses itself as the component `schema_name`."""
    return {
        "requestBody": {
            "required": True,
            "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{schema_name}"}}},
        }
    }


def submit_responses(refused: str) -> dict[int | str, dict[str, Any]]:
    """The responses a submitting POST declares; `refused` says what its 422 refuses."""
    return {
        404: {"description": "the model or a dataset does not exist"},
        413: {"description": "the JSON body is larger than 1 MiB"},
        415: {"description": "the body is not `application/json`"},
        422: {"description": refused},
    }


def spec_digest(spec: JobSpec | SearchSpec) -> tuple[dict[str, Any], str]:
    """The spec as stored (without `notify`, whose secret lives only in the webhook row) and the sha256 of the
    whole body's canonical form (sorted keys, no spaces), secret included, for `Idempotency-Key` replays."""
    data = spec.model_dump(mode="json", exclude={"notify"} if isinstance(spec, JobSpec) else None)
    whole = dict(data)
    if getattr(spec, "notify", None) is not None:
        whole["notify"] = {"url": spec.notify.url, "secret": spec.notify.secret.get_secret_value()}
    canonical = json.dumps(whole, sort_keys=True, separators=(",", ":"), allow_nan=False)
    return data, hashlib.sha256(canonical.encode()).hexdigest()


def cancel_responses(noun: str) -> dict[int | str, dict[str, Any]]:
    """The responses a `POST /{id}/cancel` of a submitted `noun` declares."""
    return {
        200: {"description": f"the queued {noun} is cancelled"},
        202: {"description": f"the running {noun} is asked to stop; it stops at its next progress check"},
        404: {"description": f"no such {noun}"},
        409: {"description": f"the {noun} has already finished"},
    }


def replay(session: Session, tenant: str, key: str, digest: str) -> Job | None:
    """The job created earlier with this Idempotency-Key, if any; 422 when its body differed."""
    job = session.scalar(select(Job).where(Job.tenant == tenant, Job.idempotency_key == key))
    if job is not None and job.spec_sha256 != digest:
        raise HTTPException(
            status.HTTP_422_UNPROCESSABLE_ENTITY,
            f"Idempotency-Key {key!r} was already used for job {job.id} with a different body; "
            "use a new key for a different job",
        )
    return job


@dataclass
class Submission(Generic[Public]):
    """One POST that creates a job row: `earlier()` answers a replayed `Idempotency-Key` before any check runs,
    `commit(job)` stores the row (or answers the twin that won the key meanwhile) and enqueues it. Both answer
    `public(job)` with `Location: <collection>/<id>`."""

    session: Session
    tenant: str
    key: str | None
    digest: str
    response: Response
    noun: str
    collection: str
    public: Callable[[Job], Public]

    def earlier(self) -> Public | None:
        """The answer for a row created earlier with this key (422 when its body differed), else None."""
        job = replay(self.session, self.tenant, self.key, self.digest) if self.key is not None else None
        return None if job is None else self._answer(job, replayed=True)

    def commit(self, job: Job, *rows: Any) -> Public:
        """Store `job` (and `rows` that belong to it), then send it to the queue; a broker that is down leaves
        the row queued for the reconciler. A concurrent request with the same key that committed first wins:
        its row is answered instead."""
        self.session.add(job)
        self.session.add_all(rows)
        try:
            self.session.commit()
        except IntegrityError:
            self.session.rollback()
            earlier = self.earlier()
            if earlier is None:
                raise
            return earlier
        try:
            enqueue_job(job.id)
        except Exception:  # the broker is down: the row stays queued and the reconciler re-enqueues it
            logger.warning(
                "could not enqueue %s %s; it stays queued for the reconciler", self.noun, job.id, exc_info=True
            )
        return self._answer(job)

    def _answer(self, job: Job, replayed: bool = False) -> Public:
        self.response.headers["Location"] = f"{self.collection}/{job.id}"
        if replayed:
            self.response.headers["Idempotent-Replayed"] = "true"
        return self.public(job)
