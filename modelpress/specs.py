"""Job specs: the one JSON shape that is the request body, the task payload and the artifact manifest.

Imported by the API and the worker alike, so it must never import torch. Every recipe step is a frozen
pydantic model with `extra="forbid"` (a typo is a 422, never a silent default), selected by its
`type` and `method` pair. The engine looks up the code for a step by that same pair in its registry.
"""

from __future__ import annotations

import math
import re
from enum import StrEnum
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    TypeAdapter,
    field_validator,
)

DEFAULT_IGNORE = ("lm_head",)


class Spec(BaseModel):
    """Base for every spec: immutable, strict about unknown keys, no NaN or infinity."""

    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)


class StepType(StrEnum):
    prune = "prune"
    quantize = "quantize"
    distill = "distill"


class MagnitudeScope(StrEnum):
    """Where magnitude pruning compares weights: within each output row, a whole layer, or all layers."""

    row = "row"
    layer = "layer"
    global_ = "global"


class _TargetedStep(Spec):
    """Targets and exclusions by module name, as llm-compressor names them.

    A pattern is either an exact module name, a module class name such as `Linear`, or a regular
    expression after `re:` matched from the start of the module name (`re:.*mlp.*`).
    Embeddings are never targeted (they are not Linear layers); lm_head is ignored by default.
    """

    targets: tuple[str, ...] = Field(default=("Linear",), min_length=1)
    ignore: tuple[str, ...] = DEFAULT_IGNORE

    @field_validator("targets", "ignore")
    @classmethod
    def _patterns_compile(cls, patterns: tuple[str, ...]) -> tuple[str, ...]:
        for pattern in patterns:
            if not pattern:
                raise ValueError("empty module pattern; use a module name, a class name or 're:<regex>'")
            if pattern.startswith("re:"):
                try:
                    re.compile(pattern[3:])
                except re.error as exc:
                    raise ValueError(f"pattern {pattern!r} is not a valid regular expression: {exc}") from exc
        return patterns


class MagnitudePrune(_TargetedStep):
    """Unstructured pruning: zero the weights of smallest magnitude."""

    type: Literal[StepType.prune] = StepType.prune
    method: Literal["magnitude"] = "magnitude"
    sparsity: float = Field(gt=0.0, lt=1.0, description="fraction of weights set to zero, in (0, 1)")
    scope: MagnitudeScope = MagnitudeScope.row


class WeightQuantArgs(Spec):
    """How weights are quantized: bit width, group size (None = one scale per output channel), symmetry."""

    bits: Literal[4, 8] = 8
    group_size: Literal[32, 64, 128] | None = None
    symmetric: bool = True


class RTNQuantize(_TargetedStep):
    """Round-to-nearest weight-only quantization; stored as integers with their scales."""

    type: Literal[StepType.quantize] = StepType.quantize
    method: Literal["rtn"] = "rtn"
    weights: WeightQuantArgs = WeightQuantArgs()


def step_key(value: Any) -> str | None:
    """The registry key of a step, `<type>:<method>`, from a dict or a spec object."""
    if isinstance(value, dict):
        step_type, method = value.get("type"), value.get("method")
    else:
        step_type, method = getattr(value, "type", None), getattr(value, "method", None)
    if step_type is None or method is None:
        return None
    return f"{step_type}:{method}"


STEP_SPECS: dict[str, type[Spec]] = {
    "prune:magnitude": MagnitudePrune,
    "quantize:rtn": RTNQuantize,
}
"""Every recipe step the service accepts, by registry key. The engine registers code for each key."""

Step = Annotated[
    Annotated[MagnitudePrune, Tag("prune:magnitude")] | Annotated[RTNQuantize, Tag("quantize:rtn")],
    Discriminator(
        step_key,
        custom_error_type="unknown_step",
        custom_error_message="unknown recipe step: 'type' and 'method' must name one of "
        + ", ".join(sorted(STEP_SPECS)),
    ),
]


class CalibrationSpec(Spec):
    """Text the data-driven steps learn from: `samples` windows of `seq_len` tokens."""

    dataset_id: str
    samples: int = Field(default=64, ge=1, le=4096)
    seq_len: int = Field(default=512, ge=8, le=16384)


class EvaluationSpec(Spec):
    """Text the report measures perplexity on: non-overlapping windows of `seq_len` tokens."""

    dataset_id: str
    seq_len: int = Field(default=512, ge=8, le=16384)
    max_windows: int | None = Field(default=40, ge=1, le=100_000)


class JobSpec(Spec):
    """What a user asks for: a model, an ordered recipe, and optional calibration and evaluation text."""

    model_id: str
    recipe: list[Step] = Field(min_length=1, max_length=32)
    calibration: CalibrationSpec | None = None
    evaluation: EvaluationSpec | None = None

    def dataset_ids(self) -> set[str]:
        return {d.dataset_id for d in (self.calibration, self.evaluation) if d is not None}


def group_sizes(spec: JobSpec) -> set[int]:
    """Quantization group sizes a recipe asks for (the API checks they divide the model's widths)."""
    sizes = set()
    for step in spec.recipe:
        weights = getattr(step, "weights", None)
        if weights is not None and weights.group_size is not None:
            sizes.add(weights.group_size)
    return sizes


_step_adapter: TypeAdapter[Any] = TypeAdapter(Step)


def parse_step(data: dict[str, Any]) -> Spec:
    """Validate one step from plain JSON data."""
    return _step_adapter.validate_python(data)


def is_finite_json(value: Any) -> bool:
    """True when no float anywhere in a JSON value is NaN or infinite."""
    if isinstance(value, float):
        return math.isfinite(value)
    if isinstance(value, dict):
        return all(is_finite_json(v) for v in value.values())
    if isinstance(value, list | tuple):
        return all(is_finite_json(v) for v in value)
    return True
