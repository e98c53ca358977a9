"""`distill:kd`: logit distillation from a teacher snapshot into the current model (the student).

Loss per batch: alpha · T² · KL(softmax(t/T) ‖ softmax(s/T)) + (1 − alpha) · next-token cross-entropy, plus
`hidden_mse` · MSE of the final hidden states when set. AdamW, linear warm-up then cosine decay, gradient
clipping, bf16 autocast on CUDA. Weights that are exactly zero when training starts (unstructured or N:M
pruning) are masked: their gradients are zeroed and the weights re-zeroed after every optimizer step.

Memory on CUDA: the teacher's weights are cast to bfloat16 (autocast runs its matrix products in bf16 anyway),
the student recomputes each decoder layer's activations in the backward pass (gradient checkpointing: a
layer's input is all it keeps), AdamW is the fused kernel (no temporaries over the whole parameter list), and
the loss is taken one sequence at a time in float32 and recomputed in the backward pass, so float32 copies of
[batch, seq, vocab] logits never exist at once. What remains is the student, its gradients and two AdamW
moments (4× the student) plus the teacher: an 8B student cannot fit in its own size plus 20 GB this way.

Checkpoints (student, optimizer, scheduler, step, RNG) are written atomically to `context.checkpoint_dir`
every `checkpoint_every` steps; a retried job resumes from the last one. Batches are a pure function of the
step number (a per-epoch permutation with a fixed seed), so a resumed run sees the same data as one that
never stopped.
"""

from __future__ import annotations

import logging
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint as recompute

from worker.engine.data import token_windows
from worker.engine.errors import EngineError
from worker.engine.loading import require_tokenizer
from worker.engine.registry import StepContext, StepResult, register

log = logging.getLogger(__name__)

CHECKPOINT = "distill.pt"
SEED = 0


# --- math -------------------------------------------------------------------------------------------------
def kd_loss(
    student: torch.Tensor, teacher: torch.Tensor, labels: torch.Tensor, temperature: float, alpha: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(total, kl, ce) for logits [b, seq, vocab] and token ids [b, seq]; KL is a mean per predicted token.

    Summed one sequence at a time; with gradients, each sequence's float32 terms are recomputed in the backward
    pass instead of kept (at batch 8 × 2048 and a 128k vocabulary each float32 copy of the logits is 8 GB)."""
    tokens = student.shape[0] * (student.shape[1] - 1)
    kl_sum = ce_sum = student.new_zeros((), dtype=torch.float32)
    for s, t, y in zip(student, teacher, labels, strict=True):
        if torch.is_grad_enabled() and s.requires_grad:
            kl, ce = recompute(sequence_losses, s[:-1], t[:-1], y[1:], temperature, use_reentrant=False)
        else:
            kl, ce = sequence_losses(s[:-1], t[:-1], y[1:], temperature)
        kl_sum, ce_sum = kl_sum + kl, ce_sum + ce
    kl, ce = kl_sum / tokens, ce_sum / tokens
    return alpha * temperature**2 * kl + (1 - alpha) * ce, kl, ce


def sequence_losses(
    student: torch.Tensor, teacher: torch.Tensor, labels: torch.Tensor, temperature: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(Σ KL(softmax(t/T) ‖ softmax(s/T)), Σ cross-entropy) over the positions of [seq, vocab] logits, in float32."""
    s, t = student.float(), teacher.float()
    kl = F.kl_div(
        F.log_softmax(s / temperature, -1), F.log_softmax(t / temperature, -1), log_target=True, reduction="sum"
    )
    return kl, F.cross_entropy(s, labels, reduction="sum")


def lr_factor(step: int, warmup: int, total: int) -> float:
    """Linear warm-up to 1, then cosine decay to 0.1 at `total`."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))


def batch_indices(step: int, windows: int, batch_size: int, seed: int = SEED) -> torch.Tensor:
    """The window indices of batch `step`: consecutive slices of a per-epoch permutation (pure in `step`)."""
    per_epoch = max(1, windows // batch_size)
    epoch, offset = divmod(step, per_epoch)
    order = torch.randperm(windows, generator=torch.Generator().manual_seed(seed + epoch))
    chosen = order[offset * batch_size : (offset + 1) * batch_size]
    if chosen.numel() < batch_size:  # fewer windows than a batch: repeat them
        chosen = order.repeat(batch_size // windows + 1)[:batch_size]
    return chosen


def sparsity_masks(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Keep-masks of the Linear weights that hold exact zeros (pruned); dense weights need none."""
    return {
        name: module.weight != 0
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear) and bool((module.weight == 0).any())
    }


