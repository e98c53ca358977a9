"""`distill:kd`: logit distillation from a teacher snapshot into the current model (the student).

Loss per batch: alpha · T² · KL(softmax(t/T) ‖ softmax(s/T)) + (1 − alpha) · next-token cross-entropy, plus
`hidden_mse` · MSE of the final hidden states when set. AdamW, linear warm-up then cosine decay, gradient
clipping, bf16 autocast on CUDA. Weights that are exactly zero when training starts (unstructured or N:M
pruning) are masked: their gradients are zeroed and the weights re-zeroed after every optimizer step.

Memory, in both modes: the teacher's weights are cast to bfloat16 on CUDA (autocast runs its matrix products in
bf16 anyway), the student recomputes each decoder layer's activations in the backward pass (gradient
checkpointing: a layer's input is all it keeps), and the loss is taken one sequence at a time in float32 and
recomputed in the backward pass, so float32 copies of [batch, seq, vocab] logits never exist at once.

Fast mode (`offload: false`): everything on the device. The teacher moves there whole and AdamW is the fused
kernel. The GPU holds the student, its gradients and two AdamW moments (4 × the student) plus the teacher plus
activations: 96 GB for an 8B bf16 model at batch 8 × 2048.

Lean mode (`offload: true`): the GPU holds the student and little else; what is not needed at a given moment
waits in host memory (pinned, so that copies run asynchronously and overlap compute; see offload.py):
- the teacher stays on the host and its decoder layers are streamed to the device one at a time, the next
  layer's copy overlapping the current layer's forward (`StreamedLayers`); embeddings, final norm and output
  layer (a few percent of it) stay on the device for the step;
- AdamW's moments and step counts live on the host, and each gradient leaves the GPU as soon as backward has
  finished it; the update streams parameter by parameter (`HostAdamW`, torch's own AdamW update);
- pruning masks are kept on the host, bit-packed (8 GB of bool masks on the GPU for an 8B model otherwise);
- teacher and student stop at their final hidden states, and the loss applies each one's output layer to one
  sequence at a time inside the recomputed per-sequence loss: the whole batch's logits (4.2 GB each at
  8 × 2048 × 128k in bf16) never exist. Only where that is exact for the model (checked once on a short input:
  some architectures scale or soft-cap the logits after the output layer); otherwise the whole-batch logits.
The price is host↔device traffic: the teacher once per step, the gradients once, and gradients plus moments in
and moments out at every optimizer step. `offload: "auto"` (the default) runs the lean mode on CUDA only when the
fast mode's estimated footprint does not fit in the device's free memory. The report says which mode ran and why.
distill_modes.py chooses and sets up the modes; offload.py and host_adamw.py hold the machinery.

Checkpoints (student, optimizer, scheduler, step, RNG) are written atomically to `context.checkpoint_dir`
every `checkpoint_every` steps; a retried job resumes from the last one written in the same memory mode.
Batches are a pure function of the step number (a per-epoch permutation with a fixed seed), so a resumed run
sees the same data as one that never stopped.
"""

from __future__ import annotations

import contextlib
import functools
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

from modelpress.specs import KnowledgeDistill
from worker.engine.calibrate.windows import token_windows
from worker.engine.distill.modes import Mode, choose_offload, fast_mode, lean_mode
from worker.engine.load.checkpoint import require_tokenizer
from worker.engine.steps import EngineError, StepContext, StepResult, register

log = logging.getLogger(__name__)

CHECKPOINT = "distill.pt"
SEED = 0


