"""Log lines as plain text (the default) or JSON lines (`MODELPRESS_LOG_FORMAT=json`), for the API and the worker.

Every line carries the job id while a worker runs a job and the request id while the API serves a request,
taken from context variables: a log aggregator can then follow one job or one request across modules without
each message having to repeat it. The worker's task sets the job id for the job's whole run (and its heartbeat
thread sets its own); the API's request middleware sets the request id.
"""

from __future__ import annotations

import contextvars
import json
import logging
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime

job_id_var: contextvars.ContextVar[str | None] = contextvars.ContextVar("modelpress_job_id", default=None)
request_id_var: contextvars.ContextVar[str | None] = contextvars.ContextVar("modelpress_request_id", default=None)

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
UVICORN_LOGGERS = ("uvicorn", "uvicorn.error", "uvicorn.access")


@contextmanager
def job_context(job_id: str) -> Iterator[None]:
    """Every line logged in this context (this thread or task) carries `job_id`."""
    token = job_id_var.set(job_id)
    try:
        yield
    finally:
        job_id_var.reset(token)


class ContextFilter(logging.Filter):
    """Copies the job id and request id of the current context onto each record (None outside one)."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.job_id = job_id_var.get()
        record.request_id = request_id_var.get()
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per line; `job_id` and `request_id` appear only when set, so each line stays short."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            "process": record.process,
        }
        for field in ("job_id", "request_id"):
            value = getattr(record, field, None)
            if value is not None:
                entry[field] = value
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        if record.stack_info:
            entry["stack"] = self.formatStack(record.stack_info)
        return json.dumps(entry, default=str)


class _OurHandler(logging.StreamHandler):
    """The handler `configure_logging` installs, told apart so a second call replaces it instead of adding one."""


def configure_logging(log_format: str, level: int | str = logging.INFO) -> None:
    """Send the root logger's lines to stderr as `log_format` ("text" or "json"), with the context filter.

    In JSON mode uvicorn's own loggers lose their handlers and go through the root, so every line is JSON.
    """
    handler = _OurHandler(sys.stderr)
    handler.addFilter(ContextFilter())
    handler.setFormatter(JsonFormatter() if log_format == "json" else logging.Formatter(TEXT_FORMAT))
    root = logging.getLogger()
    for old in [h for h in root.handlers if isinstance(h, _OurHandler)]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
    if log_format == "json":
        for name in UVICORN_LOGGERS:
            logger = logging.getLogger(name)
            logger.handlers.clear()
            logger.propagate = True
