"""Per-layer damage: how far a step moved a Linear from what it computed before, the same fields for every step
that changes Linear weights in place (the prune and quantize methods), so the report can rank layers across steps.

Each changed Linear's record carries `relative_error` (‖W − Ŵ‖/‖W‖, always), `output_error` (‖XWᵀ − XŴᵀ‖/‖XWᵀ‖
over its calibration inputs X, or None) and `output_error_from`, which says what that figure rests on:
`"gram"` (exact, from XᵀX the step already gathered), `"outputs"` (exact, measured on the layer's outputs in a
forward pass the step runs anyway: RTN and FP8 to nearest, see `quantize.common`), `"input_norms"` (from the
diagonal of XᵀX alone, the per-input norms Wanda gathers: correlations between inputs are ignored) or None (no
calibration statistics: rank the layer by its weight error). The statistics are the step's own: nothing here
runs the model.
"""

from __future__ import annotations

import torch

DAMAGE_FIELDS = ("relative_error", "output_error", "output_error_from")


def relative_error(weight: torch.Tensor, approximation: torch.Tensor) -> float:
    """||W - W_hat|| / ||W|| (Frobenius); 0 for an all-zero W reproduced exactly."""
    weight, approximation = weight.detach().float(), approximation.detach().float()
    norm = torch.linalg.vector_norm(weight)
    diff = torch.linalg.vector_norm(weight - approximation)
    return float(diff / norm) if norm > 0 else float(diff)


# rows of ΔW multiplied by G at a time: at 32B a down_proj's G alone is 3 GB, and an onloaded layer works in 16 GB
_ROW_BYTES = 256 * 1024**2


def _quadratic_form(gram: torch.Tensor, rows: torch.Tensor, minus: torch.Tensor | None = None) -> torch.Tensor:
    """Σ_o r_o G r_oᵀ over the rows r_o of `rows` (less `minus`'s), in float32 products summed in float64, a block
    of rows at a time: no copy of G, W or ΔW is made."""
    step = max(1, _ROW_BYTES // (4 * rows.shape[1]))
    total = torch.zeros((), dtype=torch.float64, device=rows.device)
    for start in range(0, rows.shape[0], step):
        block = rows[start : start + step].float()
        if minus is not None:
            block = block - minus[start : start + step].float()
        total += ((block @ gram) * block).sum(dtype=torch.float64)
    return total


def output_error(weight: torch.Tensor, approximation: torch.Tensor, gram: torch.Tensor) -> float:
    """||X Wᵀ − X Ŵᵀ|| / ||X Wᵀ|| over calibration inputs X, from G ∝ XᵀX (any positive factor cancels)."""
    weight, approximation = weight.detach(), approximation.detach().to(weight.device)
    gram = gram.detach().to(device=weight.device, dtype=torch.float32)
    error = _quadratic_form(gram, weight, approximation).clamp(min=0)
    reference = _quadratic_form(gram, weight).clamp(min=0)
    return float((error / reference).sqrt()) if reference > 0 else float(error.sqrt())


def diagonal_output_error(weight: torch.Tensor, approximation: torch.Tensor, input_norms: torch.Tensor) -> float:
    """`output_error` with XᵀX replaced by its diagonal (‖X_j‖² per input j): exact when inputs are uncorrelated."""
    scale = input_norms.detach().double().to(weight.device).unsqueeze(0)
    weight, approximation = weight.detach().double() * scale, approximation.detach().double() * scale
    return relative_error(weight, approximation)


def layer_damage(
    original: torch.Tensor,
    changed: torch.Tensor,
    gram: torch.Tensor | None = None,
    input_norms: torch.Tensor | None = None,
) -> dict[str, float | str | None]:
    """The uniform damage fields of one Linear whose weight went from `original` to `changed`: the output error
    from the step's Gram matrix when it has one, else from its per-input norms, else none (weight error only)."""
    if gram is not None:
        output, source = output_error(original, changed, gram), "gram"
    elif input_norms is not None:
        output, source = diagonal_output_error(original, changed, input_norms), "input_norms"
    else:
        output, source = None, None
    return {"relative_error": relative_error(original, changed), "output_error": output, "output_error_from": source}
