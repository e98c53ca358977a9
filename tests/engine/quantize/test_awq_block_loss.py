"""AWQ's module-output scale-search loss (`loss: "block"`): it measures the module holding the consumers, stops
the layer there, leaves the weights as they were, and gives a model as good as the Gram loss's."""

import pytest
import torch
from pydantic import ValidationError

from modelpress.specs import AWQQuantize
from tests.engine.quantize.test_quant_methods import INT4_G32, calibration_windows, run_step
from worker.engine.calibrate.targets import select_linears
from worker.engine.quantize.awq_block import block_loss, containing_module
from worker.engine.quantize.awq_math import candidate_scales, scale_candidates, search_scales
from worker.engine.quantize.common import calibrated_layers
from worker.engine.quantize.quant_math import fake_quantize, rtn_params
from worker.engine.steps import EngineError

CONSUMERS = {
    "self_attn": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    "mlp": ("mlp.gate_proj", "mlp.up_proj"),
}


def logits(model, ids):
    with torch.no_grad():
        return torch.cat([model(input_ids=row.unsqueeze(0), use_cache=False).logits for row in ids])


@pytest.fixture()
def first_layer(tiny):
    """The first decoder layer's calibration pass on a fresh tiny model (the generator closed afterwards)."""
    model = tiny.model
    layers = calibrated_layers(model, select_linears(model), calibration_windows(model, 3, 24), "cpu", None)
    yield next(layers)
    layers.close()


def module_output_error(step, module, consumers):
    """Σ‖module(x) − module_RTN(x)‖² over the windows, from whole-layer runs (no early stop) and plain RTN."""

    def outputs():
        captured = []
        handle = module.register_forward_hook(
            lambda _m, _a, out: captured.append(out[0] if isinstance(out, tuple) else out)
        )
        with torch.no_grad():
            for hidden in step.inputs():
                step.layer(hidden, **step.kwargs)
        handle.remove()
        return captured

    reference = outputs()
    originals = [c.weight.detach().clone() for c in consumers]
    with torch.no_grad():
        for c in consumers:
            c.weight.copy_(fake_quantize(c.weight, *rtn_params(c.weight, 4, 32, True), 4, 32))
    quantized = outputs()
    with torch.no_grad():
        for c, w in zip(consumers, originals, strict=True):
            c.weight.copy_(w)
    return sum(float((a - b).pow(2).sum()) for a, b in zip(quantized, reference, strict=True))


@pytest.mark.parametrize("parent", ["self_attn", "mlp"])
def test_block_loss_of_unit_scales_is_the_module_output_error_of_rtn(first_layer, parent):
    step = first_layer.step
    names = [f"{step.name}.{c}" for c in CONSUMERS[parent]]
    module = containing_module(step, names)
    assert module is step.layer.get_submodule(parent)
    consumers = [first_layer.linears[n] for n in names]
    ran_mlp = []
    handle = step.layer.mlp.register_forward_pre_hook(lambda _m, _a: ran_mlp.append(True))
    try:
        loss = block_loss(step, module, consumers, 4, 32, True)(torch.ones(consumers[0].in_features))
    finally:
        handle.remove()
    expected = module_output_error(step, module, consumers)
    assert expected > 0 and loss == pytest.approx(expected, rel=1e-5)
    assert bool(ran_mlp) == (parent == "mlp")  # the q/k/v search stops each layer run after self_attn


def test_a_block_search_leaves_every_weight_as_it_was(first_layer):
    step = first_layer.step
    before = {k: v.clone() for k, v in step.layer.state_dict().items()}
    names = [f"{step.name}.{c}" for c in CONSUMERS["self_attn"]]
    consumers = [first_layer.linears[n] for n in names]
    loss = block_loss(step, containing_module(step, names), consumers, 4, 32, True)
    x_mean = first_layer.stats[names[0]].abs_mean
    s, alpha, _, best, plain = search_scales(loss, x_mean.numel(), x_mean, x_mean, scale_candidates(6, False))
    assert best <= plain and torch.equal(s, candidate_scales(x_mean, alpha))
    after = step.layer.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_block_loss_step_matches_gram_and_beats_rounding(tiny_model_dir):
    from worker.engine.load.checkpoint import load_model

    errors, results = {}, {}
    for name, step in (
        ("rtn", {"method": "rtn", "weights": INT4_G32}),
        ("gram", {"method": "awq", "weights": INT4_G32, "grid": 6}),
        ("block", {"method": "awq", "weights": INT4_G32, "grid": 6, "loss": "block"}),
    ):
        model = load_model(tiny_model_dir, "hf", torch.device("cpu")).model
        ids = calibration_windows(model, count=2, length=32, seed=5)
        expected = logits(model, ids)
        results[name] = run_step(model, step, calibration_windows(model, count=4, length=48))
        errors[name] = float((logits(model, ids) - expected).norm() / expected.norm())
    block = results["block"]
    assert block.summary["loss"] == "block" and results["gram"].summary["loss"] == "gram"
    assert block.summary["scaled_layers"] == 7 * 2
    searched = {layer["name"].rsplit(".", 1)[1]: layer["awq_loss"] for layer in block.layers}
    norm_consumers = [c.rsplit(".", 1)[1] for c in (*CONSUMERS["self_attn"], *CONSUMERS["mlp"])]
    assert searched == {**dict.fromkeys(norm_consumers, "block"), "o_proj": "gram", "down_proj": "gram"}
    for layer in block.layers:  # α = 0 is plain rounding; a loss blind to the scales would keep it (ratio 1)
        assert layer["awq_loss_vs_rtn"] < 1 if layer["awq_loss"] == "block" else layer["awq_loss_vs_rtn"] <= 1 + 1e-6
    assert all(torch.isfinite(torch.tensor(layer["output_error"])) for layer in block.layers)
    assert errors["block"] < errors["rtn"] and errors["block"] < 1.2 * errors["gram"], errors


def test_an_unknown_loss_is_refused(tiny):
    with pytest.raises(EngineError) as info:
        run_step(tiny.model, {"method": "awq", "weights": INT4_G32, "loss": "blocks"}, calibration_windows(tiny.model))
    assert info.value.code == "bad_spec" and "blocks" in info.value.message
    with pytest.raises(ValidationError, match="loss"):
        AWQQuantize(loss="blocks")
    assert AWQQuantize().loss == "gram"
