"""Per-layer sensitivity: how much the loss is predicted to rise when one Linear alone takes a format, for every
targeted Linear and allowed format, from one calibrated forward and backward pass.

The estimate is AutoQuantize's (NVIDIA ModelOpt): a second-order expansion of the loss in the layer's outputs Y
with the empirical Fisher diagonal as the curvature, ΔL ≈ ½ Σ_tokens Σ_outputs (∂ℓ/∂Y)² · (Ŷ − Y)², where Ŷ is
the layer's output with its weights rounded to the format (and, for fp8, its inputs rounded per token as at run
time). ∂ℓ/∂Y is each token's own gradient (the loss is summed, not averaged), so the sum divided by the tokens
is the predicted mean increase in next-token NLL, in nats. Layers are assumed to add up, as the solver needs.

Ŷ is rounded the way the candidates will be. To nearest by default; when every candidate is built by GPTQ, each
layer's weights are first rounded by GPTQ itself (act order, on the Hessian of the same windows), since GPTQ
takes back a share of the rounding error that differs from layer to layer, and a ranking by rounding to nearest
puts the wrong layers at the boundary of a tight budget. That needs every probed layer's Hessian and rounded
copies at once; past `GPTQ_ROUNDING_LIMIT_BYTES` the pass rounds to nearest and says so.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from modelpress.specs import SearchFormat, SearchMethod
from worker.engine.calibrate import SharedInputs, hook_inputs
from worker.engine.quantize import (
    InputStats,
    fake_quantize,
    fake_quantize_tokens,
    fp8_fake_quantize,
    fp8_params,
    rtn_params,
)
from worker.engine.search.candidates import round_layer_

log = logging.getLogger(__name__)

Progress = Callable[[float, str], None]

NEAREST = "nearest"
GPTQ = "gptq"
ROUNDINGS = (NEAREST, GPTQ)
# the Hessians and GPTQ-rounded copies of every probed layer are held together during the pass
GPTQ_ROUNDING_LIMIT_BYTES = 4 * 1024**3


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


@torch.no_grad()
def gptq_rounded_weight(linear: torch.nn.Linear, stats: InputStats, fmt: SearchFormat) -> torch.Tensor:
    """The weight as a GPTQ candidate stores `fmt`, rounded by the candidates' own code on a copy (the Linear is
    left unchanged); bf16: the weight itself."""
    if fmt == SearchFormat.bf16:
        return linear.weight.detach()
    scratch = torch.nn.Linear(linear.in_features, linear.out_features, bias=False, device="meta")
    scratch.weight = torch.nn.Parameter(linear.weight.detach().clone(), requires_grad=False)
    round_layer_(fmt, SearchMethod.gptq, scratch, stats)
    return scratch.weight.detach()


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
    rounding: str = NEAREST  # how Ŷ was rounded: NEAREST or GPTQ

    def to_json(self) -> dict:
        return {"scores": self.scores, "tokens": self.tokens, "windows": self.windows, "rounding": self.rounding}

    @classmethod
    def from_json(cls, data: dict) -> Sensitivity:
        return cls(
            scores=data["scores"],
            tokens=int(data["tokens"]),
            windows=int(data["windows"]),
            rounding=data.get("rounding", NEAREST),
        )


class _LayerProbe:
    """Keeps one Linear's input during the forward pass and scores every format on its output gradient."""

    def __init__(
        self,
        linear: torch.nn.Linear,
        formats: Sequence[SearchFormat],
        rounded: Mapping[SearchFormat, torch.Tensor] | None = None,
    ) -> None:
        self.linear = linear
        self.formats = [f for f in formats if f != SearchFormat.bf16]
        self.rounded = rounded  # None: rounded to nearest as each window is scored
        self.sums = dict.fromkeys(self.formats, 0.0)
        self.handle = linear.register_forward_hook(self._forward)

    def _forward(self, _module: torch.nn.Module, args: tuple, output: torch.Tensor) -> None:
        if output.requires_grad:
            x = args[0].detach()
            output.register_hook(lambda grad: self._score(x, grad))

    def _score(self, x: torch.Tensor, grad: torch.Tensor) -> None:
        weight = self.linear.weight.detach()  # x stays (batch, tokens, in): fp8 inputs take one scale per token
        for fmt in self.formats:
            rounded = rounded_weight(weight, fmt) if self.rounded is None else self.rounded[fmt]
            change = output_change(x, weight, rounded, fmt)
            self.sums[fmt] += fisher_score(grad, change)


