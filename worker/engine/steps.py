"""The contract between the pipeline and every recipe step: the registry, what a step receives and returns,
and the one error a user can act on.

Recipe steps are registered under their spec class (`modelpress.specs.STEP_CLASSES`) and named
`<type>_<method>`. A step is a function `(model, spec, context) -> StepResult` that receives its own validated
spec, so every default lives once, on the spec class. It changes the model in place and reports what it did;
any state it needs (masks, scales) lives in its locals or in the result it returns.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import torch
from pydantic import TypeAdapter, ValidationError

from modelpress.specs import Step, StepSpec


class EngineError(Exception):
    """A job failure with a stable machine-readable `code` and a message a person can act on."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message

    def to_dict(self) -> dict[str, str]:
        return {"code": self.code, "message": self.message}


@dataclass(frozen=True)
class QuantizedWeight:
    """What a quantize step decided for one Linear: its scales, zero points and scheme (export needs them)."""

    scale: torch.Tensor  # (out, groups) or (out, 1) for per-channel
    zero_point: torch.Tensor | None  # same shape, integer values; None when symmetric
    bits: int
    group_size: int | None
    symmetric: bool
    kind: str = "int"  # "int", or "float" for FP8 E4M3 weights
    activations: str | None = None  # dynamic per-token input quantization: None (weight-only), "int8" or "fp8"
    actorder: str | None = None  # "static" when GPTQ chose columns by activation order (no g_idx is stored)


@dataclass
class StepContext:
    """What a step may use besides its spec: calibration windows (or None), a progress callback, and for the steps
    that need them the device, tokenizer, datasets (id -> (path, format)), teacher snapshot and checkpoint folder."""

    calibration: torch.Tensor | None
    report_progress: Callable[[float, str], None]
    device: torch.device | None = None
    tokenizer: Any | None = None
    datasets: dict[str, tuple[Path, str]] = field(default_factory=dict)
    teacher: torch.nn.Module | None = None  # distill: the model as uploaded or after `teacher_step` (a CPU copy)
    checkpoint_dir: Path | None = None  # distill: this step's folder, kept across retries of the job
    on_checkpoint: Callable[[Path], None] | None = None  # told of each checkpoint file written (to copy it away)


@dataclass
class StepResult:
    layers: list[dict[str, Any]]
    summary: dict[str, Any]
    quantized: dict[str, QuantizedWeight] = field(default_factory=dict)  # layers this step quantized
    sparsified: list[str] = field(default_factory=list)  # layers this step pruned
    notes: list[str] = field(default_factory=list)


StepFn = Callable[[torch.nn.Module, Any, StepContext], StepResult]
F = TypeVar("F", bound=StepFn)

_STEPS: dict[type[StepSpec], StepFn] = {}
_STEP_ADAPTER: TypeAdapter[StepSpec] = TypeAdapter(Step)


def register(spec_class: type[StepSpec]) -> Callable[[F], F]:
    """Register a step function for the recipe steps of `spec_class` (it is called with such a spec)."""

    def decorator(fn: F) -> F:
        if spec_class in _STEPS:
            raise ValueError(f"recipe step {spec_class.key!r} is registered twice")
        _STEPS[spec_class] = fn
        return fn

    return decorator


def get_step(spec: StepSpec) -> StepFn:
    """The function registered for this spec's class; an EngineError for a step this engine does not know."""
    try:
        return _STEPS[type(spec)]
    except KeyError:
        known = ", ".join(registered_steps())
        raise EngineError(
            "unknown_step", f"recipe step {spec.key!r} is not known to this engine; known: {known}"
        ) from None


def run_step(model: torch.nn.Module, spec: StepSpec, context: StepContext) -> StepResult:
    """Run one recipe step on the model (the pipeline's call, and the one for scripts that run a single step)."""
    return get_step(spec)(model, spec, context)


def step_spec(data: dict[str, Any] | StepSpec) -> StepSpec:
    """A recipe step as its spec class, for callers that hold its JSON (scripts, tests): invalid JSON is an
    EngineError `bad_spec` that names the problem."""
    if isinstance(data, StepSpec):
        return data
    try:
        return _STEP_ADAPTER.validate_python(data)
    except ValidationError as exc:
        raise EngineError("bad_spec", f"invalid recipe step: {exc}") from exc


def registered_steps() -> list[str]:
    """The registry keys this engine can run (the step modules must be imported first: see __init__)."""
    return sorted(cls.key for cls in _STEPS)
