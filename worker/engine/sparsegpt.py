"""`prune:sparsegpt` (Frantar & Alistarh, 2023): OBS pruning with weight reconstruction from the Hessian of
the layer's calibration inputs, column block by column block (the reference implementation's algorithm).

Numerics: the Hessian is accumulated in float32, dampened by a fraction of its mean diagonal, inverted via
Cholesky in float64, and the weights are updated in float32. The mask of a block is chosen when the block
starts (unstructured: the lowest w²/[H⁻¹]²_jj of each row, with cumulative rounding so every row reaches
exactly round(sparsity · in_features)); for N:M, each group of M columns is chosen as the sweep reaches it.
"""

from __future__ import annotations

from typing import Any

import torch

from worker.engine.calibration import HessianAccumulator
from worker.engine.errors import EngineError
from worker.engine.pruning_math import prune_count
from worker.engine.pruning_sequential import prune_sequentially
from worker.engine.registry import StepContext, StepResult, register


def inverse_hessian_factor(hessian: torch.Tensor, dampening: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Upper Cholesky factor of the dampened H⁻¹ (float32) and the mask of dead inputs (zero diagonal)."""
    h = hessian.double().clone()
    dead = h.diagonal() == 0
    h[dead, dead] = 1.0
    h.diagonal().add_(dampening * h.diagonal().mean())
    try:
        inverse = torch.cholesky_inverse(torch.linalg.cholesky(h))
        factor = torch.linalg.cholesky(inverse, upper=True)
    except torch.linalg.LinAlgError as exc:
        message = f"the layer Hessian is not positive definite ({exc}): raise dampening"
        raise EngineError("numerical_error", message) from exc
    return factor.float(), dead


def _block_mask(w: torch.Tensor, d: torch.Tensor, count: int) -> torch.Tensor:
    """Prune-mask (True = prune) of a block: the `count` lowest w²/d² of every row."""
    prune = torch.zeros_like(w, dtype=torch.bool)
    if count:
        scores = w.square() / d.square().unsqueeze(0)
        prune.scatter_(1, scores.topk(count, dim=1, largest=False).indices, True)
    return prune


@torch.no_grad()
def sparsegpt_prune_(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    sparsity: float,
    pattern: tuple[int, int] | None = None,
    block_size: int = 128,
    dampening: float = 0.01,
) -> float:
    """Prune `weight` (out, in) in place; return the reconstruction loss Σ (w − q)² / [H⁻¹]_jj / 2."""
    w = weight.detach().float().clone()
    factor, dead = inverse_hessian_factor(hessian.to(w.device), dampening)
    w[:, dead] = 0
    columns = w.shape[1]
    if pattern is not None:
        block_size = max(pattern[1], block_size - block_size % pattern[1])
    loss = torch.zeros((), device=w.device)
    for start in range(0, columns, block_size):
        end = min(start + block_size, columns)
        block, inverse = w[:, start:end].clone(), factor[start:end, start:end]
        errors = torch.zeros_like(block)
        d = inverse.diagonal()
        if pattern is None:
            count = prune_count(end, sparsity) - prune_count(start, sparsity)
            prune = _block_mask(block, d, count)
        else:
            prune = torch.zeros_like(block, dtype=torch.bool)
        for i in range(end - start):
            if pattern is not None and i % pattern[1] == 0:
                group = slice(i, i + pattern[1])
                prune[:, group] = _block_mask(block[:, group], d[group], pattern[1] - pattern[0])
            column = block[:, i]
            kept = torch.where(prune[:, i], torch.zeros_like(column), column)
            error = (column - kept) / d[i]
            loss += error.square().sum() / 2
            block[:, i:] -= error.unsqueeze(1) * inverse[i, i:].unsqueeze(0)
            block[:, i] = kept
            errors[:, i] = error
        w[:, start:end] = block
        w[:, end:] -= errors @ factor[start:end, end:]
    weight.copy_(w.to(weight.dtype))
    return float(loss)


@register("prune", "sparsegpt")
def sparsegpt_prune(model: torch.nn.Module, context: StepContext) -> StepResult:
    block_size = int(context.spec.get("block_size", 128))
    dampening = float(context.spec.get("dampening", 0.01))

    def prune_linear_(linear: torch.nn.Linear, stat: HessianAccumulator, sparsity, pattern) -> dict[str, Any]:
        loss = sparsegpt_prune_(linear.weight, stat.hessian, sparsity, pattern, block_size, dampening)
        return {"tokens": stat.count, "reconstruction_loss": loss}

    return prune_sequentially(
        model, context, lambda linear: HessianAccumulator(linear.in_features, linear.weight.device), prune_linear_
    )
