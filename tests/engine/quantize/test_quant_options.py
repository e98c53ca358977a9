"""Options of the calibrated quantizers: GPTQ's `true_sequential` and `clip_search`, AWQ's `true_sequential` and
`clipped_search`: what each changes, checked against a direct computation."""

import pytest
import torch

from tests.engine.quantize.test_quant_methods import INT4_G32, calibration_windows, correlated_inputs, run_step
from worker.engine.calibrate.layerwise import input_stages, sequential_layers
from worker.engine.calibrate.targets import select_linears
from worker.engine.quantize import gptq_math
from worker.engine.quantize.awq_math import scaled_error
from worker.engine.quantize.common import calibrated_layers, quantize_, quantize_layers
from worker.engine.quantize.gptq_math import gptq_quantize
from worker.engine.quantize.quant_math import fake_quantize, output_error, rtn_params
from worker.engine.steps import StepContext


def test_input_stages_follow_the_order_a_llama_layer_reads_its_inputs(tiny):
    model = tiny.model
    names = list(select_linears(model))
    steps = sequential_layers(model, calibration_windows(model), torch.device("cpu"))
    step = next(steps)
    inside = [n for n in names if n.startswith(step.name + ".")]
    stages = input_stages(step, inside)
    steps.close()
    short = [[n.removeprefix(step.name + ".") for n in stage] for stage in stages]
    assert short == [
        ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"],
        ["self_attn.o_proj"],
        ["mlp.gate_proj", "mlp.up_proj"],
        ["mlp.down_proj"],
    ]


def test_true_sequential_observes_o_proj_after_q_k_v_are_quantized(tiny_model_dir):
    """The o_proj Hessian handed to the quantizer equals the one observed on a model whose q/k/v alone were
    rounded; without the option it equals the float model's."""
    from worker.engine.load.checkpoint import load_model

    o_proj = "model.layers.0.self_attn.o_proj"
    qkv = [f"model.layers.0.self_attn.{p}_proj" for p in "qkv"]

    def seen_o_proj_hessian(true_sequential: bool) -> torch.Tensor:
        model = load_model(tiny_model_dir, "hf", torch.device("cpu")).model
        linears = select_linears(model)
        seen = {}

        def rtn(name, linear, stats):
            seen.setdefault(name, stats.gram.clone())
            return quantize_(linear.weight, 4, 32, True)

        context = StepContext(calibration=calibration_windows(model), report_progress=lambda f, m: None)
        quantize_layers(model, context, linears, rtn, true_sequential=true_sequential)
        return seen[o_proj]

    def o_proj_hessian(round_qkv: bool) -> torch.Tensor:
        model = load_model(tiny_model_dir, "hf", torch.device("cpu")).model
        linears = select_linears(model)
        if round_qkv:
            for name in qkv:
                quantize_(linears[name].weight, 4, 32, True)
        layers = calibrated_layers(model, {o_proj: linears[o_proj]}, calibration_windows(model), "cpu", None)
        gram = next(layers).stats[o_proj].gram.clone()
        layers.close()
        return gram

    float_gram, rounded_gram = o_proj_hessian(False), o_proj_hessian(True)
    assert not torch.allclose(float_gram, rounded_gram, rtol=1e-3, atol=1e-6)  # rounding q/k/v is visible
    torch.testing.assert_close(seen_o_proj_hessian(True), rounded_gram, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(seen_o_proj_hessian(False), float_gram, rtol=1e-5, atol=1e-6)


def test_true_sequential_runs_prepare_once_per_layer_on_the_whole_float_layer(tiny):
    """AWQ folds every scale before anything is rounded: `prepare` sees all of a layer's Linears, with their
    float statistics, and only then are the stages quantized in turn."""
    model = tiny.model
    linears = select_linears(model)
    events = []

    def prepare(group):
        events.append(("prepare", sorted(group.linears), group.stats[next(iter(group.linears))].hessian.count))

    def rtn(name, linear, stats):
        events.append(("quantize", name))
        return quantize_(linear.weight, 4, 32, True)

    context = StepContext(calibration=calibration_windows(model), report_progress=lambda f, m: None)
    quantize_layers(model, context, linears, rtn, prepare, true_sequential=True)
    layer0 = [n for n in linears if n.startswith("model.layers.0.")]
    assert events[0] == ("prepare", sorted(layer0), 4 * 48)  # every window's tokens, before any rounding
    assert [e[1] for e in events[1 : 1 + len(layer0)]] == layer0
    assert sum(e[0] == "prepare" for e in events) == model.config.num_hidden_layers


@pytest.mark.parametrize("option", ["true_sequential", "clipped_search"])
def test_awq_step_runs_and_records_its_option(tiny, option):
    model = tiny.model
    step = {"method": "awq", "weights": INT4_G32, option: True}
    result = run_step(model, step, calibration_windows(model, count=8, length=64))
    assert result.summary[option] is True and result.summary["scaled_layers"] > 0
    assert all(layer["output_error"] is not None and layer["output_error"] < 0.5 for layer in result.layers)


def test_true_sequential_step_quantizes_every_linear_once(tiny):
    model = tiny.model
    step = {"method": "gptq", "weights": INT4_G32, "act_order": True, "true_sequential": True}
    result = run_step(model, step, calibration_windows(model, count=8, length=64))
    names = list(select_linears(model))
    assert [layer["name"] for layer in result.layers] == names
    assert result.summary["true_sequential"] is True
    assert all(layer["output_error"] is not None and layer["output_error"] < 0.5 for layer in result.layers)


@pytest.mark.parametrize("act_order", [True, False])
@pytest.mark.parametrize("symmetric", [True, False])
def test_clip_search_shrinks_ranges_and_keeps_weights_on_their_grid(act_order, symmetric):
    x = correlated_inputs()
    w = torch.randn(64, 128, generator=torch.Generator().manual_seed(1))
    w[:, 5] *= 6  # a column of outliers: clipping pays off in its groups
    hessian = 2 / x.shape[0] * x.T @ x
    plain = gptq_quantize(w, hessian, 4, 32, symmetric, block_size=48, act_order=act_order)
    clipped = gptq_quantize(w, hessian, 4, 32, symmetric, block_size=48, act_order=act_order, clip_search=True)
    q, scale, zero = clipped
    assert torch.equal(fake_quantize(q, scale, zero, 4, 32), q)
    full_range, _ = rtn_params(w, 4, 32, symmetric)
    if act_order:  # static groups: scales of the original weights, never wider than their full range
        assert (scale <= full_range * (1 + 1e-6)).all() and (scale < full_range * 0.99).any()
    # GPTQ's updates move weights after the ranges were chosen, so clipping is no sure gain over the full range
    # (here it is slightly worse: the real model decides, benchmarks/quant_sweep.py); it still beats rounding
    rtn = fake_quantize(w, full_range, rtn_params(w, 4, 32, symmetric)[1], 4, 32)
    assert output_error(w, q, hessian) < 0.6 * output_error(w, rtn, hessian)
    assert not torch.equal(q, plain[0])


def test_fp8_gptq_refuses_clip_search():
    with pytest.raises(ValueError, match="clip search"):
        gptq_quantize(torch.ones(4, 8), torch.eye(8), 8, None, True, kind="float", clip_search=True)


def test_clipped_scale_search_scores_with_the_clipped_quantizer():
    """With a block-diagonal Gram (here the identity), per-group clipping can only lower the error that the
    candidate's score measures; with s ≠ 1 the search clips in the scaled space, where the Gram is G / (s sᵀ)."""
    g = torch.Generator().manual_seed(3)
    w = torch.randn(16, 64, generator=g)
    w[:, 7] *= 8
    eye = torch.eye(64)
    for s in (torch.ones(64), 0.5 + torch.rand(64, generator=g)):
        rounded = scaled_error([w], eye, s, 4, 32, True)
        clipped = scaled_error([w], eye, s, 4, 32, True, clipped=True)
        assert clipped < rounded


def _reference_inverse_factor(hessian: torch.Tensor, dampening: float) -> torch.Tensor:
    damped = hessian + dampening * torch.diag(hessian).mean() * torch.eye(hessian.shape[0])
    return torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(damped)), upper=True)


