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

Every builder either returns a module and a one-line description of the kernel it runs, or raises
`KernelUnavailable` with the reason; `fast_inference.convert_for_speed_` swaps the modules in and keeps a
refused Linear as a float one, saying why.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F

from worker.engine import triton_gemv
from worker.engine.quant_math import (
    FP8_MAX,
    INT8_HALF_RANGE,
    dequantize,
    fp8_params,
    quantize,
    rtn_params,
)
from worker.engine.registry import QuantizedWeight

log = logging.getLogger(__name__)

TINYGEMM_GROUPS = (32, 64, 128, 256)
# fp8 takes the Triton kernel at one input row only: at 16 rows its multi-row path decoded 1665 tok/s on the 8B
# shape, where _scaled_mm had decoded 2365 (benchmarks/gpu.md, session 5 and session 2)
FP8_TRITON_MAX_ROWS = 1
INT4_KERNELS = ("tinygemm", "triton")  # tinygemm where it can run (the default), or the Triton kernel
TINYGEMM_INNER_K_TILES = (8, 4, 2)  # the largest that divides K is used (8: 16-byte loads)
INT_MM_MIN_ROWS = 32  # aten._int_mm on CUDA needs more than 16 rows (and a multiple of 8)
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
    than silently re-rounded."""
    scale = record.scale.to(weight.device, torch.float32)
    zero = None if record.zero_point is None else record.zero_point.to(weight.device, torch.float32)
    w = weight.detach().float()
    codes = quantize(w, scale, zero, record.bits, record.group_size)
    if check_grid:
        off = (dequantize(codes, scale, zero, record.group_size) - w).abs()
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


def _output(out: torch.Tensor, x: torch.Tensor, module: torch.nn.Module) -> torch.Tensor:
    """A kernel's (rows, out_features) result in x's leading shape, plus the module's bias."""
    out = out.reshape(*x.shape[:-1], module.out_features)
    return out if module.bias is None else out + module.bias


# --- int8 weight-only -----------------------------------------------------------------------------------------


class Int8WeightOnlyLinear(torch.nn.Module):
    """W8A16 with per-channel symmetric int8 weights: y = (x @ q.T) * scale (+ bias)."""

    def __init__(self, codes: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None, use_int8pack: bool):
        super().__init__()
        self.in_features, self.out_features = codes.shape[1], codes.shape[0]
        self.use_int8pack = use_int8pack
        self.use_triton = triton_gemv.available(codes.device) and not use_int8pack
        self.register_buffer("weight_int8", codes.contiguous())
        self.register_buffer("scale", scale.reshape(-1).contiguous())
        self.register_buffer("bias", bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features)
        if self.use_triton and flat.shape[0] <= triton_gemv.MAX_ROWS:
            return _output(triton_gemv.gemv(flat, self.weight_int8, self.scale, kind=triton_gemv.KIND_INT8), x, self)
        if self.use_int8pack:
            out = torch.ops.aten._weight_int8pack_mm(flat.contiguous(), self.weight_int8, self.scale)
            return _output(out, x, self)
        out = F.linear(x, self.weight_int8.to(x.dtype)) * self.scale
        return out if self.bias is None else out + self.bias


