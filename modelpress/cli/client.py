"""A small synchronous client for the modelpress REST API, used by the CLI and usable from scripts.

Errors become `ApiError` carrying the server's `detail`, so the CLI can show what to fix instead of a traceback.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, BinaryIO

import httpx

DEFAULT_URL = "http://127.0.0.1:8000"
CHUNK = 1024 * 1024


class ApiError(Exception):
    """A request the server refused or could not be made; `str()` is a message for a person."""

    def __init__(self, message: str, status_code: int | None = None, detail: Any = None) -> None:
        super().__init__(message)
        self.status_code = status_code
        self.detail = detail


def format_detail(detail: Any) -> str:
    """Turn FastAPI's `detail` (a string, or pydantic's list of errors for a 422) into readable lines."""
    if isinstance(detail, list):
        lines = []
        for error in detail:
            if isinstance(error, dict):
                where = ".".join(str(part) for part in error.get("loc", ()) if part != "body")
                message = error.get("msg", "")
                lines.append(f"{where}: {message}" if where else str(message))
            else:
                lines.append(str(error))
        return "\n".join(lines)
    if isinstance(detail, dict):
        return ", ".join(f"{key}: {value}" for key, value in detail.items())
    return str(detail)


def _error_from(response: httpx.Response) -> ApiError:
    try:
        detail = response.json().get("detail", response.text)
    except ValueError:  # not JSON (a proxy's HTML page, say)
        detail = response.text.strip() or response.reason_phrase
    except AttributeError:  # JSON, but not an object
        detail = response.text
    return ApiError(f"{response.status_code} {format_detail(detail)}", response.status_code, detail)


class _ProgressReader:
    """A file wrapper that reports bytes read, so a multipart upload can drive a progress bar while streaming."""

    def __init__(self, handle: BinaryIO, on_read: Callable[[int], None] | None) -> None:
        self._handle = handle
        self._on_read = on_read

    def read(self, size: int = -1) -> bytes:
        data = self._handle.read(size)
        if self._on_read and data:
            self._on_read(len(data))
        return data

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        return self._handle.seek(offset, whence)

    def tell(self) -> int:
        return self._handle.tell()

    def fileno(self) -> int:
        return self._handle.fileno()


def items_of(payload: Any) -> list[dict[str, Any]]:
    """The rows of a list answer, whether the server sends a bare list or `{"data": [...], "count": n}`."""
    if isinstance(payload, list):
        return payload
    if isinstance(payload, dict):
        for key in ("data", "items", "results"):
            if isinstance(payload.get(key), list):
                return payload[key]
    raise ApiError(f"unexpected list answer from the server: {str(payload)[:200]}")


class Client:
    """One authenticated connection to a modelpress server."""

    def __init__(
        self,
        url: str = DEFAULT_URL,
        api_key: str | None = None,
        *,
        timeout: float = 30.0,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.url = url.rstrip("/")
        self._http = httpx.Client(
            base_url=self.url,
            headers=headers,
            timeout=httpx.Timeout(timeout, read=max(timeout, 300.0)),
            transport=transport,
            follow_redirects=True,
        )

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        """Send a request; raise `ApiError` on a 4xx/5xx answer or when the server cannot be reached."""
        try:
            response = self._http.request(method, path, **kwargs)
        except httpx.TransportError as exc:
            raise ApiError(f"cannot reach the modelpress server at {self.url}: {exc} (is it running?)") from exc
        if response.is_error:
            raise _error_from(response)
        return response

    def _json(self, method: str, path: str, **kwargs: Any) -> Any:
        return self.request(method, path, **kwargs).json()

    # uploads -------------------------------------------------------------------------------------------------

    def upload(
        self,
        kind: str,
        path: Path,
        *,
        name: str | None = None,
        filename: str | None = None,
        on_read: Callable[[int], None] | None = None,
    ) -> dict[str, Any]:
        """Stream a file to `/v1/{kind}` (models or datasets) as multipart field `file`."""
        data = {"name": name} if name else None
        with path.open("rb") as handle:
            files = {"file": (filename or path.name, _ProgressReader(handle, on_read), "application/octet-stream")}
            return self._json("POST", f"/v1/{kind}", files=files, data=data)

    # reads ---------------------------------------------------------------------------------------------------

    def list(self, kind: str, **params: Any) -> list[dict[str, Any]]:
        query = {key: value for key, value in params.items() if value is not None}
        return items_of(self._json("GET", f"/v1/{kind}", params=query))

    def get(self, path: str) -> Any:
        return self._json("GET", path)

    def health(self) -> httpx.Response:
        """`/healthz` without raising on 503, which names what is down."""
        try:
            return self._http.get("/healthz")
        except httpx.TransportError as exc:
            raise ApiError(f"cannot reach the modelpress server at {self.url}: {exc}") from exc

    # jobs ----------------------------------------------------------------------------------------------------

    def submit(self, body: dict[str, Any], idempotency_key: str | None = None) -> dict[str, Any]:
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else None
        return self._json("POST", "/v1/jobs", json=body, headers=headers)

    def submit_search(self, body: dict[str, Any], idempotency_key: str | None = None) -> dict[str, Any]:
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else None
        return self._json("POST", "/v1/searches", json=body, headers=headers)

    def search(self, search_id: str) -> dict[str, Any]:
        return self._json("GET", f"/v1/searches/{search_id}")

    def job(self, job_id: str) -> dict[str, Any]:
        return self._json("GET", f"/v1/jobs/{job_id}")

    def events(self, job_id: str, last_event_id: str | None = None) -> Iterator[tuple[str | None, dict[str, Any]]]:
        """The job's server-sent events as (id, job), until the server closes the stream; `ApiError` when refused
        or when the connection fails (the caller resumes with the last id, or polls)."""
        from modelpress.cli.watch import read_events

        headers = {"Accept": "text/event-stream", **({"Last-Event-ID": last_event_id} if last_event_id else {})}
        try:
            with self._http.stream("GET", f"/v1/jobs/{job_id}/events", headers=headers) as response:
                if response.is_error:
                    response.read()
                    raise _error_from(response)
                if not response.headers.get("content-type", "").startswith("text/event-stream"):
                    raise ApiError(f"the server answered {response.headers.get('content-type')}, not an event stream")
                yield from read_events(response.iter_lines())
        except httpx.TransportError as exc:
            raise ApiError(f"the event stream of job {job_id} broke: {exc}") from exc

    def cancel(self, job_id: str) -> dict[str, Any]:
        return self._json("POST", f"/v1/jobs/{job_id}/cancel")

    def report(self, job_id: str) -> dict[str, Any]:
        return self._json("GET", f"/v1/jobs/{job_id}/report")

    def artifacts(self, job_id: str) -> list[dict[str, Any]]:
        return items_of(self._json("GET", f"/v1/jobs/{job_id}/artifacts"))

    def download(
        self, artifact: dict[str, Any], target: Path, *, on_bytes: Callable[[int], None] | None = None
    ) -> Path:
        """Stream one artifact to `target`, resuming a `.part` left by an interrupted run, and check its sha256.

        The file appears under its final name only once its checksum matches what the server listed.
        """
        url = artifact.get("download_url") or f"/v1/artifacts/{artifact['id']}"
        partial = target.with_name(target.name + ".part")
        digest = hashlib.sha256()
        offset = 0
        if partial.exists():
            with partial.open("rb") as handle:
                for block in iter(lambda: handle.read(CHUNK), b""):
                    digest.update(block)
            offset = partial.stat().st_size
            if on_bytes:
                on_bytes(offset)
        headers = {"Range": f"bytes={offset}-"} if offset else None
        try:
            with self._http.stream("GET", url, headers=headers) as response:
                if response.status_code == 416:  # the part is already whole (or longer than the file)
                    response.read()
                elif response.is_error:
                    response.read()
                    raise _error_from(response)
                else:
                    mode = "ab" if offset and response.status_code == 206 else "wb"
                    if mode == "wb":
                        digest = hashlib.sha256()
                    with partial.open(mode) as out:
                        for block in response.iter_bytes(CHUNK):
                            out.write(block)
                            digest.update(block)
                            if on_bytes:
                                on_bytes(len(block))
        except httpx.TransportError as exc:
            raise ApiError(f"download of {artifact.get('name')} interrupted: {exc}; run again to resume") from exc
        expected = artifact.get("sha256")
        if expected and digest.hexdigest() != expected:
            partial.unlink(missing_ok=True)
            raise ApiError(
                f"checksum mismatch for {artifact.get('name')}: expected {expected}, got {digest.hexdigest()}; "
                "the partial file was removed, run the download again"
            )
        partial.replace(target)
        return target
