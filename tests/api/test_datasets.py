"""Dataset uploads: .txt and .jsonl accepted and counted; bad text refused with nothing stored."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import httpx
import pytest

from tests.api.conftest import storage_root
from tests.utils.factories import write_jsonl_dataset, write_text_dataset


def post(client: httpx.Client, name: str, data: bytes) -> httpx.Response:
    return client.post("/v1/datasets", files={"file": (name, data)})


def test_txt_dataset(dataset: dict, client: httpx.Client, migrated: dict, tmp_path: Path) -> None:
    text = write_text_dataset(tmp_path / "calib.txt").read_bytes()
    assert dataset["name"] == "calib" and dataset["format"] == "txt"
    assert dataset["records"] == 400 and dataset["size_bytes"] == len(text)
    assert dataset["sha256"] == hashlib.sha256(text).hexdigest()
    assert (storage_root(migrated) / "datasets" / dataset["id"] / "data.txt").read_bytes() == text
    assert client.get(f"/v1/datasets/{dataset['id']}").json() == dataset
    assert dataset["id"] in {d["id"] for d in client.get("/v1/datasets").json()["data"]}


def test_txt_counts_non_empty_lines(client: httpx.Client) -> None:
    response = post(client, "notes.txt", "first\n\n  \nsecond – ünïcode\nthird without newline".encode())
    assert response.status_code == 201, response.text
    assert response.json()["records"] == 3
    assert client.delete(f"/v1/datasets/{response.json()['id']}").status_code == 204


def test_jsonl_dataset(client: httpx.Client, migrated: dict, tmp_path: Path) -> None:
    path = write_jsonl_dataset(tmp_path / "eval.jsonl")
    response = post(client, "eval.jsonl", path.read_bytes())
    assert response.status_code == 201, response.text
    body = response.json()
    assert body["format"] == "jsonl" and body["records"] == 200 and body["name"] == "eval"
    folder = storage_root(migrated) / "datasets" / body["id"]
    assert (folder / "data.jsonl").is_file()
    assert client.delete(f"/v1/datasets/{body['id']}").status_code == 204
    assert not folder.exists()
    assert client.get(f"/v1/datasets/{body['id']}").status_code == 404


@pytest.mark.usefixtures("nothing_stored")
@pytest.mark.parametrize(
    ("name", "data", "fragment"),
    [
        ("data.csv", b"a,b\n", ".txt file, a .jsonl file"),
        ("data.txt", b"caf\xe9 latin-1\n", "not UTF-8"),
        ("data.txt", b"\n \n\n", "no text"),
        ("data.jsonl", b'{"text": "ok"}\n{"text": 3}\n', 'line 2 must be a JSON object with a string "text"'),
        ("data.jsonl", b'{"text": "ok"}\nnot json\n', "line 2 is not valid JSON"),
        ("data.jsonl", b'["text"]\n', "line 1 must be a JSON object"),
        ("data.jsonl", b"[" * 100_000 + b"\n", "line 1 is not valid JSON"),
    ],
    ids=["extension", "not-utf8", "empty", "text-not-string", "bad-json", "not-object", "deep"],
)
def test_bad_datasets(client: httpx.Client, name: str, data: bytes, fragment: str) -> None:
    response = post(client, name, data)
    assert response.status_code == 422, response.text
    assert fragment in response.json()["detail"]


def test_jsonl_lines_are_all_checked(client: httpx.Client, nothing_stored: None) -> None:
    lines = [json.dumps({"text": f"line {i}"}) for i in range(1000)] + ['{"txt": "typo"}']
    response = post(client, "big.jsonl", "\n".join(lines).encode())
    assert response.status_code == 422 and "line 1001" in response.json()["detail"]
