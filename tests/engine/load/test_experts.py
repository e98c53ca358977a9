"""Mixture-of-experts models: one Linear per expert matrix, routed calibration, fallbacks, and the saved layout.

Tiny random Qwen3-MoE and Mixtral models (4 experts, 2 per token) built from transformers configs.
"""

from __future__ import annotations

import json
from collections import Counter

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM

from modelpress.specs import DEFAULT_IGNORE
from tests.utils.factories import build_tiny_model_of
from worker.engine import EngineError
from worker.engine.calibrate import select_linears
from worker.engine.export.compressed import save_compressed_
from worker.engine.load import load_model
from worker.engine.load.experts import UnfusedExperts, fused_expert_modules, is_expert_linear
from worker.engine.steps import StepContext, run_step, step_spec

pytestmark = pytest.mark.usefixtures("one_thread")

MOE = ["qwen3_moe", "mixtral"]
PROJECTIONS = {"qwen3_moe": ("gate_proj", "up_proj", "down_proj"), "mixtral": ("w1", "w3", "w2")}
SAVED_BLOCK = {"qwen3_moe": "mlp", "mixtral": "block_sparse_moe"}  # as vLLM's Qwen3-MoE and Mixtral loaders read


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("moe")
    return {model_type: build_tiny_model_of(root / model_type, model_type) for model_type in MOE}


def windows(model, count=4, length=32, seed=0):
    return torch.randint(0, model.config.vocab_size, (count, length), generator=torch.Generator().manual_seed(seed))


def context(calibration):
    return StepContext(calibration=calibration, report_progress=lambda f, m: None)


def routed_tokens(model, calibration) -> Counter:
    """Calibration tokens the router sends to each (layer, expert), counted from the router's own choice, on the
    model as it is (the experts of layer 1 see layer 0's outputs)."""
    counts: Counter = Counter()
    handles = []
    for index, layer in enumerate(model.model.layers):

        def hook(_module, _args, output, index=index):
            for expert in output[-1].flatten().tolist():
                counts[(index, expert)] += 1

        handles.append(layer.mlp.gate.register_forward_hook(hook))
    with torch.no_grad():
        for window in calibration:
            model(input_ids=window[None])
    for handle in handles:
        handle.remove()
    return counts


@pytest.mark.parametrize("model_type", MOE)
def test_experts_become_linears_with_the_same_outputs(folders, model_type) -> None:
    fused = AutoModelForCausalLM.from_pretrained(folders[model_type]).eval()
    assert fused_expert_modules(fused), "transformers no longer fuses this model's experts: revisit load/experts.py"
    model = load_model(folders[model_type], "hf", torch.device("cpu")).model
    assert not fused_expert_modules(model)
    experts = model.model.layers[0].mlp.experts
    assert isinstance(experts, UnfusedExperts) and len(experts) == 4
    gate, up, down = PROJECTIONS[model_type]
    fused_experts = fused.model.layers[0].mlp.experts
    torch.testing.assert_close(getattr(experts[2], gate).weight, fused_experts.gate_up_proj[2, :64])
    torch.testing.assert_close(getattr(experts[2], up).weight, fused_experts.gate_up_proj[2, 64:])
    torch.testing.assert_close(getattr(experts[2], down).weight, fused_experts.down_proj[2])
    ids = windows(model, count=2)
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, fused(input_ids=ids).logits, rtol=1e-5, atol=1e-5)
    targeted = select_linears(model, ignore=DEFAULT_IGNORE)
    assert not any(name.endswith(".mlp.gate") for name in targeted), "the router is targeted by default"
    assert sum(is_expert_linear(name) for name in targeted) == 2 * 4 * 3


@pytest.mark.parametrize("model_type", MOE)
def test_gptq_calibrates_each_expert_on_its_routed_tokens_and_rounds_starved_ones(
    folders, model_type, monkeypatch
) -> None:
    model = load_model(folders[model_type], "hf", torch.device("cpu")).model
    calibration = windows(model)
    counts = routed_tokens(model, calibration)
    first_layer = sorted(counts[(0, e)] for e in range(4))
    assert first_layer[0] < first_layer[-1], "the router sends every expert the same share: pick another seed"
    threshold = first_layer[-1]  # the busiest expert of layer 0 is calibrated, the others fall back
    monkeypatch.setattr("worker.engine.quantize.gptq.MIN_ROUTED_TOKENS", threshold)
    weights = {"bits": 4, "group_size": 32, "symmetric": True}
    step = step_spec({"type": "quantize", "method": "gptq", "weights": weights, "true_sequential": False})
    result = run_step(model, step, context(calibration))
    records = {layer["name"]: layer for layer in result.layers}
    gate = PROJECTIONS[model_type][0]
    for expert in range(4):
        record = records[f"model.layers.0.mlp.experts.{expert}.{gate}"]
        tokens = counts[(0, expert)]
        if tokens < threshold:
            assert record["calibration"] == f"rtn: only {tokens} calibration tokens reached this layer"
        else:
            assert "calibration" not in record and record["output_error"] is not None
    assert "model.layers.0.mlp.gate" not in records
    assert any("rounded to nearest" in note for note in result.notes)


