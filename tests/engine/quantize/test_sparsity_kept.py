"""Quantizing a pruned model keeps its zeros: every pruned weight of the reloaded artifact is exactly zero and an
N:M pattern holds in every group, for every quantize method. The artifact is reloaded by transformers alone
(compressed-tensors decompresses it), so the check covers each scheme's grid and the export."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, CompressedTensorsConfig

from tests.engine.quantize.test_quant_methods import correlated_inputs
from tests.utils.factories import build_tiny_model, run_engine_job
from worker.engine import pipeline
from worker.engine.load.checkpoint import load_model
from worker.engine.prune.masks import nm_mask
from worker.engine.quantize.common import quantize_layers
from worker.engine.quantize.gptq_math import gptq_quantize
from worker.engine.quantize.quant_math import (
    clipped_params,
    fake_quantize,
    fp8_fake_quantize,
    fp8_params,
    output_error,
    rtn_params,
)
from worker.engine.steps import QuantizedWeight, StepContext, run_step, step_spec

PRUNES = {
    "magnitude-50%": {"type": "prune", "method": "magnitude", "sparsity": 0.5},
    "2:4": {"type": "prune", "method": "magnitude", "pattern": "2:4"},
}
G32 = {"bits": 4, "group_size": 32}
QUANTIZERS = {
    "rtn-int8": {"method": "rtn", "weights": {"bits": 8, "group_size": None, "symmetric": True}},
    "rtn-int4-g32-asym": {"method": "rtn", "weights": {**G32, "symmetric": False}},
    "gptq-int4-g32-sym": {"method": "gptq", "weights": {**G32, "symmetric": True}},
    "gptq-int4-g32-asym": {"method": "gptq", "weights": {**G32, "symmetric": False}},
    "gptq-int4-g32-act-order": {"method": "gptq", "weights": {**G32, "symmetric": False}, "act_order": True},
    "awq-int4-g32-sym": {"method": "awq", "weights": {**G32, "symmetric": True}},
    "awq-int4-g32-asym": {"method": "awq", "weights": {**G32, "symmetric": False}},
    "smoothquant": {"method": "smoothquant"},
    "fp8": {"method": "fp8"},
    "fp8-gptq": {"method": "fp8", "gptq": True},
}
UNTIMED = {"prefill": {"ms": 0.0, "tokens": 0}, "decode": [{"ms_per_step": 0.0, "steps": 0}]}


@pytest.fixture(autouse=True)
def untimed(monkeypatch):
    """Skip the speed harness and sample generation (most of a CPU run, and not what these tests check)."""
    real = pipeline.evaluate
    monkeypatch.setattr(
        pipeline,
        "evaluate",
        lambda model, _tokenizer, plan, report, _speed, observer=None, onloaded=False: real(
            model, None, plan, report, UNTIMED, observer, onloaded
        ),
    )


@pytest.fixture(scope="module")
def qwen2_model_dir(tmp_path_factory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("qwen2") / "model", architecture="qwen2")


def pruned_positions(model_dir, prune: dict) -> dict[str, torch.Tensor]:
    """{Linear name: where the prune step alone leaves zeros} (the step is deterministic, as in the pipeline)."""
    model = load_model(model_dir, "hf", torch.device("cpu")).model
    run_step(model, step_spec(prune), StepContext(calibration=None, report_progress=lambda f, m: None))
    return {n: m.weight == 0 for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head"}


def run_recipe(model_dir, recipe: list[dict], text_dataset, out, datasets=None) -> tuple[dict, dict]:
    """Run `recipe` through the pipeline; (report, {Linear name: weight} of the artifact dequantized on reload)."""
    calibration = (text_dataset, {"samples": 4, "seq_len": 64})
    report, folder = run_engine_job(model_dir, recipe, out, calibration=calibration, datasets=datasets)
    quantized = "quantization_config" in json.loads((folder / "config.json").read_text())
    dequantized = {"quantization_config": CompressedTensorsConfig(dequantize=True)} if quantized else {}
    loaded = AutoModelForCausalLM.from_pretrained(folder, local_files_only=True, **dequantized)
    weights = {n: m.weight.detach() for n, m in loaded.named_modules() if isinstance(m, torch.nn.Linear)}
    return report, weights


def assert_zeros_kept(weights: dict, pruned: dict, pattern: bool) -> None:
    for name, zero in pruned.items():
        weight = weights[name]
        assert zero.float().mean() >= 0.5, f"{name}: the prune step itself left too few zeros"
        moved = int((weight[zero] != 0).sum())
        assert moved == 0, f"{name}: {moved} of {int(zero.sum())} pruned weights are no longer zero"
        if pattern:
            zeros_per_group = (weight == 0).reshape(weight.shape[0], -1, 4).sum(dim=-1)
            assert int(zeros_per_group.min()) >= 2, f"{name}: a group of 4 holds fewer than 2 zeros"


def assert_reported(report: dict, weights: dict, pruned: dict) -> None:
    quant = report["steps"][-1]["summary"]
    assert quant["sparsity_kept"] is True
    zeros = sum(int((weights[n] == 0).sum()) for n in pruned)
    total = sum(weights[n].numel() for n in pruned)
    assert quant["sparsity_before"] == pytest.approx(sum(int(z.sum()) for z in pruned.values()) / total)
    assert quant["sparsity_after"] == pytest.approx(zeros / total)
    assert quant["sparsity_after"] >= quant["sparsity_before"] >= 0.5


@pytest.mark.parametrize("prune", list(PRUNES))
@pytest.mark.parametrize("quantizer", list(QUANTIZERS))
def test_quantizing_keeps_the_pruned_zeros(quantizer, prune, tiny_model_dir, text_dataset, tmp_path):
    pruned = pruned_positions(tiny_model_dir, PRUNES[prune])
    recipe = [PRUNES[prune], {"type": "quantize", **QUANTIZERS[quantizer]}]
    report, weights = run_recipe(tiny_model_dir, recipe, text_dataset, tmp_path)
    assert_zeros_kept(weights, pruned, pattern=prune == "2:4")
    assert_reported(report, weights, pruned)


@pytest.mark.parametrize("quantizer", ["gptq-int4-g32-sym", "awq-int4-g32-asym", "fp8-gptq"])
def test_quantizing_keeps_the_wanda_zeros_of_a_qwen2_model(quantizer, qwen2_model_dir, text_dataset, tmp_path):
    """The recipe first found to lose zeros: wanda 50% then int4 GPTQ, on a model with q/k/v biases."""
    wanda = {"type": "prune", "method": "wanda", "sparsity": 0.5}
    _, pruned_weights = run_recipe(qwen2_model_dir, [wanda], text_dataset, tmp_path / "pruned")
    pruned = {n: w == 0 for n, w in pruned_weights.items() if n != "lm_head"}
    recipe = [wanda, {"type": "quantize", **QUANTIZERS[quantizer]}]
    report, weights = run_recipe(qwen2_model_dir, recipe, text_dataset, tmp_path / "quantized")
    assert_zeros_kept(weights, pruned, pattern=False)
    assert_reported(report, weights, pruned)


@pytest.mark.parametrize("quantizer", ["rtn-int4-g32-asym", "gptq-int4-g32-sym"])
def test_distillation_then_quantization_keeps_the_2_4_pattern(quantizer, tiny_model_dir, text_dataset, tmp_path):
    distill = {
        "type": "distill",
        "method": "kd",
        "dataset_id": "text",
        "steps": 4,
        "batch_size": 2,
        "seq_len": 32,
        "learning_rate": 1e-3,
        "warmup_steps": 1,
    }
    pruned = pruned_positions(tiny_model_dir, PRUNES["2:4"])
    recipe = [PRUNES["2:4"], distill, {"type": "quantize", **QUANTIZERS[quantizer]}]
    datasets = {"text": (text_dataset, "txt")}
    report, weights = run_recipe(tiny_model_dir, recipe, text_dataset, tmp_path, datasets)
    assert_zeros_kept(weights, pruned, pattern=True)
    assert_reported(report, weights, pruned)


# --- the math: GPTQ's sweep under a mask, and zero on every grid ------------------------------------------------


@pytest.mark.parametrize(
    "bits,group_size,symmetric,act_order,kind",
    [
        (4, 32, True, False, "int"),
        (4, 32, False, False, "int"),
        (4, 32, False, True, "int"),
        (4, None, True, False, "int"),
        (8, None, True, False, "float"),
    ],
)
def test_gptq_keeps_a_2_4_pattern_and_still_beats_rounding_to_nearest(bits, group_size, symmetric, act_order, kind):
    x = correlated_inputs()
    hessian = 2 / x.shape[0] * x.T @ x
    dense = torch.randn(64, 128, generator=torch.Generator().manual_seed(3)) * 0.05
    w = dense * nm_mask(dense.abs(), 2, 4)
    q, scale, zero = gptq_quantize(
        w, hessian, bits, group_size, symmetric, block_size=48, act_order=act_order, kind=kind
    )
    assert torch.equal(q[w == 0], torch.zeros(int((w == 0).sum())))
    assert int((q == 0).reshape(64, -1, 4).sum(dim=-1).min()) >= 2
    if kind == "float":
        assert torch.equal(fp8_fake_quantize(q, scale), q)
        rtn = fp8_fake_quantize(w, fp8_params(w))
    else:
        assert torch.equal(fake_quantize(q, scale, zero, bits, group_size), q)  # on the grid its scales describe
        rtn = fake_quantize(w, *rtn_params(w, bits, group_size, symmetric), bits, group_size)
    assert output_error(w, q, hessian) < 0.8 * output_error(w, rtn, hessian)


@pytest.mark.parametrize("ratio", [1.0, 0.8, 0.55])
@pytest.mark.parametrize("bits,group_size", [(4, 32), (4, None), (8, None), (8, 32)])
def test_zero_is_a_code_of_every_integer_grid(bits, group_size, ratio):
    g = torch.Generator().manual_seed(5)
    w = torch.randn(16, 64, generator=g) * torch.rand(16, 1, generator=g) + torch.randn(16, 1, generator=g)
    w[0] = w[0].abs() + 0.1  # a row of positive weights and one of negative: 0 sits at an end of the range
    w[1] = -w[1].abs() - 0.1
    w[:, ::3] = 0
    for symmetric in (True, False):
        scale, zero = clipped_params(w, bits, group_size, symmetric, ratio)
        if zero is not None:
            assert torch.equal(zero, zero.round())  # integer zero points, as the artifact stores them
        assert not bool(fake_quantize(w, scale, zero, bits, group_size)[:, ::3].any())
    assert not bool(fp8_fake_quantize(w, fp8_params(w))[:, ::3].any())


def test_the_summary_tells_when_quantization_lost_the_zeros(tiny):
    """A quantizer that moves pruned weights off zero is reported, per layer, in the summary and in a note."""
    model = tiny.model
    linears = {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head"}
    first = next(iter(linears))
    with torch.no_grad():
        linears[first].weight.mul_(nm_mask(linears[first].weight.abs(), 2, 4))

    def shift(_name, linear, _stats):
        with torch.no_grad():
            linear.weight.add_(1e-3)
        return QuantizedWeight(
            scale=torch.ones(linear.out_features, 1), zero_point=None, bits=8, group_size=None, symmetric=True
        )

    context = StepContext(calibration=None, report_progress=lambda f, m: None)
    result = quantize_layers(model, context, linears, shift)
    layer = next(layer for layer in result.layers if layer["name"] == first)
    assert layer["sparsity_before"] == 0.5 and layer["sparsity_after"] == 0.0 and layer["sparsity_kept"] is False
    assert all("sparsity_kept" not in other for other in result.layers if other["name"] != first)  # dense
    assert result.summary["sparsity_kept"] is False and result.summary["pruned_layers"] == 1
    assert result.summary["sparsity_before"] == 0.5 and result.summary["sparsity_after"] == 0.0
    assert any(first in note and "sparsity is lost" in note for note in result.notes)
