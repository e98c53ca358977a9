"""Kernel-backed Linears against the fake-quantized float Linears they replace, and the speed harness, on CPU.

The CPU kernels (aten._weight_int8pack_mm, tinygemm's _weight_int4pack_mm_for_cpu, _scaled_mm, _int_mm) run
the same codes and scales as the CUDA ones, so their outputs are checked here; the CUDA-only paths (tinygemm
on CUDA, rowwise fp8 on sm89+, 2:4 sparse) run in benchmarks/gpu_speed.py. Float32 throughout: a kernel output
must match the fake-quantized Linear to 1e-5 relative to the output's largest magnitude (float32 sums in a
different order), which is far below one quantization step (~1e-2 of it for int8, more for int4).
"""

from __future__ import annotations

import argparse

import pytest
import torch
import torch.nn.functional as F

from benchmarks import gpu_speed
from tests.utils.factories import quantize_decoder_, tiny_llama
from worker.engine.prune.masks import nm_mask
from worker.engine.quantize.quant_math import (
    dequantize,
    fake_quantize,
    fake_quantize_tokens,
    fp8_fake_quantize,
    fp8_params,
    quantize,
    requantize_in_dtype,
    rtn_params,
)
from worker.engine.speed import triton_gemv
from worker.engine.speed.conversion import convert_for_speed_, kernel_counts, speed_copy
from worker.engine.speed.harness import decode_weight_bytes, greedy_tokens, measure_copy_bandwidth, time_model
from worker.engine.speed.kernel_modules import Int4PackedLinear
from worker.engine.speed.kernels import (
    GRID_TOLERANCE,
    KernelUnavailable,
    has_aten_op,
    int_codes,
    kernel_linear,
    semi_structured_violations,
    semi_structured_weight,
)
from worker.engine.steps import QuantizedWeight, StepContext, run_step, step_spec

TOLERANCE = 1e-5  # of the reference output's largest magnitude
IN, OUT = 256, 128


pytestmark = pytest.mark.usefixtures("one_thread")


def fake_quantized_linear(bits: int, group_size: int | None, symmetric: bool, seed: int = 0):
    """A float Linear whose weight is RTN fake-quantized in place, with its record."""
    torch.manual_seed(seed)
    linear = torch.nn.Linear(IN, OUT, bias=True)
    scale, zero = rtn_params(linear.weight.detach(), bits, group_size, symmetric)
    with torch.no_grad():
        linear.weight.copy_(fake_quantize(linear.weight, scale, zero, bits, group_size))
    return linear, QuantizedWeight(scale=scale, zero_point=zero, bits=bits, group_size=group_size, symmetric=symmetric)


def assert_matches(out: torch.Tensor, reference: torch.Tensor) -> None:
    assert out.shape == reference.shape and out.dtype == reference.dtype
    error = float((out - reference).detach().abs().max())
    assert error <= TOLERANCE * float(reference.detach().abs().max()), error


def inputs() -> torch.Tensor:
    return torch.randn(2, 5, IN, generator=torch.Generator().manual_seed(1))


@pytest.mark.skipif(not has_aten_op("_weight_int8pack_mm"), reason="this torch has no _weight_int8pack_mm")
def test_int8_weight_only_runs_int8pack_mm_and_matches():
    linear, record = fake_quantized_linear(8, None, True)
    module, kernel = kernel_linear(linear, record, False)
    assert "aten._weight_int8pack_mm" in kernel and module.weight_int8.dtype == torch.int8
    x = inputs()
    assert_matches(module(x), linear(x))


@pytest.mark.skipif(not has_aten_op("_weight_int4pack_mm_for_cpu"), reason="no CPU tinygemm in this torch")
@pytest.mark.parametrize(
    ("group_size", "symmetric"), [(32, True), (64, False), (128, True), (128, False), (None, True)]
)
def test_int4_tinygemm_matches_symmetric_and_asymmetric(group_size, symmetric):
    linear, record = fake_quantized_linear(4, group_size, symmetric)
    module, kernel = kernel_linear(linear, record, False)
    assert "tinygemm" in kernel and f"group {group_size or IN}" in kernel  # per channel: one group of the row
    x = inputs()
    assert_matches(module(x), linear(x))