@torch.no_grad()
def apply_masks_(model: torch.nn.Module, masks: dict[str, torch.Tensor], grads: bool = False) -> None:
    for name, keep in masks.items():
        weight = model.get_submodule(name).weight
        target = weight.grad if grads else weight
        if target is not None:
            target.mul_(keep.to(target.dtype))


# --- checkpoints ----------------------------------------------------------------------------------------------
def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """torch.save to a temporary file in the same folder, then an atomic rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: Path | None, spec: dict[str, Any]) -> dict[str, Any] | None:
    if path is None or not path.is_file():
        return None
    state = torch.load(path, map_location="cpu", weights_only=True)
    if state.get("spec") != {k: v for k, v in spec.items() if k != "checkpoint_every"}:
        log.warning("ignoring checkpoint %s: it was written for another distill spec", path)
        return None
    return state


def _rng_state() -> dict[str, Any]:
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# --- orchestration -------------------------------------------------------------------------------------------
def _windows(context: StepContext, seq_len: int) -> torch.Tensor:
    dataset_id = context.spec["dataset_id"]
    if dataset_id not in context.datasets:
        raise EngineError("missing_dataset", f"distill dataset {dataset_id!r} was not given to the engine")
    path, data_format = context.datasets[dataset_id]
    tokenizer = require_tokenizer(context.tokenizer, "distillation")
    return token_windows(tokenizer, Path(path), data_format, seq_len, None, "distillation")


def _forward(model: torch.nn.Module, ids: torch.Tensor, hidden: bool):
    out = model(input_ids=ids, use_cache=False, output_hidden_states=hidden)
    return out.logits, (out.hidden_states[-1] if hidden else None)


def _parameters_to_bf16_(module: torch.nn.Module) -> None:
    """Cast float parameters (not buffers: rotary frequencies stay float32) to bfloat16 in place."""
    for parameter in module.parameters():
        if parameter.is_floating_point() and parameter.dtype != torch.bfloat16:
            parameter.data = parameter.data.to(torch.bfloat16)


@dataclass
class _Run:
    """What the training loop needs besides the model: one distill step's state (dies with it)."""

    spec: dict[str, Any]
    context: StepContext
    teacher: torch.nn.Module
    windows: torch.Tensor
    device: torch.device
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    masks: dict[str, torch.Tensor]
    checkpoint: Path | None


