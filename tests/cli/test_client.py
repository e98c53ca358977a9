"""The client commands against an in-memory fake of the API (httpx.MockTransport): fast, no server needed."""

from __future__ import annotations

import functools
import hashlib
import io
import json
import tarfile
from pathlib import Path

import pytest
from typer.testing import CliRunner

from modelpress.cli import main as cli
from modelpress.cli import watch as watching
from modelpress.cli.client import Client
from tests.cli.fake_api import KEY, FakeApi
from tests.utils.factories import tar_of

runner = CliRunner()


@pytest.fixture
def fake(monkeypatch: pytest.MonkeyPatch) -> FakeApi:
    api = FakeApi()
    monkeypatch.setattr(cli, "Client", functools.partial(Client, transport=api.transport()))
    monkeypatch.setattr(watching.time, "sleep", lambda _s: None)
    monkeypatch.setenv("MODELPRESS_API_KEY", KEY)
    monkeypatch.setenv("MODELPRESS_URL", "http://fake")
    return api


def invoke(*args: str):
    return runner.invoke(cli.app, list(args))


def test_upload_folder_is_packed_as_a_tar_with_files_at_the_root(fake: FakeApi, tmp_path: Path) -> None:
    folder = tmp_path / "tiny-llama"
    (folder / "sub").mkdir(parents=True)
    (folder / "config.json").write_text('{"model_type": "llama"}')
    (folder / "model.safetensors").write_bytes(b"\0" * 1000)
    (folder / "sub" / "extra.txt").write_text("x")

    result = invoke("upload", "model", str(folder))

    assert result.exit_code == 0, result.output
    row = fake.uploads[0]
    assert row["name"] == "tiny-llama" and row["filename"] == "tiny-llama.tar"
    with tarfile.open(fileobj=io.BytesIO(row["data"])) as tar:
        assert sorted(tar.getnames()) == ["config.json", "model.safetensors", "sub/extra.txt"]
    assert "m1" in result.output


def test_upload_folder_without_config_is_refused_before_sending(fake: FakeApi, tmp_path: Path) -> None:
    (tmp_path / "weights.safetensors").write_bytes(b"x")
    result = invoke("upload", "model", str(tmp_path))
    assert result.exit_code == 1
    assert "no config.json" in result.output
    assert not fake.requests


def test_upload_file_streams_its_bytes_and_name(fake: FakeApi, tmp_path: Path) -> None:
    text = tmp_path / "wiki.txt"
    text.write_text("hello world\n" * 100)
    result = invoke("upload", "dataset", str(text), "--name", "wiki")
    assert result.exit_code == 0, result.output
    assert fake.uploads[0]["name"] == "wiki"
    assert fake.uploads[0]["sha256"] == hashlib.sha256(text.read_bytes()).hexdigest()


def test_wrong_key_prints_the_servers_detail_without_a_traceback(fake: FakeApi) -> None:
    result = invoke("models", "list", "--api-key", "wrong")
    assert result.exit_code == 1
    assert "missing or unknown API key" in result.output
    assert "Traceback" not in result.output


def test_models_list_reads_the_data_envelope(fake: FakeApi, tmp_path: Path) -> None:
    (tmp_path / "m.gguf").write_bytes(b"GGUF")
    assert invoke("upload", "model", str(tmp_path / "m.gguf")).exit_code == 0
    result = invoke("models", "list")
    assert result.exit_code == 0, result.output
    assert "m.gguf" in result.output


@pytest.mark.parametrize("kind,noun,filename", [("models", "model", "m.gguf"), ("datasets", "dataset", "wiki.txt")])
def test_list_and_delete_commands_of_each_resource(fake: FakeApi, tmp_path: Path, kind, noun, filename) -> None:
    (tmp_path / filename).write_bytes(b"GGUF" if kind == "models" else b"hello\n")
    assert invoke("upload", noun, str(tmp_path / filename)).exit_code == 0
    row_id = fake.uploads[0]["id"]
    listed = invoke(kind, "list")
    assert listed.exit_code == 0 and filename in listed.output and kind in listed.output  # the table's title
    deleted = invoke(kind, "delete", row_id)
    assert deleted.exit_code == 0, deleted.output
    assert f"deleted {noun} {row_id}" in deleted.output
    assert (fake.requests[-1].method, fake.requests[-1].url.path) == ("DELETE", f"/v1/{kind}/{row_id}")
    assert filename not in invoke(kind, "list").output
    missing = invoke(kind, "delete", row_id)
    assert missing.exit_code == 1 and f"{noun} {row_id} not found" in missing.output