@pytest.mark.parametrize("model_type", MOE)
def test_wanda_scores_experts_by_their_routed_tokens(folders, model_type, monkeypatch) -> None:
    model = load_model(folders[model_type], "hf", torch.device("cpu")).model
    calibration = windows(model)
    counts = routed_tokens(model, calibration)
    threshold = max(counts[(0, e)] for e in range(4))
    monkeypatch.setattr("worker.engine.prune.wanda.MIN_ROUTED_TOKENS", threshold)
    result = run_step(model, step_spec({"type": "prune", "method": "wanda", "sparsity": 0.5}), context(calibration))
    records = {layer["name"]: layer for layer in result.layers}
    down = PROJECTIONS[model_type][2]
    for expert in range(4):
        record = records[f"model.layers.0.mlp.experts.{expert}.{down}"]
        assert record["tokens"] == counts[(0, expert)]  # an expert's statistics hold its routed tokens only
        assert record["sparsity"] == pytest.approx(0.5, abs=0.02)
        assert ("calibration" in record) == (record["tokens"] < threshold)


@pytest.mark.parametrize("model_type", MOE)
def test_saved_experts_use_the_names_vllm_reads_and_reload(folders, model_type, tmp_path) -> None:
    model = load_model(folders[model_type], "hf", torch.device("cpu")).model
    weights = {"bits": 4, "group_size": 32, "symmetric": True}
    result = run_step(model, step_spec({"type": "quantize", "method": "rtn", "weights": weights}), context(None))
    ids = windows(model, count=2, seed=5)
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    config = save_compressed_(model, result.quantized, tmp_path)
    block = SAVED_BLOCK[model_type]
    with safe_open(tmp_path / "model.safetensors", "pt") as tensors:
        names = set(tensors.keys())
        router = tensors.get_tensor(f"model.layers.0.{block}.gate.weight")
    for expert in range(4):
        for projection in PROJECTIONS[model_type]:
            prefix = f"model.layers.1.{block}.experts.{expert}.{projection}"
            assert {f"{prefix}.weight_packed", f"{prefix}.weight_scale"} <= names
    assert router.dtype == torch.float32, "the router was quantized"
    assert not any("gate_up_proj" in name for name in names)
    written = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    assert written["format"] == config["format"] == "pack-quantized"
    assert {f"model.layers.{i}.{block}.gate" for i in (0, 1)} <= set(written["ignore"])
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids).logits, expected, rtol=1e-4, atol=1e-4)


def test_asymmetric_weights_on_experts_are_refused_before_the_work(folders) -> None:
    model = load_model(folders["qwen3_moe"], "hf", torch.device("cpu")).model
    before = model.model.layers[0].mlp.experts[0].gate_proj.weight.clone()
    weights = {"bits": 4, "group_size": 32, "symmetric": False}
    with pytest.raises(EngineError, match="symmetric weights on mixture-of-experts"):
        run_step(model, step_spec({"type": "quantize", "method": "rtn", "weights": weights}), context(None))
    assert torch.equal(model.model.layers[0].mlp.experts[0].gate_proj.weight, before)


@pytest.mark.parametrize("model_type", MOE)
def test_rtn_reports_no_output_error_for_an_expert_no_token_reached(folders, model_type) -> None:
    model = load_model(folders[model_type], "hf", torch.device("cpu")).model
    calibration = windows(model, count=1, length=1)  # one token: 2 of the 4 experts of each layer see nothing
    counts = routed_tokens(model, calibration)
    weights = {"bits": 8, "group_size": None, "symmetric": True}
    result = run_step(model, step_spec({"type": "quantize", "method": "rtn", "weights": weights}), context(calibration))
    records = {layer["name"]: layer for layer in result.layers}
    down = PROJECTIONS[model_type][2]
    errors = {e: records[f"model.layers.0.mlp.experts.{e}.{down}"]["output_error"] for e in range(4)}
    assert sum(counts[(0, e)] == 0 for e in range(4)) == 2
    assert {e for e, error in errors.items() if error is None} == {e for e in range(4) if counts[(0, e)] == 0}
    assert all(error > 0 for error in errors.values() if error is not None)
