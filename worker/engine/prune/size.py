"""Model size before and after a pruning step that removes parameters (structured, depth), and the summary
entries both report from it, so the two steps describe what they removed the same way."""

from __future__ import annotations

from typing import Any, NamedTuple

import torch


def parameter_count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def parameter_bytes(model: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in {id(p): p for p in model.parameters()}.values())


class ModelSize(NamedTuple):
    parameters: int
    bytes: int


def model_size(model: torch.nn.Module) -> ModelSize:
    """Parameters and their bytes, each tied parameter counted once."""
    return ModelSize(parameter_count(model), parameter_bytes(model))


def size_summary(before: ModelSize, model: torch.nn.Module, calibration: torch.Tensor) -> dict[str, Any]:
    """Parameters and bytes before and after, the fraction removed of each, and the calibration windows used."""
    after = model_size(model)
    return {
        "parameters_before": before.parameters,
        "parameters_after": after.parameters,
        "parameter_reduction": 1 - after.parameters / before.parameters,
        "bytes_before": before.bytes,
        "bytes_after": after.bytes,
        "size_reduction": 1 - after.bytes / before.bytes,
        "calibration_windows": int(calibration.shape[0]),
    }