# --- math -------------------------------------------------------------------------------------------------
def kd_loss(
    student: torch.Tensor,
    teacher: torch.Tensor,
    labels: torch.Tensor,
    temperature: float,
    alpha: float,
    heads: tuple[torch.nn.Module, torch.nn.Module] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(total, kl, ce) for logits [b, seq, vocab] and token ids [b, seq]; KL is a mean per predicted token.

    Summed one sequence at a time; with gradients, each sequence's float32 terms are recomputed in the backward
    pass instead of kept (at batch 8 × 2048 and a 128k vocabulary each float32 copy of the logits is 8 GB).
    With `heads` (the student's and the teacher's output layers), `student` and `teacher` are final hidden states
    [b, seq, hidden] and each sequence's logits are made inside its recomputed loss: one sequence's at a time."""
    losses = sequence_losses if heads is None else functools.partial(head_losses, *heads)
    tokens = student.shape[0] * (student.shape[1] - 1)
    kl_sum = ce_sum = student.new_zeros((), dtype=torch.float32)
    for s, t, y in zip(student, teacher, labels, strict=True):
        if torch.is_grad_enabled() and s.requires_grad:
            kl, ce = recompute(losses, s[:-1], t[:-1], y[1:], temperature, use_reentrant=False)
        else:
            kl, ce = losses(s[:-1], t[:-1], y[1:], temperature)
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


def head_losses(
    student_head: torch.nn.Module,
    teacher_head: torch.nn.Module,
    student: torch.Tensor,
    teacher: torch.Tensor,
    labels: torch.Tensor,
    temperature: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`sequence_losses` of the logits that the output layers make of one sequence's final hidden states."""
    with torch.no_grad():
        teacher_logits = teacher_head(teacher)
    return sequence_losses(student_head(student), teacher_logits, labels, temperature)


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


# --- checkpoints ----------------------------------------------------------------------------------------------
def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """torch.save to a temporary file in the same folder, then an atomic rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def checkpoint_key(spec: KnowledgeDistill, offload: bool) -> dict[str, Any]:
    """What a checkpoint must have been written for: the spec (less `checkpoint_every`) and the memory mode that
    ran, since the two modes' optimizers differ (host buffers and no kernel options in the lean one)."""
    return spec.model_dump(mode="json", exclude={"checkpoint_every"}) | {"offload": offload}


def load_checkpoint(path: Path | None, key: dict[str, Any]) -> dict[str, Any] | None:
    if path is None or not path.is_file():
        return None
    state = torch.load(path, map_location="cpu", weights_only=True)
    if state.get("spec") != key:
        log.warning("ignoring checkpoint %s: it was written for another distill spec or memory mode", path)
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
def _windows(spec: KnowledgeDistill, context: StepContext) -> torch.Tensor:
    dataset_id, seq_len = spec.dataset_id, spec.seq_len
    if dataset_id not in context.datasets:
        raise EngineError("missing_dataset", f"distill dataset {dataset_id!r} was not given to the engine")
    path, data_format = context.datasets[dataset_id]
    tokenizer = require_tokenizer(context.tokenizer, "distillation")
    return token_windows(tokenizer, Path(path), data_format, seq_len, None, "distillation")


def _forward(model: torch.nn.Module, ids: torch.Tensor, hidden: bool, split: bool):
    """(logits, final hidden states if `hidden`); when `split`, the model stops at its final hidden states and
    returns them in both places (the loss applies the output layer)."""
    if split:
        states = model.base_model(input_ids=ids, use_cache=False).last_hidden_state
        return states, states
    out = model(input_ids=ids, use_cache=False, output_hidden_states=hidden)
    return out.logits, (out.hidden_states[-1] if hidden else None)


@dataclass
class _Run:
    """What the training loop needs besides the model: one distill step's state (dies with it)."""

    spec: KnowledgeDistill
    context: StepContext
    mode: Mode
    windows: torch.Tensor
    device: torch.device
    scheduler: torch.optim.lr_scheduler.LRScheduler
    checkpoint: Path | None
    key: dict[str, Any]


@register(KnowledgeDistill)
def distill_kd(model: torch.nn.Module, spec: KnowledgeDistill, context: StepContext) -> StepResult:
    if context.teacher is None:
        raise EngineError("bad_spec", "distill:kd has no teacher snapshot (the pipeline keeps one per teacher_step)")
    steps, batch_size, seq_len = spec.steps, spec.batch_size, spec.seq_len
    device = torch.device(context.device) if context.device is not None else next(model.parameters()).device
    cuda = device.type == "cuda"
    windows = _windows(spec, context)
    offload, reason = choose_offload(spec.offload, model, context.teacher, device, batch_size, seq_len)
    log.info("distill: %s mode (%s)", "lean" if offload else "fast", reason)
    with contextlib.ExitStack() as cleanup:
        mode = (
            lean_mode(model, spec, context, device, windows, cleanup)
            if offload
            else fast_mode(model, spec, context, device, cleanup)
        )
        warmup = spec.warmup_steps
        scheduler = torch.optim.lr_scheduler.LambdaLR(mode.optimizer, lambda s: lr_factor(s, warmup, steps))
        checkpoint = None if context.checkpoint_dir is None else Path(context.checkpoint_dir) / CHECKPOINT
        run = _Run(spec, context, mode, windows, device, scheduler, checkpoint, checkpoint_key(spec, offload))
        start, losses = _resume(model, run)
        if start:
            context.report_progress(start / steps, f"resumed from the checkpoint at step {start}")
        checkpointing = cuda and bool(getattr(model, "supports_gradient_checkpointing", False))
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            cleanup.callback(model.gradient_checkpointing_disable)
        cleanup.callback(model.eval)
        _train(model, run, start, losses)
    summary = {
        "steps": steps,
        "resumed_from_step": start,
        "tokens_seen": steps * batch_size * seq_len,
        "first_loss": losses[0] if losses else None,
        "final_loss": sum(losses[-10:]) / len(losses[-10:]) if losses else None,
        "masked_layers": len(mode.layers),
        "dataset_windows": int(windows.shape[0]),
        "autocast": "bf16" if cuda else None,
        "gradient_checkpointing": checkpointing,
        "memory_mode": "lean" if offload else "fast",
        "memory_mode_reason": reason,
        "logits": mode.logits,
    }
    return StepResult(layers=mode.layers, summary=summary)


def _resume(model: torch.nn.Module, run: _Run) -> tuple[int, list[float]]:
    """Load the last checkpoint of this spec and mode, if any: (first step to run, losses so far). The loaded state
    (the size of the student and its moments) is dropped on return."""
    state = load_checkpoint(run.checkpoint, run.key)
    if state is None:
        return 0, []
    model.load_state_dict(state["student"])
    run.mode.optimizer.load_state_dict(state["optimizer"])
    run.scheduler.load_state_dict(state["scheduler"])
    _set_rng_state(state["rng"])
    return int(state["step"]), list(state["losses"])


def _batch_loss(
    model: torch.nn.Module, run: _Run, ids: torch.Tensor, temperature: float, alpha: float, hidden_weight: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, kl, ce) of one batch. When the loss makes the logits (`heads`), it runs under autocast like the
    forwards, so that the output layers' matrix products are bf16 as in the whole-batch path."""
    heads = run.mode.heads
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=run.device.type == "cuda")
    with autocast:
        with torch.no_grad():
            t_out, t_hidden = _forward(run.mode.teacher, ids, hidden_weight > 0, heads is not None)
        s_out, s_hidden = _forward(model, ids, hidden_weight > 0, heads is not None)
    with autocast if heads is not None else contextlib.nullcontext():
        loss, kl, ce = kd_loss(s_out, t_out, ids, temperature, alpha, heads)
    if hidden_weight > 0:
        loss = loss + hidden_weight * F.mse_loss(s_hidden.float(), t_hidden.float())
    return loss, kl, ce


