"""Where `distill:kd` keeps things (see distill.py's docstring for the two memory modes and why): the choice of
mode, and each mode's teacher, optimizer, masks and output-layer plan for one distill step."""

from __future__ import annotations

import contextlib
import functools
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from modelpress.specs import KnowledgeDistill
from worker.engine.distill.host_adamw import HostAdamW
from worker.engine.distill.offload import StreamedLayers, host_like, pack_mask
from worker.engine.steps import EngineError, StepContext

log = logging.getLogger(__name__)

PROBE_TOKENS = 64  # length of the input on which the per-sequence output layer is checked against the model


# --- masks ----------------------------------------------------------------------------------------------------
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


def packed_sparsity_masks(
    model: torch.nn.Module, pin: bool
) -> tuple[dict[torch.nn.Parameter, torch.Tensor], list[dict[str, Any]]]:
    """The lean mode's masks: `sparsity_masks` bit-packed in host memory, by weight, and each layer's sparsity.
    One bool mask at a time exists on the device while they are made."""
    packed, layers = {}, []
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and bool((module.weight == 0).any()):
            keep = module.weight != 0
            packed[module.weight] = pack_mask(keep)
            layers.append({"name": name, "sparsity": float(1 - keep.float().mean())})
    hosts = host_like(list(packed.values()), pin)
    for host, bits in zip(hosts, packed.values(), strict=True):
        host.copy_(bits)
    return dict(zip(packed, hosts, strict=True)), layers


# --- choosing a mode ---------------------------------------------------------------------------------------------
def fast_footprint(model: torch.nn.Module, teacher: torch.nn.Module, batch_size: int, seq_len: int) -> int:
    """Bytes the fast mode needs on CUDA: the bf16 teacher, the student with its gradients and two AdamW moments
    (4 × its bytes), and activations: every decoder layer's checkpointed input, one layer's recomputed
    intermediates, the batch's bf16 logits (student, teacher, the student's gradient), one sequence's float32
    loss terms. An estimate: 105 GB for Llama-3-8B at 8 × 2048, where 96 GB was measured."""
    config = model.config
    hidden, vocab, layers = config.hidden_size, config.vocab_size, config.num_hidden_layers
    inner = getattr(config, "intermediate_size", None) or 4 * hidden
    teacher_bytes = sum(p.numel() * (2 if p.is_floating_point() else p.element_size()) for p in teacher.parameters())
    student_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    per_token = 2 * (layers * hidden + 4 * hidden + 3 * inner + 3 * vocab)
    return teacher_bytes + 4 * student_bytes + batch_size * seq_len * per_token + 6 * seq_len * vocab * 4


def choose_offload(
    setting: bool | str, model: torch.nn.Module, teacher: torch.nn.Module, device: torch.device, batch: int, seq: int
) -> tuple[bool, str]:
    """Whether to run the lean mode, and why: `offload` as the spec says, or for "auto" on CUDA whether the fast
    mode's estimated footprint exceeds the free device memory (plus what the student already holds there).
    On the CPU "auto" is off: host and device are the same memory there."""
    if setting is True or setting is False:
        return setting, f"offload: {str(setting).lower()} in the spec"
    if setting != "auto":
        raise EngineError("bad_spec", f'distill offload must be true, false or "auto", not {setting!r}')
    if device.type != "cuda":
        return False, "offload: auto, and the device is not a GPU"
    need = fast_footprint(model, teacher, batch, seq)
    free, _ = torch.cuda.mem_get_info(device)
    have = free + sum(p.numel() * p.element_size() for p in model.parameters() if p.is_cuda)
    fits = "fits" if need <= have else "does not fit"
    return need > have, f"offload: auto; the fast mode's estimated {need / 1e9:.1f} GB {fits} in {have / 1e9:.1f} GB"


@torch.no_grad()
def logits_from_hidden_are_exact(model: torch.nn.Module, ids: torch.Tensor) -> bool:
    """Whether the output layer applied to the base model's final hidden states gives exactly the model's logits.
    Some architectures scale or soft-cap the logits after the output layer; the per-sequence loss must not
    apply the output layer alone to them."""
    head, base = model.get_output_embeddings(), model.base_model
    if head is None or base is model:
        return False
    hidden = base(input_ids=ids, use_cache=False).last_hidden_state
    return torch.equal(head(hidden).float(), model(input_ids=ids, use_cache=False).logits.float())


