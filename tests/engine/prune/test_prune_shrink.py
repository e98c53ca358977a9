"""Structured width and depth pruning: shapes and config agree, and the saved artifact loads with transformers
alone (a clean interpreter, no modelpress import) and gives the same logits."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch

from tests.utils.factories import build_tiny_model_of
from worker.engine import steps as engine
from worker.engine.calibrate.layerwise import decoder_layers
from worker.engine.load import load_model
from worker.engine.prune.structured import kept_width
from worker.engine.steps import StepContext, step_spec


def _calibration(model, n: int = 3, seq: int = 24) -> torch.Tensor:
    return torch.randint(0, model.config.vocab_size, (n, seq), generator=torch.Generator().manual_seed(0))


def run_step(model, **spec):
    step = {"type": "prune", **spec}
    context = StepContext(calibration=_calibration(model), report_progress=lambda f, m: None)
    return engine.run_step(model, step_spec(step), context)


def assert_reloads_with_same_logits(model, folder) -> None:
    model.save_pretrained(folder)
    ids = _calibration(model, 1, 16)
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    script = textwrap.dedent(
        f"""
        import sys, torch
        from transformers import AutoModelForCausalLM
        model = AutoModelForCausalLM.from_pretrained({str(folder)!r}, dtype=torch.float32).eval()
        ids = torch.tensor({ids.tolist()})
        with torch.no_grad():
            torch.save(model(input_ids=ids).logits, {str(folder / "logits.pt")!r})
        assert not any(name.startswith(("modelpress", "worker")) for name in sys.modules)
        """
    )
    subprocess.run([sys.executable, "-c", script], check=True, capture_output=True, cwd=folder)
    torch.testing.assert_close(torch.load(folder / "logits.pt"), expected, rtol=1e-4, atol=1e-4)


def test_kept_width_rounds_to_hardware_friendly_multiples():
    assert kept_width(1536, 0.25) == 1152  # 18 · 64
    assert kept_width(128, 0.25) == 96  # 3 · 32
    assert kept_width(100, 0.5) == 48  # 6 · 8
    assert kept_width(10, 0.5) == 5


def test_structured_shrinks_mlp_and_kv_groups_consistently(tiny, tmp_path):
    model = tiny.model
    config = model.config
    heads, kv, hidden = config.num_attention_heads, config.num_key_value_heads, config.hidden_size
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    params_before = sum(p.numel() for p in model.parameters())
    result = run_step(model, method="structured", mlp_sparsity=0.25, attention_sparsity=0.5)
    keep_mlp, keep_kv = kept_width(2 * hidden, 0.25), kv // 2
    assert (config.intermediate_size, config.num_key_value_heads) == (keep_mlp, keep_kv)
    assert config.num_attention_heads == keep_kv * heads // kv and config.head_dim == head_dim
    for layer in decoder_layers(model)[1]:
        assert layer.mlp.gate_proj.weight.shape == (keep_mlp, hidden)
        assert layer.mlp.down_proj.weight.shape == (hidden, keep_mlp)
        assert layer.self_attn.q_proj.weight.shape == (config.num_attention_heads * head_dim, hidden)
        assert layer.self_attn.k_proj.weight.shape == (keep_kv * head_dim, hidden)
        assert layer.self_attn.o_proj.weight.shape == (hidden, config.num_attention_heads * head_dim)
    damage = {entry["name"]: entry for entry in result.layers if "output_error" in entry}
    assert sorted(damage) == sorted(
        f"model.layers.{i}.{proj}"
        for i in range(config.num_hidden_layers)
        for proj in ("mlp.down_proj", "self_attn.o_proj")
    )
    down = damage["model.layers.0.mlp.down_proj"]
    assert down["removed_inputs"] == 2 * hidden - keep_mlp and down["output_error_from"] == "input_norms"
    assert 0 < down["output_error"] < 1 and 0 < down["relative_error"] < 1
    assert result.summary["parameters_after"] == sum(p.numel() for p in model.parameters()) < params_before
    assert 0 < result.summary["size_reduction"] < 1
    assert_reloads_with_same_logits(model, tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["intermediate_size"] == keep_mlp and saved["head_dim"] == head_dim


def test_structured_damage_is_the_removed_channels_share_of_the_output(tiny):
    """down_proj's output error is √(Σ_removed ‖a_j‖²‖W_:,j‖² / Σ_all ‖a_j‖²‖W_:,j‖²) over the calibration
    activations a_j it reads (the diagonal of XᵀX)."""
    model = tiny.model
    down = decoder_layers(model)[1][1].mlp.down_proj
    weight, squares = down.weight.detach().clone(), torch.zeros(down.in_features, dtype=torch.float64)

    def gather(_module, args) -> None:
        squares.add_(args[0].double().square().sum(dim=(0, 1)))

    hook = down.register_forward_pre_hook(gather)
    with torch.no_grad():
        for window in _calibration(model):
            model(input_ids=window.unsqueeze(0))
    hook.remove()
    result = run_step(model, method="structured", mlp_sparsity=0.5)
    (entry,) = [e for e in result.layers if e["name"] == "model.layers.1.mlp.down_proj"]
    kept = [next(j for j in range(weight.shape[1]) if torch.equal(weight[:, j], column)) for column in down.weight.T]
    energy = squares * weight.double().square().sum(0)
    removed = torch.ones(weight.shape[1], dtype=torch.bool)
    removed[kept] = False
    assert entry["output_error"] == pytest.approx((energy[removed].sum() / energy.sum()).sqrt().item(), rel=1e-4)


@pytest.fixture(scope="module")
def phi3_dir(tmp_path_factory):
    return build_tiny_model_of(tmp_path_factory.mktemp("phi3") / "model", "phi3")


def test_structured_prunes_phi3_fused_projections_consistently(phi3_dir, tmp_path):
    """Odd MLP channels and key/value head 0 are silenced (their up rows and v rows zeroed), so pruning must pick
    exactly them, and removing them from the fused gate_up_proj and qkv_proj leaves the model's outputs unchanged."""
    model = load_model(phi3_dir, "hf", torch.device("cpu")).model
    config = model.config
    width, hidden, head_dim = config.intermediate_size, config.hidden_size, config.head_dim
    q_width, kv_width = config.num_attention_heads * head_dim, config.num_key_value_heads * head_dim
    with torch.no_grad():
        for layer in model.model.layers:
            layer.mlp.gate_up_proj.weight[width + 1 :: 2] = 0  # up rows of the odd channels
            layer.self_attn.qkv_proj.weight[q_width + kv_width : q_width + kv_width + head_dim] = 0  # v of head 0
    ids = _calibration(model, 1, 16)
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    result = run_step(model, method="structured", mlp_sparsity=0.5, attention_sparsity=0.5)
    assert (config.intermediate_size, config.num_attention_heads, config.num_key_value_heads) == (width // 2, 2, 1)
    shrunk = [entry for entry in result.layers if "kv_groups_kept" in entry]
    for entry, layer in zip(shrunk, model.model.layers, strict=True):
        assert entry["kv_groups_kept"] == [1]
        assert layer.mlp.gate_up_proj.weight.shape == (width, hidden)
        assert layer.mlp.down_proj.weight.shape == (hidden, width // 2)
        assert layer.self_attn.qkv_proj.weight.shape == (4 * head_dim, hidden)  # 2 q heads, 1 k, 1 v
        assert layer.self_attn.o_proj.weight.shape == (hidden, 2 * head_dim)
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, expected, rtol=1e-4, atol=1e-4)
    assert_reloads_with_same_logits(model, tmp_path)


def test_structured_keeps_the_most_active_channels(tiny):
    model = tiny.model
    layer = decoder_layers(model)[1][0]
    with torch.no_grad():
        layer.mlp.up_proj.weight[7].mul_(100.0)  # channel 7 becomes by far the loudest
    original = layer.mlp.up_proj.weight[7].clone()
    run_step(model, method="structured", mlp_sparsity=0.5)
    assert any(torch.equal(row, original) for row in layer.mlp.up_proj.weight)


def test_depth_drops_layers_and_renumbers(tmp_path):
    from tests.utils.factories import build_tiny_model
    from worker.engine.load.checkpoint import load_model

    model = load_model(build_tiny_model(tmp_path / "m", layers=5), "hf", torch.device("cpu")).model
    with torch.no_grad():  # hidden_states[l] is layer l's input; the last entry (final norm applied) is never used
        states = [model(input_ids=w.unsqueeze(0), output_hidden_states=True).hidden_states for w in _calibration(model)]
    result = run_step(model, method="depth", num_layers=2)
    start = result.summary["dropped_layers"][0]
    skip_error = (
        (
            sum((s[start + 2] - s[start]).double().square().sum() for s in states)
            / sum(s[start + 2].double().square().sum() for s in states)
        )
        .sqrt()
        .item()
    )
    layers = decoder_layers(model)[1]
    assert len(layers) == model.config.num_hidden_layers == 3
    assert [layer.self_attn.layer_idx for layer in layers] == [0, 1, 2]
    dropped = result.summary["dropped_layers"]
    assert len(dropped) == 2 and dropped[1] == dropped[0] + 1 and 4 not in dropped
    ranked, (damage,) = result.layers[:5], result.layers[5:]
    assert all(0 <= d["angular_distance"] <= 1 for d in ranked)
    assert damage["name"] == f"model.layers.{dropped[0]}-{dropped[1]}" and damage["output_error_from"] == "outputs"
    assert damage["output_error"] == pytest.approx(skip_error, rel=1e-4) and damage["relative_error"] == 1.0
    with torch.no_grad():  # the KV cache still works: generation with a cache matches no cache
        ids = _calibration(model, 1, 8)
        cached = model.generate(ids, max_new_tokens=4, do_sample=False, use_cache=True)
        plain = model.generate(ids, max_new_tokens=4, do_sample=False, use_cache=False)
    assert torch.equal(cached, plain)
    assert_reloads_with_same_logits(model, tmp_path / "out")


def test_depth_refuses_removing_every_layer(tiny):
    from worker.engine.steps import EngineError

    with pytest.raises(EngineError):
        run_step(tiny.model, method="depth", num_layers=2)
