"""The OpenAPI schema tells the truth: `schemathesis run --checks all` against the live API, and one test per
disagreement it found, each checking the answer against what the schema declares.

The schema is the one the live API serves (checked equal). The run is bounded (examples per operation, deterministic
generation, a time limit on the process) and talks to the live uvicorn on 127.0.0.1 with keys of a tenant of its own
(`schemathesis_hooks.py`), after a model, a dataset and a queued job of that tenant exist for it to reach.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import jsonschema_rs
import pytest

from app.main import create_app
from tests.api.conftest import storage_root
from tests.conftest import REPO, LiveProcess, make_key
from tests.utils.factories import insert_artifact, write_text_dataset

OPENAPI = create_app().openapi()
HERE = Path(__file__).parent
MAX_EXAMPLES = 20
NOT_FUZZED = [("/v1/jobs/{job_id}/events", "get")]
"""Operations schemathesis.toml leaves out (with its reason there); their answers are checked by tests here."""
RUN_LIMIT_S = 480


def validator(schema: dict[str, Any]) -> Any:
    """A JSON Schema validator for `schema`, its `$ref`s resolved against the OpenAPI components."""
    return jsonschema_rs.Draft202012Validator({**schema, "components": OPENAPI["components"]})


def declared(path: str, method: str, status: int) -> dict[str, Any]:
    """The response the schema declares for this operation and status (KeyError when it declares none)."""
    return OPENAPI["paths"][path][method]["responses"][str(status)]


def assert_declared_error(response: httpx.Response, path: str, method: str) -> None:
    """The status is declared for the operation and the body is valid against the schema declared for it."""
    entry = declared(path, method, response.status_code)
    body_schema = entry["content"]["application/json"]["schema"]
    errors = [e.message for e in validator(body_schema).iter_errors(response.json())]
    assert not errors, (response.status_code, response.text, errors)


@pytest.fixture(scope="module")
def fuzz(live_api: LiveProcess) -> Iterator[httpx.Client]:
    """A client of the `fuzz` tenant."""
    with httpx.Client(
        base_url=live_api.url, headers={"Authorization": f"Bearer {make_key('fuzz')}"}, timeout=60
    ) as client:
        yield client


def test_live_api_serves_this_schema(live_api: LiveProcess) -> None:
    assert httpx.get(f"{live_api.url}/openapi.json").json() == OPENAPI


def test_every_4xx_declares_the_error_schema() -> None:
    components = OPENAPI["components"]["schemas"]
    assert "HTTPValidationError" not in components and components["Error"]["properties"]["detail"]["type"] == "string"
    seen = 0
    for path, operations in OPENAPI["paths"].items():
        for method, operation in operations.items():
            for code, response in operation["responses"].items():
                if code.startswith("4"):
                    seen += 1
                    assert response["content"] == {
                        "application/json": {"schema": {"$ref": "#/components/schemas/Error"}}
                    }, (method, path, code)
    assert seen >= 40


@pytest.mark.parametrize(
    ("path", "query"),
    [("/v1/models", "offset=-1"), ("/v1/datasets", "limit=0"), ("/v1/jobs", "status=null"), ("/v1/jobs", "limit=x")],
)
def test_a_422_body_matches_the_declared_error(fuzz: httpx.Client, path: str, query: str) -> None:
    response = fuzz.get(f"{path}?{query}")
    assert response.status_code == 422
    assert_declared_error(response, path, "get")
    body = response.json()
    assert query.split("=")[0] in body["detail"] and body["errors"][0]["loc"] == ["query", query.split("=")[0]]


@pytest.mark.parametrize("resource", ["models", "datasets"])
def test_405_allows_every_method_of_the_path(fuzz: httpx.Client, resource: str) -> None:
    response = fuzz.options(f"/v1/{resource}/0")
    assert response.status_code == 405
    documented = {m.upper() for m in OPENAPI["paths"][f"/v1/{resource}/{{{resource[:-1]}_id}}"]}
    assert documented == {"GET", "DELETE"}
    assert {m.strip() for m in response.headers["allow"].split(",")} == documented
    assert "GET or DELETE" in response.json()["detail"]


@pytest.mark.parametrize("resource", ["models", "datasets"])
def test_upload_refusals_are_declared(fuzz: httpx.Client, resource: str) -> None:
    path = f"/v1/{resource}"
    not_multipart = fuzz.post(path, content=b"file=model.tar", headers={"Content-Type": "text/plain"})
    assert not_multipart.status_code == 415
    assert_declared_error(not_multipart, path, "post")
    as_json = fuzz.post(path, json={"file": "model.tar"})  # models: a JSON body names a stored object
    assert as_json.status_code == (422 if resource == "models" else 415)
    assert_declared_error(as_json, path, "post")
    no_file = fuzz.post(path, files={"name": (None, "x")})
    assert no_file.status_code == 400 and "no 'file' field" in no_file.json()["detail"]
    assert_declared_error(no_file, path, "post")
    picture = fuzz.post(path, files={"file": ("cat.png", b"\x89PNG\r\n\x1a\n" + bytes(64))})
    assert picture.status_code == 422
    assert_declared_error(picture, path, "post")


def test_job_body_refusals_are_declared(fuzz: httpx.Client) -> None:
    not_json = fuzz.post("/v1/jobs", content=b"model_id=x", headers={"Content-Type": "text/plain"})
    assert not_json.status_code == 415
    assert_declared_error(not_json, "/v1/jobs", "post")


def test_events_refusals_are_declared(fuzz: httpx.Client, fuzz_resources: dict[str, str]) -> None:
    """The event stream, left out of the fuzzing run: its 404 and 422 bodies match the declared `Error`."""
    path = "/v1/jobs/{job_id}/events"
    missing = fuzz.get("/v1/jobs/00000000-0000-0000-0000-000000000000/events")
    assert missing.status_code == 404
    assert_declared_error(missing, path, "get")
    job_id = fuzz_resources["MODELPRESS_FUZZ_JOB_ID"]
    malformed = fuzz.get(f"/v1/jobs/{job_id}/events", headers={"Last-Event-ID": "yesterday"})
    assert malformed.status_code == 422 and "Last-Event-ID" in malformed.json()["detail"], malformed.text
    assert_declared_error(malformed, path, "get")
    assert set(declared(path, "get", 200)["content"]) == {"text/event-stream"}


def test_recipe_step_schema_is_as_strict_as_validation(fuzz: httpx.Client) -> None:
    """A step without `type` or `method` is refused, so the schema's union of steps refuses it too."""
    job_schema = validator({"$ref": "#/components/schemas/JobCreate"})
    good = {"model_id": "m", "recipe": [{"type": "prune", "method": "magnitude", "sparsity": 0.5}]}
    assert job_schema.is_valid(good)
    assert job_schema.is_valid({"model_id": "m", "recipe": [{"type": "distill", "dataset_id": "d"}]})
    for step in ({"sparsity": 0.5}, {"method": "magnitude", "sparsity": 0.5}, {"type": "prune", "sparsity": 0.5}):
        body = {"model_id": "m", "recipe": [step]}
        assert not job_schema.is_valid(body), step
        response = fuzz.post("/v1/jobs", json=body)
        assert response.status_code == 422 and "unknown recipe step" in response.json()["detail"], response.text


