"""The allow-list at the API: refused families get a 422 naming what is supported, listed ones are accepted,
and a step an architecture cannot run is refused at submission."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from app.architectures import ARCHITECTURES, GGUF_ARCHITECTURES, REFUSED, SUPPORTED_ARCHITECTURES
from app.gguf_inspection import inspect_gguf
from app.inspection import InspectionError
from tests.utils.factories import build_tiny_model_of, tar_folder, write_tiny_gguf

MAGNITUDE = {"type": "prune", "method": "magnitude", "sparsity": 0.5}


def upload(client: httpx.Client, path: Path) -> httpx.Response:
    with path.open("rb") as handle:
        return client.post("/v1/models", files={"file": (path.name, handle)})


def names_every_supported_type(detail: str) -> bool:
    return all(model_type in detail for model_type in SUPPORTED_ARCHITECTURES)


@pytest.mark.usefixtures("nothing_stored")
@pytest.mark.parametrize("model_type", sorted(REFUSED))
def test_refused_family_upload_is_422_naming_the_supported_list(client, tmp_path, model_type) -> None:
    folder = build_tiny_model_of(tmp_path / model_type, model_type)
    response = upload(client, tar_folder(folder, tmp_path / f"{model_type}.tar"))
    assert response.status_code == 422, response.text
    detail = response.json()["detail"]
    assert f"model_type '{model_type}' is not supported" in detail and REFUSED[model_type] in detail
    assert names_every_supported_type(detail), detail


@pytest.mark.usefixtures("nothing_stored")
def test_refused_family_gguf_upload_is_422(client, tmp_path) -> None:
    response = upload(client, write_tiny_gguf(tmp_path / "gpt2.gguf", "gpt2"))
    assert response.status_code == 422, response.text
    detail = response.json()["detail"]
    assert "'gpt2' is not supported" in detail and "Conv1D" in detail and names_every_supported_type(detail)


@pytest.mark.parametrize("gguf_name", ["gpt2", "falcon", "gemma", "opt"])
def test_gguf_without_a_tested_import_is_refused(tmp_path, gguf_name) -> None:
    with pytest.raises(InspectionError, match=f"GGUF architecture '{gguf_name}' is not supported"):
        inspect_gguf(write_tiny_gguf(tmp_path / "m.gguf", gguf_name))


@pytest.mark.parametrize("gguf_name", sorted(GGUF_ARCHITECTURES))
def test_gguf_of_a_listed_family_is_inspected_as_its_model_type(tmp_path, gguf_name) -> None:
    inspected = inspect_gguf(write_tiny_gguf(tmp_path / "m.gguf", gguf_name))
    assert (inspected.architecture, inspected.details["model_type"]) == GGUF_ARCHITECTURES[gguf_name]
    assert inspected.details["model_type"] in SUPPORTED_ARCHITECTURES


@pytest.mark.parametrize("architecture", ARCHITECTURES, ids=[a.model_type for a in ARCHITECTURES])
def test_listed_family_is_accepted_and_runs_only_its_steps(client, dataset, tmp_path, architecture) -> None:
    folder = build_tiny_model_of(tmp_path / architecture.model_type, architecture.model_type)
    response = upload(client, tar_folder(folder, tmp_path / "m.tar"))
    assert response.status_code == 201, response.text
    model = response.json()
    assert model["architecture"] == architecture.hf_class
    assert model["details"]["model_type"] == architecture.model_type
    try:
        structured = {"type": "prune", "method": "structured", "mlp_sparsity": 0.5}
        calibration = {"dataset_id": dataset["id"], "samples": 4, "seq_len": 32}
        body = {"model_id": model["id"], "recipe": [structured], "calibration": calibration}
        job = client.post("/v1/jobs", json=body)
        if architecture.unsupported and "prune:structured" in architecture.unsupported:
            assert job.status_code == 422, job.text
            detail = job.json()["detail"]
            assert "prune:structured" in detail and architecture.model_type in detail and "remove" in detail
        else:
            assert job.status_code == 202, job.text
            assert client.post(f"/v1/jobs/{job.json()['id']}/cancel").status_code == 200
    finally:
        assert client.delete(f"/v1/models/{model['id']}").status_code == 204


def test_job_on_a_model_of_a_refused_family_is_422(client, tiny_tar: Path) -> None:
    """A stored model whose model_type is off the list gets a 422 at submission, not a failure at run time."""
    from sqlalchemy import update

    from modelpress.db import session_scope
    from modelpress.models import Model

    with tiny_tar.open("rb") as handle:
        model = client.post("/v1/models", files={"file": ("tiny.tar", handle)}).json()
    details = {**model["details"], "model_type": "gpt2"}
    with session_scope() as session:
        session.execute(update(Model).where(Model.id == model["id"]).values(details=details))
    try:
        job = client.post("/v1/jobs", json={"model_id": model["id"], "recipe": [MAGNITUDE]})
        assert job.status_code == 422, job.text
        assert "'gpt2' is not supported" in job.json()["detail"] and names_every_supported_type(job.json()["detail"])
    finally:
        assert client.delete(f"/v1/models/{model['id']}").status_code == 204


@pytest.mark.parametrize(
    "model_type",
    sorted({a.model_type for a in ARCHITECTURES if "quantize:smoothquant" in (a.unsupported or {})}),
)
def test_smoothquant_on_a_mixture_of_experts_model_is_422(client, dataset, tmp_path, model_type) -> None:
    folder = build_tiny_model_of(tmp_path / model_type, model_type)
    model = upload(client, tar_folder(folder, tmp_path / "m.tar")).json()
    try:
        calibration = {"dataset_id": dataset["id"], "samples": 4, "seq_len": 32}
        smoothquant = {"type": "quantize", "method": "smoothquant"}
        job = client.post(
            "/v1/jobs", json={"model_id": model["id"], "recipe": [smoothquant], "calibration": calibration}
        )
        assert job.status_code == 422, job.text
        assert (
            "quantize:smoothquant cannot run on" in job.json()["detail"] and "remove that step" in job.json()["detail"]
        )
        rtn = {"type": "quantize", "method": "rtn", "weights": {"bits": 8, "group_size": None, "symmetric": True}}
        accepted = client.post("/v1/jobs", json={"model_id": model["id"], "recipe": [rtn]})
        assert accepted.status_code == 202, accepted.text
        assert client.post(f"/v1/jobs/{accepted.json()['id']}/cancel").status_code == 200
    finally:
        assert client.delete(f"/v1/models/{model['id']}").status_code == 204
