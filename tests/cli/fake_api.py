"""An in-memory stand-in for the modelpress API behind httpx.MockTransport, for fast client tests.

It mimics only the shapes the CLI relies on (the API's contract); the live tests check the real server.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from typing import Any

import httpx

KEY = "mp_test"


@dataclass
class FakeApi:
    """Routes by regex; records uploads and job bodies so tests can look at what the client sent."""

    uploads: list[dict[str, Any]] = field(default_factory=list)
    jobs: dict[str, dict[str, Any]] = field(default_factory=dict)
    job_bodies: list[tuple[dict[str, Any], str | None]] = field(default_factory=list)
    # statuses a job walks through, one per GET
    script: list[dict[str, Any]] = field(default_factory=list)
    artifacts: dict[str, tuple[dict[str, Any], bytes]] = field(default_factory=dict)
    report: dict[str, Any] | None = None
    search_result: dict[str, Any] | None = None  # a finished search's `result`
    requests: list[httpx.Request] = field(default_factory=list)
    # the event stream: each request answers the next batch of (id, job) events, then closes; None: no such route
    event_batches: list[list[tuple[str, dict[str, Any]]]] | None = None
    events_status: int = 200

    def add_artifact(self, name: str, data: bytes, *, sha256: str | None = None, kind: str = "model") -> None:
        artifact_id = f"a{len(self.artifacts) + 1}"
        meta = {
            "id": artifact_id,
            "name": name,
            "kind": kind,
            "media_type": "application/x-tar",
            "size_bytes": len(data),
            "sha256": sha256 or hashlib.sha256(data).hexdigest(),
            "download_url": f"/v1/artifacts/{artifact_id}",
        }
        self.artifacts[artifact_id] = (meta, data)

    def transport(self) -> httpx.MockTransport:
        return httpx.MockTransport(self.handle)

    def handle(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        path, method = request.url.path, request.method
        if request.headers.get("authorization") != f"Bearer {KEY}":
            return httpx.Response(401, json={"detail": "missing or unknown API key"})
        if method == "POST" and path in ("/v1/models", "/v1/datasets"):
            return self._upload(request, path.rsplit("/", 1)[1])
        if method == "GET" and path in ("/v1/models", "/v1/datasets"):
            kind = path.rsplit("/", 1)[1]
            rows = [{k: v for k, v in u.items() if k != "data"} for u in self.uploads if u["kind"] == kind]
            return httpx.Response(200, json={"data": rows, "count": len(rows)})
        if method == "DELETE" and (match := re.fullmatch(r"/v1/(models|datasets)/([^/]+)", path)):
            kept = [u for u in self.uploads if (u["kind"], u["id"]) != (match[1], match[2])]
            if len(kept) == len(self.uploads):
                return httpx.Response(404, json={"detail": f"{match[1][:-1]} {match[2]} not found"})
            self.uploads[:] = kept
            return httpx.Response(204)
        if method == "POST" and path == "/v1/jobs":
            body = json.loads(request.content)
            self.job_bodies.append((body, request.headers.get("idempotency-key")))
            if not body.get("recipe") or body["recipe"][0].get("method") == "nope":
                detail = [{"loc": ["body", "recipe", 0], "msg": "unknown recipe step", "type": "unknown_step"}]
                return httpx.Response(422, json={"detail": detail})
            job = {"id": "job1", "status": "queued", "progress": {}, "error": None}
            self.jobs["job1"] = job
            return httpx.Response(202, json=job, headers={"location": "/v1/jobs/job1"})
        if method == "POST" and path == "/v1/searches":
            body = json.loads(request.content)
            self.job_bodies.append((body, request.headers.get("idempotency-key")))
            job = {"id": "search1", "kind": "search", "status": "queued", "progress": {}, "error": None}
            self.jobs["search1"] = job
            return httpx.Response(202, json=job, headers={"location": "/v1/searches/search1"})
        if match := re.fullmatch(r"/v1/searches/([^/]+)", path):
            return httpx.Response(200, json={**self.jobs[match[1]], "result": self.search_result})
        if method == "POST" and (match := re.fullmatch(r"/v1/jobs/([^/]+)/cancel", path)):
            self.jobs[match[1]]["status"] = "cancelled"
            return httpx.Response(200, json=self.jobs[match[1]])
        if self.event_batches is not None and re.fullmatch(r"/v1/jobs/[^/]+/events", path):
            if self.events_status != 200:
                return httpx.Response(self.events_status, json={"detail": "the stream is down"})
            batch = self.event_batches.pop(0) if self.event_batches else []
            text = "".join(f"id: {i}\nevent: job\ndata: {json.dumps(job)}\n\n: heartbeat\n\n" for i, job in batch)
            return httpx.Response(200, text=text, headers={"content-type": "text/event-stream"})
        if match := re.fullmatch(r"/v1/jobs/([^/]+)", path):
            if match[1] not in self.jobs:
                return httpx.Response(404, json={"detail": f"job {match[1]} not found"})
            if self.script:
                self.jobs[match[1]].update(self.script.pop(0))
            return httpx.Response(200, json=self.jobs[match[1]])
        if re.fullmatch(r"/v1/jobs/[^/]+/artifacts", path):
            return httpx.Response(200, json={"data": [meta for meta, _ in self.artifacts.values()], "count": 1})
        if re.fullmatch(r"/v1/jobs/[^/]+/report", path):
            return httpx.Response(200, json=self.report)
        if match := re.fullmatch(r"/v1/artifacts/([^/]+)", path):
            _meta, data = self.artifacts[match[1]]
            if range_header := request.headers.get("range"):
                start = int(range_header.removeprefix("bytes=").rstrip("-"))
                return httpx.Response(206, content=data[start:])
            return httpx.Response(200, content=data)
        return httpx.Response(404, json={"detail": "Not Found"})

    def _upload(self, request: httpx.Request, kind: str) -> httpx.Response:
        content_type = request.headers["content-type"]
        boundary = content_type.split("boundary=")[1].encode()
        body = request.read()
        fields: dict[str, tuple[str | None, bytes]] = {}
        for part in body.split(b"--" + boundary)[1:-1]:
            head, _, data = part.partition(b"\r\n\r\n")
            name = re.search(rb'name="([^"]+)"', head)[1].decode()
            filename = re.search(rb'filename="([^"]+)"', head)
            fields[name] = (filename[1].decode() if filename else None, data[:-2])
        filename, data = fields["file"]
        name = fields["name"][1].decode() if "name" in fields else filename
        row = {
            "kind": kind,
            "id": f"{kind[0]}{len(self.uploads) + 1}",
            "name": name,
            "filename": filename,
            "size_bytes": len(data),
            "sha256": hashlib.sha256(data).hexdigest(),
            "data": data,
        }
        self.uploads.append(row)
        public = {k: v for k, v in row.items() if k != "data"}
        return httpx.Response(201, json=public)
