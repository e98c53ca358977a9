"""Load: small jobs (a tiny model, one magnitude-prune step, no evaluation) across 3 real worker processes on S3
storage, each worker with a data folder of its own.

It checks that every job ran exactly once (one attempt, two artifact rows, one object per artifact) and that none
is stuck, and prints jobs per minute and the p50/p99 queue wait (submission to start), over the jobs that finished,
before its checks. Jobs are submitted once the 3 workers have registered. Workers preload the engine
(`MODELPRESS_PRELOAD_ENGINE`), so a job's fresh child does not import torch again.

Two sizes: 24 jobs in the default run (about a minute on a 2-core machine), and 500 jobs marked `load`, left out of
the default run (`pytest -m load tests/load -s` runs it; benchmarks/fleet_load.md has its figures).
`MODELPRESS_LOAD_FIGURES=<file>` also writes the figures there as JSON.
"""

from __future__ import annotations

import json
import os
import statistics
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text

from tests.utils.factories import build_tiny_model, tar_folder
from tests.utils.stack import FINAL, Stack, open_stack, wait_for

JOBS = int(os.environ.get("MODELPRESS_LOAD_JOBS", "500"))
DEADLINE_S = float(os.environ.get("MODELPRESS_LOAD_DEADLINE_S", "900"))
SMALL_JOBS, SMALL_DEADLINE_S = 24, 150.0
WORKERS = 3
RECIPE = [{"type": "prune", "method": "magnitude", "sparsity": 0.5}]


def percentile(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1] if len(values) > 1 else values[0]


def submit_all(stack: Stack, model_id: str, count: int) -> list[str]:
    def submit(_: int) -> str:
        response = client.http.post("/v1/jobs", json={"model_id": model_id, "recipe": RECIPE})
        assert response.status_code == 202, response.text
        return response.json()["id"]

    client = stack.client()
    with ThreadPoolExecutor(8) as pool:
        return list(pool.map(submit, range(count)))


def rows(database_url: str) -> tuple[list[dict], Counter]:
    engine = create_engine(database_url)
    try:
        with engine.connect() as conn:
            jobs = [dict(r._mapping) for r in conn.execute(text("SELECT * FROM jobs"))]
            artifacts = Counter(r.job_id for r in conn.execute(text("SELECT job_id FROM artifacts")))
    finally:
        engine.dispose()
    return jobs, artifacts


def registered(database_url: str) -> int:
    engine = create_engine(database_url)
    try:
        with engine.connect() as conn:
            return conn.execute(text("SELECT count(*) FROM workers")).scalar_one()
    finally:
        engine.dispose()


@pytest.mark.parametrize(
    ("jobs", "deadline_s"),
    [pytest.param(SMALL_JOBS, SMALL_DEADLINE_S, id="small"), pytest.param(JOBS, DEADLINE_S, marks=pytest.mark.load)],
)
def test_small_jobs_run_exactly_once_across_3_workers(
    jobs: int, deadline_s: float, migrated: dict[str, str], s3_server, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    prefix = f"load-{os.getpid()}-{int(time.time())}"
    env = {
        **s3_server.env(prefix),
        "MODELPRESS_PRELOAD_ENGINE": "true",
        "MODELPRESS_FORK_AT_ONCE": "true",
        "MODELPRESS_PROGRESS_INTERVAL_S": "5",
        "MODELPRESS_RATE_LIMIT_PER_MINUTE": "0",
    }
    archive = tar_folder(build_tiny_model(tmp_path / "model", hidden=32, layers=1), tmp_path / "model.tar")
    with open_stack(migrated, tmp_path, **env) as stack:
        stack.start_api()
        model = stack.client().upload("/v1/models", archive)
        assert model.status_code == 201, model.text
        workers = [stack.start_worker(f"load{i}", DATA_DIR=str(tmp_path / f"machine-{i}")) for i in range(WORKERS)]
        database_url = stack.env["DATABASE_URL"]
        wait_for(lambda: registered(database_url) == WORKERS, 180, "the workers to register")

        load_before = os.getloadavg()
        began = time.monotonic()
        job_ids = submit_all(stack, model.json()["id"], jobs)
        submitted_s = time.monotonic() - began
        while time.monotonic() - began < deadline_s:
            found, _ = rows(database_url)
            if all(j["status"] in FINAL for j in found):
                break
            assert all(w.process.poll() is None for w in workers), "a worker died"
            time.sleep(2)
        found, artifacts = rows(database_url)
        keys = [o["Key"] for page in s3_server.client().get_paginator("list_objects_v2").paginate(
            Bucket=s3_server.bucket, Prefix=f"{prefix}/artifacts/") for o in page.get("Contents", [])]  # fmt: skip

        load_after = os.getloadavg()

    done = [j for j in found if j["status"] in FINAL]
    print_figures(done, len(job_ids), submitted_s, (load_before, load_after), capsys)
    assert sorted(j["id"] for j in found) == sorted(job_ids)
    stuck = [j["id"] for j in found if j["status"] not in FINAL]
    assert not stuck, f"{len(stuck)} of {len(job_ids)} jobs not finished after {deadline_s:.0f}s"
    failed = [(j["id"], j["error"]) for j in found if j["status"] != "succeeded"]
    assert not failed, failed[:3]
    assert all(j["attempts"] == 1 and len(j["attempt_history"]) == 1 for j in found), "a job ran more than once"
    assert all(artifacts[j] == 2 for j in job_ids), "each job stores its model and its report exactly once"
    assert Counter(k.split("/")[2] for k in keys) == Counter(dict.fromkeys(job_ids, 2))
    assert len({j["worker"] for j in found}) == WORKERS, "every worker took jobs"


def print_figures(
    done: list[dict],
    submitted: int,
    submitted_s: float,
    load: tuple[tuple[float, ...], tuple[float, ...]],
    capsys: pytest.CaptureFixture,
) -> None:
    """The figures over the jobs that finished (all of them, when the test passes), printed before the checks, and
    written as JSON to `MODELPRESS_LOAD_FIGURES` when set."""
    if not done:
        return
    waits = [(j["started_at"] - j["created_at"]).total_seconds() for j in done if j["started_at"]]
    runs = [(j["finished_at"] - j["started_at"]).total_seconds() for j in done if j["started_at"]]
    span_s = (max(j["finished_at"] for j in done) - min(j["created_at"] for j in done)).total_seconds()
    figures = {
        "jobs_submitted": submitted,
        "jobs_finished": len(done),
        "workers": WORKERS,
        "submitted_in_s": round(submitted_s, 1),
        "first_submission_to_last_finish_s": round(span_s, 1),
        "jobs_per_minute": round(len(done) / span_s * 60, 1),
        "queue_wait_p50_s": round(percentile(waits, 50), 1),
        "queue_wait_p99_s": round(percentile(waits, 99), 1),
        "run_p50_s": round(percentile(runs, 50), 2),
        "run_p99_s": round(percentile(runs, 99), 2),
        "jobs_per_worker": dict(sorted(Counter(j["worker"].split("@")[0] for j in done).items())),
        "cpus": os.cpu_count(),
        "load_average_1_5_15_before": [round(x, 2) for x in load[0]],
        "load_average_1_5_15_after": [round(x, 2) for x in load[1]],
        "date": datetime.now(UTC).date().isoformat(),
    }
    with capsys.disabled():
        print("\n| figure | value |\n| --- | --- |")
        for name, value in figures.items():
            print(f"| {name} | {value} |")
        print(json.dumps(figures))
    if target := os.environ.get("MODELPRESS_LOAD_FIGURES"):
        Path(target).write_text(json.dumps(figures, indent=2) + "\n")
