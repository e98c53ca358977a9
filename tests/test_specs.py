"""The spec classes carry what the service needs to know about each step, and `check_fit` checks a recipe against
a model's Linear layers (pure Python: the API runs it on inspected shapes, the engine on the loaded model)."""

from __future__ import annotations

import re

import pytest
from pydantic import ValidationError

from modelpress.specs import (
    NEEDS_CALIBRATION,
    STEP_CLASSES,
    STEP_SPECS,
    FP8Quantize,
    GPTQQuantize,
    JobSpec,
    KnowledgeDistill,
    MagnitudePrune,
    RTNQuantize,
    StepSpec,
    WandaPrune,
    check_fit,
    step_key,
)

# a two-layer Llama: attention reads 64 features, the MLP's down_proj reads 96
LINEARS = {
    **{f"model.layers.{i}.self_attn.{p}_proj": (64, 64) for i in range(2) for p in "qkvo"},
    **{f"model.layers.{i}.mlp.{p}_proj": (96, 64) for i in range(2) for p in ("gate", "up")},
    **{f"model.layers.{i}.mlp.down_proj": (64, 96) for i in range(2)},
    "lm_head": (1000, 64),
}


def job(*recipe: dict, calibration: bool = False) -> JobSpec:
    body = {"model_id": "m", "recipe": list(recipe)}
    if calibration:
        body["calibration"] = {"dataset_id": "d"}
    return JobSpec.model_validate(body)


def test_keys_come_from_the_type_and_method_literals() -> None:
    assert set(STEP_SPECS) == {f"{cls.model_fields['type'].default}:{cls.model_fields['method'].default}"
                               for cls in STEP_CLASSES}  # fmt: skip
    assert GPTQQuantize.key == "quantize:gptq" and KnowledgeDistill.key == "distill:kd"
    assert all(STEP_SPECS[cls.key] is cls for cls in STEP_CLASSES)
    assert step_key({"type": "distill"}) == "distill:kd" and step_key(MagnitudePrune(sparsity=0.5)) == "prune:magnitude"


def test_calibration_need_and_recipe_place_are_read_from_the_class() -> None:
    assert "prune:wanda" in NEEDS_CALIBRATION and "prune:magnitude" not in NEEDS_CALIBRATION
    assert WandaPrune(sparsity=0.5).needs_calibration and not MagnitudePrune(sparsity=0.5).needs_calibration
    assert FP8Quantize(gptq=True).needs_calibration and not FP8Quantize().needs_calibration
    assert {cls.key for cls in STEP_CLASSES if cls.final} == {k for k in STEP_SPECS if k.startswith("quantize:")}
    with pytest.raises(ValidationError, match="learns from calibration text"):
        job({"type": "quantize", "method": "fp8", "gptq": True})
    with pytest.raises(ValidationError, match="quantization must be the last step"):
        job({"type": "quantize", "method": "fp8"}, {"type": "prune", "method": "magnitude", "sparsity": 0.5})


def test_a_fitting_recipe_has_no_problems() -> None:
    recipe = job(
        {"type": "prune", "method": "magnitude", "pattern": "2:4"},
        {"type": "quantize", "method": "rtn", "weights": {"bits": 4, "group_size": 32}},
    )
    assert check_fit(recipe, LINEARS) == []


def test_targets_that_match_nothing_name_the_step_patterns_and_layers() -> None:
    problems = check_fit(
        job({"type": "prune", "method": "magnitude", "sparsity": 0.5, "targets": ["re:.*fc1"]}), LINEARS
    )
    assert [p.code for p in problems] == ["no_targets"]
    assert "recipe.0 (prune:magnitude) matched no Linear layer" in problems[0].message
    assert "re:.*fc1" in problems[0].message and "model.layers.0.self_attn.q_proj" in problems[0].message
    # ignore wins over targets; class-name patterns read the given class names
    only_head = RTNQuantize(targets=["lm_head"])
    assert [p.code for p in check_fit(only_head, LINEARS)] == ["no_targets"]
    assert check_fit(RTNQuantize(targets=["lm_head"], ignore=[]), LINEARS) == []
    head_class = RTNQuantize(targets=["QLinear"], ignore=[])
    assert [p.code for p in check_fit(head_class, LINEARS)] == ["no_targets"]
    assert check_fit(head_class, LINEARS, {"lm_head": "QLinear"}) == []


