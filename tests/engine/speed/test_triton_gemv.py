"""The Triton low-bit matrix-vector kernel (worker/engine/speed/triton_gemv.py) against plain float products.

On CPU the kernel runs under Triton's interpreter, in a subprocess (TRITON_INTERPRET must be set before Triton
is imported); on CUDA the kernel modules run compiled, as the decode step runs them."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from worker.engine.speed import triton_gemv
from worker.engine.speed.kernel_modules import Fp8RowwiseLinear, Int4PackedLinear, Int8WeightOnlyLinear

ROOT = Path(__file__).resolve().parents[3]
needs_triton = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="Triton is not installed")

INTERPRETED = textwrap.dedent(
    """
    import torch
    from worker.engine.speed import triton_gemv as tg
    from worker.engine.speed.kernel_modules import Int4PackedLinear

    torch.manual_seed(0)
    rows, n, k, group = 3, 37, 256, 64  # n not a multiple of any block: the row mask is exercised

    def close(out, ref):
        worst = float((out.float() - ref).abs().max() / ref.abs().max())
        assert worst < 1e-2, worst  # bf16 output rounding is 2^-8 of each value
        return worst

    x = torch.randn(rows, k, dtype=torch.bfloat16)
    q8 = torch.randint(-128, 128, (n, k), dtype=torch.int8)
    s8 = torch.rand(n) + 0.1
    print("int8", close(tg.gemv(x, q8, s8, kind=tg.KIND_INT8), (x.float() @ q8.float().T) * s8))

    def int4_case(rows, k, group, with_zero):
        x = torch.randn(rows, k, dtype=torch.bfloat16)
        q = torch.randint(-8, 8, (n, k), dtype=torch.int8)
        s = torch.rand(n, k // group) + 0.1
        zero = torch.randint(-3, 4, (n, k // group)).float() if with_zero else None
        shifted = q.float().view(n, -1, group) - (0 if zero is None else zero.unsqueeze(-1))
        ref = x.float() @ (shifted * s.unsqueeze(-1)).view(n, k).T
        return close(tg.gemv(x, tg.pack_int4(q), s, zero, kind=tg.KIND_INT4, group=group), ref)

    # (BLOCK_K, rows, K, group, zero points): groups of 32, 64 and 128 with and without zero points, smaller than,
    # equal to and larger than BLOCK_K; per channel (one group, a K that is no power of two); K not a multiple
    # of BLOCK_K (the tail chunk is masked). BLOCK_K is the one-row kernel's; more rows run the multi-row kernel
    int4_cases = [
        (64, 3, 256, 64, True), (256, 1, 320, 64, False), (64, 1, 96, 32, False), (256, 1, 96, 32, True),
        (64, 16, 384, 128, True), (256, 1, 384, 128, False), (64, 3, 96, 96, True),
    ]  # fmt: skip
    for block_k, *case in int4_cases:
        tg.INTERPRETER_BLOCKS["BLOCK_K"] = block_k
        print("int4", block_k, *case, int4_case(*case))
    tg.INTERPRETER_BLOCKS["BLOCK_K"] = 64
    q4 = torch.randint(-8, 8, (n, k), dtype=torch.int8)
    s4 = torch.rand(n, k // group) + 0.1
    z4 = torch.randint(-3, 4, (n, k // group)).float()

    wq = (torch.randn(n, k) * 50).to(torch.float8_e4m3fn)
    xq = (torch.randn(rows, k) * 20).to(torch.float8_e4m3fn)
    xs = torch.rand(rows) + 0.5
    ref = (xq.float() @ wq.float().T) * s8 * xs[:, None]
    print("fp8", close(tg.gemv(xq, wq, s8, x_scale=xs, kind=tg.KIND_FP8, out_dtype=torch.bfloat16), ref))

    # the module's two paths (kernel up to MAX_ROWS rows, dequantized matmul above) compute the same product
    module = Int4PackedLinear(q4, s4, z4, group, None, torch.bfloat16)
    many = torch.randn(tg.MAX_ROWS + 5, k, dtype=torch.bfloat16)
    assert module.weight_int4.dtype == torch.uint8 and module.weight_int4.shape == (n, k // 2)
    close(module(many[: tg.MAX_ROWS]), module(many).float()[: tg.MAX_ROWS])
    print("ok")
    """
)


# The multi-row kernel (2 to MAX_ROWS rows, one program for all rows of BLOCK_N outputs, tl.dot on dequantized
# tiles) against float products and against the one-row kernel run row by row.
INTERPRETED_ROWS = textwrap.dedent(
    """
    import torch
    from worker.engine.speed import triton_gemv as tg

    torch.manual_seed(0)
    n = 37  # no multiple of BLOCK_N: the output-row mask is exercised
    multi = []
    launch_rows = tg._launch_rows
    tg._launch_rows = lambda *args: multi.append(1) or launch_rows(*args)

    def close(out, ref):
        worst = float((out.float() - ref).abs().max() / ref.abs().max())
        assert worst < 1e-2, worst  # bf16 / fp16 output rounding
        return worst

    def check(run, x, ref, path_multi=True):
        before = len(multi)
        out = run(x)
        assert len(multi) == before + path_multi, "wrong kernel"
        close(out, ref)
        by_row = torch.cat([run(x[i : i + 1]) for i in range(x.shape[0])])  # the one-row kernel
        assert len(multi) == before + path_multi
        return close(out, by_row.float())

    for rows in (2, 5, 16):
        for dtype in (torch.bfloat16, torch.float16, torch.float32):
            x = torch.randn(rows, 80, dtype=dtype)  # K = 80: the last BLOCK_K tile is masked
            q8 = torch.randint(-128, 128, (n, 80), dtype=torch.int8)
            s8 = torch.rand(n) + 0.1
            run = lambda x: tg.gemv(x, q8, s8, kind=tg.KIND_INT8)
            print("int8", rows, dtype, check(run, x, (x.float() @ q8.float().T) * s8))

        wq = (torch.randn(n, 96) * 50).to(torch.float8_e4m3fn)
        xq = (torch.randn(rows, 96) * 20).to(torch.float8_e4m3fn)
        xs = torch.rand(rows) + 0.5
        ref = (xq.float() @ wq.float().T) * s8 * xs[:, None]
        before = len(multi)
        out = tg.gemv(xq, wq, s8, x_scale=xs, kind=tg.KIND_FP8, out_dtype=torch.bfloat16)
        assert len(multi) == before + 1, "wrong kernel"
        by_row = torch.cat([
            tg.gemv(xq[i : i + 1], wq, s8, x_scale=xs[i : i + 1], kind=tg.KIND_FP8, out_dtype=torch.bfloat16)
            for i in range(rows)
        ])  # each row with its own activation scale
        print("fp8", rows, close(out, ref), close(out, by_row.float()))

    def int4_case(rows, k, group, with_zero, dtype=torch.bfloat16, path_multi=True):
        x = torch.randn(rows, k, dtype=dtype)
        q = torch.randint(-8, 8, (n, k), dtype=torch.int8)
        s = torch.rand(n, k // group) + 0.1
        zero = torch.randint(-3, 4, (n, k // group)).float() if with_zero else None
        shifted = q.float().view(n, -1, group) - (0 if zero is None else zero.unsqueeze(-1))
        ref = x.float() @ (shifted * s.unsqueeze(-1)).view(n, k).T
        packed = tg.pack_int4(q)
        run = lambda x: tg.gemv(x, packed, s, zero, kind=tg.KIND_INT4, group=group)
        return check(run, x, ref, path_multi)

    # (BLOCK_N, BLOCK_K, rows, K, group, zero points): groups of 32, 64 and 128 with and without zero points,
    # BLOCK_K capped at the group where it is larger; per channel (one group of the whole row, K no power of
    # two, its last tile masked)
    int4_cases = [
        (16, 64, 2, 128, 32, True), (16, 128, 5, 128, 32, False), (32, 64, 16, 192, 64, True),
        (16, 128, 2, 192, 64, False), (16, 64, 5, 256, 128, True), (32, 128, 16, 256, 128, False),
        (16, 64, 5, 96, 96, True), (16, 128, 16, 96, 96, False), (16, 32, 2, 160, 160, True),
    ]  # fmt: skip
    for block_n, block_k, *case in int4_cases:
        tg.INTERPRETER_ROW_BLOCKS.update(BLOCK_N=block_n, BLOCK_K=block_k)
        print("int4", block_n, block_k, *case, int4_case(*case))
    tg.INTERPRETER_ROW_BLOCKS.update(BLOCK_N=16, BLOCK_K=64)
    print("int4 fp16", int4_case(5, 128, 64, True, torch.float16))
    print("int4 fp32", int4_case(5, 128, 32, True, torch.float32))
    # groups of 48 (the largest power of two dividing them is 16 < 32): the one-row kernel, row by row
    print("int4 group 48", int4_case(5, 96, 48, True, path_multi=False))
    print("ok")
    """
)

# The custom op that CUDA calls goes through torch.library.wrap_triton; on CPU its body runs the same kernels.
INTERPRETED_OP = textwrap.dedent(
    """
    import torch
    from worker.engine.speed import triton_gemv as tg

    tg._op()
    torch.manual_seed(0)
    n, k = 37, 128
    q8, s8 = torch.randint(-128, 128, (n, k), dtype=torch.int8), torch.rand(n) + 0.1
    q4, s4, z4 = torch.randint(-8, 8, (n, k), dtype=torch.int8), torch.rand(n, k // 32) + 0.1, torch.ones(n, k // 32)
    for rows in (1, 5):  # the one-row and the multi-row kernel
        x = torch.randn(rows, k, dtype=torch.bfloat16)
        for args in ((q8, s8, None, None, tg.KIND_INT8, 0), (tg.pack_int4(q4), s4, z4, None, tg.KIND_INT4, 32)):
            direct = tg.gemv(x, *args)
            via_op = torch.ops.modelpress.lowbit_gemv(x, *args, None)
            assert via_op.shape == (rows, n) and torch.equal(direct, via_op), (rows, args[-2])
    print("ok")
    """
)


def _interpret(script: str) -> str:
    """Run `script` in a fresh interpreter with TRITON_INTERPRET=1; its stdout."""
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": path}
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


@needs_triton
def test_kernel_matches_float_products_under_the_interpreter():
    out = _interpret(INTERPRETED)
    assert out.strip().endswith("ok"), out


@needs_triton
def test_multi_row_kernel_matches_float_products_and_the_one_row_kernel_under_the_interpreter():
    out = _interpret(INTERPRETED_ROWS)
    assert out.strip().endswith("ok"), out


@needs_triton
def test_custom_op_body_runs_the_kernels_as_gemv_does_under_the_interpreter():
    out = _interpret(INTERPRETED_OP)
    assert out.strip().endswith("ok"), out


def test_int4_packing_round_trips_and_puts_the_even_column_high():
    codes = torch.randint(-8, 8, (5, 64), dtype=torch.int8)
    packed = triton_gemv.pack_int4(codes)
    assert packed.shape == (5, 32) and packed.dtype == torch.uint8
    assert torch.equal(triton_gemv.unpack_int4(packed), codes)
    assert int(packed[0, 0]) == ((int(codes[0, 0]) + 8) << 4 | (int(codes[0, 1]) + 8))


def test_without_triton_or_cuda_the_kernel_is_not_offered(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert not triton_gemv.available(torch.device("cpu"))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA only")
@pytest.mark.parametrize("rows", [1, 16, 64])
def test_kernel_modules_compiled_on_cuda_match_their_float_weights(rows):
    """Each module, compiled as the decode step compiles it, against F.linear with its dequantized weight."""
    torch.manual_seed(0)
    n, k, group = 1024, 4096, 128
    x = torch.randn(1, rows, k, device="cuda", dtype=torch.bfloat16)
    q8 = torch.randint(-127, 128, (n, k), device="cuda", dtype=torch.int8)
    s8 = torch.rand(n, device="cuda") / 100
    q4 = torch.randint(-8, 8, (n, k), device="cuda", dtype=torch.int8)
    s4 = torch.rand(n, k // group, device="cuda") / 10
    z4 = torch.randint(-2, 3, (n, k // group), device="cuda").float()
    w8 = (torch.randn(n, k, device="cuda") * 50).to(torch.float8_e4m3fn)
    int4 = Int4PackedLinear(q4, s4, z4, group, None, torch.bfloat16)
    modules = {
        "int8": (Int8WeightOnlyLinear(q8, s8.bfloat16(), None, use_int8pack=False), (q8.float() * s8[:, None])),
        "int4": (int4, int4.dequantized(torch.float32)),
        "fp8": (Fp8RowwiseLinear(w8, s8, None, fast_accum=True), w8.float() * s8[:, None]),
    }
    for name, (module, weight) in modules.items():
        compiled = torch.compile(module, fullgraph=True, options={"coordinate_descent_tuning": True})
        out = compiled(x).float()
        ref = torch.nn.functional.linear(x.float(), weight)
        worst = float((out - ref).norm() / ref.norm())
        assert worst < (3e-2 if name == "fp8" else 1e-2), (name, worst)  # fp8 also rounds the activations


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA only")
@pytest.mark.parametrize("rows", [1, 16])
def test_int4_kernel_compiled_on_cuda_handles_each_group_and_width(rows):
    """The autotuned int4 kernel over the groups the specs allow and per channel, at Llama-3-8B and SmolLM2
    input widths (576 and 1536 are no multiple of the largest BLOCK_K)."""
    torch.manual_seed(0)
    n = 1000  # no multiple of any BLOCK_N
    cases = [(4096, 32, True), (4096, 64, False), (14336, 128, True), (576, 64, True), (1536, 1536, False)]
    for k, group, with_zero in cases:
        x = torch.randn(rows, k, device="cuda", dtype=torch.bfloat16)
        q = torch.randint(-8, 8, (n, k), device="cuda", dtype=torch.int8)
        s = torch.rand(n, k // group, device="cuda") / 10
        zero = torch.randint(-2, 3, (n, k // group), device="cuda").float() if with_zero else None
        shifted = q.float().view(n, -1, group) - (0 if zero is None else zero.unsqueeze(-1))
        ref = x.float() @ (shifted * s.unsqueeze(-1)).view(n, k).T
        out = triton_gemv.gemv(x, triton_gemv.pack_int4(q), s, zero, kind=triton_gemv.KIND_INT4, group=group)
        worst = float((out.float() - ref).norm() / ref.norm())
        assert worst < 1e-2, (k, group, with_zero, worst)
