"""Round-to-nearest integer weight quantization math, per output channel or per group of input columns.

The operations mirror compressed-tensors' own (divide by the scale, add the zero point, clamp to the signed
range, round half to even; dequantize as (q - zero_point) * scale), so that the artifact it writes from our
scales holds exactly the weights the engine evaluated in memory.
"""

from __future__ import annotations

import torch

from worker.engine.calibrate.damage import output_error, relative_error  # noqa: F401  (the quantize steps' names)


def int_range(bits: int) -> tuple[int, int]:
    """Signed integer range of `bits` bits: (-2**(bits-1), 2**(bits-1) - 1)."""
    return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1


def symmetric_scale(low: torch.Tensor, high: torch.Tensor, bits: int) -> torch.Tensor:
    """The finest symmetric scale that clips nothing: max(high / qmax, -low / -qmin), 1 where all is zero.

    The positive end lands on qmax and the negative end on qmin (-8 for int4), so all 2**bits levels can be
    used. absmax / qmax leaves qmin unused (15 levels); compressed-tensors' absmax / 7.5 clips the largest
    positive weights. On SmolLM2 int4 g64 round-to-nearest this form measured lower perplexity than either
    (docs/quantization.md). The artifact stores the scale, so loaders need no convention of their own.
    """
    qmin, qmax = int_range(bits)
    scale = torch.maximum(high.clamp(min=0) / qmax, low.clamp(max=0) / qmin)
    return torch.where(scale > 0, scale, torch.ones_like(scale))