@pytest.mark.skipif(not has_aten_op("_weight_int4pack_mm_for_cpu"), reason="no CPU tinygemm in this torch")
def test_int4_kernel_choice_takes_the_triton_module_where_triton_runs(monkeypatch):
    linear, record = fake_quantized_linear(4, 64, False)
    with pytest.raises(ValueError, match="int4_kernel"):
        kernel_linear(linear, record, False, int4_kernel="marlin")
    monkeypatch.setattr(triton_gemv, "available", lambda device: True)  # kernels.py and kernel_modules.py both ask it
    module, kernel = kernel_linear(linear, record, False, int4_kernel="triton")
    assert isinstance(module, Int4PackedLinear) and "Triton matrix-vector kernel (group 64)" in kernel
    assert torch.equal(module.dequantized(torch.float32), linear.weight.detach())  # same codes, scales and zeros
    _, kernel = kernel_linear(linear, record, False)
    assert "tinygemm" in kernel  # the default keeps tinygemm wherever it runs


@pytest.mark.parametrize(("group_size", "symmetric"), [(64, True), (None, False)])
def test_grouped_or_asymmetric_int8_dequantizes_in_the_forward(group_size, symmetric):
    linear, record = fake_quantized_linear(8, group_size, symmetric)
    module, kernel = kernel_linear(linear, record, False)
    assert "dequantized in the forward" in kernel
    x = inputs()
    assert_matches(module(x), linear(x))


def test_codes_come_from_the_records_scale_and_off_grid_weights_are_refused():
    linear, record = fake_quantized_linear(4, 32, True)
    codes = int_codes(linear.weight, record)
    assert codes.dtype == torch.int8 and int(codes.min()) >= -8 and int(codes.max()) <= 7
    assert int(codes.min()) == -8  # absmax / 7.5: the most negative level is used
    with torch.no_grad():
        linear.weight.add_(0.3 * record.scale.repeat_interleave(32, dim=1))  # a third of a step off the grid
    with pytest.raises(KernelUnavailable, match="not on the record's 4-bit grid"):
        kernel_linear(linear, record, False)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize(("bits", "group_size", "symmetric"), [(4, 128, True), (4, 32, False), (8, None, True)])
def test_weights_held_in_half_precision_are_on_their_grid(dtype, bits, group_size, symmetric):
    """A bf16 / fp16 model's quantize step leaves each weight as its codes times its scale computed in that dtype
    (`requantize_in_dtype`): in bf16 up to 3% of a step from the float32 product at code 8. Those weights are on
    the grid: the codes recovered reproduce them exactly, and 4-bit codes are the step's own."""
    weight = torch.randn(OUT, IN, generator=torch.Generator().manual_seed(4)) * 0.02
    scale, zero = rtn_params(weight, bits, group_size, symmetric)
    codes = quantize(weight, scale, zero, bits, group_size)
    held, held_scale = requantize_in_dtype(weight, scale, zero, bits, group_size, dtype)
    held_zero = None if zero is None else zero.to(dtype)
    record = QuantizedWeight(
        scale=held_scale, zero_point=held_zero, bits=bits, group_size=group_size, symmetric=symmetric
    )
    if dtype == torch.bfloat16 and bits == 4:  # the case a float32 grid refused
        step = held_scale.float().repeat_interleave(group_size or IN, dim=1)
        float32_grid = dequantize(codes, held_scale.float(), None if zero is None else zero, group_size)
        assert float(((held.float() - float32_grid).abs() / step).max()) > GRID_TOLERANCE
    recovered = int_codes(held, record)
    assert torch.equal(dequantize(recovered.to(dtype), held_scale, held_zero, group_size), held)
    if bits == 4:
        assert torch.equal(recovered, codes.to(torch.int8))


@pytest.mark.skipif(not has_aten_op("_scaled_mm"), reason="no _scaled_mm")
def test_fp8_w8a8_matches_fake_quantized_weights_and_tokens():
    torch.manual_seed(0)
    linear = torch.nn.Linear(IN, OUT, bias=False)
    scale = fp8_params(linear.weight.detach())
    with torch.no_grad():
        linear.weight.copy_(fp8_fake_quantize(linear.weight, scale))
    record = QuantizedWeight(
        scale=scale, zero_point=None, bits=8, group_size=None, symmetric=True, kind="float", activations="fp8"
    )
    try:
        module, kernel = kernel_linear(linear, record, False)
        x = inputs()
        out = module(x)
    except (RuntimeError, NotImplementedError) as exc:  # a CPU build without fp8 GEMMs
        pytest.skip(f"_scaled_mm on CPU: {exc}")
    assert "_scaled_mm" in kernel and module.weight_fp8.dtype == torch.float8_e4m3fn
    assert_matches(out, F.linear(fake_quantize_tokens(x, "fp8"), linear.weight))


