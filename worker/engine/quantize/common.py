"""Quantize steps: what they share (weight arguments, target checks, calibration statistics, per-layer records),
the plumbing the methods build on.

Every quantize step leaves fake-quantized float weights in the model (what the quantized layer computes with)
and returns each layer's scales; export writes the integers (or FP8 codes) with them (see ct_export). Steps
with dynamic activation quantization also attach a forward pre-hook that fake-quantizes each targeted Linear's
input per token, so the in-memory model computes what the saved checkpoint computes when loaded.

Per layer the report gives the damage fields every weight-changing step gives (`calibrate.layer_damage`):
`relative_error` (‖W − Ŵ‖/‖W‖) and, when the job has calibration data, `output_error` (‖XWᵀ − XŴᵀ‖/‖XWᵀ‖ over
the layer's calibration inputs X; X comes from the already quantized earlier decoder layers, as in sequential
GPTQ), with `output_error_from` saying how: "gram" (computed from XᵀX) for the methods that gather it, "outputs"
for a method that rounds without looking at its inputs (RTN, FP8 to nearest): it needs X only for that figure and
measures it in the one forward pass that carries the first `REPORT_WINDOWS` windows through the quantized layers,
so the report costs a small part of the step.

On pruned layers (at least `PRUNED_SHARE` of the weights exactly zero) every method keeps each zero exactly
zero (0 is a code of every grid; GPTQ forces pruned entries to 0 in its sweep). The layer records and the
summary say so, measured on the quantized weights: `sparsity_before`, `sparsity_after` and `sparsity_kept`.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from modelpress.specs import TargetedStep
from worker.engine.calibrate import layer_damage
from worker.engine.calibrate.layerwise import (
    HessianAccumulator,
    LayerPass,
    decoder_layers,
    input_stages,
    observe_shared,
    sequential_layers,
)
from worker.engine.calibrate.targets import fitted_linears
from worker.engine.export import require_compressed_tensors, storage_format, stored_weight_bytes
from worker.engine.load.experts import is_expert_linear
from worker.engine.quantize.quant_math import (
    TokenQuantHook,
    fake_quantize,
    fp8_fake_quantize,
    requantize_in_dtype,
    rtn_params,
)
from worker.engine.steps import EngineError, QuantizedWeight, StepContext, StepResult

log = logging.getLogger(__name__)

PRUNED_SHARE = 0.01  # a dense weight holds almost no exact zeros; a pruned one far more than this
REPORT_WINDOWS = 8  # calibration windows a report-only output_error is measured on
LinearQuantizer = Callable[[str, torch.nn.Linear, "InputStats | None"], QuantizedWeight]


# --- Spec and targets -----------------------------------------------------------------------------------------


def targeted_linears(model: torch.nn.Module, spec: TargetedStep) -> dict[str, torch.nn.Linear]:
    """The Linears the step quantizes, refused when they do not fit it (`fitted_linears`)."""
    require_compressed_tensors()  # the artifact cannot be written without it: fail before the work
    linears = fitted_linears(model, spec)
    weights = getattr(spec, "weights", None)
    if weights is not None and not weights.symmetric and any(is_expert_linear(name) for name in linears):
        raise EngineError(
            "unsupported_model",
            "asymmetric weights are saved int-quantized, and transformers cannot merge int-quantized experts back "
            "into its fused expert tensors: use symmetric weights on mixture-of-experts models",
        )
    return linears


def require_calibration(context: StepContext, step: str) -> torch.Tensor:
    """The calibration windows, or an EngineError naming the step (`quantize:gptq`) that needs them."""
    if context.calibration is None:
        raise EngineError("missing_calibration", f"{step} learns from calibration text: add `calibration`")
    return context.calibration


def calibration_device(model: torch.nn.Module, context: StepContext) -> torch.device:
    return context.device or next(model.parameters()).device


# --- Calibration statistics -----------------------------------------------------------------------------------


class InputStats:
    """Statistics of one Linear's calibration inputs: H = 2/n XᵀX, mean |x| and max |x| per input channel."""

    def __init__(self, features: int, device: torch.device) -> None:
        self.hessian = HessianAccumulator(features, device)
        self.abs_sum = torch.zeros(features, dtype=torch.float32, device=device)
        self.abs_max = torch.zeros(features, dtype=torch.float32, device=device)

    @torch.no_grad()
    def add(self, x: torch.Tensor) -> None:
        """Add a [tokens, features] batch of inputs in any float dtype (no float32 copy of it is made)."""
        self.hessian.add(x)
        magnitude = x.abs()
        self.abs_sum += magnitude.sum(dim=0, dtype=torch.float32)
        torch.maximum(self.abs_max, magnitude.amax(dim=0).float(), out=self.abs_max)

    @property
    def gram(self) -> torch.Tensor:
        return self.hessian.hessian

    @property
    def abs_mean(self) -> torch.Tensor:
        return self.abs_sum / max(self.hessian.count, 1)

    def rescale_(self, factors: torch.Tensor) -> None:
        """The statistics of x / factors (after a scale was folded into the operation that produces x)."""
        self.hessian.hessian.div_(factors.unsqueeze(0) * factors.unsqueeze(1))
        self.abs_sum.div_(factors)
        self.abs_max.div_(factors)


