"""Fused q/k/v and gate/up projections on a tiny grouped-query Llama, on CPU in float32.

The fused model must compute what the unfused one does: logits to 1e-5 of their largest magnitude (float32
products of the same weights, summed in the same order per output column), and the same greedy tokens through
the harness's static-cache decode loop, eager and traced by Dynamo as one graph.
"""

from __future__ import annotations

import copy

import pytest
import torch

from tests.utils.factories import quantize_decoder_, tiny_llama
from worker.engine.quantize.quant_math import TokenQuantHook, rtn_params
from worker.engine.speed.conversion import convert_for_speed_, kernel_counts, speed_copy
from worker.engine.speed.fused_projections import QKV, ColumnSlice, fuse_projections_
from worker.engine.speed.harness import greedy_tokens
from worker.engine.speed.kernels import kernel_linear
from worker.engine.steps import QuantizedWeight, StepContext, run_step, step_spec

TOLERANCE = 1e-5  # of the reference's largest magnitude
ATTENTION, MLP = "model.layers.0.self_attn", "model.layers.0.mlp"
ALL_FUSED = {
    f"model.layers.{i}.{module}": f"fused {label}"
    for i in range(2)
    for module, label in (("self_attn", "q/k/v"), ("mlp", "gate/up"))
}


pytestmark = pytest.mark.usefixtures("one_thread")


def assert_matches(out: torch.Tensor, reference: torch.Tensor) -> None:
    assert out.shape == reference.shape
    error = float((out - reference).abs().max())
    assert error <= TOLERANCE * float(reference.abs().max()), error


def prompt(batch: int = 2, length: int = 10, seed: int = 3) -> torch.Tensor:
    return torch.randint(1, 512, (batch, length), generator=torch.Generator().manual_seed(seed))


def test_fused_model_computes_the_same_logits_and_leaves_the_original_alone():
    model = tiny_llama(hidden=64, max_positions=128)
    fused = copy.deepcopy(model)
    assert fuse_projections_(fused) == ALL_FUSED
    attention, mlp = fused.model.layers[0].self_attn, fused.model.layers[0].mlp
    assert type(attention.qkv_proj) is torch.nn.Linear and attention.qkv_proj.out_features == 64 + 2 * 32
    assert type(mlp.gate_up_proj) is torch.nn.Linear and mlp.gate_up_proj.out_features == 2 * 128
    assert isinstance(attention.k_proj, ColumnSlice) and (attention.k_proj.start, attention.k_proj.stop) == (64, 96)
    names = {name for name, _ in fused.named_modules()}
    assert f"{ATTENTION}.qkv_proj" in names and f"{ATTENTION}.q_proj" not in names
    assert f"{MLP}.gate_up_proj.weight" in fused.state_dict() and f"{MLP}.up_proj.weight" not in fused.state_dict()
    original = model.model.layers[0].self_attn
    assert type(original).__name__ == "LlamaAttention" and isinstance(original.q_proj, torch.nn.Linear)
    assert isinstance(attention, type(original))  # a subclass: transformers' isinstance checks still hold
    ids = prompt()
    with torch.no_grad():
        assert_matches(fused(ids).logits, model(ids).logits)


def test_fused_model_decodes_the_same_tokens_with_a_static_cache():
    model = tiny_llama(hidden=64, max_positions=128)
    fused = copy.deepcopy(model)
    fuse_projections_(fused)
    ids = prompt()
    assert torch.equal(greedy_tokens(fused, ids, 12), greedy_tokens(model, ids, 12))
    torch._dynamo.reset()
    try:  # the compiled step's tracing (Dynamo, eager backend): one graph through the fused forward
        traced = greedy_tokens(fused, ids[:1], 6, compiled=True, backend="eager")
    finally:
        torch._dynamo.reset()
    assert torch.equal(traced, greedy_tokens(model, ids[:1], 6))


