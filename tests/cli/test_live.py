"""The client commands against the real API (uvicorn, PostgreSQL, Redis) and a real worker: the user's path."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import REPO, LiveProcess
from tests.utils.factories import build_tiny_model, write_text_dataset
from tests.utils.stack import Stack, running_stack

pytestmark = pytest.mark.skipif(not (REPO / "app" / "main.py").exists(), reason="needs the API (app/main.py)")


@pytest.fixture(scope="module")
def cli_stack(migrated: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    with running_stack(migrated, tmp_path_factory.mktemp("cli-stack")) as stack:
        yield stack


@pytest.fixture(scope="module")
def cli_worker(cli_stack: Stack) -> LiveProcess:
    return cli_stack.workers[0]


@pytest.fixture
def cli(cli_stack: Stack):
    """Run `modelpress ...` in a subprocess, as a user would, pointed at the live API by environment."""

    def run(*args: str, key: str | None = cli_stack.key, cwd: Path = REPO) -> subprocess.CompletedProcess[str]:
        env = {**os.environ, **cli_stack.env, "MODELPRESS_URL": cli_stack.api.url, "COLUMNS": "200"}
        env.pop("MODELPRESS_API_KEY", None)
        if key is not None:
            env["MODELPRESS_API_KEY"] = key
        code = "from modelpress.cli.main import app; app()"
        return subprocess.run(
            [sys.executable, "-c", code, *args], env=env, cwd=cwd, capture_output=True, text=True, timeout=180
        )

    return run


def last_id(output: str) -> str:
    return output.strip().splitlines()[-1].split()[-1]


def test_upload_submit_watch_report_download(cli, cli_stack: Stack, cli_worker: LiveProcess, tmp_path: Path) -> None:
    folder = build_tiny_model(tmp_path / "tiny-model")
    uploaded = cli("upload", "model", str(folder))
    assert uploaded.returncode == 0, uploaded.stderr
    model_id = last_id(uploaded.stdout)
    dataset = cli("upload", "dataset", str(write_text_dataset(tmp_path / "text.txt")))
    assert dataset.returncode == 0, dataset.stderr
    dataset_id = last_id(dataset.stdout)

    listed = cli("models", "list")
    assert listed.returncode == 0 and model_id in listed.stdout and "tiny-model" in listed.stdout

    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        "- {type: prune, method: magnitude, sparsity: 0.5}\n- {type: quantize, method: rtn, weights: {bits: 8}}\n"
    )
    submitted = cli(
        "submit",
        "--model",
        model_id,
        "--recipe",
        str(recipe),
        "--evaluation",
        dataset_id,
        "--eval-seq-len",
        "32",
        "--max-windows",
        "4",
        "--idempotency-key",
        "cli-live-1",
        "--watch",
    )
    assert submitted.returncode == 0, submitted.stdout + submitted.stderr + cli_worker.output()[-3000:]
    job_id = submitted.stdout.split()[1]
    # --watch followed the event stream, one bar per stage, and never fell back to polling
    assert f"GET /v1/jobs/{job_id}/events" in cli_stack.api.output()
    assert f"GET /v1/jobs/{job_id} " not in cli_stack.api.output()
    assert "polling instead" not in submitted.stderr
    assert "prune:magnitude" in submitted.stderr and "quantize:rtn" in submitted.stderr, submitted.stderr
    again = cli("submit", "--model", model_id, "--recipe", str(recipe), "--idempotency-key", "cli-live-1")
    assert again.returncode == 1 and "422" in again.stderr  # same key, another body

    report = cli("report", job_id)
    assert report.returncode == 0, report.stderr
    assert "baseline vs optimized" in report.stdout and "perplexity" in report.stdout
    raw = json.loads(cli("report", job_id, "--json").stdout)
    assert raw["baseline"] and raw["optimized"]

    out = tmp_path / "out"
    downloaded = cli("download", job_id, "--out", str(out), "--extract")
    assert downloaded.returncode == 0, downloaded.stderr
    assert "sha256 ok" in downloaded.stdout
    assert list(out.rglob("config.json")), sorted(p.name for p in out.rglob("*"))

    jobs = cli("jobs", "list", "--status", "succeeded")
    assert jobs.returncode == 0 and job_id in jobs.stdout


def test_errors_are_the_servers_detail(cli, tmp_path: Path) -> None:
    wrong = cli("models", "list", key="mp_wrong")
    assert wrong.returncode == 1 and "Traceback" not in wrong.stderr
    assert wrong.stderr.strip()

    not_archive = tmp_path / "notes.tar"
    not_archive.write_text("not an archive")
    refused = cli("upload", "model", str(not_archive))
    assert refused.returncode == 1 and "Traceback" not in refused.stderr

    missing = cli("watch", "00000000-0000-0000-0000-000000000000")
    assert missing.returncode == 1 and "404" in missing.stderr