@pytest.mark.skipif(not has_aten_op("_int_mm"), reason="no _int_mm")
def test_int8_w8a8_matches_fake_quantized_weights_and_tokens():
    linear, weights = fake_quantized_linear(8, None, True)
    record = QuantizedWeight(scale=weights.scale, zero_point=None, bits=8, group_size=None, symmetric=True,
                             activations="int8")  # fmt: skip
    module, kernel = kernel_linear(linear, record, False)
    assert "_int_mm" in kernel
    x = inputs()
    assert_matches(module(x), F.linear(fake_quantize_tokens(x, "int8"), linear.weight, linear.bias))


def test_the_sparse_path_refuses_a_weight_that_is_not_2_4():
    torch.manual_seed(0)
    dense = torch.randn(OUT, IN)
    pruned = dense * nm_mask(dense.abs(), 2, 4)
    assert semi_structured_violations(dense) > 0 and semi_structured_violations(pruned) == 0
    pruned[0, :4] = torch.tensor([0.0, 0.0, 0.0, 1.0])  # fewer than 2 nonzeros still fits the format
    assert semi_structured_violations(pruned) == 0
    assert semi_structured_violations(torch.randn(4, 6)) == 1  # width not a multiple of 4
    with pytest.raises(KernelUnavailable, match="not 2:4 sparse"):
        semi_structured_weight(dense, torch.bfloat16)
    with pytest.raises(KernelUnavailable, match="CUDA only"):  # a 2:4 weight passes the check, then needs CUDA
        semi_structured_weight(pruned, torch.bfloat16)


# --- A tiny Llama, quantized --------------------------------------------------------------------------------


