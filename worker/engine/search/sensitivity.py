"""Per-layer sensitivity: how much the loss is predicted to rise when one Linear alone takes a format, for every
targeted Linear and allowed format, from one calibrated forward and backward pass.

The estimate is AutoQuantize's (NVIDIA ModelOpt): a second-order expansion of the loss in the layer's outputs Y
with the empirical Fisher diagonal as the curvature, ΔL ≈ ½ Σ_tokens Σ_outputs (∂ℓ/∂Y)² · (Ŷ − Y)², where Ŷ is
the layer's output with its weights rounded to the format (and, for fp8, its inputs rounded per token as at run
time). ∂ℓ/∂Y is each token's own gradient (the loss is summed, not averaged), so the sum divided by the tokens
is the predicted mean increase in next-token NLL, in nats. Rounding is to nearest here (GPTQ's rounding, used
to build the candidates, does better; the search corrects the predictions by what it measures). Layers are
assumed to add up, as the solver needs.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from modelpress.specs import SearchFormat
from worker.engine.quantize import (
    fake_quantize,
    fake_quantize_tokens,
    fp8_fake_quantize,
    fp8_params,
    rtn_params,
)

log = logging.getLogger(__name__)

Progress = Callable[[float, str], None]


# --- The math: tensors in, tensors out ------------------------------------------------------------------------


@torch.no_grad()
def rounded_weight(weight: torch.Tensor, fmt: SearchFormat) -> torch.Tensor:
    """The weight as `fmt` stores it, rounded to nearest (bf16: the weight itself)."""
    if fmt == SearchFormat.fp8:
        return fp8_fake_quantize(weight, fp8_params(weight))
    args = fmt.weights
    if args is None:
        return weight
    scale, zero_point = rtn_params(weight, args.bits, args.group_size, args.symmetric)
    return fake_quantize(weight, scale, zero_point, args.bits, args.group_size)


@torch.no_grad()
def output_change(x: torch.Tensor, weight: torch.Tensor, rounded: torch.Tensor, fmt: SearchFormat) -> torch.Tensor:
    """Ŷ − Y for inputs x (batch, tokens, in): what rounding the weight (and, for fp8, the inputs) changes."""
    if fmt == SearchFormat.fp8:
        return F.linear(fake_quantize_tokens(x, "fp8"), rounded) - F.linear(x, weight)
    return F.linear(x, rounded - weight)


def fisher_score(grad: torch.Tensor, change: torch.Tensor) -> float:
    """½ Σ (∂ℓ/∂Y)² (ΔY)²: the loss increase the Fisher diagonal predicts for this output change (summed)."""
    return 0.5 * float((grad.double().square() * change.double().square()).sum())


# --- The calibrated pass --------------------------------------------------------------------------------------


@dataclass
class Sensitivity:
    """Predicted mean NLL increase (nats per token) per layer and format, and what it was measured on."""

    scores: dict[str, dict[str, float]]
    tokens: int
    windows: int

    def to_json(self) -> dict:
        return {"scores": self.scores, "tokens": self.tokens, "windows": self.windows}

    @classmethod
    def from_json(cls, data: dict) -> Sensitivity:
        return cls(scores=data["scores"], tokens=int(data["tokens"]), windows=int(data["windows"]))


class _LayerProbe:
    """Keeps one Linear's input during the forward pass and scores every format on its output gradient."""

    def __init__(self, linear: torch.nn.Linear, formats: Sequence[SearchFormat]) -> None:
        self.linear = linear
        self.formats = [f for f in formats if f != SearchFormat.bf16]
        self.sums = dict.fromkeys(self.formats, 0.0)
        self.handle = linear.register_forward_hook(self._forward)

    def _forward(self, _module: torch.nn.Module, args: tuple, output: torch.Tensor) -> None:
        if output.requires_grad:
            x = args[0].detach()
            output.register_hook(lambda grad: self._score(x, grad))

    def _score(self, x: torch.Tensor, grad: torch.Tensor) -> None:
        weight = self.linear.weight.detach()  # x stays (batch, tokens, in): fp8 inputs take one scale per token
        for fmt in self.formats:
            change = output_change(x, weight, rounded_weight(weight, fmt), fmt)
            self.sums[fmt] += fisher_score(grad, change)


def _inputs_need_grad(_module: torch.nn.Module, _args: tuple, output: torch.Tensor) -> torch.Tensor:
    """Make the embeddings' output a leaf that needs a gradient, so the backward pass reaches every Linear."""
    return output.detach().requires_grad_(True)


def measure_sensitivity(
    model: torch.nn.Module,
    linears: Mapping[str, torch.nn.Linear],
    formats: Mapping[str, Sequence[SearchFormat]],
    windows: torch.Tensor,
    device: torch.device,
    progress: Progress,
) -> Sensitivity:
    """One forward and backward pass per window (batch 1) with every targeted Linear probed; the weights get no
    gradient and are left unchanged."""
    probes = {name: _LayerProbe(linear, formats[name]) for name, linear in linears.items()}
    embedding = model.get_input_embeddings().register_forward_hook(_inputs_need_grad)
    flags = [(p, p.requires_grad) for p in model.parameters()]
    for parameter, _ in flags:
        parameter.requires_grad_(False)
    tokens = 0
    try:
        with torch.enable_grad():
            for i, window in enumerate(windows):
                ids = window.unsqueeze(0).to(device)
                logits = model(input_ids=ids, use_cache=False).logits[0, :-1].float()
                F.cross_entropy(logits, ids[0, 1:], reduction="sum").backward()
                tokens += ids.shape[1] - 1
                progress((i + 1) / len(windows), f"sensitivity window {i + 1}/{len(windows)}")
    finally:
        embedding.remove()
        for probe in probes.values():
            probe.handle.remove()
        for parameter, flag in flags:
            parameter.requires_grad_(flag)
    scores = {
        name: {SearchFormat.bf16.value: 0.0, **{f.value: s / tokens for f, s in probe.sums.items()}}
        for name, probe in probes.items()
    }
    for name in scores:
        scores[name] = {f: v for f, v in scores[name].items() if SearchFormat(f) in formats[name]}
    return Sensitivity(scores=scores, tokens=tokens, windows=len(windows))
