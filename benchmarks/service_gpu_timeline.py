"""A job's timeline from its server-sent events, and the markdown tables of the service benchmark.

Each event of `GET /v1/jobs/{id}/events` is the job resource with its `progress` (stage index, stage name,
fraction, message). Its time is the one its id carries (a Redis stream id is the publication's milliseconds since
the epoch), else (the first event of a stream, polling) the time it arrived; client and server share the machine.
The worker writes progress at most every `MODELPRESS_PROGRESS_INTERVAL_S` (0.2 s in the benchmark) and always
at a stage's end, so a stage's start is known to that resolution. A stage lasts from its first event to the next
stage's first event (the last one: to `finished_at`); within a stage, a phase is a run of events whose message
reads the same once its numbers are masked ("layer 3/32" and "layer 4/32" are one phase).
"""

from __future__ import annotations

import re
import threading
import time
from datetime import UTC, datetime
from typing import Any

from modelpress.cli.client import ApiError, Client
from modelpress.cli.watch import FINAL
from modelpress.events import EVENT_ID, parse_id

STREAM_RESUMES = 20


def epoch(stamp: str | None) -> float | None:
    """Seconds since the epoch of the API's ISO time (naive ones are UTC, as SQLite returns them)."""
    if not stamp:
        return None
    moment = datetime.fromisoformat(stamp.replace("Z", "+00:00"))
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.timestamp()


class JobFollower(threading.Thread):
    """Follows one job's event stream to its final status (resuming after drops, polling if the stream fails),
    keeping every event with its arrival time, and printing a line at each new stage."""

    def __init__(self, url: str, key: str, job_id: str, label: str, say) -> None:
        super().__init__(name=f"follow-{job_id}", daemon=True)
        self.url, self.key, self.job_id, self.label, self.say = url, key, job_id, label, say
        self.events: list[dict[str, Any]] = []
        self.job: dict[str, Any] | None = None
        self.error: str | None = None

    def run(self) -> None:
        try:
            with Client(self.url, self.key) as client:
                if not self._stream(client):
                    self._poll(client)
        except Exception as exc:  # the main thread reports it; the job itself goes on
            self.error = f"{type(exc).__name__}: {exc}"

    def _stream(self, client: Client) -> bool:
        last_id = None
        for _ in range(STREAM_RESUMES):
            try:
                for event_id, job in client.events(self.job_id, last_event_id=last_id):
                    self.record(job, event_id if event_id != last_id else None)
                    last_id = event_id or last_id
                    if job.get("status") in FINAL:
                        return True
            except ApiError as exc:
                self.say(f"{self.label}: event stream failed ({exc}); polling")
                return False
            time.sleep(0.2)
        return False

    def _poll(self, client: Client) -> None:
        while True:
            job = client.job(self.job_id)
            self.record(job)
            if job.get("status") in FINAL:
                return
            time.sleep(0.2)

    def record(self, job: dict[str, Any], event_id: str | None = None) -> None:
        progress = job.get("progress") or {}
        published = parse_id(event_id)[0] / 1000 if event_id and EVENT_ID.match(event_id) else 0.0
        event = {
            "t": published if published > 0 else time.time(),
            "status": job.get("status"),
            "index": progress.get("step_index"),
            "stage": progress.get("step"),
            "fraction": progress.get("fraction"),
            "message": progress.get("message") or "",
        }
        previous = self.events[-1] if self.events else None
        if previous is None or (previous["status"], previous["stage"]) != (event["status"], event["stage"]):
            where = f" {event['index']}/{progress.get('total_steps')} {event['stage']}" if event["stage"] else ""
            self.say(f"{self.label}: {event['status']}{where} {event['message']}".rstrip())
        self.events.append(event)
        self.job = job


def _kind(message: str) -> str:
    return re.sub(r"\d+(\.\d+)?", "#", message)