def grouped(weight: torch.Tensor, group_size: int | None) -> torch.Tensor:
    """View (out, in) as (out, groups, columns): one group of all columns when group_size is None."""
    if group_size is None:
        return weight.unsqueeze(1)
    return weight.unflatten(-1, (weight.shape[-1] // group_size, group_size))


def rtn_params(
    weight: torch.Tensor, bits: int, group_size: int | None, symmetric: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Scales (out, groups) and, when asymmetric, integer-valued zero points (out, groups), over each group's
    whole range: `clipped_params` with ratio 1."""
    return clipped_params(weight, bits, group_size, symmetric, 1.0)


def clipped_params(
    weight: torch.Tensor, bits: int, group_size: int | None, symmetric: bool, ratio: torch.Tensor | float
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Scales and zero points (out, groups) for each group's range [min, max] (widened to hold 0) shrunk by
    `ratio` (a float, or (out, groups) ratios per group).

    Symmetric: `symmetric_scale` of the range, zero point 0. Asymmetric: the range spread over all 2**bits
    levels, zero point = round(qmin - min / scale). All-zero groups get scale 1.
    """
    qmin, qmax = int_range(bits)
    groups = grouped(weight, group_size)
    low = groups.amin(dim=-1).clamp(max=0)
    high = groups.amax(dim=-1).clamp(min=0)
    if isinstance(ratio, torch.Tensor) or ratio != 1.0:  # a ratio of 1 changes nothing: skip the products
        ratio = torch.as_tensor(ratio, dtype=weight.dtype, device=weight.device)
        low, high = low * ratio, high * ratio
    if symmetric:
        return symmetric_scale(low, high, bits), None
    scale = (high - low) / (qmax - qmin)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    zero_point = torch.round(qmin - low / scale).clamp(qmin, qmax)
    return scale, zero_point


def quantize(
    weight: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | None, bits: int, group_size: int | None
) -> torch.Tensor:
    """Integer codes (as a float tensor of weight's shape): round(clamp(w / scale + zero_point))."""
    qmin, qmax = int_range(bits)
    scaled = grouped(weight, group_size) / scale.unsqueeze(-1)
    if zero_point is not None:
        scaled = scaled + zero_point.unsqueeze(-1)
    return torch.round(torch.clamp(scaled, qmin, qmax)).flatten(-2)


def dequantize(
    codes: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | None, group_size: int | None
) -> torch.Tensor:
    """Float weights from integer codes: (q - zero_point) * scale."""
    values = grouped(codes, group_size)
    if zero_point is not None:
        values = values - zero_point.unsqueeze(-1)
    return (values * scale.unsqueeze(-1)).flatten(-2)


def fake_quantize(
    weight: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | None, bits: int, group_size: int | None
) -> torch.Tensor:
    """The weights a quantized layer really computes with: dequantize(quantize(w))."""
    return dequantize(quantize(weight, scale, zero_point, bits, group_size), scale, zero_point, group_size)


SETTLE_ROUNDS = 4
"""Round trips `requantize_in_dtype` allows before it leaves the weight to the export's own check."""


def requantize_in_dtype(
    weight: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor | None,
    bits: int,
    group_size: int | None,
    dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(weight, scale) of an already quantized weight, expressed in `dtype` (bf16 / fp16) as a loader computes
    it from the stored scale: the same integer codes (read in float32, where they are exact), the scale rounded to
    `dtype`, and the weight dequantized in `dtype`. The checkpoint then reproduces the in-memory weight bit for
    bit; each weight moves by at most one rounding of the scale (2⁻⁹ relative in bf16)."""
    codes = quantize(
        weight.float(), scale.float(), None if zero_point is None else zero_point.float(), bits, group_size
    )
    scale = scale.to(dtype)
    zero = None if zero_point is None else zero_point.to(dtype)
    weight = dequantize(codes.to(dtype), scale, zero, group_size)
    # compressed-tensors packs the codes it derives from this weight, dividing by the scale in `dtype`: with
    # 8-bit codes that division can land one code away (bf16 keeps 8 significant bits); settle on the weight
    # its round trip keeps, so the artifact holds what was measured
    for _ in range(SETTLE_ROUNDS):
        again = fake_quantize(weight, scale, zero, bits, group_size)
        if torch.equal(again, weight):
            break
        weight = again
    return weight, scale


# --- FP8 E4M3 and dynamic per-token activations (compressed-tensors' operation order) -------------------------

FP8_MAX = 448.0  # largest finite float8_e4m3fn
INT8_HALF_RANGE = 127.5  # compressed-tensors' dynamic int8 activation scale divides absmax by (qmax - qmin) / 2


def fp8_params(weight: torch.Tensor) -> torch.Tensor:
    """Per-output-channel FP8 E4M3 scales (out, 1): absmax / 448, 1 for an all-zero row."""
    scale = weight.abs().amax(dim=-1, keepdim=True) / FP8_MAX
    return torch.where(scale > 0, scale, torch.ones_like(scale))


def fp8_fake_quantize(weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Round w / scale to the nearest E4M3 value (saturating at ±448) and scale back."""
    codes = torch.clamp(weight / scale, -FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn).to(weight.dtype)
    return codes.to(scale.dtype) * scale


def fake_quantize_tokens(x: torch.Tensor, kind: str) -> torch.Tensor:
    """Dynamic symmetric per-token fake quantization of activations, as compressed-tensors computes it at run
    time for `strategy: token, dynamic: true` (one scale per row of the last dimension of a 3-D input; a 2-D
    input gets one scale for the whole tensor, as compressed-tensors does). `kind` is "int8" or "fp8"."""
    if x.numel() == 0:
        return x
    reduce = tuple(range(2, x.ndim))
    low = (x.amin(dim=reduce, keepdim=True) if reduce else x.amin()).clamp(max=0)
    high = (x.amax(dim=reduce, keepdim=True) if reduce else x.amax()).clamp(min=0)
    absmax = torch.maximum(low.abs(), high.abs())
    if kind == "int8":
        scale = absmax / INT8_HALF_RANGE
    elif kind == "fp8":
        scale = absmax / FP8_MAX
    else:
        raise ValueError(f"unknown activation kind {kind!r}")
    scale = torch.where(scale == 0, torch.finfo(scale.dtype).eps, scale)
    scaled = x / scale
    if kind == "int8":
        codes = torch.round(torch.clamp(scaled, -128, 127))
    else:
        codes = torch.clamp(scaled, -FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn).to(x.dtype)
    return codes.to(scale.dtype) * scale


class TokenQuantHook:
    """A Linear's forward pre-hook that fake-quantizes its input per token (`fake_quantize_tokens`): the
    activation half of a W8A8 scheme, held in memory as compressed-tensors applies it at run time. A class, not a
    closure, so that code rearranging Linears (fusing q/k/v for speed) can recognize it and carry it over."""

    def __init__(self, kind: str) -> None:
        self.kind = kind

    def __call__(self, _module: torch.nn.Module, args: tuple) -> tuple:
        return (fake_quantize_tokens(args[0], self.kind), *args[1:])

    def __repr__(self) -> str:
        return f"TokenQuantHook({self.kind!r})"