class IntDequantLinear(torch.nn.Module):
    """Integer codes held in int8 with (grouped) scales and zero points, dequantized in the forward:
    W = (q - z) * s. Under torch.compile at batch 1 the dequantization fuses into the matrix-vector kernel."""

    def __init__(self, codes, scale, zero, group_size: int | None, bias: torch.Tensor | None):
        super().__init__()
        self.in_features, self.out_features = codes.shape[1], codes.shape[0]
        self.group = group_size or codes.shape[1]
        self.register_buffer("weight_int8", codes.contiguous())
        self.register_buffer("scale", scale.contiguous())
        self.register_buffer("zero", None if zero is None else zero.contiguous())
        self.register_buffer("bias", bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        groups = self.weight_int8.view(self.out_features, -1, self.group).to(x.dtype)
        if self.zero is not None:
            groups = groups - self.zero.unsqueeze(-1)
        weight = (groups * self.scale.unsqueeze(-1)).view(self.out_features, self.in_features)
        return F.linear(x, weight, self.bias)


# --- int4 weight-only (tinygemm) ------------------------------------------------------------------------------


def tinygemm_pack(codes: torch.Tensor, inner_k_tiles: int) -> torch.Tensor:
    """Pack signed int4 codes (N, K) for tinygemm on their device: unsigned q + 8; on CUDA two codes a byte
    (even column in the high nibble) then `_convert_weight_to_int4pack`, on CPU `..._for_cpu` from int32."""
    if codes.device.type == "cuda":
        return torch.ops.aten._convert_weight_to_int4pack(triton_gemv.pack_int4(codes), inner_k_tiles)
    unsigned = codes.to(torch.int32) + 8
    return torch.ops.aten._convert_weight_to_int4pack_for_cpu(unsigned.contiguous(), inner_k_tiles)


def tinygemm_scales_and_zeros(scale: torch.Tensor, zero: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    """(K / group, N, 2) scales and zeros in tinygemm's convention, dequant = (q_unsigned - 8) * s + z.

    Ours is (q - zp) * s with q = q_unsigned - 8, so z = -zp * s (0 when symmetric)."""
    zeros = torch.zeros_like(scale) if zero is None else -zero * scale
    return torch.stack([scale, zeros], dim=-1).transpose(0, 1).contiguous().to(dtype)


class Int4TinyGemmLinear(torch.nn.Module):
    """W4A16 on tinygemm: `_weight_int4pack_mm` (CUDA, bf16) or `_weight_int4pack_mm_for_cpu`."""

    def __init__(self, packed, scales_and_zeros, group_size: int, shape: tuple[int, int], bias, cpu: bool):
        super().__init__()
        self.out_features, self.in_features = shape
        self.group_size, self.cpu = group_size, cpu
        self.register_buffer("weight_int4pack", packed)
        self.register_buffer("scales_and_zeros", scales_and_zeros)
        self.register_buffer("bias", bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features).contiguous()
        op = torch.ops.aten._weight_int4pack_mm_for_cpu if self.cpu else torch.ops.aten._weight_int4pack_mm
        return _output(op(flat, self.weight_int4pack, self.group_size, self.scales_and_zeros), x, self)


class Int4PackedLinear(torch.nn.Module):
    """W4A16 with int4 codes two a byte and per-group scales (and zero points): the Triton matrix-vector kernel
    for up to triton_gemv.MAX_ROWS input rows (decoding), else the codes dequantized to `dtype` and a
    matmul (prefill, where the matmul, not the weight read, dominates)."""

    def __init__(self, codes, scale, zero, group_size: int, bias, dtype: torch.dtype):
        super().__init__()
        self.out_features, self.in_features = codes.shape
        self.group_size = group_size
        self.use_triton = triton_gemv.available(codes.device)
        self.register_buffer("weight_int4", triton_gemv.pack_int4(codes))
        self.register_buffer("scale", scale.to(dtype).contiguous())
        self.register_buffer("zero", None if zero is None else zero.to(dtype).contiguous())
        self.register_buffer("bias", bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features)
        if self.use_triton and flat.shape[0] <= triton_gemv.MAX_ROWS:
            out = triton_gemv.gemv(
                flat, self.weight_int4, self.scale, self.zero, kind=triton_gemv.KIND_INT4, group=self.group_size
            )
        else:
            out = F.linear(flat, self.dequantized(flat.dtype))
        return _output(out, x, self)

    def dequantized(self, dtype: torch.dtype) -> torch.Tensor:
        codes = triton_gemv.unpack_int4(self.weight_int4).to(dtype)
        return dequantize(codes, self.scale, self.zero, self.group_size)


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


# --- fp8 W8A8 and int8 W8A8 -----------------------------------------------------------------------------------


def per_token_scale(x: torch.Tensor, top: float) -> torch.Tensor:
    """Dynamic symmetric per-row scales (rows, 1) in float32: absmax / top, eps for an all-zero row
    (compressed-tensors' `strategy: token, dynamic: true`)."""
    scale = x.abs().amax(dim=-1, keepdim=True).float() / top
    return torch.where(scale == 0, torch.finfo(torch.float32).eps, scale)


class Fp8RowwiseLinear(torch.nn.Module):
    """FP8 E4M3 weights (per output channel) times per-token E4M3 activations on `aten._scaled_mm`.

    The weight is stored (N, K) row-major and passed transposed: the column-major second operand cuBLASLt
    needs. Rowwise scales: scale_a (M, 1), scale_b (1, N), both float32."""

    def __init__(self, weight_fp8, weight_scale, bias, fast_accum: bool):
        super().__init__()
        self.out_features, self.in_features = weight_fp8.shape
        self.fast_accum = fast_accum
        self.use_triton = triton_gemv.available(weight_fp8.device)
        self.register_buffer("weight_fp8", weight_fp8.contiguous())
        self.register_buffer("weight_scale", weight_scale.reshape(1, -1).float().contiguous())
        self.register_buffer("bias", bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features)
        x_scale = per_token_scale(flat, FP8_MAX)
        x_fp8 = (flat.float() / x_scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
        if self.use_triton and flat.shape[0] <= FP8_TRITON_MAX_ROWS:
            out = triton_gemv.gemv(
                x_fp8, self.weight_fp8, self.weight_scale.reshape(-1), x_scale=x_scale.reshape(-1),
                kind=triton_gemv.KIND_FP8, out_dtype=x.dtype,
            )  # fmt: skip
        else:
            out = torch._scaled_mm(
                x_fp8,
                self.weight_fp8.t(),
                scale_a=x_scale,
                scale_b=self.weight_scale,
                out_dtype=x.dtype,
                use_fast_accum=self.fast_accum,
            )
        return _output(out, x, self)


class Int8DynamicLinear(torch.nn.Module):
    """int8 weights (per channel) times per-token int8 activations on `aten._int_mm` (int32 accumulation)."""

    def __init__(self, codes: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        self.out_features, self.in_features = codes.shape
        self.register_buffer("weight_int8", codes.contiguous())
        self.register_buffer("weight_scale", scale.reshape(1, -1).float().contiguous())
        self.register_buffer("bias", bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features)
        x_scale = per_token_scale(flat, INT8_HALF_RANGE)
        x_int8 = torch.round((flat.float() / x_scale).clamp(-128, 127)).to(torch.int8)
        rows = x_int8.shape[0]
        if x_int8.is_cuda and rows < INT_MM_MIN_ROWS:
            x_int8 = F.pad(x_int8, (0, 0, 0, INT_MM_MIN_ROWS - rows))
        accumulated = torch._int_mm(x_int8, self.weight_int8.t())[:rows]
        return _output((accumulated.float() * x_scale * self.weight_scale).to(x.dtype), x, self)


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
        try:
            if int4_kernel == "triton" and triton_gemv.available(device):
                raise KernelUnavailable("the Triton kernel was asked for")
            tiles = _tinygemm_layout(codes, group, dtype)
        except KernelUnavailable as exc:
            reason = str(exc)
            if triton_gemv.available(device) and codes.shape[1] % 2 == 0 and group % 2 == 0:
                module = Int4PackedLinear(codes, scale, zero, group, bias, dtype)
                return module, (
                    f"int4 weight-only: Triton matrix-vector kernel (group {group}) up to "
                    f"{triton_gemv.MAX_ROWS} rows, dequantized matmul above ({reason})"
                )
        else:
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
