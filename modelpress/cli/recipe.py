"""Build a job body from a recipe file plus command-line options.

The file holds either a list of steps or a whole job body; options fill in or override the model and the
datasets. Only the options a user gave are sent, so the server's defaults stay the single source of defaults.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml


class RecipeError(ValueError):
    """A recipe file or option combination that cannot become a job body; the message says what to fix."""


def load_recipe_file(path: Path) -> dict[str, Any]:
    """Read YAML or JSON (by suffix; YAML otherwise, which also reads JSON) into a job body dict."""
    try:
        text = path.read_text()
    except OSError as exc:
        raise RecipeError(f"cannot read recipe file {path}: {exc.strerror or exc}") from exc
    try:
        data = json.loads(text) if path.suffix.lower() == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as exc:
        raise RecipeError(f"{path} is not valid {'JSON' if path.suffix.lower() == '.json' else 'YAML'}: {exc}") from exc
    if isinstance(data, list):
        return {"recipe": data}
    if isinstance(data, dict) and "recipe" in data:
        return dict(data)
    if isinstance(data, dict) and "type" in data:
        raise RecipeError(f"{path} holds a single step; write it as a list (`- type: ...`) or as {{recipe: [...]}}")
    raise RecipeError(f"{path} must hold a list of recipe steps or a job body with a 'recipe' list")


def _merge(body: dict[str, Any], section: str, dataset: str | None, options: dict[str, tuple[str, int | None]]) -> None:
    """Fill `body[section]` from options given as {field: (flag, value)}; a field without a dataset is an error."""
    given = {key: value for key, (_flag, value) in options.items() if value is not None}
    current = body.get(section)
    if dataset is not None:
        current = {**(current or {}), "dataset_id": dataset}
    if given:
        if current is None:
            names = ", ".join(options[key][0] for key in given)
            raise RecipeError(f"{names} needs --{section} DATASET (or a '{section}' section in the recipe file)")
        current = {**current, **given}
    if current is not None:
        body[section] = current


def build_job_body(
    recipe_file: Path,
    *,
    model: str | None = None,
    calibration: str | None = None,
    samples: int | None = None,
    seq_len: int | None = None,
    evaluation: str | None = None,
    eval_seq_len: int | None = None,
    max_windows: int | None = None,
) -> dict[str, Any]:
    """The JSON body for POST /v1/jobs (the server validates it fully against `modelpress.specs.JobSpec`)."""
    body = load_recipe_file(recipe_file)
    if model is not None:
        body["model_id"] = model
    if not body.get("model_id"):
        raise RecipeError("no model: pass --model ID (see `modelpress models list`) or set model_id in the file")
    _merge(body, "calibration", calibration, {"samples": ("--samples", samples), "seq_len": ("--seq-len", seq_len)})
    _merge(
        body,
        "evaluation",
        evaluation,
        {"seq_len": ("--eval-seq-len", eval_seq_len), "max_windows": ("--max-windows", max_windows)},
    )
    return body