def _inputs_need_grad(_module: torch.nn.Module, _args: tuple, output: torch.Tensor) -> torch.Tensor:
    """Make the embeddings' output a leaf that needs a gradient, so the backward pass reaches every Linear."""
    return output.detach().requires_grad_(True)


def gptq_rounding_bytes(linears: Mapping[str, torch.nn.Linear], formats: Mapping[str, Sequence[SearchFormat]]) -> int:
    """At most what GPTQ rounding holds at once: each probed layer's float32 Hessian (fewer where Linears share an
    input) and one rounded copy per format."""
    total = 0
    for name, linear in linears.items():
        rounded = sum(1 for f in formats[name] if f != SearchFormat.bf16)
        total += 4 * linear.in_features**2 + rounded * linear.weight.numel() * linear.weight.element_size()
    return total


@torch.no_grad()
def gptq_rounded_weights(
    model: torch.nn.Module,
    linears: Mapping[str, torch.nn.Linear],
    formats: Mapping[str, Sequence[SearchFormat]],
    windows: torch.Tensor,
    device: torch.device,
    progress: Progress,
) -> dict[str, dict[SearchFormat, torch.Tensor]]:
    """Every probed layer's weights rounded by GPTQ to each of its formats, on the Hessian of its inputs over
    `windows` (one forward pass per window, the model unchanged; Linears that read one input share its Hessian,
    as in the candidates' build)."""
    shared = SharedInputs(list(linears), lambda n: InputStats(linears[n].in_features, linears[n].weight.device))
    handles = hook_inputs(linears, shared.callbacks())
    try:
        for i, window in enumerate(windows):
            model(input_ids=window.unsqueeze(0).to(device), use_cache=False)
            progress(0.25 * (i + 1) / len(windows), f"GPTQ Hessians, window {i + 1}/{len(windows)}")
    finally:
        for handle in handles:
            handle.remove()
    stats = shared.result()  # q/k/v (and gate/up) read one input: one Hessian for them
    rounded: dict[str, dict[SearchFormat, torch.Tensor]] = {}
    for k, (name, linear) in enumerate(linears.items()):
        layer_stats = stats.pop(name)  # freed as soon as its layer is rounded
        allowed = [f for f in formats[name] if f != SearchFormat.bf16]
        rounded[name] = {f: gptq_rounded_weight(linear, layer_stats, f) for f in allowed}
        progress(0.25 + 0.25 * (k + 1) / len(linears), f"GPTQ rounding, layer {k + 1}/{len(linears)}")
    return rounded


def measure_sensitivity(
    model: torch.nn.Module,
    linears: Mapping[str, torch.nn.Linear],
    formats: Mapping[str, Sequence[SearchFormat]],
    windows: torch.Tensor,
    device: torch.device,
    progress: Progress,
    rounding: str = NEAREST,
) -> Sensitivity:
    """One forward and backward pass per window (batch 1) with every targeted Linear probed; the weights get no
    gradient and are left unchanged. `rounding` GPTQ first rounds every layer by GPTQ on the same windows (one
    forward pass more), unless that would hold more than `GPTQ_ROUNDING_LIMIT_BYTES`."""
    if rounding not in ROUNDINGS:
        raise ValueError(f"rounding must be one of {ROUNDINGS}, got {rounding!r}")
    rounded: dict[str, dict[SearchFormat, torch.Tensor]] = {}
    if rounding == GPTQ:
        needed = gptq_rounding_bytes(linears, formats)
        if needed > GPTQ_ROUNDING_LIMIT_BYTES:
            log.info(
                "sensitivity rounds to nearest: GPTQ rounding would hold %.1f GB, over %.1f GB",
                needed / 1e9,
                GPTQ_ROUNDING_LIMIT_BYTES / 1e9,
            )
            rounding = NEAREST
        else:
            rounded = gptq_rounded_weights(model, linears, formats, windows, device, progress)
    probes = {name: _LayerProbe(linear, formats[name], rounded.get(name)) for name, linear in linears.items()}
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
                done = (i + 1) / len(windows)
                done = done if rounding == NEAREST else 0.5 + 0.5 * done  # after GPTQ's half of the stage
                progress(done, f"sensitivity window {i + 1}/{len(windows)}")
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
    return Sensitivity(scores=scores, tokens=tokens, windows=len(windows), rounding=rounding)
