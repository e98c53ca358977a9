"""Magnitude pruning math: keep-masks that zero exactly round(sparsity * n) weights of smallest |w|.

Counts are exact even with ties: the pruned positions are chosen by index (topk), or, for the global scope,
everything strictly under the k-th smallest magnitude plus just enough of the ties at it, in model order.
"""

from __future__ import annotations

import torch


def prune_count(numel: int, sparsity: float) -> int:
    """How many of `numel` weights a sparsity removes."""
    return int(round(sparsity * numel))


def smallest_mask(magnitudes: torch.Tensor, count: int) -> torch.Tensor:
    """Keep-mask (bool, same shape) of a 1-D or 2-D tensor with the `count` smallest entries of each row
    (or of the vector) set False."""
    keep = torch.ones_like(magnitudes, dtype=torch.bool)
    if count == 0:
        return keep
    index = magnitudes.topk(count, dim=-1, largest=False, sorted=False).indices
    return keep.scatter_(-1, index, False)


def row_mask(weight: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Per output row: drop round(sparsity * in_features) smallest |w| of every row."""
    return smallest_mask(weight.abs(), prune_count(weight.shape[1], sparsity))


def layer_mask(weight: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Per matrix: drop round(sparsity * numel) smallest |w| of the whole weight."""
    flat = weight.abs().flatten()
    return smallest_mask(flat, prune_count(flat.numel(), sparsity)).view_as(weight)


def global_masks(weights: list[torch.Tensor], sparsity: float) -> list[torch.Tensor]:
    """Across all weights together: drop round(sparsity * total) smallest |w|, one threshold for all layers."""
    total = sum(w.numel() for w in weights)
    count = prune_count(total, sparsity)
    if count == 0:
        return [torch.ones_like(w, dtype=torch.bool) for w in weights]
    threshold = torch.cat([w.detach().abs().flatten().float().cpu() for w in weights]).kthvalue(count).values
    below = [w.abs() < threshold.to(w.device) for w in weights]
    ties_left = count - sum(int(b.sum()) for b in below)
    masks = []
    for weight, under in zip(weights, below, strict=True):
        tie = (weight.abs() == threshold.to(weight.device)).flatten()
        take = min(ties_left, int(tie.sum()))
        drop = under.flatten().clone()
        drop[tie.nonzero().flatten()[:take]] = True
        ties_left -= take
        masks.append(~drop.view_as(weight))
    return masks


def sparsity_of(weight: torch.Tensor) -> float:
    """Fraction of exact zeros."""
    return float((weight == 0).sum()) / weight.numel()


def nm_mask(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """N:M keep-mask of a 2-D score matrix: in every M consecutive inputs of each row, the N highest scores stay.

    The input width must be a multiple of M (hardware N:M kernels require it too)."""
    rows, columns = scores.shape
    if columns % m:
        raise ValueError(f"{columns} input features are not a multiple of M={m}")
    groups = scores.reshape(rows, columns // m, m)
    keep = torch.zeros_like(groups, dtype=torch.bool)
    keep.scatter_(-1, groups.topk(n, dim=-1).indices, True)
    return keep.reshape(rows, columns)


def score_mask(scores: torch.Tensor, sparsity: float | None, pattern: tuple[int, int] | None) -> torch.Tensor:
    """Keep-mask from importance scores: N:M when `pattern` is given, else the lowest `sparsity` of each row."""
    if pattern is not None:
        return nm_mask(scores, *pattern)
    return smallest_mask(scores, prune_count(scores.shape[1], float(sparsity)))
