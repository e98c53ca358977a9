"""lm-eval task uploads: a task archive (YAML + .jsonl) is checked and stored as its config and data; code hooks,
other files, missing data and unsafe templates are refused with nothing stored; jobs name tasks where tasks go."""

from __future__ import annotations

import io
import zipfile
from pathlib import Path

import httpx
import pytest
import yaml

from modelpress.cloze_task import ClozeOptions, task_config
from tests.api.conftest import storage_root
from tests.api.test_jobs import spec
from tests.utils.factories import tar_of, write_cloze_task

DOCS = b'{"context": "the model prunes", "choices": ["weights", "servers"], "label": 0}\n' * 3
TASK = task_config(ClozeOptions(name="tiny"))  # the config the product's cloze builder writes


def upload(client: httpx.Client, data: bytes, name: str = "task.tar") -> httpx.Response:
    return client.post("/v1/datasets", files={"file": (name, data)})


@pytest.fixture(scope="module")
def task_dataset(client: httpx.Client, tmp_path_factory: pytest.TempPathFactory) -> dict:
    archive = write_cloze_task(tmp_path_factory.mktemp("task") / "cloze.tar")
    response = upload(client, archive.read_bytes(), "cloze.tar")
    assert response.status_code == 201, response.text
    return response.json()


def test_cloze_task_is_stored_as_its_config_and_data(task_dataset: dict, migrated: dict) -> None:
    assert task_dataset["format"] == "lm-eval" and task_dataset["name"] == "cloze"
    assert task_dataset["records"] == 40  # the documents the task scores
    folder = storage_root(migrated) / "datasets" / task_dataset["id"] / "task"
    assert sorted(p.name for p in folder.iterdir()) == ["task.yaml", "test.jsonl"]
    assert yaml.safe_load((folder / "task.yaml").read_text())["output_type"] == "multiple_choice"


def test_zip_in_a_top_folder_with_a_nested_data_file(client: httpx.Client, migrated: dict) -> None:
    config = {**TASK, "dataset_kwargs": {"data_files": {"test": ["data/a.jsonl", "data/b.jsonl"]}}}
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("tiny/task.yml", yaml.safe_dump(config))
        archive.writestr("tiny/data/a.jsonl", DOCS)
        archive.writestr("tiny/data/b.jsonl", DOCS)
        archive.writestr("tiny/README.md", b"not stored")
    response = upload(client, buffer.getvalue(), "tiny.zip")
    assert response.status_code == 201, response.text
    assert response.json()["records"] == 6
    folder = storage_root(migrated) / "datasets" / response.json()["id"] / "task"
    assert sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()) == [
        "data/a.jsonl",
        "data/b.jsonl",
        "task.yaml",
    ]


FUNCTION_HOOK = yaml.safe_dump(TASK).replace("doc_to_text: '{{context}}'", "doc_to_text: !function utils.doc_to_text")


