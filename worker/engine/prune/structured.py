"""`prune:structured`: width pruning that physically shrinks the model (Minitron-style activation importance).

MLP: channel j of a layer scores ‖a_j‖₂ over the calibration tokens, a = act(gate(x)) · up(x) (the input of
down_proj); the lowest-scoring channels lose their gate/up rows and down_proj column. Attention: a key/value
group scores the L2 norm of its query heads' slice of the o_proj input; a removed group takes its q heads, its
k/v head and its o_proj columns along. Channels are ranked per layer, but every layer removes the same count
(a Hugging Face config has one intermediate_size and one head count for all layers). The kept MLP width is
rounded to a multiple of 64 (else 32, else 8) so the matrices stay friendly to tensor cores. Each down_proj and
o_proj that lost input channels carries the uniform damage fields (`calibrate.layer_damage`, from input norms).
Phi-3's fused projections lose the same rows: a channel's gate and up rows of gate_up_proj, a head's q, k and v
rows of qkv_proj.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from modelpress.specs import StructuredPrune
from worker.engine.calibrate.damage import layer_damage
from worker.engine.calibrate.layerwise import decoder_layers, streamed
from worker.engine.prune.size import model_size, size_summary
from worker.engine.steps import EngineError, StepContext, StepResult, register

log = logging.getLogger(__name__)


# --- math -------------------------------------------------------------------------------------------------
def kept_width(width: int, sparsity: float) -> int:
    """How many of `width` channels stay: (1 − sparsity) · width, rounded to the largest of 64, 32 or 8 whose
    nearest multiple moves the count by at most 5% of the width (else the exact count)."""
    exact = width - round(sparsity * width)
    for multiple in (64, 32, 8):
        rounded = round(exact / multiple) * multiple
        if 0 < rounded < width and abs(rounded - exact) <= 0.05 * width:
            return rounded
    return max(1, exact)


def top_indices(scores: torch.Tensor, keep: int) -> torch.Tensor:
    """Indices of the `keep` highest scores, in ascending index order (so the kept channels keep their order)."""
    return scores.topk(keep).indices.sort().values


@torch.no_grad()
def shrink_linear_(linear: torch.nn.Linear, index: torch.Tensor, dim: int) -> None:
    """Keep only the rows (dim=0, outputs) or columns (dim=1, inputs) at `index`; update the shape fields."""
    index = index.to(linear.weight.device)
    linear.weight = torch.nn.Parameter(linear.weight.index_select(dim, index).contiguous())
    if dim == 0:
        if linear.bias is not None:
            linear.bias = torch.nn.Parameter(linear.bias.index_select(0, index).contiguous())
        linear.out_features = index.numel()
    else:
        linear.in_features = index.numel()


def head_rows(heads: torch.Tensor, head_dim: int) -> torch.Tensor:
    """Row indices of whole heads in a projection laid out head after head."""
    return (heads.unsqueeze(1) * head_dim + torch.arange(head_dim, device=heads.device)).flatten()


def removed_inputs_damage(
    name: str, linear: torch.nn.Linear, kept: torch.Tensor, input_norms: torch.Tensor
) -> dict[str, Any]:
    """The damage fields of the Linear that reads the removed channels (down_proj for MLP channels, o_proj for
    heads): removing a channel zeroes that input column, so its output error is `layer_damage` of the weight with
    those columns zeroed, from the channels' calibration norms (the statistic that ranked them). The Linear's
    output is the MLP's (attention's) output, so this is the whole block's output error."""
    weight = linear.weight.detach()
    keep = torch.zeros(weight.shape[1], dtype=torch.bool, device=weight.device)
    keep[kept.to(weight.device)] = True
    changed = weight * keep.to(weight.dtype).unsqueeze(0)
    removed = int((~keep).sum())
    return {"name": name, "removed_inputs": removed, **layer_damage(weight, changed, input_norms=input_norms)}


@torch.no_grad()
def shrink_mlp_(mlp: torch.nn.Module, kept: torch.Tensor, width: int) -> None:
    """Keep MLP channels `kept` of `width`: their gate and up rows (both halves of Phi-3's fused gate_up_proj,
    gate | up) and their down_proj columns."""
    if hasattr(mlp, "gate_up_proj"):
        shrink_linear_(mlp.gate_up_proj, torch.cat([kept, kept + width]), 0)
    else:
        shrink_linear_(mlp.gate_proj, kept, 0)
        shrink_linear_(mlp.up_proj, kept, 0)
    shrink_linear_(mlp.down_proj, kept, 1)


@torch.no_grad()
def shrink_attention_(attn: torch.nn.Module, q_heads: torch.Tensor, kv_heads: torch.Tensor, head_dim: int) -> None:
    """Keep query heads `q_heads` and key/value heads `kv_heads`: their q/k/v rows (in Phi-3's fused qkv_proj,
    laid out q | k | v) and the o_proj columns of the kept query heads."""
    q_rows, kv_rows = head_rows(q_heads, head_dim), head_rows(kv_heads, head_dim)
    if hasattr(attn, "qkv_proj"):
        q_width = attn.o_proj.in_features
        kv_width = (attn.qkv_proj.out_features - q_width) // 2
        shrink_linear_(attn.qkv_proj, torch.cat([q_rows, q_width + kv_rows, q_width + kv_width + kv_rows]), 0)
    else:
        shrink_linear_(attn.q_proj, q_rows, 0)
        shrink_linear_(attn.k_proj, kv_rows, 0)
        shrink_linear_(attn.v_proj, kv_rows, 0)
    shrink_linear_(attn.o_proj, q_rows, 1)