def observe_inputs(step: LayerPass, linears: dict[str, torch.nn.Linear]) -> dict[str, InputStats]:
    """Run the layer over the calibration windows once, collecting each Linear's input statistics. Linears fed
    the very same tensor (q/k/v, gate/up) share one set, computed once."""
    return observe_shared(
        step, list(linears), lambda name: InputStats(linears[name].in_features, linears[name].weight.device)
    )


@dataclass
class LayerGroup:
    """One decoder layer during a sequential quantization pass, with its targeted Linears' input statistics."""

    step: LayerPass
    linears: dict[str, torch.nn.Linear]
    stats: dict[str, InputStats]


def calibrated_layers(
    model: torch.nn.Module, linears: dict[str, torch.nn.Linear], windows: torch.Tensor, device, progress
) -> Iterator[LayerGroup]:
    """For each decoder layer holding targeted Linears: their statistics on inputs that went through the already
    quantized earlier layers. Change the weights before asking for the next one."""
    for step in sequential_layers(model, windows, device, progress):
        inside = {n: m for n, m in linears.items() if n.startswith(step.name + ".")}
        if inside:
            yield LayerGroup(step, inside, observe_inputs(step, inside))


def outside_layers(model: torch.nn.Module, linears: dict[str, torch.nn.Linear]) -> dict[str, torch.nn.Linear]:
    """Targeted Linears outside the decoder layers (an untied lm_head asked for): no calibration inputs."""
    prefix, _ = decoder_layers(model)
    return {n: m for n, m in linears.items() if not n.startswith(prefix + ".")}


# --- Activation quantization in memory ------------------------------------------------------------------------


def attach_activation_quant_(linear: torch.nn.Linear, kind: str) -> None:
    """Fake-quantize the Linear's input per token on every forward (what compressed-tensors does at run time)."""
    linear.register_forward_pre_hook(TokenQuantHook(kind))


# --- The result as the checkpoint holds it ---------------------------------------------------------------------


@torch.no_grad()
def settle_(linear: torch.nn.Linear, q: QuantizedWeight, home: torch.device | None) -> QuantizedWeight:
    """`q` as the artifact stores it: for a bf16 / fp16 weight the scales in that dtype and the weight recomputed
    from them as a loader does (`requantize_in_dtype`), so export reproduces it exactly; the scales moved to
    `home` (where the model lives: host memory when its layers are onloaded one at a time, so that no step's
    results pile up on the GPU)."""
    weight, scale, zero = linear.weight, q.scale, q.zero_point
    if weight.dtype in (torch.bfloat16, torch.float16) and scale.dtype != weight.dtype:
        if q.kind == "float":
            scale = scale.to(weight.dtype)
            weight.copy_(fp8_fake_quantize(weight, scale))
        else:
            requantized, scale = requantize_in_dtype(weight, scale, zero, q.bits, q.group_size, weight.dtype)
            weight.copy_(requantized)
    if home is not None:
        scale = scale.to(home)
        zero = None if zero is None else zero.to(home)
    return dataclasses.replace(q, scale=scale, zero_point=zero)


def model_home(model: torch.nn.Module) -> torch.device | None:
    """Where the model's weights live between layers (its input embeddings' device)."""
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    return None if embeddings is None else embeddings.weight.device


# --- Records --------------------------------------------------------------------------------------------------


def sparsity_record(original: torch.Tensor, quantized: torch.Tensor) -> dict:
    """For a pruned weight: its share of exact zeros before and after quantization, and whether every weight
    that was zero still is. Empty for a dense weight."""
    zero = original == 0
    before = float(zero.sum()) / zero.numel()
    if before < PRUNED_SHARE:
        return {}
    return {
        "sparsity_before": before,
        "sparsity_after": float((quantized == 0).sum()) / quantized.numel(),
        "sparsity_kept": not bool(quantized[zero].any()),
    }


