"""What lets the calibrated steps and distillation run on an 8B bf16 model: bf16 models throughout, Hessians in
float32 from bf16 inputs, shared inputs observed and pruned once, one layer's inputs held at a time, and a
distillation loss taken one sequence at a time with the same value and gradients as the whole batch."""

from __future__ import annotations

import weakref

import pytest
import torch
import torch.nn.functional as F

from worker.engine.calibrate.layerwise import HessianAccumulator, half_gram_supported, sequential_layers
from worker.engine.distill.kd import kd_loss
from worker.engine.prune import sparsegpt
from worker.engine.prune.masks import prune_count
from worker.engine.prune.sparsegpt import inverse_hessian_factor, sparsegpt_prune_, sparsegpt_prune_shared_, sweep_
from worker.engine.quantize import common as quantization
from worker.engine.steps import StepContext, run_step, step_spec

INT4_G32 = {"bits": 4, "group_size": 32, "symmetric": True}


def windows(model, count=4, length=32):
    return torch.randint(0, model.config.vocab_size, (count, length), generator=torch.Generator().manual_seed(0))


def correlated_hessian(features=96, tokens=1024):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(tokens, 16, generator=g) @ torch.randn(16, features, generator=g)
    x = x + 0.1 * torch.randn(tokens, features, generator=g)
    return 2 * x.T @ x / tokens


# --- Hessians -------------------------------------------------------------------------------------------------


def test_hessian_from_bf16_inputs_is_the_float32_hessian_of_their_values():
    x = torch.randn(300, 24, generator=torch.Generator().manual_seed(3)).to(torch.bfloat16)
    half, full = HessianAccumulator(24), HessianAccumulator(24)
    for part in x.split(100):
        half.add(part)
        full.add(part.float())
    assert half.hessian.dtype == torch.float32
    torch.testing.assert_close(half.hessian, full.hessian, rtol=1e-6, atol=1e-6)


def test_float32_output_half_matmul_is_only_used_on_cuda():
    assert not half_gram_supported(torch.device("cpu"), torch.bfloat16)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA only")
def test_cuda_bf16_hessian_matches_float32():
    x = torch.randn(4096, 256, device="cuda").to(torch.bfloat16)
    accumulator = HessianAccumulator(256, "cuda")
    accumulator.add(x)
    expected = 2 / 4096 * x.double().T @ x.double()
    torch.testing.assert_close(accumulator.hessian.double(), expected, rtol=1e-5, atol=1e-6)


# --- sequential passes ----------------------------------------------------------------------------------------


def test_a_layer_pass_lets_go_of_its_inputs_once_the_runner_advances(tiny):
    passes = []
    for step in sequential_layers(tiny.model, windows(tiny.model), "cpu"):
        assert len(list(step.inputs())) == 4
        passes.append(step)
    assert all(list(step.inputs()) == [] for step in passes)  # a caller holding a pass no longer pins a layer's inputs


def test_quantizers_hold_one_layer_of_statistics_at_a_time(tiny, monkeypatch):
    alive, most = weakref.WeakSet(), []

    class Tracked(quantization.InputStats):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            alive.add(self)
            most.append(len(alive))

    monkeypatch.setattr(quantization, "InputStats", Tracked)
    spec = {"type": "quantize", "method": "gptq", "weights": INT4_G32, "true_sequential": False}
    context = StepContext(calibration=windows(tiny.model), report_progress=lambda f, m: None)
    run_step(tiny.model, step_spec(spec), context)
    assert len(most) == 4 * tiny.model.config.num_hidden_layers  # q/k/v, o, gate/up, down: shared inputs once
    assert max(most) == 4  # the previous layer's (a 0.8 GiB down_proj Hessian at 8B) are gone before the next


def test_sparsegpt_accumulates_one_hessian_per_distinct_input(tiny, monkeypatch):
    made = []

    class Counting(HessianAccumulator):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            made.append(self)

    monkeypatch.setattr(sparsegpt, "HessianAccumulator", Counting)
    spec = {"type": "prune", "method": "sparsegpt", "sparsity": 0.5}
    context = StepContext(calibration=windows(tiny.model), report_progress=lambda f, m: None)
    result = run_step(tiny.model, step_spec(spec), context)
    layers = tiny.model.config.num_hidden_layers
    assert len(made) == 4 * layers  # q/k/v, o, gate/up, down
    assert len(result.layers) == 7 * layers and all(r["sparsity"] == 0.5 for r in result.layers)


# --- SparseGPT sweep ------------------------------------------------------------------------------------------