def test_submit_sends_recipe_options_and_idempotency_key(fake: FakeApi, tmp_path: Path) -> None:
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("- type: prune\n  method: magnitude\n  sparsity: 0.5\n")
    result = invoke(
        "submit",
        "--model",
        "m1",
        "--recipe",
        str(recipe),
        "--evaluation",
        "d1",
        "--eval-seq-len",
        "64",
        "--idempotency-key",
        "k1",
    )
    assert result.exit_code == 0, result.output
    body, key = fake.job_bodies[0]
    assert body == {
        "model_id": "m1",
        "recipe": [{"type": "prune", "method": "magnitude", "sparsity": 0.5}],
        "evaluation": {"dataset_id": "d1", "seq_len": 64},
    }
    assert key == "k1"
    assert "job1" in result.output


def test_submit_422_lists_what_to_fix(fake: FakeApi, tmp_path: Path) -> None:
    recipe = tmp_path / "recipe.json"
    recipe.write_text(json.dumps({"model_id": "m1", "recipe": [{"type": "prune", "method": "nope"}]}))
    result = invoke("submit", "--recipe", str(recipe))
    assert result.exit_code == 1
    assert "recipe.0: unknown recipe step" in result.output


def test_watch_follows_progress_until_success(fake: FakeApi, tmp_path: Path) -> None:
    recipe = tmp_path / "r.yaml"
    recipe.write_text("[{type: prune, method: magnitude, sparsity: 0.5}]")
    fake.script = [
        {"status": "running", "progress": {"step_index": 0, "total_steps": 1, "step": "prune", "fraction": 0.5}},
        {"status": "succeeded", "progress": {"fraction": 1.0, "message": "done"}},
    ]
    result = invoke("submit", "--model", "m1", "--recipe", str(recipe), "--watch")
    assert result.exit_code == 0, result.output
    assert "succeeded" in result.output
    assert not fake.script  # polled through every state


def running(index: int, step: str, fraction: float) -> dict:
    progress = {"step_index": index, "total_steps": 5, "step": step, "fraction": fraction, "message": ""}
    return {"id": "job1", "status": "running", "progress": progress, "error": None}


def test_watch_follows_the_event_stream_without_polling(fake: FakeApi) -> None:
    fake.jobs["job1"] = {"id": "job1", "status": "queued", "progress": {}}
    done = {"id": "job1", "status": "succeeded", "progress": {"fraction": 1.0}, "error": None}
    events = [("1-0", running(1, "load", 1.0)), ("2-0", running(3, "prune:magnitude", 0.5)), ("3-0", done)]
    fake.event_batches = [events]
    result = invoke("watch", "job1")
    assert result.exit_code == 0, result.output
    assert "prune:magnitude" in result.output and "3/5" in result.output and "succeeded" in result.output
    assert [r.url.path for r in fake.requests] == ["/v1/jobs/job1/events"]
    assert fake.requests[0].headers["accept"] == "text/event-stream"


def test_watch_resumes_a_dropped_stream_from_the_last_event(fake: FakeApi) -> None:
    fake.jobs["job1"] = {"id": "job1", "status": "running", "progress": {}}
    failed = {"id": "job1", "status": "failed", "error": {"code": "out_of_memory", "message": "smaller"}}
    fake.event_batches = [[("5-0", running(1, "load", 0.2)), ("6-1", running(2, "evaluate baseline", 0.1))], []]
    fake.event_batches.append([("7-0", failed)])
    result = invoke("watch", "job1")
    assert result.exit_code == 1 and "out_of_memory" in result.output
    streams = [r for r in fake.requests if r.url.path.endswith("/events")]
    assert [r.headers.get("last-event-id") for r in streams] == [None, "6-1", "6-1"]
    assert not [r for r in fake.requests if r.url.path == "/v1/jobs/job1"]


def test_watch_falls_back_to_polling_when_the_stream_fails(fake: FakeApi) -> None:
    fake.jobs["job1"] = {"id": "job1", "status": "running", "progress": {}}
    fake.event_batches, fake.events_status = [], 502
    fake.script = [{"status": "succeeded", "progress": {"fraction": 1.0}}]
    result = invoke("watch", "job1")
    assert result.exit_code == 0, result.output
    assert "polling instead" in result.output and "succeeded" in result.output
    assert not fake.script


