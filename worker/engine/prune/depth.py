"""`prune:depth`: drop whole decoder layers (Gromov et al., 2024, "The Unreasonable Ineffectiveness of the
Deeper Layers"). For a block of n consecutive layers starting at l, the importance is the angular distance
arccos(cos(x_l, x_{l+n})) / π between its input and output, averaged over the calibration tokens; the block
with the smallest distance goes. The last layer is never dropped (it feeds the final norm and head directly).
Single-layer distances are reported too, and the dropped block's damage (`calibrate.layer_damage`'s fields): its
output error ‖x_{l+n} − x_l‖ / ‖x_{l+n}‖ on the calibration tokens.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from modelpress.specs import DepthPrune
from worker.engine.calibrate.layerwise import decoder_layers, streamed
from worker.engine.prune.size import model_size, size_summary
from worker.engine.steps import EngineError, StepContext, StepResult, register

log = logging.getLogger(__name__)


def angular_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per token arccos(cos(a, b)) / π in [0, 1], in float32; a and b are [..., hidden]."""
    cos = torch.nn.functional.cosine_similarity(a.float(), b.float(), dim=-1).clamp(-1.0, 1.0)
    return torch.arccos(cos) / torch.pi


@torch.no_grad()
def block_distances(
    model: torch.nn.Module, windows: torch.Tensor, device: torch.device, span: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """For every l, between the input x_l of layer l and the output x_{l+span} of layer l + span − 1: the mean
    angular distance, and the relative output error of skipping the block, ‖x_{l+span} − x_l‖ / ‖x_{l+span}‖
    over all calibration tokens."""
    _, layers = decoder_layers(model)
    boundaries: list[torch.Tensor] = []
    hooks = [layers[0].register_forward_pre_hook(lambda _m, args, kwargs: boundaries.append(args[0]), with_kwargs=True)]
    hooks += [
        layer.register_forward_hook(lambda _m, _a, out: boundaries.append(out[0] if isinstance(out, tuple) else out))
        for layer in layers
    ]
    totals = torch.zeros(len(layers) - span + 1, dtype=torch.float64)
    errors, outputs = torch.zeros_like(totals), torch.zeros_like(totals)
    tokens = 0
    try:
        for window in windows:
            boundaries.clear()
            model(input_ids=window.unsqueeze(0).to(device), use_cache=False)
            for start in range(totals.numel()):
                before, after = boundaries[start].double(), boundaries[start + span].double()
                totals[start] += angular_distance(before, after).sum().cpu()
                errors[start] += (after - before).square().sum().cpu()
                outputs[start] += after.square().sum().cpu()
            tokens += window.numel()
    finally:
        for hook in hooks:
            hook.remove()
    return (totals / tokens).float(), (errors / outputs.clamp(min=1e-30)).sqrt().float()


def drop_layers_(model: torch.nn.Module, drop: list[int]) -> None:
    """Remove decoder layers in place; renumber the kept ones (layer_idx, for the KV cache) and the config."""
    prefix, layers = decoder_layers(model)
    kept = [layer for i, layer in enumerate(layers) if i not in set(drop)]
    parent = model.get_submodule(prefix.rsplit(".", 1)[0]) if "." in prefix else model
    setattr(parent, prefix.rsplit(".", 1)[-1], torch.nn.ModuleList(kept))
    for index, layer in enumerate(kept):
        for module in layer.modules():
            if hasattr(module, "layer_idx"):
                module.layer_idx = index
    config = model.config
    if isinstance(getattr(config, "layer_types", None), list):
        config.layer_types = [t for i, t in enumerate(config.layer_types) if i not in set(drop)]
    config.num_hidden_layers = len(kept)


@register(DepthPrune)
def prune_depth(model: torch.nn.Module, spec: DepthPrune, context: StepContext) -> StepResult:
    count = spec.num_layers
    if context.calibration is None:
        raise EngineError("missing_dataset", "prune:depth ranks layers on calibration data: add a dataset")
    prefix, layers = decoder_layers(model)
    total = len(layers)
    if not 1 <= count < total:
        raise EngineError("bad_spec", f"num_layers={count}: the model has {total} layers and must keep at least 1")
    device = context.device or next(model.parameters()).device
    before = model_size(model)
    was_training = model.training
    model.eval()
    context.report_progress(0.1, "measuring layer importance (angular distance)")
    with streamed(model, device):  # a model in host memory: each layer visits the device in turn
        single, single_errors = block_distances(model, context.calibration, device, 1)
        blocks, errors = (
            (single, single_errors) if count == 1 else block_distances(model, context.calibration, device, count)
        )
    model.train(was_training)
    candidates = blocks[: total - count]  # blocks that end before the last layer
    start = int(candidates.argmin())
    drop = list(range(start, start + count))
    drop_layers_(model, drop)
    details: list[dict[str, Any]] = [
        {"name": f"layer {i}", "angular_distance": float(single[i]), "dropped": i in drop} for i in range(total)
    ]
    block = f"{prefix}.{drop[0]}" if count == 1 else f"{prefix}.{drop[0]}-{drop[-1]}"
    details.append(  # the uniform damage fields: every weight of the block is gone, its output error measured
        {"name": block, "relative_error": 1.0, "output_error": float(errors[start]), "output_error_from": "outputs"}
    )
    summary = {
        "dropped_layers": drop,
        "block_angular_distance": float(blocks[start]),
        "num_hidden_layers": [total, total - count],
        **size_summary(before, model, context.calibration),
    }
    context.report_progress(1.0, f"dropped layers {drop}")
    return StepResult(layers=details, summary=summary)
