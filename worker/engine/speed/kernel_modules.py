"""The nn.Modules that run low-bit matmuls in place of a quantized Linear, and the packing they need.

kernels.py recovers the codes from a quantize step's record, checks what each kernel takes and builds these
modules; here is only what runs in the forward, so that a benchmark or test can build one directly.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from worker.engine.quantize import FP8_MAX, INT8_HALF_RANGE, dequantize
from worker.engine.speed import triton_gemv

# fp8 takes the Triton kernel at one input row only: at 16 rows its multi-row path decoded 1665 tok/s on the 8B
# shape, where _scaled_mm decoded 2791 (one H200, docs/speed.md)
FP8_TRITON_MAX_ROWS = 1
INT_MM_MIN_ROWS = 32  # aten._int_mm on CUDA needs more than 16 rows (and a multiple of 8)


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
