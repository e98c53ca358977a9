"""`--watch` and `modelpress watch`: follow a job over its event stream, one progress bar per stage.

The stream (`GET /v1/jobs/{id}/events`) is resumed with `Last-Event-ID` when the connection drops; when it
cannot be had (an older server, a proxy that buffers, repeated drops) the job is polled instead.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, Progress, SpinnerColumn, TaskID, TaskProgressColumn, TextColumn, TimeElapsedColumn
from rich.text import Text

from modelpress.cli import render
from modelpress.cli.client import ApiError, Client

FINAL = frozenset({"succeeded", "failed", "cancelled"})
STREAM_RETRIES = 3


class StreamUnavailable(Exception):
    """The event stream failed; the caller polls instead."""


def read_events(lines: Iterator[str]) -> Iterator[tuple[str | None, dict[str, Any]]]:
    """(id, job) for each `job` event of a server-sent event stream; comments (heartbeats) are skipped."""
    event_id: str | None = None
    data: list[str] = []
    for line in lines:
        if line == "":
            if data:
                yield event_id, json.loads("\n".join(data))
            data = []
        elif line.startswith("data:"):
            data.append(line[5:].lstrip(" "))
        elif line.startswith("id:"):
            event_id = line[3:].strip()


class StageBars:
    """One rich progress bar per stage of the job (load, evaluate, each recipe step, export, evaluate)."""

    def __init__(self, progress: Progress) -> None:
        self.progress = progress
        self.status = progress.add_task("queued", total=1.0)
        self.stages: dict[int, TaskID] = {}

    def show(self, job: dict[str, Any]) -> None:
        status = str(job.get("status"))
        info = job.get("progress") or {}
        index = int(info.get("step_index") or 0)
        self.progress.update(self.status, description=f"{status} {render.progress_text(job)}".strip())
        if status == "running" and index and info.get("step"):
            for earlier, task in self.stages.items():
                if earlier < index:
                    self.progress.update(task, completed=1.0)
            if index not in self.stages:
                total = info.get("total_steps") or "?"
                self.stages[index] = self.progress.add_task(f"  {index}/{total} {info['step']}", total=1.0)
            message = info.get("message") or ""
            self.progress.update(self.stages[index], completed=float(info.get("fraction") or 0.0))
            self.progress.update(
                self.stages[index], description=f"  {index}/{info.get('total_steps')} {info['step']} {message}".rstrip()
            )
        if status in FINAL:
            self.progress.update(self.status, completed=1.0 if status == "succeeded" else 0.0)
            if status == "succeeded":
                for task in self.stages.values():
                    self.progress.update(task, completed=1.0)


def stream(client: Client, job_id: str, bars: StageBars) -> dict[str, Any]:
    """Follow the job's event stream to its final status, resuming after drops; StreamUnavailable when it fails."""
    last_id: str | None = None
    job: dict[str, Any] | None = None
    for _attempt in range(STREAM_RETRIES):
        try:
            for event_id, job in client.events(job_id, last_event_id=last_id):
                last_id = event_id or last_id
                bars.show(job)
                if job.get("status") in FINAL:
                    return job
        except ApiError as exc:
            raise StreamUnavailable(str(exc)) from exc
        time.sleep(0.5)  # the stream ended before the job did: resume after the last event
    raise StreamUnavailable(f"the event stream of job {job_id} kept closing early")


def poll(client: Client, job_id: str, bars: StageBars, interval: float) -> dict[str, Any]:
    """Poll the job until it ends, riding out a few transport failures (a restarting server)."""
    transport_failures = 0
    while True:
        try:
            job = client.job(job_id)
            transport_failures = 0
        except ApiError as exc:
            if exc.status_code is not None or transport_failures >= 5:
                raise
            transport_failures += 1
            time.sleep(interval * 2**transport_failures)
            continue
        bars.show(job)
        if job.get("status") in FINAL:
            return job
        time.sleep(interval)


def follow(client: Client, job_id: str, out: Console, err: Console, interval: float = 1.0) -> int:
    """Follow a job until it ends (the stream, else polling); the exit status is 0 only if it succeeded.

    Ctrl-C stops watching only: the job goes on on the server (exit status 130).
    """
    columns = (
        SpinnerColumn(),
        TextColumn("{task.description}"),
        BarColumn(),
        TaskProgressColumn(),
        TimeElapsedColumn(),
    )
    try:
        with Progress(*columns, console=err) as progress:
            bars = StageBars(progress)
            try:
                job = stream(client, job_id, bars)
            except StreamUnavailable as exc:
                progress.console.print(f"event stream unavailable ({exc}); polling instead", highlight=False)
                job = poll(client, job_id, bars, interval)
    except KeyboardInterrupt:
        err.print(f"stopped watching; job {job_id} goes on on the server (modelpress watch {job_id})", highlight=False)
        return 130
    return outcome(job, out, err)


def outcome(job: dict[str, Any], out: Console, err: Console) -> int:
    job_id, status = job.get("id"), job.get("status")
    if status == "succeeded":
        out.print(
            f"job {job_id} succeeded: `modelpress report {job_id}`, `modelpress download {job_id}`",
            style="green",
            highlight=False,
            markup=False,
        )
        return 0
    if status == "failed":
        error = job.get("error") or {}
        code = error.get("code", "error")
        err.print(Text(f"job {job_id} failed [{code}]: {error.get('message', 'no message')}", style="bold red"))
        return 1
    err.print(Text(f"job {job_id} was cancelled", style="magenta"))
    return 1
