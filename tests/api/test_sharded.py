"""Sharded checkpoints: the index is read, every shard it names must be uploaded and must hold the tensors the
index maps to it; shapes are checked over all shards together and the weights' dtype is recorded."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest

from app.inspection import INDEX_NAME
from tests.api.test_uploads_refused import post, refused
from tests.utils.factories import build_sharded_model, tar_folder


@pytest.fixture(scope="module")
def sharded_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = build_sharded_model(tmp_path_factory.mktemp("sharded") / "tiny-sharded")
    assert len(list(folder.glob("*.safetensors"))) >= 3  # really sharded
    return folder


def copy_of(folder: Path, dest: Path) -> Path:
    dest.mkdir()
    for path in folder.iterdir():
        (dest / path.name).write_bytes(path.read_bytes())
    return dest


def shards_of(folder: Path) -> dict[str, str]:
    return json.loads((folder / INDEX_NAME).read_text())["weight_map"]


def test_sharded_bf16_checkpoint_is_accepted(client: httpx.Client, sharded_dir: Path, tmp_path: Path) -> None:
    response = post(client, tar_folder(sharded_dir, tmp_path / "sharded.tar"))
    assert response.status_code == 201, response.text
    details = response.json()["details"]
    shards = set(shards_of(sharded_dir).values())
    assert details["dtype"] == "bfloat16"
    assert details["shards"] == len(shards) >= 3
    assert shards <= set(details["files"])
    assert details["linears"]["model.layers.1.mlp.down_proj"] == [64, 128]


def test_missing_shard_is_refused(client, sharded_dir: Path, tmp_path: Path, nothing_stored) -> None:
    folder = copy_of(sharded_dir, tmp_path / "model")
    gone = sorted(set(shards_of(folder).values()))[1]
    (folder / gone).unlink()
    refused(post(client, tar_folder(folder, tmp_path / "m.tar")), 422, gone, "not in the upload", "every shard")


def test_index_naming_a_tensor_not_in_its_shard_is_refused(client, sharded_dir, tmp_path, nothing_stored) -> None:
    folder = copy_of(sharded_dir, tmp_path / "model")
    index = json.loads((folder / INDEX_NAME).read_text())
    shards = sorted(set(index["weight_map"].values()))
    name = next(n for n, s in index["weight_map"].items() if s == shards[0])
    index["weight_map"][name] = shards[-1]
    (folder / INDEX_NAME).write_text(json.dumps(index))
    refused(post(client, tar_folder(folder, tmp_path / "m.tar")), 422, name, f"to {shards[-1]}", f"in {shards[0]}")


def test_tensor_outside_the_index_is_refused(client, sharded_dir, tmp_path, nothing_stored) -> None:
    folder = copy_of(sharded_dir, tmp_path / "model")
    index = json.loads((folder / INDEX_NAME).read_text())
    name = sorted(index["weight_map"])[0]
    del index["weight_map"][name]
    (folder / INDEX_NAME).write_text(json.dumps(index))
    refused(post(client, tar_folder(folder, tmp_path / "m.tar")), 422, name, "not in", "weight_map")


def test_shards_without_their_index_are_refused(client, sharded_dir, tmp_path, nothing_stored) -> None:
    folder = copy_of(sharded_dir, tmp_path / "model")
    (folder / INDEX_NAME).unlink()
    refused(post(client, tar_folder(folder, tmp_path / "m.tar")), 422, INDEX_NAME, "is missing")


def test_shapes_are_checked_across_shards(client, sharded_dir, tmp_path, nothing_stored) -> None:
    """Dropping the shard that holds a whole layer leaves the other shards' shapes to disagree with the config."""
    folder = copy_of(sharded_dir, tmp_path / "model")
    index = json.loads((folder / INDEX_NAME).read_text())
    last = sorted(set(index["weight_map"].values()))[-1]
    index["weight_map"] = {n: s for n, s in index["weight_map"].items() if s != last}
    (folder / INDEX_NAME).write_text(json.dumps(index))
    (folder / last).unlink()
    config = json.loads((folder / "config.json").read_text())
    config["num_hidden_layers"] = 3
    (folder / "config.json").write_text(json.dumps(config))
    refused(post(client, tar_folder(folder, tmp_path / "m.tar")), 422, "num_hidden_layers = 3", "layer(s) 2")
