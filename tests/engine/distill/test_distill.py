"""Distillation: masks hold exactly, the loss falls, and a crashed run resumes from its checkpoint to the same
weights as one that never stopped."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from worker.engine.distill.kd import batch_indices, kd_loss, lr_factor
from worker.engine.steps import StepContext, run_step, step_spec


class Crash(Exception):
    pass


def distill_spec(**overrides):
    spec = {
        "type": "distill",
        "method": "kd",
        "dataset_id": "text",
        "teacher_step": None,
        "steps": 6,
        "batch_size": 2,
        "seq_len": 32,
        "learning_rate": 1e-3,
        "warmup_steps": 2,
        "max_grad_norm": 1.0,
        "temperature": 2.0,
        "alpha": 0.5,
        "hidden_mse": 0.1,
        "checkpoint_every": 2,
    }
    return {**spec, **overrides}


def run_distill(model, teacher, tokenizer, dataset, spec, checkpoint_dir=None, crash_at=None, on_checkpoint=None):
    def progress(fraction, message):
        if crash_at is not None and message.startswith(f"step {crash_at}/"):
            raise Crash

    context = StepContext(
        calibration=None,
        report_progress=progress,
        device=torch.device("cpu"),
        tokenizer=tokenizer,
        datasets={"text": (dataset, "txt")},
        teacher=teacher,
        checkpoint_dir=checkpoint_dir,
        on_checkpoint=on_checkpoint,
    )
    return run_step(model, step_spec(spec), context)


def test_kd_loss_is_zero_kl_for_identical_logits():
    logits = torch.randn(2, 5, 11)
    labels = torch.randint(0, 11, (2, 5))
    total, kl, ce = kd_loss(logits, logits.clone(), labels, 2.0, 1.0)
    assert float(kl) == pytest.approx(0.0, abs=1e-6) and float(total) == pytest.approx(0.0, abs=1e-6)
    assert float(ce) > 0


def test_schedule_and_batches_are_pure_functions_of_the_step():
    assert lr_factor(0, 4, 20) == 0.25 and lr_factor(3, 4, 20) == 1.0 and lr_factor(20, 4, 20) == pytest.approx(0.1)
    assert torch.equal(batch_indices(7, 10, 3), batch_indices(7, 10, 3))
    assert len(set(torch.cat([batch_indices(s, 9, 3) for s in range(3)]).tolist())) == 9  # one epoch, no repeats


def test_pruned_weights_stay_exactly_zero(tiny, text_dataset):
    model, teacher = tiny.model, copy.deepcopy(tiny.model)
    prune = {"type": "prune", "method": "magnitude", "pattern": "2:4"}
    run_step(model, step_spec(prune), StepContext(calibration=None, report_progress=lambda f, m: None))
    zeros = {n: m.weight == 0 for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head"}
    before = {n: model.get_submodule(n).weight.detach().clone() for n in zeros}
    result = run_distill(model, teacher, tiny.tokenizer, text_dataset, distill_spec())
    for name, was_zero in zeros.items():
        weight = model.get_submodule(name).weight
        assert (weight[was_zero] == 0).all(), name
        assert not torch.equal(weight, before[name]), f"{name} did not train"
    assert result.summary["masked_layers"] == len(zeros)


def test_resume_after_a_crash_matches_an_uninterrupted_run(tiny, text_dataset, tmp_path):
    teacher = copy.deepcopy(tiny.model)
    for p in teacher.parameters():
        p.data.add_(0.01 * torch.randn_like(p))
    student = copy.deepcopy(tiny.model)
    torch.manual_seed(0)
    run_distill(student, teacher, tiny.tokenizer, text_dataset, distill_spec())

    crashed, checkpoints = copy.deepcopy(tiny.model), tmp_path / "ckpt"
    with pytest.raises(Crash):
        run_distill(crashed, teacher, tiny.tokenizer, text_dataset, distill_spec(), checkpoints, crash_at=5)
    assert (checkpoints / "distill.pt").is_file() and not list(checkpoints.glob("*.tmp"))
    retried = copy.deepcopy(tiny.model)  # the retry starts from the model as the recipe rebuilt it
    result = run_distill(retried, teacher, tiny.tokenizer, text_dataset, distill_spec(), checkpoints)
    assert result.summary["resumed_from_step"] == 4
    for (name, a), b in zip(student.state_dict().items(), retried.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)
    assert result.summary["final_loss"] < result.summary["first_loss"]


def test_checkpoints_announced_to_the_worker_resume_in_another_folder(tiny, text_dataset, tmp_path):
    """Each checkpoint is announced once complete; copies taken then resume a run in a fresh folder (another
    machine) to the weights of a run that never stopped."""
    teacher = copy.deepcopy(tiny.model)
    for p in teacher.parameters():
        p.data.add_(0.01 * torch.randn_like(p))
    student = copy.deepcopy(tiny.model)
    torch.manual_seed(0)
    run_distill(student, teacher, tiny.tokenizer, text_dataset, distill_spec())

    here, store, there = tmp_path / "here", tmp_path / "store", tmp_path / "there"
    announced = []

    def copy_away(path):
        state = torch.load(path, weights_only=True)
        announced.append((path.relative_to(here), state["step"]))
        store.mkdir(exist_ok=True)
        (store / path.name).write_bytes(path.read_bytes())

    with pytest.raises(Crash):
        crashed = copy.deepcopy(tiny.model)
        run_distill(crashed, teacher, tiny.tokenizer, text_dataset, distill_spec(), here, 5, copy_away)
    assert [step for _, step in announced] == [2, 4] and {name for name, _ in announced} == {Path("distill.pt")}
    there.mkdir()
    (there / "distill.pt").write_bytes((store / "distill.pt").read_bytes())
    retried = copy.deepcopy(tiny.model)
    result = run_distill(retried, teacher, tiny.tokenizer, text_dataset, distill_spec(), there)
    assert result.summary["resumed_from_step"] == 4
    for (name, a), b in zip(student.state_dict().items(), retried.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)


def test_distill_refuses_a_missing_dataset(tiny):
    from worker.engine.steps import EngineError

    spec = distill_spec(dataset_id="absent")
    context = StepContext(
        calibration=None, report_progress=lambda f, m: None, tokenizer=tiny.tokenizer, teacher=tiny.model
    )
    with pytest.raises(EngineError):
        run_step(tiny.model, step_spec(spec), context)


def test_teacher_snapshot_is_a_frozen_host_copy_with_ties_kept(tiny):
    from worker.engine.pipeline import cpu_copy

    model = tiny.model
    model.config.tie_word_embeddings = True
    model.lm_head.weight = model.model.embed_tokens.weight  # tied, as SmolLM2's are
    snapshot = cpu_copy(model)
    originals = dict(model.named_parameters(remove_duplicate=False))
    for name, tensor in snapshot.named_parameters(remove_duplicate=False):
        assert torch.equal(tensor, originals[name]) and tensor.data_ptr() != originals[name].data_ptr(), name
        assert tensor.device.type == "cpu" and not tensor.requires_grad
    assert snapshot.lm_head.weight is snapshot.model.embed_tokens.weight
    for (name, buffer), (_, original) in zip(snapshot.named_buffers(), model.named_buffers(), strict=True):
        assert torch.equal(buffer, original) and buffer.data_ptr() != original.data_ptr(), name
    assert not snapshot.training
    with torch.no_grad():
        model.model.embed_tokens.weight.add_(1.0)  # training the student leaves the teacher alone
    assert not torch.equal(snapshot.model.embed_tokens.weight, model.model.embed_tokens.weight)