@pytest.mark.usefixtures("nothing_stored")
@pytest.mark.parametrize(
    ("files", "fragment"),
    [
        ({"task.yaml": FUNCTION_HOOK.encode(), "test.jsonl": DOCS, "utils.py": b"import os"}, "`!function` hook"),
        ({"task.yaml": yaml.safe_dump({**TASK, "process_docs": "x"}).encode(), "test.jsonl": DOCS}, "process_docs"),
        ({"task.yaml": yaml.safe_dump({**TASK, "include": "other.yaml"}).encode(), "test.jsonl": DOCS}, "include"),
        ({"task.yaml": b"task: [unclosed\n", "test.jsonl": DOCS}, "not valid YAML"),
        ({"task.yaml": b"!!python/object:os.system {}\n", "test.jsonl": DOCS}, "not plain data"),
        ({"task.yaml": yaml.safe_dump(TASK).encode()}, "'test.jsonl' named in data_files is not in the archive"),
        ({"test.jsonl": DOCS}, "exactly one .yaml task config"),
        ({"a.yaml": yaml.safe_dump(TASK).encode(), "b.yaml": b"{}", "test.jsonl": DOCS}, "holds 2"),
        (
            {"task.yaml": yaml.safe_dump({**TASK, "dataset_path": "Rowan/hellaswag"}).encode(), "test.jsonl": DOCS},
            "dataset_path: json",
        ),
        (
            {
                "task.yaml": yaml.safe_dump(
                    {**TASK, "dataset_kwargs": {"data_files": {"test": "../../etc/passwd.jsonl"}}}
                ).encode(),
                "test.jsonl": DOCS,
            },
            "without globs or '..'",
        ),
        ({"task.yaml": yaml.safe_dump(TASK).encode(), "test.jsonl": b"[1, 2]\n"}, "must be a JSON object"),
        (
            {"task.yaml": yaml.safe_dump({**TASK, "doc_to_text": "{{ missing }}"}).encode(), "test.jsonl": DOCS},
            "`doc_to_text` does not render on the first document of test.jsonl: 'missing' is undefined",
        ),
        (
            {
                "task.yaml": yaml.safe_dump({**TASK, "doc_to_text": "{{ context.__class__.__mro__ }}"}).encode(),
                "test.jsonl": DOCS,
            },
            "unsafe",
        ),
        (
            {"task.yaml": yaml.safe_dump({**TASK, "output_type": "generate_until"}).encode(), "test.jsonl": DOCS},
            "`output_type` must be one of multiple_choice, loglikelihood",
        ),
    ],
    ids=[
        "function-hook",
        "process-docs",
        "include",
        "bad-yaml",
        "python-tag",
        "missing-data",
        "no-yaml",
        "two-yamls",
        "hub-dataset",
        "escaping-path",
        "not-objects",
        "undefined-column",
        "sandbox",
        "generation",
    ],
)
def test_bad_tasks_are_refused(client: httpx.Client, files: dict[str, bytes], fragment: str) -> None:
    response = upload(client, tar_of(files))
    assert response.status_code == 422, response.text
    assert fragment in response.json()["detail"]


def test_jobs_name_task_datasets_only_as_tasks(
    client: httpx.Client, model: dict, dataset: dict, task_dataset: dict, tmp_path: Path
) -> None:
    body = spec(model, dataset)
    body["evaluation"]["tasks"] = [{"dataset_id": task_dataset["id"], "limit": 10}, {"name": "hellaswag"}]
    response = client.post("/v1/jobs", json=body)
    assert response.status_code == 202, response.text

    body["evaluation"]["tasks"] = [{"dataset_id": dataset["id"]}]
    response = client.post("/v1/jobs", json=body)
    assert response.status_code == 422 and "is text, not an lm-eval task" in response.json()["detail"]

    body = spec(model, dataset)
    body["evaluation"]["dataset_id"] = task_dataset["id"]
    response = client.post("/v1/jobs", json=body)
    assert response.status_code == 422 and "evaluation.dataset_id) is an lm-eval task" in response.json()["detail"]

    body = spec(model, dataset)
    body["evaluation"]["tasks"] = [{"dataset_id": task_dataset["id"], "name": "hellaswag"}]
    response = client.post("/v1/jobs", json=body)
    assert response.status_code == 422 and "not both" in str(response.json()["detail"])


def test_a_task_in_use_is_not_deleted(client: httpx.Client, model: dict, dataset: dict, task_dataset: dict) -> None:
    body = spec(model, dataset)
    body["evaluation"]["tasks"] = [{"dataset_id": task_dataset["id"]}]
    job = client.post("/v1/jobs", json=body).json()
    response = client.delete(f"/v1/datasets/{task_dataset['id']}")
    assert response.status_code == 409 and job["id"] in response.json()["detail"]
    assert client.post(f"/v1/jobs/{job['id']}/cancel").status_code in (200, 202)