def timeline(job: dict[str, Any], events: list[dict[str, Any]]) -> dict[str, Any]:
    """Queue, run and total seconds, and each stage's start, end and phases, in seconds after `created_at`."""
    created, started, finished = (epoch(job.get(k)) for k in ("created_at", "started_at", "finished_at"))
    running = [e for e in events if e["status"] == "running" and e["stage"]]
    starts: list[tuple[int, str, float]] = []
    for event in running:
        if not starts or starts[-1][:2] != (event["index"], event["stage"]):
            starts.append((event["index"], event["stage"], event["t"]))
    stages = []
    for i, (index, stage, start) in enumerate(starts):
        end = starts[i + 1][2] if i + 1 < len(starts) else (finished or running[-1]["t"])
        inside = [e for e in running if (e["index"], e["stage"]) == (index, stage) and start <= e["t"] <= end]
        phases: list[dict[str, Any]] = []
        for event in inside:
            if not phases or phases[-1]["kind"] != _kind(event["message"]):
                phases.append({"kind": _kind(event["message"]), "message": event["message"], "start": event["t"]})
        for j, phase in enumerate(phases):
            phase["seconds"] = (phases[j + 1]["start"] if j + 1 < len(phases) else end) - phase["start"]
            phase["start_s"] = phase.pop("start") - created
            del phase["kind"]
        stages.append(
            {"index": index, "stage": stage, "start_s": start - created, "seconds": end - start, "phases": phases}
        )
    first_stage = starts[0][2] if starts else None
    return {
        "created_at": job.get("created_at"),
        "queue_s": None if started is None else started - created,
        "claim_to_first_stage_s": None if started is None or first_stage is None else first_stage - started,
        "run_s": None if finished is None or started is None else finished - started,
        "total_s": None if finished is None else finished - created,
        "stages": stages,
    }


def phase_lines(timeline: dict[str, Any]) -> list[str]:
    """One line per stage: its seconds, then each phase's message and seconds (where the stage's time went)."""
    lines = []
    for stage in timeline["stages"]:
        phases = ", ".join(f"{p['message'] or '-'} {p['seconds']:.1f} s" for p in stage["phases"])
        lines.append(f"  {stage['stage']}: {stage['seconds']:.1f} s ({phases})")
    return lines


def event_rows(events: list[dict[str, Any]], created: float | None) -> list[list[Any]]:
    """The events, compact: [seconds after created_at, status, stage index, fraction, message]."""
    base = created or (events[0]["t"] if events else 0.0)
    return [[round(e["t"] - base, 3), e["status"], e["index"], e["fraction"], e["message"]] for e in events]


# --- tables -----------------------------------------------------------------------------------------------------


def _s(value: float | None) -> str:
    return "" if value is None else f"{value:.1f}"


def _gb_from_mib(value: float | None) -> str:
    return "" if value is None else f"{value * 2**20 / 1e9:.1f}"


def _gb(value: float | None) -> str:
    return "" if value is None else f"{value / 1e9:.2f}"


def _f(value: float | None, digits: int) -> str:
    return "" if value is None else f"{value:.{digits}f}"


def prepare_table(result: dict[str, Any]) -> str:
    prepare = result.get("prepare") or {}
    checkpoint, upload = prepare.get("checkpoint") or {}, prepare.get("upload") or {}
    return "\n".join(
        [
            "| archive GB | shards | build s | model upload s (CLI) | MB/s end to end | datasets upload s |",
            "|---|---|---|---|---|---|",
            f"| {_gb(checkpoint.get('archive_bytes'))} | {checkpoint.get('shards', '')} | "
            f"{_s(checkpoint.get('build_s'))} | {_s(upload.get('model_s'))} | {_f(upload.get('model_mb_per_s'), 0)} | "
            f"{_s(upload.get('datasets_s'))} |",
        ]
    )


