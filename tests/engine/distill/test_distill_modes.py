"""The lean distillation mode (`offload: true`) gives the fast mode's losses and weights, keeps pruned weights at
zero, clips, resumes from its checkpoints and leaves the teacher on the CPU; `offload` is validated by the spec."""

from __future__ import annotations

import copy

import pytest
import torch
from pydantic import ValidationError
from transformers import LlamaForCausalLM

from modelpress.specs import JobSpec, KnowledgeDistill
from tests.engine.distill.test_distill import Crash, distill_spec, run_distill
from worker.engine.distill.modes import choose_offload, logits_from_hidden_are_exact
from worker.engine.steps import StepContext, run_step, step_spec

CPU = torch.device("cpu")


def perturbed_teacher(model: torch.nn.Module) -> torch.nn.Module:
    teacher = copy.deepcopy(model)
    generator = torch.Generator().manual_seed(1)
    for p in teacher.parameters():
        p.data.add_(0.01 * torch.randn(p.shape, generator=generator))
    return teacher


def pruned(model: torch.nn.Module) -> torch.nn.Module:
    spec = {"type": "prune", "method": "magnitude", "pattern": "2:4"}
    run_step(model, step_spec(spec), StepContext(calibration=None, report_progress=lambda f, m: None))
    return model


def distill_both_modes(student, teacher, tiny, dataset, **overrides):
    """(fast result, fast model, lean result, lean model), each from a copy of `student` and the same seed."""
    runs = []
    for offload in (False, True):
        model = copy.deepcopy(student)
        torch.manual_seed(0)
        result = run_distill(model, teacher, tiny.tokenizer, dataset, distill_spec(offload=offload, **overrides))
        runs += [result, model]
    return runs


def assert_same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6, msg=name)


def test_lean_mode_matches_the_fast_mode_and_keeps_masks(tiny, text_dataset):
    student = pruned(tiny.model)
    teacher = perturbed_teacher(tiny.model)
    before = {n: p.detach().clone() for n, p in teacher.state_dict().items()}
    zeros = {n: m.weight == 0 for n, m in student.named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head"}
    fast, fast_model, lean, lean_model = distill_both_modes(student, teacher, tiny, text_dataset)

    assert (fast.summary["memory_mode"], lean.summary["memory_mode"]) == ("fast", "lean")
    assert lean.summary["memory_mode_reason"] == "offload: true in the spec"
    assert lean.summary["logits"] == "per sequence, from the final hidden states"
    assert lean.summary["first_loss"] == pytest.approx(fast.summary["first_loss"], rel=1e-6)
    assert lean.summary["final_loss"] == pytest.approx(fast.summary["final_loss"], rel=1e-5)
    assert lean.layers == fast.layers and lean.summary["masked_layers"] == len(zeros)
    assert_same_weights(fast_model, lean_model)
    for name, was_zero in zeros.items():
        assert (lean_model.get_submodule(name).weight[was_zero] == 0).all(), name
    assert all(p.grad is None for p in lean_model.parameters())
    # the teacher is left on the CPU with its weights, and without the streaming hooks
    for name, tensor in teacher.state_dict().items():
        assert tensor.device.type == "cpu" and torch.equal(tensor, before[name]), name
    hooks = [h for m in teacher.modules() for h in (*m._forward_pre_hooks.values(), *m._forward_hooks.values())]
    assert not any("StreamedLayers" in hook.__qualname__ for hook in hooks)  # transformers adds hooks of its own


def test_lean_mode_clips_like_the_fast_mode(tiny, text_dataset):
    teacher = perturbed_teacher(tiny.model)
    fast, fast_model, lean, lean_model = distill_both_modes(tiny.model, teacher, tiny, text_dataset, max_grad_norm=1e-3)
    assert_same_weights(fast_model, lean_model)
    unclipped = copy.deepcopy(tiny.model)
    torch.manual_seed(0)
    run_distill(unclipped, teacher, tiny.tokenizer, text_dataset, distill_spec(offload=True, max_grad_norm=None))
    moved = [(a - b).abs().max() for a, b in zip(lean_model.parameters(), unclipped.parameters(), strict=True)]
    assert max(moved) > 1e-4  # the clipping changed the updates


def test_lean_resume_after_a_crash_matches_an_uninterrupted_run(tiny, text_dataset, tmp_path):
    teacher = perturbed_teacher(tiny.model)
    student = pruned(tiny.model)
    spec = distill_spec(offload=True)
    uninterrupted = copy.deepcopy(student)
    torch.manual_seed(0)
    run_distill(uninterrupted, teacher, tiny.tokenizer, text_dataset, spec)

    checkpoints = tmp_path / "ckpt"
    with pytest.raises(Crash):
        run_distill(copy.deepcopy(student), teacher, tiny.tokenizer, text_dataset, spec, checkpoints, crash_at=5)
    retried = copy.deepcopy(student)
    result = run_distill(retried, teacher, tiny.tokenizer, text_dataset, spec, checkpoints)
    assert result.summary["resumed_from_step"] == 4
    assert_same_weights(uninterrupted, retried)

    fast = run_distill(
        copy.deepcopy(student), teacher, tiny.tokenizer, text_dataset, distill_spec(offload=False), checkpoints
    )
    assert fast.summary["resumed_from_step"] == 0  # a lean checkpoint is not resumed by the fast mode


class ScaledLlama(LlamaForCausalLM):
    """Logits scaled after the output layer, as some architectures do (Cohere, Granite; Gemma 2 soft-caps them)."""

    def forward(self, *args, **kwargs):
        out = super().forward(*args, **kwargs)
        out.logits = out.logits * 0.5
        return out


def test_lean_mode_falls_back_to_whole_batch_logits_where_the_output_layer_is_not_the_end(tiny, text_dataset):
    ids = torch.randint(0, 100, (1, 12))
    assert logits_from_hidden_are_exact(tiny.model, ids)
    scaled = ScaledLlama(tiny.model.config).eval()
    scaled.load_state_dict(tiny.model.state_dict())
    assert not logits_from_hidden_are_exact(scaled, ids)
    fast, fast_model, lean, lean_model = distill_both_modes(scaled, perturbed_teacher(scaled), tiny, text_dataset)
    assert lean.summary["logits"].startswith("whole batch")
    assert_same_weights(fast_model, lean_model)


def test_auto_is_fast_on_the_cpu_and_bad_settings_are_refused(tiny):
    assert choose_offload("auto", tiny.model, tiny.model, CPU, 8, 2048) == (
        False,
        "offload: auto, and the device is not a GPU",
    )
    assert choose_offload(True, tiny.model, tiny.model, CPU, 8, 2048)[0] is True
    with pytest.raises(Exception, match="offload must be"):
        choose_offload("yes", tiny.model, tiny.model, CPU, 8, 2048)


def test_offload_spec_field_takes_true_false_or_auto():
    assert KnowledgeDistill(dataset_id="d").offload == "auto"
    assert KnowledgeDistill(dataset_id="d", offload=True).offload is True
    for bad in ("maybe", "true", 1, None):
        body = {"model_id": "m", "recipe": [{"type": "distill", "dataset_id": "d", "offload": bad}]}
        with pytest.raises(ValidationError) as error:
            JobSpec.model_validate(body)
        (only,) = error.value.errors()
        assert only["loc"][-1] == "offload" and 'offload must be true, false or "auto"' in only["msg"]