def test_watch_failed_job_prints_error_and_exits_nonzero(fake: FakeApi, tmp_path: Path) -> None:
    fake.jobs["job1"] = {"id": "job1", "status": "running", "progress": {}}
    fake.script = [{"status": "failed", "error": {"code": "out_of_memory", "message": "use a smaller seq_len"}}]
    result = invoke("watch", "job1")
    assert result.exit_code == 1
    assert "out_of_memory" in result.output and "use a smaller seq_len" in result.output


def test_watch_unknown_job_is_a_clean_404(fake: FakeApi) -> None:
    result = invoke("watch", "nope")
    assert result.exit_code == 1
    assert "job nope not found" in result.output


def test_download_verifies_checksums_and_extracts(fake: FakeApi, tmp_path: Path) -> None:
    fake.add_artifact("model.tar", tar_of({"config.json": b"{}", "model.safetensors": b"weights"}))
    fake.add_artifact("report.json", b'{"ok": true}', kind="report")
    out = tmp_path / "out"
    result = invoke("download", "job1", "--out", str(out), "--extract")
    assert result.exit_code == 0, result.output
    assert (out / "report.json").read_bytes() == b'{"ok": true}'
    assert (out / "model" / "model.safetensors").read_bytes() == b"weights"
    assert not list(out.glob("*.part"))


def test_download_resumes_a_partial_file_with_a_range_request(fake: FakeApi, tmp_path: Path) -> None:
    data = bytes(range(256)) * 100
    fake.add_artifact("blob.bin", data, kind="other")
    (tmp_path / "blob.bin.part").write_bytes(data[:1000])
    result = invoke("download", "job1", "--out", str(tmp_path))
    assert result.exit_code == 0, result.output
    assert (tmp_path / "blob.bin").read_bytes() == data
    assert fake.requests[-1].headers["range"] == "bytes=1000-"


def test_download_with_a_bad_checksum_fails_and_keeps_nothing(fake: FakeApi, tmp_path: Path) -> None:
    fake.add_artifact("model.tar", b"corrupted", sha256="0" * 64)
    result = invoke("download", "job1", "--out", str(tmp_path))
    assert result.exit_code == 1
    assert "checksum mismatch" in result.output
    assert not list(tmp_path.iterdir())


