"""Low-bit matrix-vector products for decoding (a few rows of input), in Triton.

Why: at batch 1 a decode step is bound by reading the weights, so a low-bit weight pays off only if the kernel
streams its bytes at close to the copy bandwidth. On an H200 (docs/speed.md, `gpu_probe.py`) torch's
own options did not: tinygemm int4 reads at about 1.6 TB/s, `_scaled_mm` fp8 at 1.1 to 2.4 TB/s, and the int8
weight-only matmul that Inductor generates at 0.7 to 1.9 TB/s for the 4096-wide inputs of q/k/v/o and gate/up.

Three weight kinds, each output row a dot product over K accumulated in float32:
- KIND_INT8: int8 codes (N, K), one scale per output row, y = (x · q) · s;
- KIND_INT4: int4 codes two a byte (N, K/2; even column in the high nibble, stored as code + 8), scales and
  optional integer zero points per group of GROUP columns: y = Σ_g s_g · (Σ_k∈g x_k u_k − (z_g + 8) Σ_k∈g x_k)
  with u = code + 8 the stored nibble, summed over segments that each lie in one group;
- KIND_FP8: E4M3 codes (N, K) with one scale per output row, times activations already rounded to E4M3 per
  token (passed as their values with one scale per row): y = (x_q · q) · s · s_x, W8A8 as `_scaled_mm`
  computes it.
The weight's shape is compiled in (a decode step has five distinct shapes). Two kernels:
- one input row (`lowbit_gemv_kernel`, tuned): each program owns BLOCK_N output rows of one input row and
  reduces with elementwise products and sums;
- 2 to MAX_ROWS rows (`lowbit_rows_kernel`): each program owns BLOCK_N output rows for all input rows
  (BLOCK_M = 16, the rows beyond M masked), loads each weight tile once, dequantizes it in registers to the
  activation dtype (bfloat16 for fp8, exact either way) and multiplies with `tl.dot`, accumulating in float32.
  Why: the one-row kernel with one program per input row re-reads the weight for every row (from L2 at best),
  and at 16 rows it read only about 0.1 TB/s of effective weight bandwidth on an H200. For int4 each K tile
  lies in one group (BLOCK_K divides the group, or the group is the whole row), so groups whose largest
  power-of-two divisor is below 32 keep the one-row kernel, row by row.
Block sizes are autotuned per shape. Both are exposed as the custom op `modelpress::lowbit_gemv`
(torch.library.triton_op), which torch.compile traces into the decode step's graph and CUDA graphs capture.

Measured on one H200, decoding the Llama-3-8B shape with transformers' sdpa attention (docs/speed.md):
- one row: fp8 decodes at 1.54× bf16 and int8 at 1.38× on this kernel; int4 on it at 1.22×, against 1.53× on
  tinygemm, so int4 layers use tinygemm and this kernel only where tinygemm cannot run (or when asked for);
- 16 rows: int8 on the multi-row kernel at 1.10× bf16; fp8 on it at 0.66× against 1.09× on `_scaled_mm`, so
  fp8 takes this kernel at one row only (kernel_modules.FP8_TRITON_MAX_ROWS); int4 on it at 0.45×.

Triton is imported lazily and is optional: without it (CPU builds) `available()` is False and the kernel
modules keep torch's own kernels. Tests run the kernel on CPU under Triton's interpreter (TRITON_INTERPRET=1).
"""

from __future__ import annotations

import importlib.util
import os
from typing import NamedTuple

import torch

