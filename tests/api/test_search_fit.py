"""A search's space is checked against the Linears read from the upload before it is queued (422 with the fix)."""

from __future__ import annotations

import pytest
from fastapi import HTTPException

from app.routes.searches import _check_space_fits
from modelpress.models import Model
from modelpress.specs import SearchSpec

LINEARS = {"model.layers.0.mlp.down_proj": [64, 96], "model.layers.0.self_attn.q_proj": [64, 96]}


def spec(**space) -> SearchSpec:
    return SearchSpec.model_validate(
        {
            "model_id": "m",
            "calibration": {"dataset_id": "c"},
            "evaluation": {"dataset_id": "e"},
            "budget": {"perplexity_increase": 0.01},
            "space": space,
        }
    )


def model() -> Model:
    return Model(details={"model_type": "llama", "linears": LINEARS})


def test_a_space_whose_group_sizes_fit_no_layer_is_refused():
    with pytest.raises(HTTPException) as refused:
        _check_space_fits(spec(formats=["int4_g64", "int4_g128"]), model())
    assert refused.value.status_code == 422 and "divides the input width of any targeted Linear" in refused.value.detail
    _check_space_fits(spec(formats=["int4_g32"]), model())  # 32 divides 96
    _check_space_fits(spec(formats=["int4_g64", "int8"]), model())  # int8 fits every layer


def test_targets_that_select_nothing_are_refused():
    with pytest.raises(HTTPException) as refused:
        _check_space_fits(spec(targets=["re:.*k_proj"]), model())
    assert "select none" in refused.value.detail


def test_a_pruning_pattern_that_does_not_divide_a_targeted_width_is_refused():
    odd = Model(details={"model_type": "llama", "linears": {**LINEARS, "model.layers.0.mlp.up_proj": [96, 90]}})
    pruning = [{"method": "wanda", "sparsity": 0.5}, {"method": "sparsegpt", "pattern": "2:4"}]
    with pytest.raises(HTTPException) as refused:
        _check_space_fits(spec(formats=["int8"], pruning=pruning), odd)
    detail = refused.value.detail
    assert refused.value.status_code == 422 and detail.startswith("space.pruning.1: prune:sparsegpt")
    assert "pattern 2:4 (M=4) does not divide the input width 90 of model.layers.0.mlp.up_proj" in detail
    _check_space_fits(spec(formats=["int8"], pruning=pruning[:1]), odd)  # a sparsity fraction fits any width
    _check_space_fits(spec(formats=["int8"], pruning=pruning, ignore=["re:.*up_proj"]), odd)  # or ignore it


@pytest.mark.usefixtures("nothing_stored")
@pytest.mark.parametrize(
    ("space", "fragments"),
    [
        ({"pruning": [{"method": "wanda"}]}, ("space.pruning.0", "give `sparsity`")),
        ({"pruning": [{"method": "wanda", "sparsity": 0.3, "pattern": "2:4"}]}, ("pattern 2:4 means sparsity 0.5",)),
        ({"pruning": [{"method": "structured", "sparsity": 0.5}]}, ("space.pruning.0.method", "'sparsegpt'")),
        ({"pruning": [{"method": "magnitude", "sparsity": 0.5}] * 2}, ("space.pruning", "once")),
        ({"methods": ["awq", "smoothquant"]}, ("space.methods.1", "'awq'")),
    ],
    ids=["no-sparsity", "pattern-vs-sparsity", "unknown-method", "twice", "unknown-rounding"],
)
def test_bad_search_spaces_are_422_with_what_to_fix(client, model, dataset, space, fragments) -> None:
    body = {
        "model_id": model["id"],
        "calibration": {"dataset_id": dataset["id"]},
        "evaluation": {"dataset_id": dataset["id"]},
        "budget": {"kl_divergence": 0.1},
        "space": space,
    }
    response = client.post("/v1/searches", json=body)
    assert response.status_code == 422, response.text
    for fragment in fragments:
        assert fragment in response.json()["detail"], response.json()["detail"]