@pytest.mark.parametrize("shift", [0.0, 0.3], ids=["positive-definite", "needs-more-dampening"])
def test_inverse_cholesky_in_place_equals_the_copying_path(shift):
    """GPTQ's inverse factor made in H's own buffer (as large Hessians are) equals the one made beside an
    untouched H, and both equal the textbook formula at the dampening that first succeeds."""
    x = torch.randn(256, 64, generator=torch.Generator().manual_seed(1))
    hessian = 2 / 256 * x.T @ x
    hessian.diagonal().sub_(shift * torch.diag(hessian).mean())  # below zero: the first dampening fails
    kept = hessian.clone()
    beside = gptq_math.inverse_cholesky(hessian, 0.01)
    assert torch.equal(hessian, kept), "without rebuild H is left as it was"
    rebuilt = []

    def rebuild() -> torch.Tensor:
        rebuilt.append(1)
        return kept.clone()

    in_place = gptq_math.inverse_cholesky(kept.clone(), 0.01, rebuild=rebuild)
    assert torch.equal(in_place, beside)
    attempt = 0
    while attempt < gptq_math.MAX_DAMPENING_RETRIES:
        try:
            expected = _reference_inverse_factor(kept, 0.01 * 10**attempt)
            break
        except torch.linalg.LinAlgError:
            attempt += 1
    assert shift == 0 or attempt > 0, "the shifted Hessian needs more than the first dampening"
    torch.testing.assert_close(in_place, expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_parking_its_hessian_in_host_memory_changes_nothing(monkeypatch, act_order):
    """Where the device is short of room GPTQ parks the layer Hessian in host memory while it factorizes: the
    result is the same, and the caller's Hessian is whole again afterwards."""
    x = torch.randn(512, 96, generator=torch.Generator().manual_seed(2)) @ torch.randn(96, 96)
    x[:, 7] = 0  # a dead channel
    hessian = 2 / 512 * x.T @ x
    weight = torch.randn(48, 96)
    expected = gptq_quantize(weight, hessian, 4, 32, True, 32, 0.01, act_order, clip_search=True)
    kept = hessian.clone()
    monkeypatch.setattr(gptq_math, "short_of_room", lambda tensor, buffers: True)
    parked = gptq_quantize(weight, hessian, 4, 32, True, 32, 0.01, act_order, clip_search=True)
    assert all(torch.equal(a, b) for a, b in zip(expected[:2], parked[:2], strict=True))
    assert torch.equal(hessian, kept)