# --- importance -----------------------------------------------------------------------------------------------
@torch.no_grad()
def channel_importance(model: torch.nn.Module, windows: torch.Tensor, device: torch.device):
    """Per layer: Σ a_j² of the down_proj inputs and of the o_proj inputs over all calibration tokens."""
    _, layers = decoder_layers(model)
    mlp = [torch.zeros(layer.mlp.down_proj.in_features, device=device) for layer in layers]
    attn = [torch.zeros(layer.self_attn.o_proj.in_features, device=device) for layer in layers]

    def gather(store: torch.Tensor):
        def hook(_module: torch.nn.Module, args: tuple) -> None:  # returns None: the input goes on unchanged
            store.add_(args[0].float().square().sum(dim=(0, 1)).to(store.device))

        return hook

    handles = []
    for i, layer in enumerate(layers):
        for module, store in ((layer.mlp.down_proj, mlp[i]), (layer.self_attn.o_proj, attn[i])):
            handles.append(module.register_forward_pre_hook(gather(store)))
    try:
        for window in windows:
            model(input_ids=window.unsqueeze(0).to(device), use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    return [m.sqrt() for m in mlp], [a.sqrt() for a in attn]


# --- orchestration -------------------------------------------------------------------------------------------
def _attention_shape(config: Any) -> tuple[int, int, int]:
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return heads, kv_heads, head_dim


@register(StructuredPrune)
def prune_structured(model: torch.nn.Module, spec: StructuredPrune, context: StepContext) -> StepResult:
    config = model.config
    if context.calibration is None:
        raise EngineError("missing_dataset", "prune:structured ranks channels on calibration data: add a dataset")
    mlp_sparsity, attn_sparsity = spec.mlp_sparsity, spec.attention_sparsity
    heads, kv_heads, head_dim = _attention_shape(config)
    group = heads // kv_heads
    before = model_size(model)
    device = context.device or next(model.parameters()).device
    context.report_progress(0.05, "measuring channel importance on the calibration data")
    was_training = model.training
    model.eval()
    with streamed(model, device):  # a model in host memory: each layer visits the device in turn
        mlp_scores, attn_scores = channel_importance(model, context.calibration, device)
    model.train(was_training)
    prefix, layers = decoder_layers(model)
    width = layers[0].mlp.down_proj.in_features
    keep_mlp = kept_width(width, mlp_sparsity) if mlp_sparsity > 0 else width
    keep_groups = max(1, kv_heads - round(attn_sparsity * kv_heads)) if attn_sparsity > 0 else kv_heads
    details, damage = [], []
    for i, layer in enumerate(layers):
        entry: dict[str, Any] = {"name": f"layer {i}"}
        if keep_mlp < width:
            kept = top_indices(mlp_scores[i], keep_mlp)
            damage.append(
                removed_inputs_damage(f"{prefix}.{i}.mlp.down_proj", layer.mlp.down_proj, kept, mlp_scores[i])
            )
            shrink_mlp_(layer.mlp, kept, width)
            entry["mlp_channels"] = [width, keep_mlp]
        if keep_groups < kv_heads:
            group_scores = attn_scores[i].view(kv_heads, group * head_dim).norm(dim=1)
            kept_groups = top_indices(group_scores, keep_groups)
            q_heads = (kept_groups.unsqueeze(1) * group + torch.arange(group, device=kept_groups.device)).flatten()
            attn = layer.self_attn
            kept_inputs = head_rows(q_heads, head_dim)
            damage.append(
                removed_inputs_damage(f"{prefix}.{i}.self_attn.o_proj", attn.o_proj, kept_inputs, attn_scores[i])
            )
            shrink_attention_(attn, q_heads, kept_groups, head_dim)
            entry["kv_groups_kept"] = kept_groups.tolist()
            entry["attention_heads"] = [heads, keep_groups * group]
        details.append(entry)
        context.report_progress(0.5 + 0.5 * (i + 1) / len(layers), f"shrank layer {i}")
    config.intermediate_size = keep_mlp
    config.num_attention_heads = keep_groups * group
    config.num_key_value_heads = keep_groups
    config.head_dim = head_dim  # explicit: hidden_size // heads no longer gives it
    for layer in layers:
        if hasattr(layer.self_attn, "num_key_value_groups"):
            layer.self_attn.num_key_value_groups = group
        if hasattr(layer.self_attn, "num_key_value_heads"):  # Phi-3 splits its fused qkv output by this count
            layer.self_attn.num_key_value_heads = keep_groups
    summary = {
        "intermediate_size": [width, keep_mlp],
        "num_attention_heads": [heads, keep_groups * group],
        "num_key_value_heads": [kv_heads, keep_groups],
        "head_dim": head_dim,
        **size_summary(before, model, context.calibration),
    }
    notes = []
    if keep_mlp < width and keep_mlp != width - round(mlp_sparsity * width):
        notes.append(
            f"prune:structured kept {keep_mlp} of {width} MLP channels (rounded from "
            f"{width - round(mlp_sparsity * width)} to a multiple of 64/32/8 for efficient matrix shapes)"
        )
    return StepResult(layers=details + damage, summary=summary, notes=notes)
