"""Low-bit matrix-vector products for decoding (a few rows of input), in Triton.

Why: at batch 1 a decode step is bound by reading the weights, so a low-bit weight pays off only if the kernel
streams its bytes at close to the copy bandwidth. On an H200 (benchmarks/gpu.md, `gpu_probe.py`) torch's
own options did not: tinygemm int4 reads at about 1.6 TB/s, `_scaled_mm` fp8 at 1.1 to 2.4 TB/s, and the int8
weight-only matmul that Inductor generates at 0.7 to 1.9 TB/s for the 4096-wide inputs of q/k/v/o and gate/up.

One kernel, three weight kinds, each output row a dot product over K accumulated in float32:
- KIND_INT8: int8 codes (N, K), one scale per output row, y = (x · q) · s;
- KIND_INT4: int4 codes two a byte (N, K/2; even column in the high nibble, stored as code + 8), scales and
  optional integer zero points per group of GROUP columns: y = Σ_g s_g · (Σ_k∈g x_k u_k − (z_g + 8) Σ_k∈g x_k)
  with u = code + 8 the stored nibble, summed over segments that each lie in one group;
- KIND_FP8: E4M3 codes (N, K) with one scale per output row, times activations already rounded to E4M3 per
  token (passed as their values with one scale per row): y = (x_q · q) · s · s_x, W8A8 as `_scaled_mm`
  computes it.
The weight's shape is compiled in (a decode step has five distinct shapes). Each program owns BLOCK_N output
rows of one input row; the input rows are the fastest grid axis, so the programs of one weight slab run
together and read it from DRAM once (the others hit L2). Block sizes
are autotuned per shape. Exposed as the custom op `modelpress::lowbit_gemv` (torch.library.triton_op), which
torch.compile traces into the decode step's graph and CUDA graphs capture.

Measured on an H200 (benchmarks/gpu.md): for fp8 this kernel beats `_scaled_mm` at one row on most Llama-3-8B
shapes; for int8 it is on par with Inductor's fused form. For int4 the first version read at under 1 TB/s,
slower than tinygemm (so int4 layers use tinygemm, and this kernel only where tinygemm cannot run); the int4
kind has since been restructured (x read once and contiguous, scales and zero points loaded once a segment of a
group rather than gathered per weight) and is not yet timed with gpu_probe.py. A quick probe of the kernel
alone (one row, CUDA-graph replay, groups of 32 and 128 and per channel) read 1.1 to 1.9 TB/s on the down and
gate+up shapes, where the first version read 0.6 to 1.2 TB/s in the same probe.

Triton is imported lazily and is optional: without it (CPU builds) `available()` is False and the kernel
modules keep torch's own kernels. Tests run the kernel on CPU under Triton's interpreter (TRITON_INTERPRET=1).
"""

from __future__ import annotations

import importlib.util
import os

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

        configs = [triton.Config({"BLOCK_N": n, "BLOCK_K": k}, num_warps=warps) for n, k, warps in _CONFIGS]
        _KERNELS["plain"] = lowbit_gemv_kernel
        _KERNELS["tuned"] = triton.autotune(configs=configs, key=["M", "N", "K", "KIND", "GROUP"])(lowbit_gemv_kernel)
    return _KERNELS["plain"], _KERNELS["tuned"]


def launch(
    x: torch.Tensor,
    weight: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor | None,
    x_scale: torch.Tensor | None,
    kind: int,
    group: int,
    out_dtype: torch.dtype | None,
    wrap=None,
) -> torch.Tensor:
    """Run the kernel on x (M, K), contiguous; y (M, N). `wrap` is torch.library.wrap_triton inside the op."""
    rows, columns = x.shape
    out = torch.empty(rows, weight.shape[0], dtype=out_dtype or x.dtype, device=x.device)
    plain, tuned = _kernels()
    kernel = plain if interpreting() else tuned
    kernel = wrap(kernel) if wrap is not None else kernel
    groups = scale.shape[1] if kind == KIND_INT4 else 1
    # the largest power of two that divides the group (one group per row: any, the whole row is one group)
    align = group & -group if groups > 1 else 1 << (columns - 1).bit_length()
    extra = INTERPRETER_BLOCKS if interpreting() else {}

    def grid(meta):
        return (rows, -(-weight.shape[0] // meta["BLOCK_N"]))

    kernel[grid](
        x, weight, scale, scale if zero is None else zero, scale if x_scale is None else x_scale, out,
        rows, weight.shape[0], columns, groups,
        KIND=kind, GROUP=group, GROUP_ALIGN=align, HAS_ZERO=zero is not None, **extra,
    )  # fmt: skip
    return out


def gemv(
    x: torch.Tensor,
    weight: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor | None = None,
    x_scale: torch.Tensor | None = None,
    kind: int = KIND_INT8,
    group: int = 0,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """y (M, N) in `out_dtype` (default x's) for x (M, K), M ≤ MAX_ROWS; on CUDA through the custom op."""
    if x.is_cuda:  # registered by available()
        return torch.ops.modelpress.lowbit_gemv(x, weight, scale, zero, x_scale, kind, group, out_dtype)
    return launch(x.contiguous(), weight, scale, zero, x_scale, kind, group, out_dtype)


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
            return launch(x.contiguous(), weight, scale, zero, x_scale, kind, group, out_dtype, wrap=wrap_triton)

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