def test_biases_are_concatenated_too():
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2, attention_bias=True, mlp_bias=True, max_position_embeddings=64,
    )  # fmt: skip
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.Linear) and module.bias is not None:
                module.bias.normal_()  # transformers initializes biases to zero
    fused = copy.deepcopy(model)
    assert set(fuse_projections_(fused).values()) == {"fused q/k/v", "fused gate/up"}
    assert fused.model.layers[0].self_attn.qkv_proj.bias.shape == (128,)
    ids = torch.randint(1, 128, (1, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert_matches(fused(ids).logits, model(ids).logits)


@pytest.mark.parametrize(("bits", "group_size", "symmetric"), [(4, 32, True), (8, None, False)])
def test_records_are_concatenated_and_the_fused_kernel_matches(bits, group_size, symmetric):
    model = tiny_llama(hidden=64, max_positions=128)
    records = quantize_decoder_(model, bits, group_size, symmetric)
    fused_model = copy.deepcopy(model)
    quantized, sparse = dict(records), {f"{MLP}.gate_proj", f"{MLP}.up_proj"}
    fuse_projections_(fused_model, quantized, sparse)
    assert sparse == {f"{MLP}.gate_up_proj"}
    assert f"{ATTENTION}.q_proj" not in quantized and f"{ATTENTION}.o_proj" in quantized
    assert len(quantized) == len(records) - 6  # 2 layers: 5 members out, 2 fused names in
    record = quantized[f"{ATTENTION}.qkv_proj"]
    members = [records[f"{ATTENTION}.{m}"] for m in ("q_proj", "k_proj", "v_proj")]
    assert torch.equal(record.scale, torch.cat([r.scale for r in members]))
    assert record.scale.shape == (128, 64 // (group_size or 64))
    if symmetric:
        assert record.zero_point is None
    else:
        assert torch.equal(record.zero_point, torch.cat([r.zero_point for r in members]))
    x = torch.randn(2, 5, 64, generator=torch.Generator().manual_seed(1))
    original = model.model.layers[0].self_attn
    separate = [kernel_linear(getattr(original, m), records[f"{ATTENTION}.{m}"], False)[0] for m in QKV.members]
    expected = torch.cat([module(x) for module in separate], dim=-1)
    module, _ = kernel_linear(fused_model.model.layers[0].self_attn.qkv_proj, record, False)
    assert_matches(module(x), expected)


def test_convert_for_speed_fuses_then_runs_the_kernels_on_the_fused_linears():
    model = tiny_llama(hidden=64, max_positions=128)
    records = quantize_decoder_(model, 8, None)
    ids = prompt(1, 12)
    with torch.no_grad():
        reference = model(ids).logits
    fast = speed_copy(model, torch.float32, set(records))
    kernels = convert_for_speed_(fast, records, set(), "cpu", fuse=True)
    counts = kernel_counts(kernels)
    assert counts["fused q/k/v"] == 2 and counts["fused gate/up"] == 2
    assert sum(n for k, n in counts.items() if not k.startswith("fused")) == 8  # qkv, o, gate_up, down x 2
    assert not any(k.startswith("unchanged") for k in counts)
    assert len(records) == 14 and f"{ATTENTION}.q_proj" in records  # the caller's records are not changed
    assert isinstance(model.model.layers[0].self_attn.q_proj, torch.nn.Linear)
    with torch.no_grad():
        assert_matches(fast(ids).logits, reference)
    assert torch.equal(greedy_tokens(fast, ids, 8), greedy_tokens(model, ids, 8))


def test_incompatible_or_partial_records_leave_the_group_unfused_with_a_reason():
    model = tiny_llama(hidden=64, max_positions=128)
    records = quantize_decoder_(model, 4, 32)
    scale, zero = rtn_params(model.model.layers[0].self_attn.k_proj.weight.detach(), 4, 64, True)
    quantized = dict(records)
    quantized[f"{ATTENTION}.k_proj"] = QuantizedWeight(scale=scale, zero_point=zero, bits=4, group_size=64,
                                                        symmetric=True)  # fmt: skip
    del quantized[f"{MLP}.up_proj"]
    fused = copy.deepcopy(model)
    before = dict(quantized)
    results = fuse_projections_(fused, quantized)
    assert results[ATTENTION] == "unchanged: quantization records differ in group_size"
    assert results[MLP] == "unchanged: only gate_proj have quantization records"
    assert results["model.layers.1.self_attn"] == "fused q/k/v"
    assert all(quantized[name] is before[name] for name in (f"{ATTENTION}.k_proj", f"{MLP}.gate_proj"))
    assert isinstance(fused.model.layers[0].self_attn.k_proj, torch.nn.Linear)
    assert type(fused.model.layers[0].self_attn).__name__ == "LlamaAttention"
    results = fuse_projections_(fused, None, {f"{ATTENTION}.q_proj"})
    assert results[ATTENTION] == "unchanged: only q_proj are 2:4 sparse"
    assert "model.layers.1.self_attn" not in results  # fused already: it has no q/k/v Linears left to look at


def test_unrecognized_structures_and_hooked_modules_are_left_alone():
    model = tiny_llama(hidden=64, max_positions=128)
    model.model.layers[0].self_attn.v_proj.register_forward_hook(lambda *args: None)
    model.model.layers[1].mlp.extra = torch.nn.Linear(64, 64)
    results = fuse_projections_(model)
    assert results[ATTENTION] == "unchanged: v_proj has hooks"
    assert results["model.layers.1.mlp"].startswith("unchanged: its Linears are ['down_proj', 'extra',")
    assert results[MLP] == "fused gate/up"


@pytest.mark.parametrize("method", ["fp8", "smoothquant"])
def test_w8a8_members_fuse_and_the_fused_linear_quantizes_its_input_as_they_did(method):
    """fp8 and SmoothQuant's int8 W8A8 leave a per-token activation quantization hook on every Linear: q/k/v and
    gate/up still fuse, and the fused Linear carries the hook, so the fused model computes what the model does."""
    model = tiny_llama(hidden=64, max_positions=128)
    windows = torch.randint(1, 512, (4, 32), generator=torch.Generator().manual_seed(7))
    spec = step_spec({"type": "quantize", "method": method})
    run_step(model, spec, StepContext(calibration=windows, report_progress=lambda f, m: None))
    hooks = list(model.model.layers[0].self_attn.q_proj._forward_pre_hooks.values())
    assert len(hooks) == 1 and isinstance(hooks[0], TokenQuantHook)
    ids = prompt()
    with torch.no_grad():
        reference = model(ids).logits
    fused = copy.deepcopy(model)
    assert fuse_projections_(fused) == ALL_FUSED
    qkv = fused.model.layers[0].self_attn.qkv_proj
    kind = "fp8" if method == "fp8" else "int8"
    assert [repr(h) for h in qkv._forward_pre_hooks.values()] == [f"TokenQuantHook('{kind}')"]
    with torch.no_grad():
        assert_matches(fused(ids).logits, reference)


def test_members_quantizing_their_inputs_differently_stay_apart():
    model = tiny_llama(hidden=64, max_positions=128)
    attention = model.model.layers[0].self_attn
    for name in ("q_proj", "k_proj"):
        getattr(attention, name).register_forward_pre_hook(TokenQuantHook("fp8"))
    attention.v_proj.register_forward_pre_hook(TokenQuantHook("int8"))
    model.model.layers[1].self_attn.q_proj.register_forward_pre_hook(TokenQuantHook("fp8"))
    results = fuse_projections_(model)
    assert results[ATTENTION] == "unchanged: the members' inputs are not quantized alike"
    assert results["model.layers.1.self_attn"] == "unchanged: the members' inputs are not quantized alike"
    assert results[MLP] == "fused gate/up"


def test_the_gpu_speed_path_fuses_the_baseline_and_the_quantized_copy_alike():
    from worker.engine.evaluate.evaluation import EvalPlan, kernel_speed

    model = tiny_llama(hidden=64, max_positions=128)
    records = quantize_decoder_(model, 8, None)
    plan = EvalPlan(device=torch.device("cpu"), windows=None, latency_ids=prompt(1, 16), decode_tokens=3, repeats=1)
    baseline = kernel_speed(model, plan, {}, set())
    assert baseline["kernels"] == {"fused q/k/v": 2, "fused gate/up": 2}
    optimized = kernel_speed(model, plan, records, set())
    assert optimized["kernels"]["fused q/k/v"] == 2 and sum(optimized["kernels"].values()) == 4 + 8
    assert kernel_speed(model, plan, {}, set(), fuse=False)["kernels"] == {}
    assert isinstance(model.model.layers[0].self_attn.q_proj, torch.nn.Linear) and len(records) == 14