# --- the modes ----------------------------------------------------------------------------------------------
def _parameters_to_bf16_(module: torch.nn.Module) -> None:
    """Cast float parameters (not buffers: rotary frequencies stay float32) to bfloat16 in place."""
    for parameter in module.parameters():
        if parameter.is_floating_point() and parameter.dtype != torch.bfloat16:
            parameter.data = parameter.data.to(torch.bfloat16)


@dataclass
class Mode:
    """What a memory mode sets up: the teacher to call, the optimizer, what follows each backward pass (masks,
    clipping, the optimizer step), the output layers when the loss makes the logits, and the report's layers."""

    teacher: torch.nn.Module
    optimizer: torch.optim.Optimizer
    update: Callable[[], None]
    heads: tuple[torch.nn.Module, torch.nn.Module] | None
    logits: str
    layers: list[dict[str, Any]]


def fast_mode(
    model: torch.nn.Module,
    spec: KnowledgeDistill,
    context: StepContext,
    device: torch.device,
    cleanup: contextlib.ExitStack,
) -> Mode:
    """Everything on the device: the teacher moved there whole, AdamW's fused kernel on CUDA."""
    cuda = device.type == "cuda"
    cleanup.callback(context.teacher.to, "cpu")
    teacher = context.teacher.to(device).eval()
    if cuda:
        _parameters_to_bf16_(teacher)
    masks = sparsity_masks(model)
    optimizer = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad],
        lr=spec.learning_rate,
        weight_decay=0.0,
        **({"fused": True} if cuda else {"foreach": False}),
    )
    cleanup.callback(optimizer.zero_grad, set_to_none=True)
    update = functools.partial(_fast_update, model, optimizer, masks, spec.max_grad_norm)
    layers = [{"name": name, "sparsity": float(1 - keep.float().mean())} for name, keep in masks.items()]
    return Mode(teacher, optimizer, update, None, "whole batch", layers)


def _fast_update(
    model: torch.nn.Module, optimizer: torch.optim.Optimizer, masks: dict[str, torch.Tensor], max_norm: float | None
) -> None:
    apply_masks_(model, masks, grads=True)
    if max_norm is not None:
        torch.nn.utils.clip_grad_norm_([p for g in optimizer.param_groups for p in g["params"]], max_norm)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)  # the gradients go before the next forward, not after it
    apply_masks_(model, masks)


def lean_mode(
    model: torch.nn.Module,
    spec: KnowledgeDistill,
    context: StepContext,
    device: torch.device,
    windows: torch.Tensor,
    cleanup: contextlib.ExitStack,
) -> Mode:
    """Teacher streamed from host memory layer by layer, AdamW's state and the gradients in host memory, masks
    bit-packed on the host, and where exact for the model the logits made one sequence at a time."""
    cuda = device.type == "cuda"
    if cuda:
        _parameters_to_bf16_(context.teacher)
    try:
        streamed = StreamedLayers(context.teacher.eval(), device)
    except EngineError as exc:
        raise EngineError(
            exc.code,
            "distill offload streams the teacher one decoder layer at a time, and this model has no decoder layer "
            "stack ('<...>.layers' ModuleList): set offload to false",
        ) from exc
    teacher = cleanup.enter_context(streamed)
    masks, layers = packed_sparsity_masks(model, pin=cuda)
    optimizer = HostAdamW(
        [p for p in model.parameters() if p.requires_grad],
        lr=spec.learning_rate,
        device=device,
        masks=masks,
        max_grad_norm=spec.max_grad_norm,
    )
    cleanup.callback(optimizer.close)
    update = functools.partial(_lean_update, optimizer)
    probe = windows[:1, :PROBE_TOKENS].to(device)
    model.eval()
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=cuda):
        exact = all(logits_from_hidden_are_exact(m, probe) for m in (model, teacher))
    if not exact:
        log.warning("distill: the output layer alone does not give this model's logits; whole-batch logits instead")
        return Mode(teacher, optimizer, update, None, "whole batch (per sequence would not be exact)", layers)
    heads = (model.get_output_embeddings(), teacher.get_output_embeddings())
    return Mode(teacher, optimizer, update, heads, "per sequence, from the final hidden states", layers)


def _lean_update(optimizer: HostAdamW) -> None:
    """HostAdamW has masked the gradients and noted their norms as they arrived: only the step is left. Looked up
    when called, not when the mode is made: LambdaLR wraps `optimizer.step` to count the steps."""
    optimizer.step()
