"""Kernel-backed replacements for quantized and 2:4-sparse Linears: a module swap, as gpt-fast and torchao do.

A quantize step leaves fake-quantized float weights in the model and a `QuantizedWeight` record of the scales
it used. Here the integer (or FP8) codes are recovered exactly from those weights and scales
(`quant_math.quantize` with the record's own scale: never recomputed) and each Linear is swapped for a module
that runs a real low-bit matmul.

What runs where (CUDA; CPU):
- int8 weight-only, per channel, symmetric: the Triton kernel of triton_gemv.py up to 16 input rows (decoding),
  above that `F.linear(x, w_int8.to(x.dtype)) * scale` (aten._weight_int8pack_mm has a CUDA kernel, but it is
  one thread per output element reading the weight with a stride of K, so it is not used there);
  CPU: aten._weight_int8pack_mm.
- int4 weight-only in groups of 32-256: tinygemm, aten._weight_int4pack_mm (bfloat16 only); CPU:
  aten._weight_int4pack_mm_for_cpu. `int4_kernel="triton"` (or a group tinygemm does not take) runs the Triton
  kernel up to 16 rows and a dequantized matmul above: slower to decode on an H200, much faster to prefill.
- other int weight-only schemes (grouped int8, zero points, int4 per channel): codes held in int8 and
  dequantized in the forward, which torch.compile fuses into the matrix-vector kernel; CPU: the same, eagerly.
- fp8 W8A8 (E4M3 weights per channel, dynamic per-token E4M3 activations): the Triton kernel at one input row,
  aten._scaled_mm with rowwise scales above (compute capability 8.9+), bfloat16 out; CPU: aten._scaled_mm where
  the CPU build has it.
- int8 W8A8 (SmoothQuant): aten._int_mm on per-token int8 activations (rows padded past 16 on CUDA); CPU: the
  same op.
- 2:4 sparse float weights: torch.sparse.to_sparse_semi_structured (cuSPARSELt, else CUTLASS); CUDA only.

Every builder either returns a module (one of kernel_modules.py's, which run the matmuls) and a one-line
description of the kernel it runs, or raises `KernelUnavailable` with the reason;
`speed_model.convert_for_speed_` swaps the modules in and keeps a refused Linear as a float one, saying why.
"""

from __future__ import annotations

import logging

import torch

from worker.engine.quantize import FP8_MAX, dequantize, fp8_params, quantize, rtn_params
from worker.engine.speed import triton_gemv
from worker.engine.speed.kernel_modules import (
    FP8_TRITON_MAX_ROWS,
    Fp8RowwiseLinear,
    Int4PackedLinear,
    Int4TinyGemmLinear,
    Int8DynamicLinear,
    Int8WeightOnlyLinear,
    IntDequantLinear,
    tinygemm_pack,
    tinygemm_scales_and_zeros,
)
from worker.engine.steps import QuantizedWeight

log = logging.getLogger(__name__)

TINYGEMM_GROUPS = (32, 64, 128, 256)
INT4_KERNELS = ("tinygemm", "triton")  # tinygemm where it can run (the default), or the Triton kernel
TINYGEMM_INNER_K_TILES = (8, 4, 2)  # the largest that divides K is used (8: 16-byte loads)
GRID_TOLERANCE = 1e-2  # |w / scale + zero - round(...)| allowed when recovering codes from fake-quantized weights


class KernelUnavailable(Exception):
    """This Linear cannot run on a low-bit kernel here; the message says why."""


def has_aten_op(name: str) -> bool:
    """Whether this torch build registers the (private) aten operator `name`."""
    try:
        getattr(torch.ops.aten, name)
    except (AttributeError, RuntimeError):
        return False
    return True


# --- Codes from a record --------------------------------------------------------------------------------------