@pytest.mark.skipif(not has_aten_op("_weight_int4pack_mm_for_cpu"), reason="no CPU tinygemm in this torch")
def test_converted_model_computes_what_the_fake_quantized_model_does():
    model = tiny_llama(hidden=128, max_positions=256)
    records = quantize_decoder_(model, 4, 64)
    records["model.norm"] = records["model.layers.0.mlp.up_proj"]  # not a Linear: kept, with its reason
    ids = torch.randint(1, 512, (1, 24), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        reference = model(ids).logits
    fast = speed_copy(model, torch.float32, set(records))
    kernels = convert_for_speed_(fast, records, set(), "cpu")
    assert kernel_counts(kernels) == {
        "int4 weight-only: tinygemm aten._weight_int4pack_mm_for_cpu (group 64, inner_k_tiles 8)": 14,
        "unchanged: not an nn.Linear in this model": 1,
    }
    assert isinstance(model.model.layers[0].mlp.up_proj, torch.nn.Linear)  # the original is untouched
    with torch.no_grad():
        logits = fast(ids).logits
    assert_matches(logits, reference)
    assert decode_weight_bytes(fast) < 0.5 * decode_weight_bytes(model)


@pytest.mark.skipif(not has_aten_op("_weight_int4pack_mm_for_cpu"), reason="no CPU tinygemm in this torch")
def test_a_bf16_model_quantized_by_gptq_runs_every_quantized_linear_on_the_int4_kernel():
    """The path of a CUDA worker (the model held in bf16), on the CPU: no quantized Linear is left unchanged."""
    model = tiny_llama(hidden=128, max_positions=256).to(torch.bfloat16)
    windows = torch.randint(1, 512, (4, 48), generator=torch.Generator().manual_seed(5))
    spec = step_spec({"type": "quantize", "method": "gptq", "weights": {"bits": 4, "group_size": 64}})
    result = run_step(model, spec, StepContext(calibration=windows, report_progress=lambda f, m: None))
    assert len(result.quantized) == 14
    fast = speed_copy(model, torch.bfloat16, set(result.quantized))
    kernels = convert_for_speed_(fast, result.quantized, set(), "cpu")
    assert kernel_counts(kernels) == {
        "int4 weight-only: tinygemm aten._weight_int4pack_mm_for_cpu (group 64, inner_k_tiles 8)": 14
    }
    ids = torch.randint(1, 512, (1, 16), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        reference, logits = model(ids).logits.float(), fast(ids).logits.float()
    assert float((logits - reference).abs().max()) <= 0.05 * float(reference.abs().max())  # bf16 sums


def test_speed_copy_casts_and_shares_only_the_kept_linears():
    model = tiny_llama(hidden=128, max_positions=256)
    copy = speed_copy(model, torch.bfloat16, {"model.layers.0.self_attn.q_proj"})
    assert copy.model.layers[0].self_attn.q_proj.weight is model.model.layers[0].self_attn.q_proj.weight
    assert copy.model.layers[0].self_attn.k_proj.weight.dtype == torch.bfloat16
    assert copy.lm_head.weight.dtype == torch.bfloat16 and model.lm_head.weight.dtype == torch.float32


def test_decode_weight_bytes_leaves_out_the_input_embedding_only():
    model = tiny_llama(hidden=128, max_positions=256)
    everything = sum(p.numel() * p.element_size() for p in model.parameters())
    everything += sum(b.numel() * b.element_size() for b in model.buffers())
    embedding = model.model.embed_tokens.weight
    assert decode_weight_bytes(model) == everything - embedding.numel() * embedding.element_size()


# --- The harness ----------------------------------------------------------------------------------------------


def test_harness_decode_loop_is_greedy_generate():
    model = tiny_llama(hidden=128, max_positions=256)
    prompt = torch.randint(1, 512, (2, 10), generator=torch.Generator().manual_seed(3))
    tokens = greedy_tokens(model, prompt, 12)
    with torch.no_grad():
        expected = model.generate(prompt, max_new_tokens=12, min_new_tokens=12, do_sample=False, pad_token_id=0)
    assert torch.equal(tokens, expected[:, prompt.shape[1] :])


def test_decode_step_traces_as_one_graph():
    """fullgraph=True with Dynamo (the eager backend: no code generation), the tracing the CUDA path compiles."""
    torch._dynamo.reset()
    model = tiny_llama(hidden=128, max_positions=256)
    prompt = torch.randint(1, 512, (1, 8), generator=torch.Generator().manual_seed(4))
    try:
        tokens = greedy_tokens(model, prompt, 6, compiled=True, backend="eager")
    finally:
        torch._dynamo.reset()
    assert torch.equal(tokens, greedy_tokens(model, prompt, 6))


def test_measure_speed_reports_positive_figures_and_its_path():
    model = tiny_llama(hidden=128, max_positions=256)
    ids = torch.randint(1, 512, (1, 32), generator=torch.Generator().manual_seed(5))
    speed = time_model(model, ids[:, :8], ids, 4, batch_sizes=(1, 3), repeats=1)
    assert [d["batch"] for d in speed["decode"]] == [1, 3]
    assert all(d["tokens_per_s"] > 0 and d["ms_per_step"] > 0 and d["compiled"] is False for d in speed["decode"])
    assert speed["prefill"]["tokens"] == 32 and speed["prefill"]["tokens_per_s"] > 0
    assert speed["weight_bytes_per_token"] == decode_weight_bytes(model) and speed["dtype"] == "float32"
    assert speed["method"].startswith("cpu: eager transformers forward with a static KV cache")
    assert "time.perf_counter" in speed["method"]
    bandwidth = measure_copy_bandwidth("cpu", 1 << 20, repeats=3)
    assert bandwidth["bytes_per_s"] > 0 and "2 x bytes / time" in bandwidth["method"]


def test_benchmark_smoke_runs_on_cpu(tmp_path):
    out = tmp_path / "speed.json"
    argv = ["--smoke", "--device", "cpu", "--dtype", "float32", "--batches", "1,2", "--steps", "3", "--prefill", "32"]
    args = gpu_speed.parse_args([*argv, "--repeats", "1", "--out", str(out)])
    assert isinstance(args, argparse.Namespace)
    result = gpu_speed.run(args)
    rows = {row["variant"]: row for row in result["variants"]}
    assert list(rows) == list(gpu_speed.DEFAULT_VARIANTS)
    for name in ("bf16", "int8", "int4"):
        assert rows[name]["prefill"]["tokens_per_s"] > 0, rows[name]
        assert all(rows[name]["decode"][b]["tokens_per_s"] > 0 for b in ("1", "2")), rows[name]
    assert "CUDA only" in rows["sparse24"]["error"]  # recorded, not raised
    assert "| int4 weight-only (g128, symmetric) |" in result["table"] and out.is_file()
    assert result["environment"]["torch"] == torch.__version__
    assert result["model"]["attention"].startswith("modelpress_grouped_decode")  # the smoke model is grouped-query


def test_benchmark_table_gives_the_floor_ratio_for_batch_1_only():
    row = {"variant": "bf16", "label": "bf16 (dense)", "floor_tokens_per_s": 100.0, "prefill": None}
    result = {
        "variants": [{**row, "decode": {"16": {"tokens_per_s": 1500.0}}}],
        "settings": {"batches": [16]},
        "copy_bandwidth": {"bytes_per_s": 4e12},
        "environment": {"device": "GPU", "torch": "2", "transformers": "5", "cuda": "13"},
    }
    line = gpu_speed.table(result).splitlines()[4]
    assert line.startswith("| bf16 (dense) |") and "| 1500.0 | 1.00 | — |" in line
    result["variants"][0]["decode"]["1"] = {"tokens_per_s": 80.0}
    result["settings"]["batches"] = [1, 16]
    assert "| 80% |" in gpu_speed.table(result).splitlines()[4]