def _train(model: torch.nn.Module, run: _Run, start: int, losses: list[float]) -> None:
    """Steps `start` .. `steps` - 1: loss, backward, masks, clipping, AdamW; `losses` grows by one per step."""
    spec = run.spec
    steps, batch_size = spec.steps, spec.batch_size
    temperature, alpha, hidden_weight, every = spec.temperature, spec.alpha, spec.hidden_mse, spec.checkpoint_every
    model.train()
    started, tokens = time.perf_counter(), 0
    for step in range(start, steps):
        ids = run.windows[batch_indices(step, run.windows.shape[0], batch_size)].to(run.device)
        loss, kl, ce = _batch_loss(model, run, ids, temperature, alpha, hidden_weight)
        loss.backward()
        run.mode.update()
        run.scheduler.step()
        tokens += ids.numel()
        losses.append(float(loss.detach()))
        speed = tokens / max(time.perf_counter() - started, 1e-9)
        done = step + 1
        if run.checkpoint is not None and (done % every == 0 or done == steps):
            save_checkpoint(
                run.checkpoint,
                {
                    "spec": run.key,
                    "step": done,
                    "losses": losses,
                    "student": model.state_dict(),
                    "optimizer": run.mode.optimizer.state_dict(),
                    "scheduler": run.scheduler.state_dict(),
                    "rng": _rng_state(),
                },
            )
            if run.context.on_checkpoint is not None:
                run.context.on_checkpoint(run.checkpoint)
        run.context.report_progress(
            done / steps,
            f"step {done}/{steps} loss {losses[-1]:.4f} (kl {float(kl.detach()):.4f} "
            f"ce {float(ce.detach()):.4f}) {speed:.0f} tokens/s",
        )
