"""Recipe files and submit options become the job body; bad combinations are refused before any request."""

from __future__ import annotations

from pathlib import Path

import pytest

from modelpress.cli.recipe import RecipeError, build_job_body
from modelpress.specs import JobSpec


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_a_full_body_in_yaml_is_a_valid_job_spec(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "job.yml",
        "model_id: m1\nrecipe:\n  - {type: prune, method: magnitude, sparsity: 0.5}\n"
        "  - {type: quantize, method: rtn, weights: {bits: 8}}\ncalibration: {dataset_id: d1}\n",
    )
    body = build_job_body(path, samples=16, seq_len=128)
    spec = JobSpec.model_validate(body)
    assert spec.calibration.samples == 16 and spec.calibration.seq_len == 128
    assert len(spec.recipe) == 2


def test_options_override_the_file(tmp_path: Path) -> None:
    path = write(tmp_path, "job.json", '{"model_id": "m1", "recipe": [], "evaluation": {"dataset_id": "d1"}}')
    body = build_job_body(path, model="m2", evaluation="d2", max_windows=4)
    assert body["model_id"] == "m2"
    assert body["evaluation"] == {"dataset_id": "d2", "max_windows": 4}


@pytest.mark.parametrize(
    ("text", "kwargs", "message"),
    [
        ("- {type: prune}", {}, "no model"),
        ("- {type: prune}", {"model": "m", "samples": 4}, "--samples needs --calibration"),
        ("- {type: prune}", {"model": "m", "eval_seq_len": 4}, "--eval-seq-len needs --evaluation"),
        ("{type: prune, method: magnitude}", {"model": "m"}, "single step"),
        ("42", {"model": "m"}, "list of recipe steps"),
        ("- [unclosed", {"model": "m"}, "not valid YAML"),
    ],
)
def test_mistakes_say_what_to_fix(tmp_path: Path, text: str, kwargs: dict, message: str) -> None:
    with pytest.raises(RecipeError, match=message):
        build_job_body(write(tmp_path, "r.yaml", text), **kwargs)


def test_a_missing_file_is_a_recipe_error(tmp_path: Path) -> None:
    with pytest.raises(RecipeError, match="cannot read"):
        build_job_body(tmp_path / "absent.yaml", model="m")
