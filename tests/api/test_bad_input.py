"""Bad input answers 4xx: values that used to reach PostgreSQL and fail there (500s found by schemathesis), and
recipes that are out of range or contradict themselves or the model."""

from __future__ import annotations

import httpx
import pytest

PRUNE = {"type": "prune", "method": "magnitude", "sparsity": 0.5}


@pytest.mark.parametrize("route", ["/v1/models", "/v1/datasets", "/v1/jobs"])
def test_offset_past_bigint(client: httpx.Client, route: str) -> None:
    response = client.get(route, params={"offset": 2**70})
    assert response.status_code == 422 and "offset" in response.json()["detail"]


@pytest.mark.parametrize("route", ["/v1/models/{}", "/v1/datasets/{}", "/v1/jobs/{}", "/v1/artifacts/{}"])
@pytest.mark.parametrize("row_id", ["%00", "a%00b", "x" * 36, "%F0%9F%87%BA"])
def test_malformed_ids_are_404(client: httpx.Client, route: str, row_id: str) -> None:
    response = client.get(route.format(row_id))
    assert response.status_code == 404 and "not found" in response.json()["detail"]


def test_nul_in_json_strings(client: httpx.Client, model: dict) -> None:
    for body in ({"model_id": "a\x00b", "recipe": [PRUNE]}, {"model_id": model["id"], "recipe": [PRUNE], "\x00": 1}):
        response = client.post("/v1/jobs", json=body)
        assert response.status_code == 422 and "\\u0000" in response.json()["detail"], response.text


@pytest.mark.usefixtures("nothing_stored")
def test_nul_in_upload_name(client: httpx.Client) -> None:
    response = client.post("/v1/datasets", files={"file": ("a.txt", b"some text\n" * 20)}, data={"name": "a\x00b"})
    assert response.status_code == 422 and "control characters" in response.json()["detail"]


def test_control_characters_are_dropped_from_file_names(client: httpx.Client) -> None:
    body = (
        b'--b0\r\nContent-Disposition: form-data; name="file"; filename="ca\x00l\x1fib.txt"\r\n\r\n'
        + b"some text\n" * 20
        + b"\r\n--b0--\r\n"
    )
    response = client.post("/v1/datasets", content=body, headers={"Content-Type": "multipart/form-data; boundary=b0"})
    assert response.status_code == 201, response.text
    assert response.json()["name"] == "calib"
    assert client.delete(f"/v1/datasets/{response.json()['id']}").status_code == 204


RTN = {"type": "quantize", "method": "rtn", "weights": {"bits": 8}}
CALIBRATION = {"samples": 8, "seq_len": 64}


@pytest.mark.usefixtures("nothing_stored")
@pytest.mark.parametrize(
    ("recipe", "extra", "fragments"),
    [
        ([RTN, PRUNE], {}, ("recipe.1", "quantization must be the last step")),
        ([{"type": "prune", "method": "wanda", "sparsity": 0.5}], {}, ("recipe.0", "calibration")),
        ([{"type": "quantize", "method": "fp8", "gptq": True}], {}, ("recipe.0", "calibration")),
        (
            [{"type": "quantize", "method": "awq", "loss": "blocks"}],
            {"calibration": CALIBRATION},
            ("recipe.0", "loss", "'gram' or 'block'"),
        ),
        ([{**PRUNE, "pattern": "2:4", "sparsity": 0.3}], {}, ("2:4", "sparsity 0.5", "0.3")),
        ([{"type": "prune", "method": "magnitude"}], {}, ("sparsity",)),
        ([{"type": "prune", "method": "structured"}], {}, ("nothing would be removed",)),
        (
            [{"type": "prune", "method": "depth", "num_layers": 2}],
            {"calibration": CALIBRATION},
            ("drops 2 decoder layers", "has 2"),
        ),
        ([{**PRUNE, "sparsity": 0}], {}, ("sparsity", "greater than 0")),
        ([{**RTN, "weights": {"bits": 3}}], {}, ("bits",)),
        ([PRUNE] * 33, {}, ("recipe", "at most 32")),
        ([], {}, ("recipe", "at least 1")),
        ([PRUNE], {"evaluation": {"seq_len": 4}}, ("evaluation.seq_len", "greater than or equal to 8")),
        ([PRUNE], {"calibration": {**CALIBRATION, "samples": 10**9}}, ("calibration.samples", "less than")),
    ],
    ids=[
        "quantize-not-last",
        "needs-calibration",
        "fp8-gptq-needs-calibration",
        "awq-unknown-loss",
        "pattern-vs-sparsity",
        "no-sparsity",
        "structured-nothing",
        "depth-all-layers",
        "sparsity-zero",
        "bits-3",
        "too-many-steps",
        "empty-recipe",
        "eval-seq-len",
        "samples-huge",
    ],
)
def test_contradictory_or_out_of_range_recipes(client, model, dataset, recipe, extra, fragments) -> None:
    body = {"model_id": model["id"], "recipe": recipe}
    for section, values in extra.items():
        body[section] = {"dataset_id": dataset["id"], **values}
    response = client.post("/v1/jobs", json=body)
    assert response.status_code == 422, response.text
    for fragment in fragments:
        assert fragment in response.json()["detail"], response.json()["detail"]
