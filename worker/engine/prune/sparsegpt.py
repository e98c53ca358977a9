"""`prune:sparsegpt` (Frantar & Alistarh, 2023): OBS pruning with weight reconstruction from the Hessian of
the layer's calibration inputs, column block by column block (the reference implementation's algorithm).

Numerics: the Hessian is accumulated in float32, dampened by a fraction of its mean diagonal, inverted via
Cholesky in float64, and the weights are updated in float32. The mask of a block is chosen when the block
starts (unstructured: the lowest w²/[H⁻¹]²_jj of each row, with cumulative rounding so every row reaches
exactly round(sparsity · in_features)); for N:M, each group of M columns is chosen as the sweep reaches it.
"""

from __future__ import annotations

import torch

from modelpress.specs import SparseGPTPrune
from worker.engine.calibrate.layerwise import HessianAccumulator
from worker.engine.prune.masks import prune_count
from worker.engine.prune.sequential import prune_sequentially
from worker.engine.steps import EngineError, StepContext, StepResult, register


def inverse_hessian_factor(hessian: torch.Tensor, dampening: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Upper Cholesky factor of the dampened H⁻¹ (float32) and the mask of dead inputs (zero diagonal)."""
    h = hessian.to(torch.float64, copy=True)
    dead = h.diagonal() == 0
    h[dead, dead] = 1.0
    h.diagonal().add_(dampening * h.diagonal().mean())
    try:
        inverse = torch.cholesky_inverse(torch.linalg.cholesky(h))
        del h
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
def sweep_(
    w: torch.Tensor, factor: torch.Tensor, sparsity: float, pattern: tuple[int, int] | None, block_size: int
) -> torch.Tensor:
    """Prune float32 `w` (out, in) in place, column by column with OBS updates from the upper factor of H⁻¹;
    return each row's reconstruction loss Σ (w − q)² / [H⁻¹]_jj / 2.

    Per column three small kernels and no host sync: error = w_i · pruned_i / d_i, the rank-1 update of the
    block's later columns, w_i · kept_i. The masks (and 1/d) of a block, or of an N:M group, are set when the
    sweep reaches it; the later blocks are updated once per block by a matrix product."""
    if pattern is not None:
        block_size = max(pattern[1], block_size - block_size % pattern[1])
    loss = torch.zeros(w.shape[0], dtype=w.dtype, device=w.device)
    for start in range(0, w.shape[1], block_size):
        end = min(start + block_size, w.shape[1])
        block, inverse = w[:, start:end].clone(), factor[start:end, start:end]
        d = inverse.diagonal()
        count = 0 if pattern is not None else prune_count(end, sparsity) - prune_count(start, sparsity)
        prune = _block_mask(block, d, count)
        ratio, keep = prune / d, (~prune).to(w.dtype)  # 1/d where pruned, 0 where kept
        errors = torch.empty_like(block)
        # per-column views made once per block (indexing per column costs more than the kernels it feeds)
        w_col, ratio_col, keep_col, error_col = (t.unbind(1) for t in (block, ratio, keep, errors))
        h_row = inverse.unbind(0)  # upper triangular: zero left of the diagonal, so updating the whole block
        for i in range(end - start):  # changes only the columns from i on, and column i is then set by `keep`
            if pattern is not None and i % pattern[1] == 0:
                group = slice(i, i + pattern[1])
                chosen = _block_mask(block[:, group], d[group], pattern[1] - pattern[0])
                ratio[:, group], keep[:, group] = chosen / d[group], ~chosen
            torch.mul(w_col[i], ratio_col[i], out=error_col[i])
            block.addr_(error_col[i], h_row[i], alpha=-1)
            w_col[i].mul_(keep_col[i])
        w[:, start:end] = block
        w[:, end:].addmm_(errors, factor[start:end, end:], alpha=-1)
        loss += errors.square().sum(dim=1)
    return loss / 2


@torch.no_grad()
def sparsegpt_prune_shared_(
    weights: list[torch.Tensor],
    hessian: torch.Tensor,
    sparsity: float,
    pattern: tuple[int, int] | None = None,
    block_size: int = 128,
    dampening: float = 0.01,
) -> list[float]:
    """Prune weights that read the same inputs (one Hessian: q/k/v, gate/up) in place; return each one's loss.

    SparseGPT treats rows independently (same H⁻¹, per-row masks), so the weights are pruned as one stacked
    matrix: exactly what pruning each alone gives, with one factorization and one column sweep."""
    w = torch.cat([weight.detach().float() for weight in weights])
    factor, dead = inverse_hessian_factor(hessian.to(w.device), dampening)
    w[:, dead] = 0
    row_loss = sweep_(w, factor, sparsity, pattern, block_size)
    sizes = [weight.shape[0] for weight in weights]
    for weight, part in zip(weights, w.split(sizes), strict=True):
        weight.copy_(part.to(weight.dtype))
    return [float(part.sum()) for part in row_loss.split(sizes)]


def sparsegpt_prune_(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    sparsity: float,
    pattern: tuple[int, int] | None = None,
    block_size: int = 128,
    dampening: float = 0.01,
) -> float:
    """Prune `weight` (out, in) in place; return the reconstruction loss Σ (w − q)² / [H⁻¹]_jj / 2."""
    return sparsegpt_prune_shared_([weight], hessian, sparsity, pattern, block_size, dampening)[0]


@register(SparseGPTPrune)
def prune_sparsegpt(model: torch.nn.Module, spec: SparseGPTPrune, context: StepContext) -> StepResult:
    block_size, dampening = spec.block_size, spec.dampening

    def prune_shared_(linears: list[torch.nn.Linear], stat: HessianAccumulator, sparsity, pattern) -> list[dict]:
        weights = [linear.weight for linear in linears]
        losses = sparsegpt_prune_shared_(weights, stat.hessian, sparsity, pattern, block_size, dampening)
        return [{"tokens": stat.count, "reconstruction_loss": loss} for loss in losses]

    return prune_sequentially(
        model,
        spec,
        context,
        lambda linear: HessianAccumulator(linear.in_features, linear.weight.device),
        prune_shared_=prune_shared_,
        damage_inputs=lambda stat: {"gram": stat.hessian},
    )
