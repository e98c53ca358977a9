"""Per-layer damage: the same fields from every step that changes Linear weights in place, each figure equal to
the one computed directly from the layer's inputs, and labelled with what it rests on."""

from __future__ import annotations

import copy

import pytest
import torch

from worker.engine.calibrate import DAMAGE_FIELDS, layer_damage
from worker.engine.calibrate.damage import diagonal_output_error, output_error, relative_error
from worker.engine.steps import StepContext, run_step, step_spec

FIRST_Q = "model.layers.0.self_attn.q_proj"  # its inputs do not depend on what the step did to earlier layers
STEPS = {  # step JSON, whether it gets calibration, the label its layers must carry
    "magnitude": ({"type": "prune", "method": "magnitude", "sparsity": 0.5}, False, None),
    "wanda": ({"type": "prune", "method": "wanda", "sparsity": 0.5}, True, "input_norms"),
    "sparsegpt": ({"type": "prune", "method": "sparsegpt", "sparsity": 0.5}, True, "gram"),
    "rtn": ({"type": "quantize", "method": "rtn", "weights": {"bits": 4, "group_size": 32}}, False, None),
    "rtn calibrated": (
        {"type": "quantize", "method": "rtn", "weights": {"bits": 4, "group_size": 32}},
        True,
        "outputs",
    ),
    "gptq": ({"type": "quantize", "method": "gptq", "weights": {"bits": 4, "group_size": 32}}, True, "gram"),
}


def calibration(model) -> torch.Tensor:
    return torch.randint(0, model.config.vocab_size, (4, 32), generator=torch.Generator().manual_seed(0))


@torch.no_grad()
def inputs_of(model, name: str, windows: torch.Tensor) -> torch.Tensor:
    """Every calibration input row the Linear `name` sees, (tokens, in_features), by a hook on a full forward."""
    seen: list[torch.Tensor] = []
    handle = dict(model.named_modules())[name].register_forward_pre_hook(lambda _m, args: seen.append(args[0]))
    for window in windows:
        model(input_ids=window[None], use_cache=False)
    handle.remove()
    return torch.cat([x.reshape(-1, x.shape[-1]) for x in seen]).double()


def test_output_error_matches_the_outputs_and_the_diagonal_form_ignores_correlations():
    torch.manual_seed(0)
    x = torch.randn(256, 16) @ torch.randn(16, 16)  # correlated inputs
    w = torch.randn(8, 16)
    w_hat = w + 0.1 * torch.randn(8, 16)
    direct = float(torch.linalg.vector_norm(x @ (w - w_hat).T) / torch.linalg.vector_norm(x @ w.T))
    assert output_error(w, w_hat, x.T @ x) == pytest.approx(direct, rel=1e-6)
    norms = x.norm(dim=0)
    diagonal = output_error(w, w_hat, torch.diag(norms.square()))
    assert diagonal_output_error(w, w_hat, norms) == pytest.approx(diagonal, rel=1e-6)
    assert diagonal_output_error(w, w_hat, norms) != pytest.approx(direct, rel=1e-2)
    assert layer_damage(w, w_hat) == {
        "relative_error": relative_error(w, w_hat),
        "output_error": None,
        "output_error_from": None,
    }


@pytest.mark.parametrize("name", list(STEPS))
def test_every_step_reports_uniform_damage_labelled_with_its_source(tiny, name):
    step, calibrated, source = STEPS[name]
    model = tiny.model
    original = copy.deepcopy(model)
    windows = calibration(model) if calibrated else None
    result = run_step(model, step_spec(step), StepContext(calibration=windows, report_progress=lambda f, m: None))
    originals, changed = dict(original.named_modules()), dict(model.named_modules())
    assert result.layers
    for layer in result.layers:
        assert set(DAMAGE_FIELDS) <= set(layer), layer["name"]
        assert layer["output_error_from"] == source
        assert (layer["output_error"] is None) == (source is None)
        before, after = originals[layer["name"]].weight, changed[layer["name"]].weight
        assert layer["relative_error"] == pytest.approx(relative_error(before, after), rel=1e-5)
        assert layer["relative_error"] > 1e-3  # every targeted layer was changed
    if source is None:
        return
    (first,) = [layer for layer in result.layers if layer["name"] == FIRST_Q]
    x = inputs_of(original, FIRST_Q, windows)
    w, w_hat = originals[FIRST_Q].weight.detach().double(), changed[FIRST_Q].weight.detach().double()
    if source in ("gram", "outputs"):
        expected = torch.linalg.vector_norm(x @ (w - w_hat).T) / torch.linalg.vector_norm(x @ w.T)
    else:  # Wanda's per-input norms: the diagonal of XᵀX
        expected = torch.tensor(diagonal_output_error(w, w_hat, x.norm(dim=0)))
    assert first["output_error"] == pytest.approx(float(expected), rel=1e-3)


def test_output_error_in_blocks_of_rows_equals_the_whole_product(monkeypatch):
    """At 32B a down_proj's Gram matrix is 3 GB: the error is summed a few rows at a time, never on a float64 copy."""
    from worker.engine.calibrate import damage

    torch.manual_seed(1)
    x = torch.randn(512, 48) @ torch.randn(48, 48)
    w = torch.randn(40, 48)
    w_hat = w + 0.05 * torch.randn(40, 48)
    whole = output_error(w, w_hat, x.T @ x)
    monkeypatch.setattr(damage, "_ROW_BYTES", 3 * 4 * 48)  # three rows a block, the last block one row
    assert output_error(w, w_hat, x.T @ x) == pytest.approx(whole, rel=1e-6)
    direct = float(
        torch.linalg.vector_norm(x.double() @ (w - w_hat).double().T)
        / torch.linalg.vector_norm(x.double() @ w.double().T)
    )
    assert output_error(w.bfloat16(), w_hat.bfloat16(), x.T @ x) == pytest.approx(
        output_error(w.bfloat16().float(), w_hat.bfloat16().float(), x.T @ x), rel=1e-6
    )
    assert whole == pytest.approx(direct, rel=1e-5)
