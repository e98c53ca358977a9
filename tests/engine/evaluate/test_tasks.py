"""Task accuracy through lm-eval-harness on a tiny model: an uploaded cloze task scored offline, reproducibly, in
the report before and after the recipe; templates rendered in a sandbox; a task that cannot run fails only its
own entry."""

from __future__ import annotations

import socket

import pytest
import yaml

from modelpress.specs import JobSpec, TaskSpec
from tests.engine.test_pipeline import request
from tests.utils.factories import unpack_task, write_cloze_task
from worker.engine import run_pipeline
from worker.engine.evaluate.tasks import TaskSource, score_tasks

LIMIT = 24


@pytest.fixture(scope="module")
def task_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("task")
    return unpack_task(write_cloze_task(folder / "cloze.tar"), folder / "task")


@pytest.fixture()
def no_network(monkeypatch):
    """Any connection attempt fails the test: an uploaded task must not reach the hub."""

    def refuse(self, address):
        raise AssertionError(f"network access to {address} while scoring an uploaded task")

    monkeypatch.setattr(socket.socket, "connect", refuse)


def score(tiny, folder, scratch, limit=LIMIT):
    source = TaskSource(TaskSpec(dataset_id="d-task", limit=limit), folder)
    return score_tasks(tiny.model, tiny.tokenizer, [source], scratch, lambda *_: None)


def test_uploaded_task_scores_offline_and_reproducibly(tiny, task_folder, tmp_path, no_network):
    pad_before = tiny.tokenizer.pad_token
    first, second = score(tiny, task_folder, tmp_path / "a"), score(tiny, task_folder, tmp_path / "b")
    assert first == second
    (entry,) = first
    assert entry["task"] == "cloze" and entry["source"] == {"dataset_id": "d-task", "limit": LIMIT}
    assert entry["n"] == LIMIT
    assert 0.0 <= entry["accuracy"] <= 1.0
    # the stderr of a mean of 0/1 outcomes: sqrt(p(1-p)/(n-1))
    p = entry["accuracy"]
    assert entry["stderr"] == pytest.approx((p * (1 - p) / (LIMIT - 1)) ** 0.5, rel=1e-6)
    assert tiny.tokenizer.pad_token == pad_before  # lm-eval got a copy; the artifact's tokenizer is untouched


def test_templates_render_in_a_sandbox(tiny, task_folder, tmp_path):
    hostile = tmp_path / "hostile"
    hostile.mkdir()
    (hostile / "test.jsonl").write_text((task_folder / "test.jsonl").read_text())
    config = yaml.safe_load((task_folder / "task.yaml").read_text())
    config["doc_to_text"] = "{{ context.__class__.__mro__[1].__subclasses__() }}"
    (hostile / "task.yaml").write_text(yaml.safe_dump(config))
    (entry,) = score(tiny, hostile, tmp_path / "scratch")
    assert "SecurityError" in entry["error"] and "accuracy" not in entry


def test_report_carries_task_accuracy_before_and_after(tiny_model_dir, text_dataset, task_folder, tmp_path):
    spec = JobSpec.model_validate(
        {
            "model_id": "m1",
            "recipe": [{"type": "quantize", "method": "rtn", "weights": {"bits": 4, "group_size": 32}}],
            "evaluation": {
                "dataset_id": "d1",
                "seq_len": 64,
                "max_windows": 2,
                "tasks": [{"dataset_id": "d-task", "limit": LIMIT}],
            },
        }
    )
    datasets = {"d-task": (task_folder, "lm-eval")}
    report = run_pipeline(request(tiny_model_dir, tmp_path, text_dataset, spec=spec, datasets=datasets), print)
    (task,) = report["quality"]["tasks"]
    assert task["error"] is None and task["task"] == "cloze"
    for model in ("baseline", "optimized"):
        assert task[model]["n"] == LIMIT and 0.0 <= task[model]["accuracy"] <= 1.0 and task[model]["stderr"] is not None
    assert task["drop"] == pytest.approx(task["baseline"]["accuracy"] - task["optimized"]["accuracy"])
    assert "lm-eval-harness" in report["quality"]["tasks_method"]
    assert report["quality"]["kl_divergence"]["positions"] == 2 * 63
