"""GPTQ (Frantar et al., 2022): quantize a Linear column by column, compensating each column's rounding error on
the columns not yet quantized, weighted by the inverse of the layer Hessian H = 2/n Σ x xᵀ.

Pure tensor functions. Numerics: everything in float32; dead input channels (H_ii = 0, the input was always
zero on the calibration data) get H_ii = 1 and zero weights, as in the reference code; dampening adds
`dampening · mean(diag H)` to the diagonal and is raised tenfold while the Cholesky factorization fails.

Act order (`desc_act`) visits columns by decreasing H_ii. Its groups are *static*: the scales of each
contiguous group of `group_size` input columns are computed from the weights before any update, so the
artifact stores groups in the natural column order and needs no g_idx (compressed-tensors actorder "static").
Without act order, a group's scales are computed when its first column is reached, from the updated weights.

The same loop rounds to the FP8 E4M3 grid (`kind="float"`, per-channel scales absmax / 448 fixed up front), as
llm-compressor's GPTQ does for its FP8 schemes: the error of each rounded column is compensated the same way.
"""

from __future__ import annotations

import torch

from worker.engine.errors import EngineError
from worker.engine.quant_math import fake_quantize, fp8_fake_quantize, fp8_params, rtn_params

MAX_DAMPENING_RETRIES = 6


def prepare_hessian(hessian: torch.Tensor, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(H with dead channels set to 1, weight with dead columns zeroed, dead mask), all float32 copies."""
    hessian, weight = hessian.float().clone(), weight.float().clone()
    dead = torch.diag(hessian) == 0
    hessian[dead, dead] = 1.0
    weight[:, dead] = 0.0
    return hessian, weight, dead


def inverse_cholesky(hessian: torch.Tensor, dampening: float) -> torch.Tensor:
    """Upper Cholesky factor of (H + λI)⁻¹, λ = dampening · mean(diag H), raising λ while H is not PD."""
    mean_diag = torch.diag(hessian).mean()
    eye = torch.eye(hessian.shape[0], dtype=hessian.dtype, device=hessian.device)
    for attempt in range(MAX_DAMPENING_RETRIES):
        damped = hessian + (dampening * 10**attempt) * mean_diag * eye
        lower, info = torch.linalg.cholesky_ex(damped)
        if info == 0:
            inverse = torch.cholesky_inverse(lower)
            upper, info = torch.linalg.cholesky_ex(inverse, upper=True)
            if info == 0:
                return upper
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
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(fake-quantized weight, scale (out, groups), zero point or None), in the weight's natural column order.

    `kind` "int": integers of `bits` bits; "float": FP8 E4M3 with per-channel scales (bits 8, no groups).
    """
    if kind == "float" and (bits != 8 or group_size is not None or not symmetric):
        raise ValueError("FP8 GPTQ takes bits 8, per-channel scales and symmetric weights")
    hessian, w, _ = prepare_hessian(hessian, weight)
    columns = w.shape[1]
    static = act_order or group_size is None  # scales fixed up front from the (dead-zeroed) weights
    if kind == "float":
        scale, zero = fp8_params(w), None
    else:
        scale, zero = rtn_params(w, bits, group_size, symmetric) if static else (None, None)
    if group_size is None:
        scale_groups, zero_groups = scale, zero
    order = torch.argsort(torch.diag(hessian), descending=True) if act_order else torch.arange(columns)
    order = order.to(w.device)
    order_host = order.tolist()  # read per column below: one transfer, not one device sync per column
    w, hessian = w[:, order], hessian[order][:, order]
    h_inv = inverse_cholesky(hessian, dampening)
    quantized = torch.zeros_like(w)
    if not static:
        scale = torch.zeros(w.shape[0], columns // group_size, dtype=w.dtype, device=w.device)
        zero = None if symmetric else torch.zeros_like(scale)
    for start in range(0, columns, block_size):
        end = min(start + block_size, columns)
        block, errors, h_block = w[:, start:end].clone(), torch.zeros_like(w[:, start:end]), h_inv[start:end, start:end]
        for i in range(end - start):
            column = order_host[start + i]
            group = 0 if group_size is None else column // group_size
            if not static and column % group_size == 0:
                upcoming = torch.cat([block[:, i:], w[:, end:]], dim=1)[:, :group_size]
                s, z = rtn_params(upcoming, bits, None, symmetric)
                scale[:, group] = s[:, 0]
                if zero is not None:
                    zero[:, group] = z[:, 0]
            s = scale[:, group : group + 1] if group_size is not None else scale_groups
            z = None if zero is None else (zero[:, group : group + 1] if group_size is not None else zero_groups)
            if kind == "float":
                q = fp8_fake_quantize(block[:, i : i + 1], s)[:, 0]
            else:
                q = fake_quantize(block[:, i : i + 1], s, z, bits, None)[:, 0]
            quantized[:, start + i] = q
            error = (block[:, i] - q) / h_block[i, i]
            block[:, i:] -= error.unsqueeze(1) * h_block[i, i:].unsqueeze(0)
            errors[:, i] = error
        w[:, end:] -= errors @ h_inv[start:end, end:]
    restored = torch.empty_like(quantized)
    restored[:, order] = quantized
    return restored, scale, zero