KIND_INT8, KIND_INT4, KIND_FP8 = 0, 1, 2
MAX_ROWS = 16  # more input rows than this: the callers use a matmul (the weight would be re-read per row)
_CONFIGS = (  # (BLOCK_N, BLOCK_K, warps); the wide-K ones suit int4, whose tiles hold half the bytes
    (2, 2048, 4),
    (4, 1024, 4),
    (4, 2048, 4),
    (4, 4096, 8),
    (8, 512, 4),
    (8, 1024, 8),
    (8, 2048, 8),
    (16, 256, 4),
    (16, 512, 8),
    (16, 1024, 8),
    (32, 256, 8),
    (32, 512, 8),
    (64, 128, 8),
)
INTERPRETER_BLOCKS = {"BLOCK_N": 4, "BLOCK_K": 64}
# The multi-row kernel (2 to MAX_ROWS rows): (BLOCK_N, BLOCK_K, warps, stages). BLOCK_K is capped per call by
# the largest power of two dividing an int4 group (see `_row_kernel`), so each K tile lies in one group.
_ROW_CONFIGS = (
    (16, 128, 4, 3),
    (16, 256, 4, 3),
    (16, 256, 4, 4),
    (32, 64, 4, 3),
    (32, 128, 4, 3),
    (32, 256, 8, 3),
    (64, 64, 4, 3),
    (64, 128, 4, 4),
    (64, 128, 8, 3),
    (64, 256, 8, 2),
    (128, 64, 8, 3),
    (128, 128, 8, 3),
    (128, 128, 8, 4),
)
ROW_BLOCK_M = 16  # tl.dot needs every dimension ≥ 16; rows beyond M are masked
ROW_MIN_INT4_K = 32  # the int4 multi-row tile is split into even and odd columns, each a dot over BLOCK_K/2
INTERPRETER_ROW_BLOCKS = {"BLOCK_N": 16, "BLOCK_K": 64}


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def available(device: torch.device) -> bool:
    """Whether the kernel can run on `device`: Triton installed and CUDA (or the interpreter, on CPU). On CUDA
    this also registers the custom op, which has to exist before torch.compile traces a call to it."""
    if importlib.util.find_spec("triton") is None:
        return False
    if device.type == "cuda":
        _op()
        return True
    return device.type == "cpu" and interpreting()


_KERNELS: dict[str, object] = {}


