"""GPTQ (Frantar et al., 2022): quantize a Linear column by column, compensating each column's rounding error on
the columns not yet quantized, weighted by the inverse of the layer Hessian H = 2/n Σ x xᵀ.

Pure tensor functions. Numerics: everything in float32; dead input channels (H_ii = 0, the input was always
zero on the calibration data) get H_ii = 1 and zero weights, as in the reference code; dampening adds
`dampening · mean(diag H)` to the diagonal and is raised tenfold while the Cholesky factorization fails.

Act order (`desc_act`) visits columns by decreasing H_ii. Its groups are *static*: the scales of each
contiguous group of `group_size` input columns are computed from the weights before any update, so the
artifact stores groups in the natural column order and needs no g_idx (compressed-tensors actorder "static").
Without act order, a group's scales are computed when its first column is reached, from the updated weights.
With `clip_search`, each group's range is the shrink ratio that minimizes its Hessian-weighted rounding error
(`awq_math.clip_search`, AWQ's clipping with H as the Gram matrix) instead of the full min/max range.

Weights that are exactly zero (pruned) stay exactly zero: their quantized value is forced to 0 and the error of
doing so is compensated on the later columns like any rounding error, as SparseGPT's joint sparsify-and-quantize
sweep handles its fixed mask. Without this, the updates of earlier columns move pruned weights off zero and a
50% sparse (or 2:4) layer comes out a few percent short (or broken). Scales computed during the sweep see the
pruned entries as zeros. A dense weight holds no exact zeros and takes the unmasked path. (Leaving pruned
entries out of the updates instead, as llm-compressor's `preserve_sparsity_mask` does, gave a 10-20% larger
output error on 2:4 and 50% sparse int4 weights in a float32 check on correlated inputs.)

The same loop rounds to the FP8 E4M3 grid (`kind="float"`, per-channel scales absmax / 448 fixed up front), as
llm-compressor's GPTQ does for its FP8 schemes: the error of each rounded column is compensated the same way.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch

from worker.engine.execution import device_free_bytes
from worker.engine.quantize.awq_math import clip_search as searched_params
from worker.engine.quantize.quant_math import fake_quantize, fp8_fake_quantize, fp8_params, int_range, rtn_params
from worker.engine.steps import EngineError

MAX_DAMPENING_RETRIES = 6


def permuted_hessian(hessian: torch.Tensor, order: torch.Tensor | None, rows_per_chunk: int = 2048) -> torch.Tensor:
    """A float32 copy of H[order][:, order] (H itself when `order` is None), dead channels (H_ii = 0) set to 1.

    One copy of H is made: the rows are gathered into it, then each chunk of rows has its columns permuted
    through a chunk-sized buffer, so building it never holds two permuted copies beside H (the down_proj
    Hessian of a 32B model is 3 GB in float32)."""
    if order is None:
        out = hessian.float().clone()
    else:
        out = hessian.float().index_select(0, order)
        for start in range(0, out.shape[0], rows_per_chunk):
            rows = out[start : start + rows_per_chunk]
            rows.copy_(rows.index_select(1, order))
    diagonal = out.diagonal()
    diagonal.masked_fill_(diagonal == 0, 1.0)  # dead channels; their off-diagonal entries are zero already
    return out


def short_of_room(tensor: torch.Tensor, buffers: int) -> bool:
    """Whether the CUDA device holding `tensor` lacks room for `buffers` more tensors of its size: what this process
    may still allocate (`device_free_bytes`, a per-process cap included) plus what its allocator holds unused; never
    on the CPU."""
    if tensor.device.type != "cuda":
        return False
    device = tensor.device
    room = device_free_bytes(device) + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    return room < buffers * tensor.numel() * tensor.element_size()


@contextlib.contextmanager
def parked_in_host_memory(tensor: torch.Tensor, park: bool) -> Iterator[torch.Tensor]:
    """With `park`, `tensor`'s values wait in host memory for the block and its device memory is freed (whoever
    holds the tensor sees it empty until the block ends, then restored); yields where the values are."""
    if not park:
        yield tensor
        return
    host = tensor.detach().to("cpu", copy=True)
    device = tensor.device
    tensor.set_(torch.empty(0, dtype=tensor.dtype, device=device))
    try:
        yield host
    finally:
        tensor.set_(host.to(device))


def inverse_cholesky(
    hessian: torch.Tensor, dampening: float, rebuild: Callable[[], torch.Tensor] | None = None
) -> torch.Tensor:
    """Upper Cholesky factor of (H + λI)⁻¹, λ = dampening · mean(diag H), raising λ while H is not PD.

    Two H-sized buffers are used beside H: the damped matrix (reused for the inverse) and the factor. Given
    `rebuild` (which returns a fresh copy of H), H's own buffer is the damped matrix and is overwritten, so only
    one buffer is added; a retry after the inverse failed its factorization asks `rebuild` for H again."""
    diagonal = torch.diag(hessian).clone()
    mean_diag = diagonal.mean()
    for attempt in range(MAX_DAMPENING_RETRIES):
        if hessian is None:
            hessian = rebuild()
        damped = hessian if rebuild is not None else hessian.clone()
        damped.diagonal().copy_(diagonal + (dampening * 10**attempt) * mean_diag)
        lower, info = torch.linalg.cholesky_ex(damped)
        if info == 0:
            torch.cholesky_inverse(lower, out=damped)
            upper, info = torch.linalg.cholesky_ex(damped, upper=True, out=(lower, info))
            if info == 0:
                return upper
            if rebuild is not None:  # the damped buffer, H's own, now holds the inverse
                hessian = None
        del damped, lower
    raise EngineError(
        "numerical_error",
        "the layer Hessian is not positive definite even with strong dampening: use more calibration samples",
    )


@torch.no_grad()
def gptq_quantize(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    bits: int,
    group_size: int | None,
    symmetric: bool,
    block_size: int = 128,
    dampening: float = 0.01,
    act_order: bool = False,
    kind: str = "int",
    clip_search: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(fake-quantized weight, scale (out, groups), zero point or None), in the weight's natural column order.

    `kind` "int": integers of `bits` bits; "float": FP8 E4M3 with per-channel scales (bits 8, no groups).
    """
    if kind == "float" and (bits != 8 or group_size is not None or not symmetric or clip_search):
        raise ValueError("FP8 GPTQ takes bits 8, per-channel scales, symmetric weights and no clip search")
    # H is read, never written: the dead channels' fix and the permutation happen in the one copy that becomes
    # the damped matrix and its inverse (the clip search may read H itself: a dead channel's weights are zero,
    # so its row of H weighs nothing either way)
    diagonal = torch.diag(hessian).float()
    dead = diagonal == 0
    w = weight.float().clone()
    w[:, dead] = 0.0
    keep = sparsity_keep_mask(weight)
    columns = w.shape[1]
    static = act_order or group_size is None  # scales fixed up front from the (dead-zeroed) weights
    if kind == "float":
        scale, zero = fp8_params(w), None
    else:
        scale, zero = (None, None)
        if static:
            scale, zero = _group_params(w, hessian.float() if clip_search else None, bits, group_size, symmetric)
    order = torch.argsort(diagonal.masked_fill(dead, 1.0), descending=True) if act_order else torch.arange(columns)
    order = order.to(w.device)
    # the dynamic sweep reads columns on the host: one transfer, not one device sync per column
    order_host = None if static else order.tolist()

    permutation = order if act_order else None
    working = permuted_hessian(hessian, permutation)
    # the factorization adds two H-sized buffers; where the device has no room for them, H itself waits in host
    # memory meanwhile (at 32B, down_proj's H is 3 GB and an onloaded layer works in 16 GB)
    with parked_in_host_memory(hessian, short_of_room(hessian, buffers=3)) as values:

        def working_copy() -> torch.Tensor:
            return permuted_hessian(values.to(hessian.device), permutation)

        h_inv = inverse_cholesky(working, dampening, rebuild=working_copy)
        del working
    w = w[:, order]
    keep = None if keep is None else keep[:, order]
    quantized = torch.zeros_like(w)
    if not static:
        scale = torch.zeros(w.shape[0], columns // group_size, dtype=w.dtype, device=w.device)
        zero = None if symmetric else torch.zeros_like(scale)
    for start in range(0, columns, block_size):
        end = min(start + block_size, columns)
        block, h_block = w[:, start:end].clone(), h_inv[start:end, start:end]
        if static:
            block_keep = None if keep is None else keep[:, start:end]
            done, errors = _sweep_static(
                block, h_block, scale, zero, order[start:end], group_size, bits, kind, block_keep
            )
        else:
            errors = _sweep_dynamic(
                block,
                h_block,
                w[:, end:],
                scale,
                zero,
                order_host[start:end],
                group_size,
                bits,
                symmetric,
                hessian.float() if clip_search else None,
                None if keep is None else keep[:, start:],
            )
            done = block
        quantized[:, start:end] = done
        w[:, end:] -= errors @ h_inv[start:end, end:]
    restored = torch.empty_like(quantized)
    restored[:, order] = quantized
    return restored, scale, zero


def sparsity_keep_mask(weight: torch.Tensor) -> torch.Tensor | None:
    """Float mask, 0 where `weight` is exactly zero (pruned) and 1 elsewhere; None when nothing is zero."""
    keep = weight != 0
    return None if bool(keep.all()) else keep.float()


def _group_params(
    weight: torch.Tensor, hessian: torch.Tensor | None, bits: int, group_size: int | None, symmetric: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Scales and zero points of `weight`'s groups: full range, or, given H, range shrunk where H says it costs
    less."""
    if hessian is not None:
        return searched_params(weight, hessian, bits, group_size, symmetric)
    return rtn_params(weight, bits, group_size, symmetric)


def _sweep_static(
    block: torch.Tensor,
    h_block: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor | None,
    order: torch.Tensor,
    group_size: int | None,
    bits: int,
    kind: str,
    keep: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize a block's columns left to right with scales fixed up front, each column's error spread over the
    block's later columns; where `keep` is 0 the quantized value is 0. Returns (quantized block, scaled errors
    for the columns after the block). In-place ops on column views, no allocation and no host sync per column:
    this loop is GPTQ's hot path."""
    groups = torch.zeros_like(order) if group_size is None else order // group_size
    scales = scale[:, groups].unbind(1)
    zeros = zero[:, groups].unbind(1) if zero is not None else None
    qmin, qmax = int_range(bits)
    quantized, errors = torch.empty_like(block), torch.empty_like(block)
    q_columns, e_columns = quantized.unbind(1), errors.unbind(1)
    diagonal, h_rows = h_block.diagonal().unbind(0), h_block.unbind(0)
    keeps = None if keep is None else keep.unbind(1)
    for i, column in enumerate(block.unbind(1)):
        q = q_columns[i]
        if kind == "float":
            q.copy_(fp8_fake_quantize(column, scales[i]))
        else:  # the operations of quant_math.fake_quantize, in its order
            torch.div(column, scales[i], out=q)
            if zeros is not None:
                q.add_(zeros[i])
            q.clamp_(qmin, qmax).round_()
            if zeros is not None:
                q.sub_(zeros[i])
            q.mul_(scales[i])
        if keeps is not None:
            q.mul_(keeps[i])
        torch.sub(column, q, out=e_columns[i]).div_(diagonal[i])
        block[:, i:].addr_(e_columns[i], h_rows[i][i:], alpha=-1)
    return quantized, errors


def _sweep_dynamic(
    block: torch.Tensor,
    h_block: torch.Tensor,
    rest: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor | None,
    order: list[int],
    group_size: int,
    bits: int,
    symmetric: bool,
    hessian: torch.Tensor | None,
    keep: torch.Tensor | None = None,
) -> torch.Tensor:
    """As `_sweep_static`, but each group's scales are computed when its first column is reached, from the
    weights as updated so far (GPTQ without act order); range-searched against the group's block of
    `hessian` when one is given (columns in natural order here). `keep` covers the block and `rest`: where it
    is 0 the weight counts as zero for the scales and is quantized to 0."""
    errors = torch.zeros_like(block)
    for i, column in enumerate(order):
        group = column // group_size
        if column % group_size == 0:
            upcoming = torch.cat([block[:, i:], rest], dim=1)[:, :group_size]
            if keep is not None:
                upcoming = upcoming * keep[:, i : i + group_size]
            h_group = None if hessian is None else hessian[column : column + group_size, column : column + group_size]
            s, z = _group_params(upcoming, h_group, bits, None, symmetric)
            scale[:, group] = s[:, 0]
            if zero is not None:
                zero[:, group] = z[:, 0]
        z = None if zero is None else zero[:, group : group + 1]
        q = fake_quantize(block[:, i : i + 1], scale[:, group : group + 1], z, bits, None)[:, 0]
        if keep is not None:
            q = q * keep[:, i]
        error = (block[:, i] - q) / h_block[i, i]
        block[:, i:] -= error.unsqueeze(1) * h_block[i, i:].unsqueeze(0)
        block[:, i] = q
        errors[:, i] = error
    return errors