@pytest.fixture(scope="module")
def fuzz_resources(
    fuzz: httpx.Client, tiny_tar: Path, tmp_path_factory: pytest.TempPathFactory, migrated: dict[str, str]
) -> dict[str, str]:
    """A model, a dataset, a queued job and an artifact of the `fuzz` tenant, by the names the run's config reads."""
    with tiny_tar.open("rb") as handle:
        model = fuzz.post("/v1/models", files={"file": ("tiny-llama.tar", handle)})
    assert model.status_code == 201, model.text
    text = write_text_dataset(tmp_path_factory.mktemp("fuzz") / "fuzz.txt", lines=20)
    with text.open("rb") as handle:
        dataset = fuzz.post("/v1/datasets", files={"file": ("fuzz.txt", handle)})
    assert dataset.status_code == 201, dataset.text
    recipe = [{"type": "prune", "method": "magnitude", "sparsity": 0.5}]
    job = fuzz.post("/v1/jobs", json={"model_id": model.json()["id"], "recipe": recipe})
    assert job.status_code == 202, job.text
    return {
        "MODELPRESS_FUZZ_MODEL_ID": model.json()["id"],
        "MODELPRESS_FUZZ_DATASET_ID": dataset.json()["id"],
        "MODELPRESS_FUZZ_JOB_ID": job.json()["id"],
        "MODELPRESS_FUZZ_ARTIFACT_ID": store_report_artifact(job.json()["id"], migrated),
    }


def store_report_artifact(job_id: str, env: dict[str, str]) -> str:
    """A report artifact of the job, its file and row written directly as the worker would; returns its id."""
    content = json.dumps({"ratios": {"size": 0.5}}).encode()
    key = f"jobs/{job_id}/report.json"
    path = storage_root(env) / key
    path.parent.mkdir(parents=True)
    path.write_bytes(content)
    return insert_artifact(
        job_id, "report.json", content, key, kind="report", media_type="application/json", tenant="fuzz"
    )


def test_schemathesis_all_checks(live_api: LiveProcess, fuzz_resources: dict[str, str]) -> None:
    """Every phase (examples, coverage, fuzzing, stateful) with every check; the report names each failure."""
    command = [
        str(Path(sys.executable).with_name("schemathesis")),
        "--config-file",
        str(HERE / "schemathesis.toml"),
        "--no-color",
        "run",
        f"{live_api.url}/openapi.json",
        "--checks",
        "all",
        "--max-examples",
        str(MAX_EXAMPLES),
        "--generation-deterministic",
        "--workers",
        "1",
        "--request-timeout",
        "30",
    ]
    env = {
        **os.environ,
        **fuzz_resources,
        "SCHEMATHESIS_HOOKS": "tests.api.schemathesis_hooks",
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
    }
    run = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=RUN_LIMIT_S)
    assert run.returncode == 0, run.stdout[-20000:] + run.stderr[-5000:]
    operations = sum(len(methods) for methods in OPENAPI["paths"].values()) - len(NOT_FUZZED)
    assert f"Tested: {operations}\n" in run.stdout, run.stdout[-5000:]