def timeline_table(result: dict[str, Any]) -> str:
    jobs = result.get("jobs", {})
    lines = ["| seconds | " + " | ".join(jobs) + " |", "|---|" + "---|" * len(jobs)]

    def row(label: str, cells: list[str]) -> None:
        lines.append(f"| {label} | " + " | ".join(cells) + " |")

    row("queued (created → claimed)", [_s(j.get("timeline", {}).get("queue_s")) for j in jobs.values()])
    row("claimed → first progress", [_s(j.get("timeline", {}).get("claim_to_first_stage_s")) for j in jobs.values()])
    order = {s["stage"]: s["index"] for j in jobs.values() for s in j.get("timeline", {}).get("stages", [])}
    for stage in sorted(order, key=lambda name: (order[name], name)):  # each job's recipe step stands third
        cells = []
        for job in jobs.values():
            found = [s for s in job.get("timeline", {}).get("stages", []) if s["stage"] == stage]
            cells.append(_s(found[0]["seconds"]) if found else "")
        row(stage, cells)
    row("**job total, upload excluded**", [_s(j.get("timeline", {}).get("total_s")) for j in jobs.values()])
    for part, key, label in (
        ("artifact", "download_s", "download the artifacts (CLI, with unpacking)"),
        ("reload", "load_s", "reload with transformers"),
        ("reload", "forward_s", "one forward pass"),
    ):
        row(label, [_s((j.get(part) or {}).get(key)) for j in jobs.values()])
    return "\n".join(lines)


def memory_table(result: dict[str, Any]) -> str:
    lines = [
        "| job | GPU used, peak GB (nvidia-smi) | baseline eval peak GB (report) | optimized eval peak GB (report) "
        "| job process peak RSS GB | service RSS peak GB | free disk min GB |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, job in result.get("jobs", {}).items():
        peaks = job.get("peaks", {})
        report = job.get("report") or {}
        base = ((report.get("baseline") or {}).get("peak_memory") or {}).get("bytes")
        opt = ((report.get("optimized") or {}).get("peak_memory") or {}).get("bytes")
        lines.append(
            f"| {name} | {_gb_from_mib(peaks.get('gpu_used_mib'))} | {_gb(base)} | {_gb(opt)} | "
            f"{_gb_from_mib(peaks.get('worker_peak_rss_mib'))} | {_gb_from_mib(peaks.get('service_rss_mib'))} | "
            f"{_f(peaks.get('disk_free_min_gb'), 1)} |"
        )
    return "\n".join(lines)


def _decode(entry: dict[str, Any] | None) -> str:
    decode = (entry or {}).get("decode") or []
    first = decode[0] if decode else {}
    return "" if first.get("tokens_per_s") is None else f"{first['tokens_per_s']:.1f}"


def _prefill(entry: dict[str, Any] | None) -> str:
    prefill = (entry or {}).get("prefill") or {}
    return "" if prefill.get("tokens_per_s") is None else f"{prefill['tokens_per_s']:.0f}"


def speed_table(result: dict[str, Any]) -> str:
    lines = [
        "| job | baseline decode tok/s | optimized decode tok/s | baseline prefill tok/s | optimized prefill tok/s "
        "| optimized floor tok/s | perplexity baseline → optimized |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, job in result.get("jobs", {}).items():
        report = job.get("report") or {}
        speed = report.get("speed") or {}
        floor = (speed.get("optimized") or {}).get("floor_tokens_per_s")
        before = (report.get("baseline") or {}).get("perplexity")
        after = (report.get("optimized") or {}).get("perplexity")
        perplexity = "" if before is None or after is None else f"{before:.1f} → {after:.1f}"
        lines.append(
            f"| {name} | {_decode(speed.get('baseline'))} | {_decode(speed.get('optimized'))} | "
            f"{_prefill(speed.get('baseline'))} | {_prefill(speed.get('optimized'))} | "
            f"{_f(floor, 0)} | {perplexity} |"
        )
    return "\n".join(lines)


def tables(result: dict[str, Any]) -> str:
    return "\n\n".join([prepare_table(result), timeline_table(result), memory_table(result), speed_table(result)])
