"""AWQ (Lin et al., 2023) math: per-input-channel scales chosen on calibration data, weight-range clipping, and
folding a scale into the operation that produces a Linear's input. Pure tensor functions.

Candidate scales: plain s = mean|x|^α, α ∈ linspace(0, 1, n) (the default), or AutoAWQ's and llm-compressor's
"duo scaling" s = mean|x|^α / (mean|Ŵ|^(1−α) + 1e-4), Ŵ each weight divided by the largest |weight| of its
quantization group, with their α = i / n for i < n. On SmolLM2-135M int4 g64, duo (the references' default) and
"both" gave a worse artifact perplexity than plain (symmetric "both" aside, within the noise); see
docs/quantization.md.

Losses are output errors over the calibration inputs computed from G ∝ XᵀX: for weights W and scales s the
quantized layer computes (X / s) · Q(W · s)ᵀ, so the error is ΔGΔᵀ with Δ = Q(W · s) / s − W (no activations
are stored). The loss of a group of Linears that read the same input is the sum over the group. The scale
search takes its loss as a function: awq_block.py has the module-output one.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from worker.engine.quantize.quant_math import clipped_params, fake_quantize, grouped, rtn_params

CLIP_RATIOS = tuple(1.0 - i / 20 for i in range(10))  # shrink the weight range by up to 45%, as AWQ does


def candidate_scales(x_mean: torch.Tensor, alpha: float, w_mean: torch.Tensor | None = None) -> torch.Tensor:
    """Plain s = x_mean^α, or, given w_mean, duo s = x_mean^α / (w_mean^(1−α) + 1e-4); clamped at 1e-4, normalized
    so that max(s)·min(s) = 1, any non-finite entry set to 1 (as AutoAWQ and llm-compressor do)."""
    s = x_mean.float().pow(alpha)
    if w_mean is not None:
        s = s / (w_mean.float().pow(1 - alpha) + 1e-4)
    s = s.clamp(min=1e-4)
    s = s / (s.max() * s.min()).sqrt()
    return torch.where(torch.isfinite(s), s, torch.ones_like(s))


def weight_means(weights: list[torch.Tensor], group_size: int | None) -> torch.Tensor:
    """Per input channel, the mean over every output row of every weight of |w| / (max |w| of its group + 1e-6):
    how large a column is relative to the range its groups are quantized with."""
    magnitude = grouped(torch.cat([w.float() for w in weights]).abs(), group_size)
    return (magnitude / (magnitude.amax(dim=-1, keepdim=True) + 1e-6)).flatten(1).mean(dim=0)


def scale_candidates(grid: int, duo_scaling: bool | str) -> list[tuple[float, bool]]:
    """(α, duo) pairs tried. Plain: α ∈ linspace(0, 1, grid). Duo and "both" as llm-compressor: α = i / grid for
    i < grid; with "both", i / (grid // 2) for each of plain and duo, interleaved."""
    if duo_scaling == "both":
        n = grid // 2
        return [(i / n, duo) for i in range(n) for duo in (False, True)]
    if duo_scaling:
        return [(i / grid, True) for i in range(grid)]
    return [(alpha, False) for alpha in torch.linspace(0, 1, grid).tolist()]


def quadratic_error(delta: torch.Tensor, gram: torch.Tensor) -> float:
    """tr(Δ G Δᵀ): the squared output error of a weight change Δ over inputs with second moment G."""
    return float(((delta @ gram) * delta).sum())


def scaled_rtn(
    weight: torch.Tensor,
    s: torch.Tensor,
    bits: int,
    group_size: int | None,
    symmetric: bool,
    clip_gram: torch.Tensor | None = None,
) -> torch.Tensor:
    """Q(W · s) / s in float32: the weights the model computes with once s is folded and W · s rounded to
    nearest (the producer's ÷ s moved onto the consumer, so the same function of the unscaled input). Given
    the unscaled inputs' Gram matrix `clip_gram`, the ranges are clip-searched first, as the final rounding
    will be (the scaled inputs x / s have Gram G / (s sᵀ))."""
    scaled = weight.float() * s
    if clip_gram is None:
        scale, zero = rtn_params(scaled, bits, group_size, symmetric)
    else:
        scale, zero = clip_search(scaled, clip_gram / (s.unsqueeze(0) * s.unsqueeze(1)), bits, group_size, symmetric)
    return fake_quantize(scaled, scale, zero, bits, group_size) / s


def scaled_error(
    weights: list[torch.Tensor],
    gram: torch.Tensor,
    s: torch.Tensor,
    bits: int,
    group_size: int | None,
    symmetric: bool,
    clipped: bool = False,
) -> float:
    """Summed output error of quantizing each W · s (to nearest, or with `clipped` ranges) and undoing s on the
    input side."""
    clip_gram = gram if clipped else None
    return sum(
        quadratic_error(scaled_rtn(w, s, bits, group_size, symmetric, clip_gram) - w.float(), gram) for w in weights
    )


@torch.no_grad()
def search_scales(
    loss: Callable[[torch.Tensor], float],
    features: int,
    x_mean: torch.Tensor,
    w_mean: torch.Tensor,
    candidates: list[tuple[float, bool]],
    head_dim: int | None = None,
) -> tuple[torch.Tensor, float, bool, float, float]:
    """(best s, its α, whether it is a duo scale, its loss, the loss of plain rounding, s = 1) over the (α, duo)
    candidates; `loss` scores scales over the consumers' `features` input channels. `x_mean` and `w_mean` are
    over the producer's channels; the consumers may read them repeated per head (see expand_scales)."""
    plain = loss(torch.ones(features, device=x_mean.device))
    best = (None, 0.0, False, float("inf"))
    for alpha, duo in candidates:
        s = candidate_scales(x_mean, alpha, w_mean if duo else None)
        value = loss(expand_scales(s, features, head_dim))
        if value < best[3]:
            best = (s, alpha, duo, value)
    return *best, plain


def clip_search(
    weight: torch.Tensor, gram: torch.Tensor, bits: int, group_size: int | None, symmetric: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Scales (and zero points) whose range is shrunk, per output row and group, by the ratio in CLIP_RATIOS that
    gives the smallest output error of that group's partial sums (block-diagonal part of G)."""
    weight = weight.float()
    size = group_size or weight.shape[1]
    blocks = torch.stack([gram[i : i + size, i : i + size] for i in range(0, weight.shape[1], size)])
    best_error = best_scale = best_zero = None
    for ratio in CLIP_RATIOS:
        scale, zero = clipped_params(weight, bits, group_size, symmetric, ratio)
        delta = grouped(fake_quantize(weight, scale, zero, bits, group_size) - weight, group_size)
        error = torch.einsum("ogi,gij,ogj->og", delta, blocks, delta)
        if best_error is None:
            best_error, best_scale, best_zero = error, scale, zero
            continue
        better = error < best_error
        best_error = torch.where(better, error, best_error)
        best_scale = torch.where(better, scale, best_scale)
        if zero is not None:
            best_zero = torch.where(better, zero, best_zero)
    return best_scale, best_zero


@torch.no_grad()
def fold_scales_(
    producer: torch.nn.Module,
    consumers: list[torch.nn.Linear],
    s: torch.Tensor,
    head_dim: int | None = None,
    rows: slice | None = None,
) -> None:
    """Divide the producer's output channels (only `rows` of a fused projection: the value rows of qkv_proj,
    the up rows of gate_up_proj) by s and multiply the consumers' input columns by s (expanded from the
    producer's channels to the consumers' when heads repeat, as v_proj → o_proj under GQA). The model computes
    the same function afterwards, up to float rounding."""
    s = s.to(producer.weight.dtype)
    rows = rows or slice(None)
    if isinstance(producer, torch.nn.Linear):
        producer.weight[rows].div_(s.unsqueeze(1))  # a view: the rows change in place
    else:  # a norm: y = weight · normalized(x) (+ bias)
        producer.weight.div_(s)
    if getattr(producer, "bias", None) is not None:
        producer.bias[rows].div_(s)
    scale_inputs_(consumers, s, head_dim)


@torch.no_grad()
def scale_inputs_(consumers: list[torch.nn.Linear], s: torch.Tensor, head_dim: int | None = None) -> None:
    """Multiply the consumers' input columns by s (the consumer half of fold_scales_)."""
    for consumer in consumers:
        consumer.weight.mul_(expand_scales(s.to(consumer.weight.dtype), consumer.in_features, head_dim))


def per_producer_channel(values: torch.Tensor, features: int, head_dim: int | None = None) -> torch.Tensor:
    """The inverse of expand_scales for statistics: values over the consumers' input channels averaged over the
    copies of each of the producer's `features` channels (unchanged when there are no repeated heads)."""
    if values.numel() == features:
        return values
    return values.view(-1, values.numel() // features, head_dim).mean(dim=1).flatten()


def expand_scales(s: torch.Tensor, features: int, head_dim: int | None = None) -> torch.Tensor:
    """s over `features` channels: s itself, or, when the consumer reads `features / len(s)` copies of each
    key/value head (grouped-query attention, heads repeated with repeat_interleave), s repeated per head."""
    if s.numel() == features:
        return s
    repeats = features // s.numel()
    if head_dim is None:
        raise ValueError("expanding scales over repeated heads needs the head size")
    return s.view(-1, head_dim).repeat_interleave(repeats, dim=0).flatten()