def int_codes(weight: torch.Tensor, record: QuantizedWeight, check_grid: bool = True) -> torch.Tensor:
    """The signed integer codes (int8 tensor, weight's shape) of a weight quantized with `record`'s scales.

    With `check_grid`, the weight must already sit on the record's grid (a fake-quantized weight): a weight
    that does not (scales from another convention, a weight changed after quantization) is refused rather
    than silently re-rounded. The grid is computed in the weight's own dtype, as the quantize step and a loader
    compute it (`requantize_in_dtype`): a bf16 weight is its codes times its scale rounded to bf16, up to 2⁻⁹
    of the value away from the float32 product (3% of a step at code 8), and exactly equal to the bf16 one."""
    scale = record.scale.to(weight.device, torch.float32)
    zero = None if record.zero_point is None else record.zero_point.to(weight.device, torch.float32)
    w = weight.detach().float()
    codes = quantize(w, scale, zero, record.bits, record.group_size)
    if check_grid:
        dtype = weight.dtype
        in_dtype = dequantize(
            codes.to(dtype), scale.to(dtype), None if zero is None else zero.to(dtype), record.group_size
        )
        off = (in_dtype.float() - w).abs()
        step = scale.repeat_interleave(w.shape[1] // scale.shape[1], dim=1)
        worst = float((off / step).max()) if off.numel() else 0.0
        if worst > GRID_TOLERANCE:
            raise KernelUnavailable(
                f"weights are not on the record's {record.bits}-bit grid (off by {worst:.3f} of a step)"
            )
    return codes.to(torch.int8)


def fp8_codes(weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """E4M3 codes of w / scale (exact for a weight fake-quantized with that scale), saturating at ±448."""
    scaled = weight.detach().float() / scale.to(weight.device, torch.float32)
    return scaled.clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)


def _bias(linear: torch.nn.Linear, dtype: torch.dtype) -> torch.Tensor | None:
    return None if linear.bias is None else linear.bias.detach().to(dtype)


# --- int4 layout (tinygemm) -----------------------------------------------------------------------------------


def _tinygemm_layout(codes: torch.Tensor, group: int, dtype: torch.dtype) -> int:
    """inner_k_tiles for this weight, or KernelUnavailable with the constraint it breaks."""
    n, k = codes.shape
    cpu = codes.device.type == "cpu"
    op = "_weight_int4pack_mm_for_cpu" if cpu else "_weight_int4pack_mm"
    if codes.device.type not in ("cpu", "cuda") or not has_aten_op(op):
        raise KernelUnavailable(f"this torch build has no aten.{op} for {codes.device.type}")
    if group not in TINYGEMM_GROUPS:
        raise KernelUnavailable(f"tinygemm takes groups of {TINYGEMM_GROUPS}, not {group}")
    if not cpu and dtype != torch.bfloat16:
        raise KernelUnavailable(f"tinygemm on CUDA computes in bfloat16, the model is {dtype}")
    if n % 8:
        raise KernelUnavailable(f"tinygemm needs out_features divisible by 8, got {n}")
    for tiles in TINYGEMM_INNER_K_TILES:
        if k % (tiles * 16) == 0 and k % group == 0:
            return tiles
    raise KernelUnavailable(f"tinygemm needs in_features divisible by 32, got {k}")


# --- 2:4 semi-structured sparsity -----------------------------------------------------------------------------


def semi_structured_violations(weight: torch.Tensor) -> int:
    """How many groups of 4 consecutive inputs hold more than 2 nonzeros (0: the 2:4 format holds the weight
    exactly; a 2:4 prune leaves exactly 2, a later rounding to zero may leave fewer, which the format holds).
    A width that is not a multiple of 4 counts as one violation."""
    if weight.dim() != 2 or weight.shape[1] % 4:
        return 1
    nonzero = (weight.detach() != 0).view(weight.shape[0], -1, 4).sum(dim=-1)
    return int((nonzero > 2).sum())


def semi_structured_weight(weight: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The weight as a `SparseSemiStructuredTensor` (cuSPARSELt where torch has it, else CUTLASS); refuses a
    weight that is not 2:4 (it would be pruned further, silently) and anything off CUDA fp16/bf16."""
    violations = semi_structured_violations(weight)
    if violations:
        raise KernelUnavailable(f"not 2:4 sparse: {violations} groups of 4 inputs hold more than 2 nonzeros")
    if weight.device.type != "cuda":
        raise KernelUnavailable("2:4 semi-structured sparse kernels run on CUDA only")
    if dtype not in (torch.float16, torch.bfloat16):
        raise KernelUnavailable(f"2:4 sparse kernels here take float16 or bfloat16, the model is {dtype}")
    from torch.sparse import SparseSemiStructuredTensor, to_sparse_semi_structured

    if not torch.backends.cusparselt.is_available():
        SparseSemiStructuredTensor._FORCE_CUTLASS = True
    return to_sparse_semi_structured(weight.detach().to(dtype).contiguous())


def semi_structured_backend() -> str:
    return "cuSPARSELt" if torch.backends.cusparselt.is_available() else "CUTLASS"


# --- Building one replacement ---------------------------------------------------------------------------------


def _int_weight_only(linear: torch.nn.Linear, record: QuantizedWeight, dtype, check_grid: bool, int4_kernel: str):
    codes = int_codes(linear.weight, record, check_grid)
    device, cpu = codes.device, codes.device.type == "cpu"
    scale = record.scale.to(device, torch.float32)
    zero = None if record.zero_point is None else record.zero_point.to(device, torch.float32)
    bias = _bias(linear, dtype)
    if record.bits == 4:
        group = record.group_size or codes.shape[1]  # per channel: one group of the whole row
        triton_fits = triton_gemv.available(device) and codes.shape[1] % 2 == 0 and group % 2 == 0
        try:
            tiles = _tinygemm_layout(codes, group, dtype)
        except KernelUnavailable as exc:
            tiles, reason = None, str(exc)
        else:
            reason = "the Triton kernel was asked for"
        if triton_fits and (tiles is None or int4_kernel == "triton"):
            module = Int4PackedLinear(codes, scale, zero, group, bias, dtype)
            return module, (
                f"int4 weight-only: Triton matrix-vector kernel (group {group}) up to "
                f"{triton_gemv.MAX_ROWS} rows, dequantized matmul above ({reason})"
            )
        if tiles is not None:
            module = Int4TinyGemmLinear(
                tinygemm_pack(codes, tiles),
                tinygemm_scales_and_zeros(scale, zero, dtype),
                group,
                tuple(codes.shape),
                bias,
                cpu,
            )
            op = "_weight_int4pack_mm_for_cpu" if cpu else "_weight_int4pack_mm"
            return module, f"int4 weight-only: tinygemm aten.{op} (group {group}, inner_k_tiles {tiles})"
    elif record.group_size is None and zero is None:
        int8pack = cpu and has_aten_op("_weight_int8pack_mm")
        module = Int8WeightOnlyLinear(codes, scale.to(dtype), bias, use_int8pack=int8pack)
        if int8pack:
            return module, "int8 weight-only: aten._weight_int8pack_mm"
        if module.use_triton:
            return module, (
                f"int8 weight-only: Triton matrix-vector kernel up to {triton_gemv.MAX_ROWS} rows, "
                "F.linear(x, int8 -> dtype) * scale above"
            )
        return module, "int8 weight-only: F.linear(x, int8 -> dtype) * scale (fused by torch.compile)"
    else:
        reason = "grouped or asymmetric int8"
    module = IntDequantLinear(codes, scale.to(dtype), None if zero is None else zero.to(dtype), record.group_size, bias)
    return module, f"int{record.bits} weight-only, codes in int8 dequantized in the forward ({reason})"


def _fp8_w8a8(linear: torch.nn.Linear, record: QuantizedWeight, dtype):
    weight = linear.weight
    if record.group_size is not None or record.scale.shape[-1] != 1:
        raise KernelUnavailable("fp8 rowwise _scaled_mm takes one weight scale per output channel")
    if not has_aten_op("_scaled_mm"):
        raise KernelUnavailable("this torch build has no aten._scaled_mm")
    cuda = weight.device.type == "cuda"
    if cuda:
        n, k = weight.shape
        if n % 16 or k % 16:
            raise KernelUnavailable(f"_scaled_mm needs in and out features divisible by 16, got {k} and {n}")
        if dtype != torch.bfloat16:
            raise KernelUnavailable(f"rowwise _scaled_mm writes bfloat16, the model is {dtype}")
        if torch.cuda.get_device_capability(weight.device) < (8, 9):
            raise KernelUnavailable("fp8 matmuls need compute capability 8.9 or newer")
    scale = record.scale.to(weight.device, torch.float32)
    module = Fp8RowwiseLinear(fp8_codes(weight, scale), scale, _bias(linear, dtype), fast_accum=cuda)
    if module.use_triton:
        return module, (
            f"fp8 W8A8 (E4M3 per channel, dynamic per-token): Triton matrix-vector kernel up to "
            f"{FP8_TRITON_MAX_ROWS} row, aten._scaled_mm rowwise above"
        )
    return module, "fp8 W8A8: aten._scaled_mm, E4M3 rowwise scales, dynamic per-token activations"


def _int8_w8a8(linear: torch.nn.Linear, record: QuantizedWeight, dtype, check_grid: bool):
    if record.bits != 8 or record.zero_point is not None or record.group_size is not None:
        raise KernelUnavailable("int8 W8A8 on _int_mm takes symmetric per-channel int8 weights")
    if not has_aten_op("_int_mm"):
        raise KernelUnavailable("this torch build has no aten._int_mm")
    n, k = linear.weight.shape
    if linear.weight.is_cuda and (n % 8 or k % 8):
        raise KernelUnavailable(f"_int_mm needs in and out features divisible by 8, got {k} and {n}")
    codes = int_codes(linear.weight, record, check_grid)
    module = Int8DynamicLinear(codes, record.scale.to(codes.device), _bias(linear, dtype))
    return module, "int8 W8A8: aten._int_mm, dynamic per-token int8 activations"


def kernel_linear(
    linear: torch.nn.Linear,
    record: QuantizedWeight | None,
    sparse_24: bool,
    dtype: torch.dtype | None = None,
    check_grid: bool = True,
    int4_kernel: str = "tinygemm",
) -> tuple[torch.nn.Module, str]:
    """The kernel-backed replacement of one Linear (built on its weight's device, computing in `dtype`, by
    default the weight's), and the kernel it runs; KernelUnavailable when none fits. `int4_kernel` "triton"
    runs int4 weights on the Triton kernel (dequantized matmul above its rows) even where tinygemm could."""
    if int4_kernel not in INT4_KERNELS:
        raise ValueError(f"int4_kernel {int4_kernel!r}: known {INT4_KERNELS}")
    dtype = dtype or linear.weight.dtype
    with torch.no_grad():
        if record is None:
            if not sparse_24:
                raise KernelUnavailable("neither quantized nor 2:4 sparse")
            # built on meta (no throwaway init), then given the compressed weight
            replacement = torch.nn.Linear(linear.in_features, linear.out_features, bias=False, device="meta")
            replacement.weight = torch.nn.Parameter(semi_structured_weight(linear.weight, dtype), requires_grad=False)
            if linear.bias is not None:
                replacement.bias = torch.nn.Parameter(_bias(linear, dtype), requires_grad=False)
            return replacement, f"2:4 sparse: to_sparse_semi_structured ({semi_structured_backend()})"
        if record.kind == "float":
            return _fp8_w8a8(linear, record, dtype)
        if record.activations == "int8":
            return _int8_w8a8(linear, record, dtype, check_grid)
        if record.activations is not None:
            raise KernelUnavailable(f"no kernel for {record.kind} weights with {record.activations} activations")
        return _int_weight_only(linear, record, dtype, check_grid, int4_kernel)


# --- Quantizing a plain Linear for the benchmark --------------------------------------------------------------

SCHEMES = ("int8", "int4", "fp8")


def plain_record(weight: torch.Tensor, scheme: str, group_size: int | None = 128) -> QuantizedWeight:
    """Round-to-nearest scales for a float weight (the benchmark quantizes a bf16 model itself): int8 per
    channel symmetric, int4 symmetric in groups of `group_size`, or fp8 E4M3 per channel with FP8 inputs."""
    w = weight.detach().float()
    if scheme == "int8":
        scale, zero = rtn_params(w, 8, None, True)
        return QuantizedWeight(scale=scale, zero_point=zero, bits=8, group_size=None, symmetric=True)
    if scheme == "int4":
        scale, zero = rtn_params(w, 4, group_size, True)
        return QuantizedWeight(scale=scale, zero_point=zero, bits=4, group_size=group_size, symmetric=True)
    if scheme == "fp8":
        scale = fp8_params(w)
        return QuantizedWeight(
            scale=scale, zero_point=None, bits=8, group_size=None, symmetric=True, kind="float", activations="fp8"
        )
    raise ValueError(f"unknown scheme {scheme!r}; known: {SCHEMES}")
