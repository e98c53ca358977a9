import pytest
import torch

from worker.engine.calibrate.targets import select_linears
from worker.engine.prune.masks import global_masks, layer_mask, row_mask, sparsity_of
from worker.engine.steps import StepContext, run_step, step_spec


def run_prune(model, **spec):
    step = {"type": "prune", "method": "magnitude", **spec}
    return run_step(model, step_spec(step), StepContext(calibration=None, report_progress=lambda f, m: None))


def weights(model):
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def test_row_mask_drops_exactly_the_smallest_of_each_row():
    w = torch.tensor([[1.0, -4.0, 2.0, 3.0], [0.5, 0.5, 0.5, -9.0]])
    keep = row_mask(w, 0.5)
    assert keep[0].tolist() == [False, True, False, True]  # 1 and 2 are the two smallest of row 0
    assert keep[1, 3] and keep[1].sum() == 2  # ties: exactly one of the 0.5s survives


def test_layer_and_global_masks_count_exactly_even_with_ties():
    tied = torch.ones(10, 10)
    assert (~layer_mask(tied, 0.37)).sum() == 37
    masks = global_masks([torch.ones(4, 5), torch.zeros(3, 5), torch.full((2, 5), 2.0)], 0.5)
    assert sum(int((~m).sum()) for m in masks) == 22  # round(0.5 * 45)
    assert not masks[1].any()  # the zeros go first
    assert masks[2].all()  # the largest stay


def test_row_scope_reaches_exact_sparsity_and_removes_smallest(tiny):
    model = tiny.model
    before = weights(model)
    result = run_prune(model, sparsity=0.5, scope="row")
    targeted = select_linears(model)
    assert result.summary["sparsity"] == 0.5
    for name, linear in targeted.items():
        w, original = linear.weight.detach(), before[f"{name}.weight"]
        assert sparsity_of(w) == 0.5
        assert ((w == 0).sum(1) == w.shape[1] // 2).all()
        kept_min = torch.where(w != 0, original.abs(), torch.inf).amin(1)
        dropped_max = torch.where(w == 0, original.abs(), -torch.inf).amax(1)
        assert (dropped_max <= kept_min).all()
        assert torch.equal(w[w != 0], original[w != 0])  # survivors are untouched (no rescaling)
    assert torch.equal(model.lm_head.weight, before["lm_head.weight"])
    assert torch.equal(model.model.embed_tokens.weight, before["model.embed_tokens.weight"])
    assert {layer["name"] for layer in result.layers} == set(targeted)
    assert all(layer["sparsity"] == 0.5 and len(layer["shape"]) == 2 for layer in result.layers)


@pytest.mark.parametrize("scope", ["layer", "global"])
def test_layer_and_global_scopes(tiny, scope):
    model = tiny.model
    linears = select_linears(model)
    original = {name: m.weight.detach().abs().clone() for name, m in linears.items()}
    result = run_prune(model, sparsity=0.3, scope=scope)
    zeros = {name: int((m.weight == 0).sum()) for name, m in linears.items()}
    if scope == "layer":
        assert all(zeros[name] == round(0.3 * m.weight.numel()) for name, m in linears.items())
        groups = [[name] for name in linears]
    else:
        assert sum(zeros.values()) == round(0.3 * sum(m.weight.numel() for m in linears.values()))
        assert len(set(zeros.values())) > 1  # one threshold: layers end up with different sparsities
        groups = [list(linears)]
    for names in groups:  # within each comparison group, every dropped |w| <= every kept |w|
        dropped = max(float(original[n][linears[n].weight == 0].max()) for n in names)
        kept = min(float(original[n][linears[n].weight != 0].min()) for n in names)
        assert dropped <= kept
    assert result.summary["scope"] == scope


def test_targets_and_ignore_limit_the_layers(tiny):
    model = tiny.model
    before = weights(model)
    result = run_prune(model, sparsity=0.5, targets=["re:.*mlp\\..*"], ignore=["model.layers.1.mlp.down_proj"])
    names = {layer["name"] for layer in result.layers}
    expected = {f"model.layers.{i}.mlp.{p}" for i in (0, 1) for p in ("gate_proj", "up_proj", "down_proj")}
    assert names == expected - {"model.layers.1.mlp.down_proj"}
    for name, param in model.named_parameters():
        if name.removesuffix(".weight") not in names:
            assert torch.equal(param, before[name]), name
