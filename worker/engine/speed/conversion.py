"""Preparing a model for the speed measurement: a copy in the serving dtype, its quantized and 2:4 Linears
swapped for kernel-backed modules (kernels.py), q/k/v and gate/up fused first where asked (fused_projections.py).

Kept apart from fast_inference.py, which only times the model it is given; the job report (evaluation.py)
prepares its model with this.
"""

from __future__ import annotations

import copy
import logging
from collections import Counter
from typing import Any

import torch

from worker.engine.speed.fused_projections import fuse_projections_
from worker.engine.speed.kernels import KernelUnavailable, kernel_linear
from worker.engine.steps import QuantizedWeight

log = logging.getLogger(__name__)


def speed_copy(model: torch.nn.Module, dtype: torch.dtype, keep: set[str] = frozenset()) -> torch.nn.Module:
    """A copy of `model` whose floating parameters are cast to `dtype`, except those of the Linears in `keep`,
    which the copy shares with `model` (unchanged) until `convert_for_speed_` replaces those Linears: so a
    float32 model and its quantized weights are never held twice. Buffers are copied as they are."""
    modules = dict(model.named_modules())
    uses: dict[int, int] = {}
    for _, param in model.named_parameters(remove_duplicate=False):
        uses[id(param)] = uses.get(id(param), 0) + 1
    shared = {
        id(param)
        for name in keep
        if isinstance(modules.get(name), torch.nn.Linear)
        for param in modules[name].parameters(recurse=False)
        if uses[id(param)] == 1  # a tied weight is used elsewhere too: cast it
    }
    memo: dict[int, Any] = {}
    for param in model.parameters():
        if id(param) in shared:
            memo[id(param)] = param
        elif param.is_floating_point():
            memo[id(param)] = torch.nn.Parameter(param.detach().to(dtype), requires_grad=False)
    return copy.deepcopy(model, memo)


def _cast_copy(linear: torch.nn.Module, dtype: torch.dtype | None) -> torch.nn.Module:
    """`linear` with its own parameters cast to `dtype` (hooks kept); the original is left untouched."""
    if dtype is None:
        return linear
    memo = {id(p): torch.nn.Parameter(p.detach().to(dtype), requires_grad=False) for p in linear.parameters()}
    return copy.deepcopy(linear, memo)


def convert_for_speed_(
    model: torch.nn.Module,
    quantized: dict[str, QuantizedWeight],
    sparse_24: set[str],
    device: torch.device | str,
    dtype: torch.dtype | None = None,
    fuse: bool = False,
) -> dict[str, str]:
    """Swap each quantized or 2:4-sparse Linear of `model` for its kernel-backed module, built on `device` and
    computing in `dtype` (default: the Linear's weight dtype); return {layer: kernel}. A layer no kernel fits
    stays a float Linear (cast to `dtype`) and maps to "unchanged: <reason>". A layer both quantized and sparse
    runs the quantized kernel (torch has no sparse low-bit matmul). The replaced Linears are not modified.

    With `fuse`, q/k/v and gate/up Linears are first fused (`fuse_projections_`, on copies of `quantized` and
    `sparse_24`, whose member names give way to the fused ones); each attention or MLP module it looked at then
    maps to "fused q/k/v", "fused gate/up" or "unchanged: <reason>". The fused weights are new tensors (float32
    ones, for quantized members shared with a float32 model, until their kernel modules replace them)."""
    device = torch.device(device)
    kernels: dict[str, str] = {}
    if fuse:
        quantized, sparse_24 = dict(quantized), set(sparse_24)
        kernels.update(fuse_projections_(model, quantized, sparse_24))
    modules = dict(model.named_modules())
    for name in sorted(set(quantized) | set(sparse_24)):
        linear = modules.get(name)
        if not isinstance(linear, torch.nn.Linear):
            kernels[name] = "unchanged: not an nn.Linear in this model"
            continue
        source = linear if linear.weight.device == device else copy.deepcopy(linear).to(device)
        try:
            replacement, kernels[name] = kernel_linear(source, quantized.get(name), name in sparse_24, dtype)
        except (KernelUnavailable, RuntimeError) as exc:
            kernels[name] = f"unchanged: {exc}"
            log.info("%s keeps a float Linear: %s", name, exc)
            replacement = _cast_copy(source, dtype if dtype != source.weight.dtype else None)
        parent, _, child = name.rpartition(".")
        setattr(modules[parent] if parent else model, child, replacement)
    return kernels


def kernel_counts(kernels: dict[str, str]) -> dict[str, int]:
    """How many layers run each kernel (each reason for an unchanged layer counted apart)."""
    return dict(Counter(kernels.values()))