def test_report_shows_nulls_as_not_measured(fake: FakeApi) -> None:
    fake.report = {
        "baseline": {"parameters": 1000, "size_bytes": 4000, "perplexity": None, "decode_ms_per_token": 2.0},
        "optimized": {"parameters": 1000, "size_bytes": 1000, "perplexity": None, "decode_ms_per_token": 1.0},
        "ratios": {"size": 0.25, "perplexity": None},
        "steps": [
            {
                "type": "prune",
                "method": "magnitude",
                "duration_s": 1.5,
                "layers": [{"name": "a", "sparsity": 0.5}, {"name": "b", "sparsity": 0.52}],
            }
        ],
        "samples": [{"prompt": "Hi", "baseline": "Hi there", "optimized": "Hi thee"}],
        "environment": {"torch": "2.13.0", "device": "cpu"},
        "notes": ["no evaluation dataset: perplexity not measured"],
    }
    result = runner.invoke(cli.app, ["report", "job1"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    out = result.output
    assert "not measured" in out
    assert "0.250×" in out  # size ratio computed from both sides
    assert "sparsity mean 0.51" in out
    assert "prune:magnitude" in out
    assert "no evaluation dataset" in out


def test_report_of_a_decompressed_cpu_artifact_shows_no_speedup(fake: FakeApi) -> None:
    note = "no speed-up ratio: on a CPU worker the quantized artifact runs with its weights decompressed to float"
    fake.report = {
        "baseline": {"size_bytes": 4000, "prefill_ms": 40.0, "decode_ms_per_token": 4.0},
        "optimized": {"size_bytes": 1000, "prefill_ms": 30.0, "decode_ms_per_token": 2.94},
        "ratios": {"size": 0.25, "prefill_speedup": None, "decode_speedup": None, "speed_note": note},
    }
    result = runner.invoke(cli.app, ["report", "job1"], env={"COLUMNS": "250"})
    assert result.exit_code == 0, result.output
    out = " ".join(result.output.split())
    assert "0.250×" in out  # the size still compares
    assert "0.750×" not in out and "0.735×" not in out  # no optimized/baseline of a decompressed timing
    assert "not comparable (see note)" in out and "decompressed to float" in out


def test_report_shows_the_kl_divergence_beside_perplexity_and_the_worst_layers(fake: FakeApi) -> None:
    fake.report = {
        "baseline": {"perplexity": 25.6},
        "optimized": {"perplexity": 28.1},
        "quality": {
            "kl_divergence": {
                "mean": 0.0412,
                "median": 0.0198,
                "p99": 0.3871,
                "top1_agreement": 0.9137,
                "positions": 20440,
                "method": "KL(baseline ‖ optimized) over the baseline's top-64 tokens plus one bucket",
            },
            "note": None,
        },
        "damage": {
            "worst": [
                {
                    "step": 1,
                    "key": "quantize:gptq",
                    "layer": "model.layers.3.mlp.down_proj",
                    "error": 0.1234,
                    "measure": "output (gram)",
                },
            ]
        },
    }
    result = runner.invoke(cli.app, ["report", "job1"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    out = result.output
    assert "KL divergence, mean (nats)" in out and "0.041200" in out
    assert "0.019800" in out and "0.387100" in out
    assert "91.37%" in out and "20,440" in out
    assert "1.098×" in out  # perplexity ratio beside the KL
    assert "top-64 tokens" in out
    assert "model.layers.3.mlp.down_proj" in out and "0.1234" in out and "output (gram)" in out


def test_report_without_kl_says_not_measured(fake: FakeApi) -> None:
    fake.report = {
        "baseline": {"perplexity": None},
        "optimized": {"perplexity": None},
        "quality": {"kl_divergence": None, "note": "no evaluation dataset: the KL divergence was not measured"},
    }
    result = runner.invoke(cli.app, ["report", "job1"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert "KL divergence to the baseline" in result.output and "not measured" in result.output
    assert "no evaluation dataset: the KL divergence was not measured" in result.output


def test_report_shows_task_accuracy_and_task_errors(fake: FakeApi) -> None:
    cloze = {"accuracy": 0.62, "stderr": 0.049, "n": 100}
    fake.report = {
        "baseline": {"perplexity": 25.6},
        "optimized": {"perplexity": 27.1},
        "quality": {
            "kl_divergence": None,
            "tasks": [
                {
                    "task": "cloze",
                    "source": {"dataset_id": "d"},
                    "baseline": cloze,
                    "optimized": {**cloze, "accuracy": 0.55},
                    "drop": 0.07,
                    "error": None,
                },
                {
                    "task": "hellaswag",
                    "source": {"name": "hellaswag"},
                    "error": "could not reach the hub",
                    "drop": None,
                },
            ],
        },
    }
    result = runner.invoke(cli.app, ["report", "job1"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert "task accuracy" in result.output and "62.0% ± 4.9" in result.output and "55.0% ± 4.9" in result.output
    assert "+7.0" in result.output and "could not reach the hub" in result.output


def test_unreachable_server_says_so(monkeypatch: pytest.MonkeyPatch) -> None:
    from tests.conftest import free_port

    monkeypatch.setenv("MODELPRESS_API_KEY", KEY)
    result = invoke("jobs", "list", "--url", f"http://127.0.0.1:{free_port()}")
    assert result.exit_code == 1
    assert "cannot reach the modelpress server" in result.output


def test_ctrl_c_while_watching_leaves_the_job_running(fake: FakeApi, monkeypatch: pytest.MonkeyPatch) -> None:
    fake.jobs["job1"] = {"id": "job1", "status": "running", "progress": {"fraction": 0.1}}

    def interrupt(_seconds: float) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(watching.time, "sleep", interrupt)
    result = invoke("watch", "job1")
    assert result.exit_code == 130
    assert "goes on on the server" in result.output
    assert not [r for r in fake.requests if r.url.path.endswith("/cancel")]


def test_cancel_then_watch_reports_cancelled_and_fails(fake: FakeApi) -> None:
    fake.jobs["job1"] = {"id": "job1", "status": "running", "progress": {}}
    cancelled = invoke("cancel", "job1")
    assert cancelled.exit_code == 0 and "cancelled" in cancelled.output
    watched = invoke("watch", "job1")
    assert watched.exit_code == 1 and "was cancelled" in watched.output