@register("distill", "kd")
def distill(model: torch.nn.Module, context: StepContext) -> StepResult:
    spec = context.spec
    if context.teacher is None:
        raise EngineError("bad_spec", "distill:kd has no teacher snapshot (the pipeline keeps one per teacher_step)")
    steps, batch_size, seq_len = int(spec.get("steps", 200)), int(spec.get("batch_size", 8)), int(spec["seq_len"])
    device = torch.device(context.device) if context.device is not None else next(model.parameters()).device
    cuda = device.type == "cuda"
    windows = _windows(context, seq_len)
    teacher = context.teacher.to(device).eval()
    if cuda:
        _parameters_to_bf16_(teacher)
    masks = sparsity_masks(model)
    parameters = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(
        parameters,
        lr=float(spec.get("learning_rate", 1e-4)),
        weight_decay=0.0,
        **({"fused": True} if cuda else {"foreach": False}),
    )
    warmup = int(spec.get("warmup_steps", 20))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, warmup, steps))
    checkpoint = None if context.checkpoint_dir is None else Path(context.checkpoint_dir) / CHECKPOINT
    start, losses = 0, []
    state = load_checkpoint(checkpoint, spec)
    if state is not None:
        model.load_state_dict(state["student"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        _set_rng_state(state["rng"])
        start, losses = int(state["step"]), list(state["losses"])
        context.report_progress(start / steps, f"resumed from the checkpoint at step {start}")
    checkpointing = cuda and bool(getattr(model, "supports_gradient_checkpointing", False))
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    run = _Run(spec, context, teacher, windows, device, optimizer, scheduler, masks, checkpoint)
    try:
        _train(model, run, start, losses)
    finally:
        if checkpointing:
            model.gradient_checkpointing_disable()
        model.eval()
        optimizer.zero_grad(set_to_none=True)
        context.teacher.to("cpu")
    summary = {
        "steps": steps,
        "resumed_from_step": start,
        "tokens_seen": steps * batch_size * seq_len,
        "first_loss": losses[0] if losses else None,
        "final_loss": sum(losses[-10:]) / len(losses[-10:]) if losses else None,
        "masked_layers": len(masks),
        "dataset_windows": int(windows.shape[0]),
        "autocast": "bf16" if cuda else None,
        "gradient_checkpointing": checkpointing,
    }
    layers = [{"name": name, "sparsity": float(1 - keep.float().mean())} for name, keep in masks.items()]
    return StepResult(layers=layers, summary=summary)


def _train(model: torch.nn.Module, run: _Run, start: int, losses: list[float]) -> None:
    """Steps `start` .. `steps` - 1: loss, backward, masks, clipping, AdamW; `losses` grows by one per step."""
    spec, optimizer = run.spec, run.optimizer
    steps, batch_size = int(spec.get("steps", 200)), int(spec.get("batch_size", 8))
    temperature, alpha = float(spec.get("temperature", 2.0)), float(spec.get("alpha", 0.5))
    hidden_weight, every = float(spec.get("hidden_mse", 0.0)), int(spec.get("checkpoint_every", 50))
    parameters = [p for group in optimizer.param_groups for p in group["params"]]
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=run.device.type == "cuda")
    model.train()
    started, tokens = time.perf_counter(), 0
    for step in range(start, steps):
        ids = run.windows[batch_indices(step, run.windows.shape[0], batch_size)].to(run.device)
        with autocast:
            with torch.no_grad():
                t_logits, t_hidden = _forward(run.teacher, ids, hidden_weight > 0)
            s_logits, s_hidden = _forward(model, ids, hidden_weight > 0)
        loss, kl, ce = kd_loss(s_logits, t_logits, ids, temperature, alpha)
        if hidden_weight > 0:
            loss = loss + hidden_weight * F.mse_loss(s_hidden.float(), t_hidden.float())
        del t_logits, t_hidden, s_logits, s_hidden  # the graph keeps what backward needs
        loss.backward()
        apply_masks_(model, run.masks, grads=True)
        if spec.get("max_grad_norm") is not None:
            torch.nn.utils.clip_grad_norm_(parameters, float(spec["max_grad_norm"]))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)  # the gradients go before the next forward, not after it
        run.scheduler.step()
        apply_masks_(model, run.masks)
        tokens += ids.numel()
        losses.append(float(loss.detach()))
        speed = tokens / max(time.perf_counter() - started, 1e-9)
        done = step + 1
        if run.checkpoint is not None and (done % every == 0 or done == steps):
            save_checkpoint(
                run.checkpoint,
                {
                    "spec": {k: v for k, v in spec.items() if k != "checkpoint_every"},
                    "step": done,
                    "losses": losses,
                    "student": model.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "scheduler": run.scheduler.state_dict(),
                    "rng": _rng_state(),
                },
            )
        run.context.report_progress(
            done / steps,
            f"step {done}/{steps} loss {losses[-1]:.4f} (kl {float(kl.detach()):.4f} "
            f"ce {float(ce.detach()):.4f}) {speed:.0f} tokens/s",
        )
