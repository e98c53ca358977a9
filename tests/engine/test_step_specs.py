"""Every spec class round-trips through JSON and has engine code; every step key the API accepts can run."""

from __future__ import annotations

import pytest
from pydantic import TypeAdapter

from modelpress.specs import STEP_CLASSES, STEP_SPECS, JobSpec, Step, StepSpec
from worker.engine import registered_steps
from worker.engine.steps import EngineError, get_step, step_spec

MINIMAL = {  # the fewest arguments each step needs to be valid
    "prune:magnitude": {"sparsity": 0.5},
    "prune:wanda": {"pattern": "2:4"},
    "prune:sparsegpt": {"sparsity": 0.25},
    "prune:structured": {"mlp_sparsity": 0.5},
    "prune:depth": {"num_layers": 1},
    "quantize:rtn": {},
    "quantize:gptq": {},
    "quantize:awq": {},
    "quantize:smoothquant": {},
    "quantize:fp8": {},
    "distill:kd": {"dataset_id": "d"},
}


def test_every_step_class_has_minimal_arguments_here() -> None:
    assert set(MINIMAL) == set(STEP_SPECS)


@pytest.mark.parametrize("cls", STEP_CLASSES, ids=lambda cls: cls.key)
def test_spec_round_trips_through_json_and_has_engine_code(cls: type[StepSpec]) -> None:
    spec = cls(**MINIMAL[cls.key])
    data = spec.model_dump(mode="json")
    assert (data["type"], data["method"]) == tuple(cls.key.split(":"))
    again = TypeAdapter(Step).validate_json(spec.model_dump_json())
    assert type(again) is cls and again == spec
    assert cls.model_validate(data) == spec
    assert step_spec(data) == spec
    assert callable(get_step(spec))
    body = {"model_id": "m", "recipe": [data], "calibration": {"dataset_id": "c"}}
    job = JobSpec.model_validate(body)
    assert JobSpec.model_validate(job.model_dump(mode="json")) == job and job.recipe[0] == spec


def test_every_accepted_step_is_registered_in_the_engine() -> None:
    assert registered_steps() == sorted(STEP_SPECS)


def test_step_json_that_does_not_validate_is_a_bad_spec() -> None:
    with pytest.raises(EngineError) as info:
        step_spec({"type": "quantize", "method": "rtn", "weights": {"bits": 3}})
    assert info.value.code == "bad_spec" and "bits" in info.value.message