def _kernels():
    """(plain jit kernel, autotuned kernel), built on first use."""
    if not _KERNELS:
        import triton
        import triton.language as tl

        @triton.jit
        def lowbit_gemv_kernel(
            x_ptr, w_ptr, s_ptr, z_ptr, xs_ptr, out_ptr, M,
            N: tl.constexpr, K: tl.constexpr, GROUPS: tl.constexpr,
            KIND: tl.constexpr, GROUP: tl.constexpr, GROUP_ALIGN: tl.constexpr, HAS_ZERO: tl.constexpr,
            BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
        ):  # fmt: skip
            m = tl.program_id(0)
            n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
            n_ok = n < N
            acc = tl.zeros([BLOCK_N], dtype=tl.float32)
            if KIND == 1:
                # Segments of SEG columns lie inside one group: their partial sums take the group's scale and
                # zero once, and x is read once, contiguous, then split into the columns of each nibble.
                SEG: tl.constexpr = min(BLOCK_K, GROUP_ALIGN)
                half_k = K // 2
                for k0 in range(0, K, BLOCK_K):
                    j = k0 // 2 + tl.arange(0, BLOCK_K // 2)  # byte columns
                    tile_ok = n_ok[:, None] & (j < half_k)[None, :]
                    byte = tl.load(w_ptr + n[:, None] * half_k + j[None, :], mask=tile_ok, other=0)
                    k = k0 + tl.arange(0, BLOCK_K)
                    x = tl.load(x_ptr + m * K + k, mask=k < K, other=0.0).to(tl.float32)
                    x_even, x_odd = tl.split(tl.reshape(x, [BLOCK_K // 2, 2]))
                    # unsigned nibbles (code + 8): the 8 joins the zero point in the per-segment correction
                    part = (byte >> 4).to(tl.float32) * x_even[None, :] + (byte & 15).to(tl.float32) * x_odd[None, :]
                    part = tl.sum(tl.reshape(part, [BLOCK_N, BLOCK_K // SEG, SEG // 2]), axis=2)
                    x_sum = tl.sum(tl.reshape(x_even + x_odd, [BLOCK_K // SEG, SEG // 2]), axis=1)
                    seg = k0 + SEG * tl.arange(0, BLOCK_K // SEG)
                    seg_ok = n_ok[:, None] & (seg < K)[None, :]
                    group = n[:, None] * GROUPS + (seg // GROUP)[None, :]
                    scale = tl.load(s_ptr + group, mask=seg_ok, other=0.0).to(tl.float32)
                    zero = 8.0
                    if HAS_ZERO:
                        zero += tl.load(z_ptr + group, mask=seg_ok, other=0.0).to(tl.float32)
                    acc += tl.sum((part - zero * x_sum[None, :]) * scale, axis=1)
            else:
                for k0 in range(0, K, BLOCK_K):
                    k = k0 + tl.arange(0, BLOCK_K)
                    k_ok = k < K
                    tile_ok = n_ok[:, None] & k_ok[None, :]
                    w = tl.load(w_ptr + n[:, None] * K + k[None, :], mask=tile_ok, other=0.0).to(tl.float32)
                    x = tl.load(x_ptr + m * K + k, mask=k_ok, other=0.0).to(tl.float32)
                    acc += tl.sum(w * x[None, :], axis=1)
                acc = acc * tl.load(s_ptr + n, mask=n_ok, other=0.0).to(tl.float32)
                if KIND == 2:
                    acc = acc * tl.load(xs_ptr + m).to(tl.float32)
            tl.store(out_ptr + m * N + n, acc.to(out_ptr.dtype.element_ty), mask=n_ok)

        @triton.jit
        def lowbit_rows_kernel(
            x_ptr, w_ptr, s_ptr, z_ptr, xs_ptr, out_ptr, M,
            N: tl.constexpr, K: tl.constexpr, GROUPS: tl.constexpr,
            KIND: tl.constexpr, GROUP: tl.constexpr, HAS_ZERO: tl.constexpr, DOT_F32: tl.constexpr,
            BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
        ):  # fmt: skip
            # One program: BLOCK_N output rows for all (up to BLOCK_M) input rows; each weight tile is read
            # once, dequantized in registers to the dot's dtype and multiplied on the tensor cores.
            tl.static_assert(BLOCK_M >= 16 and BLOCK_N >= 16 and BLOCK_K >= 16)
            r = tl.arange(0, BLOCK_M)
            r_ok = r < M
            n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
            n_ok = n < N
            if DOT_F32:
                dot_ty = tl.float32  # under the interpreter, whose bfloat16 dot multiplies bit patterns
            elif KIND == 2:
                dot_ty = tl.bfloat16  # E4M3 values (3 mantissa bits) are exact in bfloat16
            else:
                dot_ty = x_ptr.dtype.element_ty  # int8 codes and int4 code - zero are exact in it too
            acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
            if KIND == 1:
                # Each K tile lies in one group (BLOCK_K divides GROUP, or one group spans the row): one scale
                # and zero per output row and tile. x is read as its even and odd columns, one per nibble.
                tl.static_assert(BLOCK_K // 2 >= 16)
                half_k = K // 2
                for k0 in range(0, K, BLOCK_K):
                    j = k0 // 2 + tl.arange(0, BLOCK_K // 2)  # byte columns
                    j_ok = j < half_k
                    w_ok = n_ok[:, None] & j_ok[None, :]
                    byte = tl.load(w_ptr + n[:, None] * half_k + j[None, :], mask=w_ok, other=0)
                    x_at = x_ptr + r[:, None] * K + 2 * j[None, :]
                    x_ok = r_ok[:, None] & j_ok[None, :]
                    x_even = tl.load(x_at, mask=x_ok, other=0.0).to(dot_ty)
                    x_odd = tl.load(x_at + 1, mask=x_ok, other=0.0).to(dot_ty)
                    group = n * GROUPS + k0 // GROUP
                    shift = tl.full([BLOCK_N], 8.0, tl.float32)  # nibbles are stored as code + 8
                    if HAS_ZERO:
                        shift += tl.load(z_ptr + group, mask=n_ok, other=0.0).to(tl.float32)
                    high = ((byte >> 4).to(tl.float32) - shift[:, None]).to(dot_ty)
                    low = ((byte & 15).to(tl.float32) - shift[:, None]).to(dot_ty)
                    part = tl.dot(x_even, tl.trans(high), input_precision="ieee")
                    part = tl.dot(x_odd, tl.trans(low), part, input_precision="ieee")
                    acc += part * tl.load(s_ptr + group, mask=n_ok, other=0.0).to(tl.float32)[None, :]
            else:
                for k0 in range(0, K, BLOCK_K):
                    k = k0 + tl.arange(0, BLOCK_K)
                    k_ok = k < K
                    w = tl.load(w_ptr + n[:, None] * K + k[None, :], mask=n_ok[:, None] & k_ok[None, :], other=0.0)
                    x = tl.load(x_ptr + r[:, None] * K + k[None, :], mask=r_ok[:, None] & k_ok[None, :], other=0.0)
                    acc = tl.dot(x.to(dot_ty), tl.trans(w.to(dot_ty)), acc, input_precision="ieee")
                acc = acc * tl.load(s_ptr + n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
                if KIND == 2:
                    acc = acc * tl.load(xs_ptr + r, mask=r_ok, other=0.0).to(tl.float32)[:, None]
            out_ok = r_ok[:, None] & n_ok[None, :]
            tl.store(out_ptr + r[:, None] * N + n[None, :], acc.to(out_ptr.dtype.element_ty), mask=out_ok)

        _KERNELS["rows"] = lowbit_rows_kernel
        configs = [triton.Config({"BLOCK_N": n, "BLOCK_K": k}, num_warps=warps) for n, k, warps in _CONFIGS]
        _KERNELS["plain"] = lowbit_gemv_kernel
        _KERNELS["tuned"] = triton.autotune(configs=configs, key=["M", "N", "K", "KIND", "GROUP"])(lowbit_gemv_kernel)
    return _KERNELS["plain"], _KERNELS["tuned"]


def _row_kernel(max_block_k: int):
    """The multi-row kernel: plain under the interpreter, else autotuned over _ROW_CONFIGS with BLOCK_K capped
    at `max_block_k` (one autotuner per cap, so no config breaks the one-group-a-tile rule)."""
    _kernels()
    if interpreting():
        return _KERNELS["rows"]
    name = f"rows_tuned_{max_block_k}"
    if name not in _KERNELS:
        import triton

        shapes = dict.fromkeys((n, min(k, max_block_k), w, st) for n, k, w, st in _ROW_CONFIGS)
        configs = [
            triton.Config({"BLOCK_N": n, "BLOCK_K": k}, num_warps=warps, num_stages=stages)
            for n, k, warps, stages in shapes
        ]
        _KERNELS[name] = triton.autotune(configs=configs, key=["N", "K", "KIND", "GROUP"])(_KERNELS["rows"])
    return _KERNELS[name]


class _Operands(NamedTuple):
    """What both kernels take first: the pointers (an absent zero or activation scale passes `scale`, which
    the kernel then never reads) and the sizes."""

    x: torch.Tensor
    weight: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor
    x_scale: torch.Tensor
    out: torch.Tensor
    M: int
    N: int
    K: int
    GROUPS: int


def gemv(
    x: torch.Tensor,
    weight: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor | None = None,
    x_scale: torch.Tensor | None = None,
    kind: int = KIND_INT8,
    group: int = 0,
    out_dtype: torch.dtype | None = None,
    *,
    wrap=None,
) -> torch.Tensor:
    """y (M, N) in `out_dtype` (default x's) for x (M, K), M ≤ MAX_ROWS; on CUDA through the custom op, whose
    body calls this again with `wrap` = torch.library.wrap_triton.

    One row: the matrix-vector kernel. More: the multi-row kernel, unless int4 groups are not a multiple of 32
    (its K tiles must lie in one group and hold at least 32 columns), where the matrix-vector kernel runs per row."""
    if x.is_cuda and wrap is None:  # the op is registered by available()
        return torch.ops.modelpress.lowbit_gemv(x, weight, scale, zero, x_scale, kind, group, out_dtype)
    x = x.contiguous()
    rows, columns = x.shape
    out = torch.empty(rows, weight.shape[0], dtype=out_dtype or x.dtype, device=x.device)
    groups = scale.shape[1] if kind == KIND_INT4 else 1
    # the largest power of two that divides the group (one group per row: any, the whole row is one group)
    align = group & -group if groups > 1 else 1 << (columns - 1).bit_length()
    operands = _Operands(
        x, weight, scale, scale if zero is None else zero, scale if x_scale is None else x_scale, out,
        rows, weight.shape[0], columns, groups,
    )  # fmt: skip
    options = {"KIND": kind, "GROUP": group, "HAS_ZERO": zero is not None}
    if rows > 1 and (kind != KIND_INT4 or align >= ROW_MIN_INT4_K):
        return _launch_rows(operands, options, min(align, 256) if kind == KIND_INT4 else 256, wrap)
    plain, tuned = _kernels()
    kernel = plain if interpreting() else tuned
    kernel = wrap(kernel) if wrap is not None else kernel
    extra = INTERPRETER_BLOCKS if interpreting() else {}

    def grid(meta):
        return (rows, -(-operands.N // meta["BLOCK_N"]))

    kernel[grid](*operands, **options, GROUP_ALIGN=align, **extra)
    return out


def _launch_rows(operands: _Operands, options: dict[str, int | bool], max_block_k: int, wrap) -> torch.Tensor:
    """The multi-row kernel over BLOCK_N output rows a program, all input rows in each (see `gemv`)."""
    kernel = _row_kernel(max_block_k)
    kernel = wrap(kernel) if wrap is not None else kernel
    extra = {}
    if interpreting():
        extra = {**INTERPRETER_ROW_BLOCKS, "BLOCK_K": min(INTERPRETER_ROW_BLOCKS["BLOCK_K"], max_block_k)}

    def grid(meta):
        return (-(-operands.N // meta["BLOCK_N"]),)

    kernel[grid](*operands, **options, DOT_F32=interpreting(), BLOCK_M=ROW_BLOCK_M, **extra)
    return operands.out


_OPS: dict[str, object] = {}


def _op():
    """torch.ops.modelpress.lowbit_gemv, defined on first use (it needs Triton)."""
    if "op" not in _OPS:
        from torch.library import triton_op, wrap_triton

        @triton_op("modelpress::lowbit_gemv", mutates_args=())
        def lowbit_gemv(
            x: torch.Tensor,
            weight: torch.Tensor,
            scale: torch.Tensor,
            zero: torch.Tensor | None,
            x_scale: torch.Tensor | None,
            kind: int,
            group: int,
            out_dtype: torch.dtype | None,
        ) -> torch.Tensor:
            return gemv(x, weight, scale, zero, x_scale, kind, group, out_dtype, wrap=wrap_triton)

        _OPS["op"] = lowbit_gemv
    return _OPS["op"]


def pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """Signed int4 codes (N, K) as bytes (N, K/2): code + 8, even column in the high nibble."""
    unsigned = (codes.to(torch.int16) + 8).to(torch.uint8)
    return (unsigned[:, ::2] << 4 | unsigned[:, 1::2]).contiguous()


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """The inverse of pack_int4: signed codes (N, K) as int8."""
    high = (packed >> 4).to(torch.int8) - 8
    low = (packed & 15).to(torch.int8) - 8
    return torch.stack([high, low], dim=-1).view(packed.shape[0], -1)
