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
