"""Two of the non-Llama architectures on the list through the live service: upload, a calibrated prune and
quantize job on the real worker, download, and the artifact's perplexity measured by transformers alone.

tests/engine/test_architectures.py runs every listed architecture through the engine pipeline; this runs the
ones whose layout differs most from Llama (OPT's decoder, Phi-3's fused projections) through the API and worker.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.utils.checks import perplexities_in_clean_process, quantized_bytes_ratio, unpack
from tests.utils.factories import build_tiny_model_of, tar_folder, write_text_dataset
from tests.utils.stack import Client, Stack

SEQ_LEN, WINDOWS = 32, 2
RECIPE = [
    {"type": "prune", "method": "wanda", "sparsity": 0.5},
    {"type": "quantize", "method": "gptq", "weights": {"bits": 4, "group_size": 32, "symmetric": True}},
]


def in_decoder(name: str) -> bool:
    return ".layers." in name


@pytest.fixture(scope="module")
def client(e2e_stack: Stack) -> Client:
    return e2e_stack.client()


def test_opt_and_phi3_jobs_succeed_through_the_service(e2e_stack: Stack, client: Client, tmp_path: Path) -> None:
    text = write_text_dataset(tmp_path / "text.txt")
    dataset = client.upload("/v1/datasets", text, name="text")
    assert dataset.status_code == 201, dataset.text
    data = {"dataset_id": dataset.json()["id"], "seq_len": SEQ_LEN}
    jobs = {}
    for model_type in ("opt", "phi3"):
        archive = tar_folder(build_tiny_model_of(tmp_path / model_type, model_type), tmp_path / f"{model_type}.tar")
        model = client.upload("/v1/models", archive, name=model_type)
        assert model.status_code == 201, model.text
        body = {
            "model_id": model.json()["id"],
            "recipe": RECIPE,
            "calibration": {**data, "samples": 4},
            "evaluation": {**data, "max_windows": WINDOWS},
        }
        response = client.http.post("/v1/jobs", json=body)
        assert response.status_code == 202, response.text
        jobs[model_type] = response.json()["id"]

    folders, reports = [], []
    for model_type, job_id in jobs.items():
        job = client.wait(job_id, 300, e2e_stack.workers[0])
        assert job["status"] == "succeeded", job
        report = client.http.get(f"/v1/jobs/{job_id}/report").json()
        assert [s["method"] for s in report["steps"]] == ["wanda", "gptq"]
        assert all(layer["sparsity"] == pytest.approx(0.5, abs=0.02) for layer in report["steps"][0]["layers"])
        artifacts = {a["kind"]: a for a in client.http.get(f"/v1/jobs/{job_id}/artifacts").json()["data"]}
        folder = unpack(client.download(artifacts["model"], tmp_path / f"{model_type}-out.tar"), tmp_path / job_id)
        stored, float32 = quantized_bytes_ratio(folder, in_decoder)
        assert float32 > 0 and stored < 0.35 * float32, model_type
        folders.append(folder)
        reports.append(report)

    measured = perplexities_in_clean_process(folders, text, SEQ_LEN, WINDOWS)
    for folder, report in zip(folders, reports, strict=True):
        assert measured[folder]["perplexity"] == pytest.approx(report["optimized"]["perplexity"], rel=0.01)