def summarize_sparsity(layers: list[dict]) -> dict:
    """Over the pruned layers: shares of exact zeros before and after quantization (weighted by size) and
    whether every zero was kept. Empty when no targeted layer was pruned."""
    pruned = [layer for layer in layers if "sparsity_kept" in layer]
    if not pruned:
        return {}
    sizes = [layer["shape"][0] * layer["shape"][1] for layer in pruned]
    total = sum(sizes)
    return {
        "sparsity_kept": all(layer["sparsity_kept"] for layer in pruned),
        "sparsity_before": sum(s * layer["sparsity_before"] for s, layer in zip(sizes, pruned, strict=True)) / total,
        "sparsity_after": sum(s * layer["sparsity_after"] for s, layer in zip(sizes, pruned, strict=True)) / total,
        "pruned_layers": len(pruned),
    }


def layer_record(
    name: str, original: torch.Tensor, linear: torch.nn.Linear, q: QuantizedWeight, stats: InputStats | None
) -> dict:
    return {
        "name": name,
        "shape": list(original.shape),
        "bits": q.bits,
        "group_size": q.group_size,
        "symmetric": q.symmetric,
        "format": storage_format(q),
        **layer_damage(original, linear.weight, gram=None if stats is None else stats.gram),
        **sparsity_record(original, linear.weight),
    }


def summarize(layers: list[dict], quantized: dict[str, QuantizedWeight], linears: dict[str, torch.nn.Linear]) -> dict:
    first = next(iter(quantized.values()))
    errors = [layer["relative_error"] for layer in layers]
    outputs = [layer["output_error"] for layer in layers if layer["output_error"] is not None]
    shapes = {layer["name"]: tuple(layer["shape"]) for layer in layers}
    return {
        "bits": first.bits,
        "group_size": first.group_size,
        "symmetric": first.symmetric,
        "format": storage_format(first),
        "weights": first.kind,
        "activations": first.activations,
        "layers": len(layers),
        "targeted_parameters": sum(m.weight.numel() for m in linears.values()),
        "mean_relative_error": sum(errors) / len(errors),
        "max_relative_error": max(errors),
        "mean_output_error": sum(outputs) / len(outputs) if outputs else None,
        "max_output_error": max(outputs) if outputs else None,
        "targeted_weight_bytes_before": sum(m.weight.numel() * m.weight.element_size() for m in linears.values()),
        "targeted_weight_bytes_after": sum(stored_weight_bytes(shapes[n], q) for n, q in quantized.items()),
        **summarize_sparsity(layers),
    }


def quantize_layers(
    model: torch.nn.Module,
    context: StepContext,
    linears: dict[str, torch.nn.Linear],
    quantize: LinearQuantizer,
    prepare: Callable[[LayerGroup], None] | None = None,
    true_sequential: bool = False,
    uses_stats: bool = True,
) -> StepResult:
    """Quantize each targeted Linear with `quantize(name, linear, stats)` (which changes its weight in place),
    layer by layer over the calibration data when the job has some (stats None otherwise). `prepare(group)`
    runs first on each decoder layer (AWQ and SmoothQuant fold their scales there); errors are measured
    against the prepared float weights.

    `true_sequential` (GPTQ's option of that name) also goes stage by stage inside each decoder layer: q/k/v,
    then o_proj on the outputs of the quantized q/k/v, then gate/up, then down_proj, so each Linear's
    statistics include the error of the Linears before it. It costs one layer forward per stage. `prepare`
    still runs first, on the whole float layer (AWQ folds every scale before anything is rounded).

    `uses_stats=False` (the quantizer ignores its statistics): calibration only feeds the report's output_error,
    measured while the first `REPORT_WINDOWS` windows pass once through each quantized layer."""
    layers, quantized = [], {}
    home = model_home(model)
    quantize_raw = quantize

    def quantize(name: str, linear: torch.nn.Linear, stats: InputStats | None) -> QuantizedWeight:
        return settle_(linear, quantize_raw(name, linear, stats), home)

    def run(name: str, linear: torch.nn.Linear, stats: InputStats | None) -> None:
        original = linear.weight.detach().clone()
        quantized[name] = quantize(name, linear, stats)
        layers.append(layer_record(name, original, linear, quantized[name], stats))

    if context.calibration is None:
        for i, (name, linear) in enumerate(linears.items()):
            run(name, linear, None)
            context.report_progress((i + 1) / len(linears), f"quantized {name}")
    else:
        device = calibration_device(model, context)
        if not uses_stats:
            _quantize_measured(model, linears, context, device, quantized, layers, quantize)
        elif true_sequential:
            _quantize_stagewise(model, linears, context, device, run, prepare)
        else:
            for group in calibrated_layers(model, linears, context.calibration, device, context.report_progress):
                if prepare is not None:
                    prepare(group)
                for name, linear in group.linears.items():
                    run(name, linear, group.stats[name])
                del group  # this layer's statistics (the down_proj Hessian alone is 0.8 GiB at 8B) go first
        for name, linear in outside_layers(model, linears).items():
            run(name, linear, None)
    order = list(linears)
    layers.sort(key=lambda layer: order.index(layer["name"]))
    result = StepResult(layers=layers, summary=summarize(layers, quantized, linears), quantized=quantized)
    lost = [layer["name"] for layer in layers if layer.get("sparsity_kept") is False]
    if lost:
        result.notes.append(f"quantization moved pruned weights off zero in {', '.join(lost)}: their sparsity is lost")
    return result


