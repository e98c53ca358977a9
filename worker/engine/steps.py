"""The contract between the pipeline and every recipe step: the registry, what a step receives and returns,
and the one error a user can act on.

Recipe steps are found by `<type>:<method>` (the keys of `modelpress.specs.STEP_SPECS`).

A step is a function `(model, context) -> StepResult`. It changes the model in place and reports what it did;
any state it needs (masks, scales) lives in its locals or in the result it returns.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch


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
    """What a step may use: its spec, calibration windows (or None), a progress callback, and for the steps that
    need them the device, tokenizer, datasets (id -> (path, format)), teacher snapshot and checkpoint folder."""

    spec: dict[str, Any]
    calibration: torch.Tensor | None
    report_progress: Callable[[float, str], None]
    device: torch.device | None = None
    tokenizer: Any | None = None
    datasets: dict[str, tuple[Path, str]] = field(default_factory=dict)
    teacher: torch.nn.Module | None = None  # distill: the model as uploaded or after `teacher_step` (a CPU copy)
    checkpoint_dir: Path | None = None  # distill: this step's folder, kept across retries of the job


@dataclass
class StepResult:
    layers: list[dict[str, Any]]
    summary: dict[str, Any]
    quantized: dict[str, QuantizedWeight] = field(default_factory=dict)  # layers this step quantized
    sparsified: list[str] = field(default_factory=list)  # layers this step pruned
    notes: list[str] = field(default_factory=list)


StepFn = Callable[[torch.nn.Module, StepContext], StepResult]

_STEPS: dict[str, StepFn] = {}


def register(step_type: str, method: str) -> Callable[[StepFn], StepFn]:
    """Register a step function under `<step_type>:<method>`."""
    key = f"{step_type}:{method}"

    def decorator(fn: StepFn) -> StepFn:
        if key in _STEPS:
            raise ValueError(f"recipe step {key!r} is registered twice")
        _STEPS[key] = fn
        return fn

    return decorator


def step_key(step: dict[str, Any]) -> str:
    return f"{step.get('type')}:{step.get('method')}"


def get_step(step: dict[str, Any]) -> StepFn:
    key = step_key(step)
    try:
        return _STEPS[key]
    except KeyError:
        known = ", ".join(sorted(_STEPS))
        raise EngineError("unknown_step", f"recipe step {key!r} is not known to this engine; known: {known}") from None


def registered_steps() -> list[str]:
    """The registry keys this engine can run (the step modules must be imported first: see __init__)."""
    return sorted(_STEPS)
