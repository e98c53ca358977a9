"""`distill:kd`: logit distillation from a teacher snapshot into the current model (the student).

Loss per batch: alpha · T² · KL(softmax(t/T) ‖ softmax(s/T)) + (1 − alpha) · next-token cross-entropy, plus
`hidden_mse` · MSE of the final hidden states when set. AdamW, linear warm-up then cosine decay, gradient
clipping, bf16 autocast on CUDA. Weights that are exactly zero when training starts (unstructured or N:M
pruning) are masked: their gradients are zeroed and the weights re-zeroed after every optimizer step.

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
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

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
    """(total, kl, ce) for logits [b, seq, vocab] and token ids [b, seq]; KL is a mean per predicted token."""
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


@register("distill", "kd")
def distill(model: torch.nn.Module, context: StepContext) -> StepResult:
    spec = context.spec
    if context.teacher is None:
        raise EngineError("bad_spec", "distill:kd has no teacher snapshot (the pipeline keeps one per teacher_step)")
    steps, batch_size, seq_len = int(spec.get("steps", 200)), int(spec.get("batch_size", 8)), int(spec["seq_len"])
    temperature, alpha = float(spec.get("temperature", 2.0)), float(spec.get("alpha", 0.5))
    hidden_weight, every = float(spec.get("hidden_mse", 0.0)), int(spec.get("checkpoint_every", 50))
    device = torch.device(context.device) if context.device is not None else next(model.parameters()).device
    windows = _windows(context, seq_len)
    teacher = context.teacher.to(device).eval()
    masks = sparsity_masks(model)
    parameters = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(parameters, lr=float(spec.get("learning_rate", 1e-4)), weight_decay=0.0)
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
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")
    model.train()
    started, tokens = time.perf_counter(), 0
    for step in range(start, steps):
        ids = windows[batch_indices(step, windows.shape[0], batch_size)].to(device)
        with autocast:
            with torch.no_grad():
                t_logits, t_hidden = _forward(teacher, ids, hidden_weight > 0)
            s_logits, s_hidden = _forward(model, ids, hidden_weight > 0)
        loss, kl, ce = kd_loss(s_logits, t_logits, ids, temperature, alpha)
        if hidden_weight > 0:
            loss = loss + hidden_weight * F.mse_loss(s_hidden.float(), t_hidden.float())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        apply_masks_(model, masks, grads=True)
        if spec.get("max_grad_norm") is not None:
            torch.nn.utils.clip_grad_norm_(parameters, float(spec["max_grad_norm"]))
        optimizer.step()
        scheduler.step()
        apply_masks_(model, masks)
        tokens += ids.numel()
        losses.append(float(loss.detach()))
        speed = tokens / max(time.perf_counter() - started, 1e-9)
        done = step + 1
        if checkpoint is not None and (done % every == 0 or done == steps):
            save_checkpoint(
                checkpoint,
                {
                    "spec": {k: v for k, v in spec.items() if k != "checkpoint_every"},
                    "step": done,
                    "losses": losses,
                    "student": model.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(),
                    "rng": _rng_state(),
                },
            )
        context.report_progress(
            done / steps,
            f"step {done}/{steps} loss {losses[-1]:.4f} (kl {float(kl.detach()):.4f} "
            f"ce {float(ce.detach()):.4f}) {speed:.0f} tokens/s",
        )
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
        "autocast": "bf16" if device.type == "cuda" else None,
    }
    layers = [{"name": name, "sparsity": float(1 - keep.float().mean())} for name, keep in masks.items()]
    return StepResult(layers=layers, summary=summary)