def _quantize_stagewise(
    model: torch.nn.Module,
    linears: dict[str, torch.nn.Linear],
    context: StepContext,
    device: torch.device,
    run: Callable[[str, torch.nn.Linear, InputStats], None],
    prepare: Callable[[LayerGroup], None] | None,
) -> None:
    """`quantize_layers` with `true_sequential`: each stage's statistics are observed after the earlier stages
    of the same decoder layer were quantized (the first stage's, with `prepare`, are the prepared layer's)."""
    for step in sequential_layers(model, context.calibration, device, context.report_progress):
        inside = {n: m for n, m in linears.items() if n.startswith(step.name + ".")}
        if not inside:
            continue
        prepared = None
        if prepare is not None:
            group = LayerGroup(step, inside, observe_inputs(step, inside))
            prepare(group)
            prepared = group.stats
            del group
        for i, stage in enumerate(input_stages(step, list(inside))):
            if i == 0 and prepared is not None:
                stats = prepared
            else:
                stats = observe_inputs(step, {n: inside[n] for n in stage})
            prepared = None
            for name in stage:
                run(name, inside[name], stats[name])
            del stats


class OutputErrorMeter:
    """Accumulates ‖X(W − Ŵ)ᵀ‖² and ‖XWᵀ‖² over the inputs X a Linear sees (a forward pre-hook), so the output
    error needs no XᵀX and no forward of its own."""

    def __init__(self, original: torch.Tensor, approximation: torch.Tensor) -> None:
        self.original = original.float()
        self.delta = self.original - approximation.detach().float()
        self.error = 0.0
        self.reference = 0.0
        self.tokens = 0

    @torch.no_grad()
    def __call__(self, _module: torch.nn.Module, args: tuple) -> None:
        x = args[0].reshape(-1, args[0].shape[-1]).float()
        self.tokens += x.shape[0]
        self.error += float(torch.linalg.vector_norm(x @ self.delta.T, dtype=torch.float64) ** 2)
        self.reference += float(torch.linalg.vector_norm(x @ self.original.T, dtype=torch.float64) ** 2)

    def value(self) -> float | None:
        """None when no input reached the Linear (an expert the router never picked in these windows)."""
        if self.tokens == 0:
            return None
        return (self.error / self.reference) ** 0.5 if self.reference > 0 else self.error**0.5


def _quantize_measured(
    model: torch.nn.Module,
    linears: dict[str, torch.nn.Linear],
    context: StepContext,
    device: torch.device,
    quantized: dict[str, QuantizedWeight],
    layers: list[dict],
    quantize: LinearQuantizer,
) -> None:
    """`quantize_layers` for a quantizer that needs no statistics: each decoder layer is quantized first, then
    the runner's own forward over the first `REPORT_WINDOWS` windows (which feeds the next layer) measures each
    Linear's output error through a pre-hook, on the inputs it sees in the quantized model (o_proj's come from
    the quantized q/k/v)."""
    pending: list[tuple[str, torch.Tensor, torch.nn.Linear, OutputErrorMeter, object]] = []

    def finish() -> None:
        for name, original, linear, meter, handle in pending:
            handle.remove()
            record = layer_record(name, original, linear, quantized[name], None)
            record.update(output_error=meter.value(), output_error_from="outputs")
            layers.append(record)
        pending.clear()

    windows = context.calibration[:REPORT_WINDOWS]
    for step in sequential_layers(model, windows, device, context.report_progress):
        finish()  # the previous layer's forward has run
        for name, linear in linears.items():
            if name.startswith(step.name + "."):
                original = linear.weight.detach().clone()
                quantized[name] = quantize(name, linear, None)
                meter = OutputErrorMeter(original, linear.weight)
                pending.append((name, original, linear, meter, linear.register_forward_pre_hook(meter)))
    finish()


@torch.no_grad()
def quantize_(weight: torch.Tensor, bits: int, group_size: int | None, symmetric: bool) -> QuantizedWeight:
    """Replace `weight` in place by its round-to-nearest quantized values; return the scales used (computed in
    float32 whatever the weight's dtype; `settle_` expresses them in it)."""
    full = weight.float()
    scale, zero_point = rtn_params(full, bits, group_size, symmetric)
    weight.copy_(fake_quantize(full, scale, zero_point, bits, group_size))
    return QuantizedWeight(scale=scale, zero_point=zero_point, bits=bits, group_size=group_size, symmetric=symmetric)