def reference_sweep(w, factor, sparsity, pattern, block_size):
    """The reference implementation's loop, column by column, as it was written before the fused sweep."""
    if pattern is not None:
        block_size = max(pattern[1], block_size - block_size % pattern[1])
    for start in range(0, w.shape[1], block_size):
        end = min(start + block_size, w.shape[1])
        block, inverse = w[:, start:end].clone(), factor[start:end, start:end]
        errors, d = torch.zeros_like(block), inverse.diagonal()
        prune = torch.zeros_like(block, dtype=torch.bool)
        if pattern is None:
            count = prune_count(end, sparsity) - prune_count(start, sparsity)
            scores = block.square() / d.square()
            prune.scatter_(1, scores.topk(count, dim=1, largest=False).indices, True)
        for i in range(end - start):
            if pattern is not None and i % pattern[1] == 0:
                group = slice(i, i + pattern[1])
                scores = block[:, group].square() / d[group].square()
                chosen = torch.zeros_like(scores, dtype=torch.bool)
                chosen.scatter_(1, scores.topk(pattern[1] - pattern[0], dim=1, largest=False).indices, True)
                prune[:, group] = chosen
            column = block[:, i]
            kept = torch.where(prune[:, i], torch.zeros_like(column), column)
            error = (column - kept) / d[i]
            block[:, i:] -= error.unsqueeze(1) * inverse[i, i:].unsqueeze(0)
            block[:, i] = kept
            errors[:, i] = error
        w[:, start:end] = block
        w[:, end:] -= errors @ factor[start:end, end:]
    return w


@pytest.mark.parametrize("pattern,sparsity,block_size", [(None, 0.5, 32), (None, 0.3, 40), ((2, 4), 0.5, 32)])
def test_sweep_matches_the_reference_loop(pattern, sparsity, block_size):
    factor, _ = inverse_hessian_factor(correlated_hessian(), 0.01)
    w = torch.randn(24, 96, generator=torch.Generator().manual_seed(1))
    ours, reference = w.clone(), reference_sweep(w.clone(), factor, sparsity, pattern, block_size)
    sweep_(ours, factor, sparsity, pattern, block_size)
    assert torch.equal(ours == 0, reference == 0)
    torch.testing.assert_close(ours, reference, rtol=1e-5, atol=1e-5)


def test_weights_sharing_a_hessian_are_pruned_as_if_alone():
    hessian = correlated_hessian()
    g = torch.Generator().manual_seed(2)
    weights = [torch.randn(rows, 96, generator=g) for rows in (32, 8, 8)]  # q, k, v under grouped-query attention
    alone = [w.clone() for w in weights]
    losses_alone = [sparsegpt_prune_(w, hessian, 0.5, block_size=32) for w in alone]
    together = [w.clone() for w in weights]
    losses_together = sparsegpt_prune_shared_(together, hessian, 0.5, block_size=32)
    for a, b in zip(alone, together, strict=True):
        assert torch.equal(a == 0, b == 0)
        torch.testing.assert_close(a, b)
    assert losses_together == pytest.approx(losses_alone, rel=1e-5)


# --- bf16 models ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "spec",
    [
        {"type": "quantize", "method": "gptq", "weights": INT4_G32, "act_order": True},
        {"type": "quantize", "method": "awq", "weights": INT4_G32, "grid": 5},
        {"type": "quantize", "method": "smoothquant"},
        {"type": "quantize", "method": "fp8"},
        {"type": "prune", "method": "sparsegpt", "sparsity": 0.5},
        {"type": "prune", "method": "wanda", "sparsity": 0.5},
    ],
    ids=lambda spec: spec["method"],
)
def test_calibrated_steps_run_on_a_bf16_model(tiny, spec):
    model = tiny.model.to(torch.bfloat16)
    ids = windows(model)
    with torch.no_grad():
        before = model(input_ids=ids[:1]).logits.float()
    context = StepContext(calibration=ids, report_progress=lambda f, m: None)
    result = run_step(model, step_spec(spec), context)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    with torch.no_grad():
        after = model(input_ids=ids[:1]).logits.float()
    assert torch.isfinite(after).all()
    assert float((after - before).norm() / before.norm()) < 0.5  # changed, not destroyed
    if spec["method"] == "awq":  # every fold passes its linearity check despite bf16 rounding
        assert result.summary["scaled_layers"] == 7 * model.config.num_hidden_layers
    if spec["method"] == "smoothquant":
        assert result.summary["smoothed_layers"] == 5 * model.config.num_hidden_layers


# --- distillation loss ----------------------------------------------------------------------------------------


def whole_batch_kd_loss(student, teacher, labels, temperature, alpha):
    s, t = student[:, :-1].float(), teacher[:, :-1].float()
    vocab = s.shape[-1]
    kl = F.kl_div(
        F.log_softmax(s.reshape(-1, vocab) / temperature, -1),
        F.log_softmax(t.reshape(-1, vocab) / temperature, -1),
        log_target=True,
        reduction="batchmean",
    )
    ce = F.cross_entropy(s.reshape(-1, vocab), labels[:, 1:].reshape(-1))
    return alpha * temperature**2 * kl + (1 - alpha) * ce, kl, ce


def test_kd_loss_per_sequence_equals_the_whole_batch_in_value_and_gradient():
    g = torch.Generator().manual_seed(4)
    student = torch.randn(3, 17, 50, generator=g, requires_grad=True)
    teacher = torch.randn(3, 17, 50, generator=g)
    labels = torch.randint(0, 50, (3, 17), generator=g)
    ours = kd_loss(student, teacher, labels, 2.0, 0.3)
    (grad_ours,) = torch.autograd.grad(ours[0], student)
    reference = whole_batch_kd_loss(student, teacher, labels, 2.0, 0.3)
    (grad_reference,) = torch.autograd.grad(reference[0], student)
    for a, b in zip(ours, reference, strict=True):
        torch.testing.assert_close(a, b)
    torch.testing.assert_close(grad_ours, grad_reference)
