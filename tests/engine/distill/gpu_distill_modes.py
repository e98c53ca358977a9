"""Manual CUDA check of the lean distillation mode (not collected by pytest).

Run: python -m tests.engine.distill.gpu_distill_modes

On a small bf16 Llama (pruned 2:4, so masks are on) the fast and the lean mode distill from the same host teacher
with the same seed; the CPU tests check the two agree to float32 rounding, this checks the CUDA path: streams,
pinned copies, the fused AdamW kernel and gradient checkpointing. bf16 rounding and the order of reductions differ
between the modes, so the check is on the losses and on the direction of the weight updates.
"""

from __future__ import annotations

import copy
import json
import sys
import tempfile
from pathlib import Path

import torch

from tests.utils.factories import build_tiny_model, write_text_dataset
from worker.engine.load.checkpoint import load_model
from worker.engine.pipeline import cpu_copy
from worker.engine.steps import StepContext, run_step, step_spec

DEVICE = torch.device("cuda")


class Crash(Exception):
    pass


def spec(offload: bool) -> dict:
    return {
        "type": "distill",
        "method": "kd",
        "dataset_id": "text",
        "steps": 8,
        "batch_size": 4,
        "seq_len": 64,
        "learning_rate": 1e-3,
        "warmup_steps": 2,
        "max_grad_norm": 1.0,
        "hidden_mse": 0.1,
        "checkpoint_every": 4,
        "offload": offload,
    }


def distill(model, teacher, tokenizer, dataset, step, checkpoints=None, crash_at=None):
    def progress(fraction: float, message: str) -> None:
        if crash_at is not None and message.startswith(f"step {crash_at}/"):
            raise Crash

    context = StepContext(
        calibration=None,
        report_progress=progress,
        device=DEVICE,
        tokenizer=tokenizer,
        datasets={"text": (dataset, "txt")},
        teacher=teacher,
        checkpoint_dir=checkpoints,
    )
    return run_step(model, step_spec(step), context)


@torch.no_grad()
def update_cosine(start: torch.nn.Module, a: torch.nn.Module, b: torch.nn.Module) -> float:
    """Cosine between the two runs' total weight updates, over all parameters."""
    pairs = list(zip(start.parameters(), a.parameters(), b.parameters(), strict=True))
    da = torch.cat([(x.float() - s.float()).flatten() for s, x, _ in pairs])
    db = torch.cat([(y.float() - s.float()).flatten() for s, _, y in pairs])
    return float(torch.nn.functional.cosine_similarity(da, db, dim=0))


def main() -> None:
    root = Path(tempfile.mkdtemp())
    tiny = load_model(build_tiny_model(root / "model", hidden=256, layers=4), "hf", DEVICE)
    dataset = write_text_dataset(root / "text.txt")
    student = tiny.model.to(torch.bfloat16)
    prune = {"type": "prune", "method": "magnitude", "pattern": "2:4"}
    run_step(student, step_spec(prune), StepContext(calibration=None, report_progress=lambda f, m: None))
    zeros = {n: m.weight == 0 for n, m in student.named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head"}
    teacher_model = copy.deepcopy(student)
    with torch.no_grad():
        for p in teacher_model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    teacher = cpu_copy(teacher_model)
    del teacher_model

    runs = {}
    for name, offload in (("fast", False), ("fast again", False), ("lean", True)):
        model = copy.deepcopy(student)
        torch.manual_seed(0)
        runs[name] = (model, distill(model, teacher, tiny.tokenizer, dataset, spec(offload)).summary)
    lean, fast = runs["lean"][1], runs["fast"][1]
    checks = {
        "modes": [runs[name][1]["memory_mode"] for name in runs],
        "logits": lean["logits"],
        "first_loss": [fast["first_loss"], lean["first_loss"]],
        "final_loss": [fast["final_loss"], lean["final_loss"]],
        "update_cosine_fast_vs_fast": update_cosine(student, runs["fast"][0], runs["fast again"][0]),
        "update_cosine_fast_vs_lean": update_cosine(student, runs["fast"][0], runs["lean"][0]),
        "masks_hold": all(bool((runs["lean"][0].get_submodule(n).weight[z] == 0).all()) for n, z in zeros.items()),
        "teacher_on_cpu_unpinned": all(
            t.device.type == "cpu" and not t.is_pinned() for t in teacher.state_dict().values()
        ),
    }

    checkpoints = root / "checkpoints"
    try:
        distill(copy.deepcopy(student), teacher, tiny.tokenizer, dataset, spec(True), checkpoints, crash_at=6)
    except Crash:
        pass
    resumed = copy.deepcopy(student)
    summary = distill(resumed, teacher, tiny.tokenizer, dataset, spec(True), checkpoints).summary
    checks["resumed_from_step"] = summary["resumed_from_step"]
    checks["update_cosine_resumed_vs_lean"] = update_cosine(student, runs["lean"][0], resumed)
    checks["pinned_host_bytes_after"] = torch.cuda.host_memory_stats().get("allocated_bytes.current")
    json.dump(checks, sys.stdout, indent=1)
    print()
    assert checks["modes"] == ["fast", "fast", "lean"] and checks["logits"].startswith("per sequence")
    assert abs(lean["first_loss"] - fast["first_loss"]) < 1e-2 * abs(fast["first_loss"])
    assert abs(lean["final_loss"] - fast["final_loss"]) < 2e-2 * abs(fast["final_loss"])
    assert checks["update_cosine_fast_vs_lean"] > 0.99 and checks["update_cosine_resumed_vs_lean"] > 0.99
    assert checks["masks_hold"] and checks["teacher_on_cpu_unpinned"] and checks["resumed_from_step"] == 4


if __name__ == "__main__":
    main()