def test_group_size_must_divide_the_targeted_widths_only() -> None:
    g64 = {"type": "quantize", "method": "rtn", "weights": {"bits": 4, "group_size": 64}}
    problems = check_fit(job(g64), LINEARS)
    assert [p.code for p in problems] == ["bad_group_size"]
    message = problems[0].message
    assert "group_size 64 does not divide the input width 96 of model.layers.0.mlp.down_proj" in message
    assert "1 more targeted Linear" in message
    assert check_fit(job({**g64, "ignore": ["lm_head", "re:.*down_proj"]}), LINEARS) == []
    assert check_fit(job({**g64, "weights": {"bits": 4, "group_size": 32}}), LINEARS) == []


def test_an_nm_pattern_must_fit_the_targeted_widths() -> None:
    widths = {"a": (8, 64), "b": (8, 36)}
    problems = check_fit(MagnitudePrune(pattern="4:8"), widths)
    assert [p.code for p in problems] == ["bad_spec"] and "pattern 4:8 (M=8)" in problems[0].message
    assert "input width 36 of b" in problems[0].message
    assert check_fit(MagnitudePrune(pattern="2:4"), widths) == []
    assert check_fit(MagnitudePrune(pattern="4:8", ignore=["b"]), widths) == []
    assert check_fit(MagnitudePrune(sparsity=0.5), widths) == []


def test_steps_without_targets_are_not_checked() -> None:
    recipe = job({"type": "prune", "method": "depth", "num_layers": 1}, calibration=True)
    assert check_fit(recipe, {}) == []
    assert check_fit(RTNQuantize(), {}) != []  # a targeted step with no Linear at all is refused
    assert all(issubclass(cls, StepSpec) for cls in STEP_CLASSES)


def evaluation_with(*tasks: dict) -> dict:
    return {
        "model_id": "m",
        "recipe": [{"type": "prune", "method": "magnitude", "sparsity": 0.5}],
        "evaluation": {"dataset_id": "text", "tasks": list(tasks)},
    }


def test_tasks_are_uploaded_or_named_and_their_datasets_are_referenced() -> None:
    spec = JobSpec.model_validate(evaluation_with({"dataset_id": "cloze", "limit": 50}, {"name": "hellaswag"}))
    assert spec.dataset_references() == [("evaluation.dataset_id", "text"), ("evaluation.tasks.0.dataset_id", "cloze")]
    assert spec.task_dataset_references() == [("evaluation.tasks.0.dataset_id", "cloze")]
    assert [task.label for task in spec.evaluation.tasks] == ["dataset:cloze", "hellaswag"]


@pytest.mark.parametrize(
    ("tasks", "fragment"),
    [
        ([{"dataset_id": "a", "name": "hellaswag"}], "not both and not neither"),
        ([{"limit": 5}], "not both and not neither"),
        ([{"name": "hellaswag"}, {"name": "hellaswag"}], "names hellaswag more than once"),
        ([{"name": "../etc"}], "String should match pattern"),
        ([{"name": "arc_easy", "limit": 0}], "greater than or equal to 1"),
        ([{"name": "arc_easy", "num_fewshot": 5}], "Extra inputs are not permitted"),
    ],
)
def test_bad_tasks_are_refused(tasks: list[dict], fragment: str) -> None:
    with pytest.raises(ValidationError, match=re.escape(fragment)):
        JobSpec.model_validate(evaluation_with(*tasks))
