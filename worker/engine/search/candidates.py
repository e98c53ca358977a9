"""Candidates: which formats fit each layer and what each costs in bytes, building an assignment into the model
(each layer rounded to its format by the candidate's method), writing it as a compressed-tensors artifact
(one config group per scheme, unquantized layers left out), and measuring the artifact as transformers
reloads it.

Sizes are predicted exactly from the assignment with the export's own byte count per quantized weight
(`stored_weight_bytes`); the artifact's tensor bytes are then read from its safetensors headers, so a test can
hold the two equal.
"""

from __future__ import annotations

import hashlib
import json
import math
import struct
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from modelpress.specs import AWQQuantize, GPTQQuantize, SearchFormat, SearchMethod, SearchPruning
from worker.engine.evaluate import ReferenceReader, perplexity, state_dict_bytes
from worker.engine.export import save_compressed_, stored_weight_bytes, tar_folder, write_manifest
from worker.engine.load.checkpoint import load_model
from worker.engine.quantize import (
    InputStats,
    LayerGroup,
    awq_round_,
    fold_awq_scales_,
    fp8_quantize_,
    gptq_quantize,
    quantize_,
    quantize_layers,
)
from worker.engine.steps import QuantizedWeight, StepContext

Progress = Callable[[float, str], None]
# a search rounds with GPTQ's default options (true sequential, clip search) and act order with static groups: the
# columns of large Hessian diagonal are rounded first, the scales still fixed per group in the stored order (no
# g_idx), so the artifact is read as without it (SmolLM2-135M on the CPU, 8 × 512 calibration and evaluation
# windows of WikiText-2: uniform int4 g64 measured +13.0% perplexity with act order, +15.7% without)
GPTQ_DEFAULTS = GPTQQuantize(act_order=True)
AWQ_DEFAULTS = AWQQuantize()  # and searches AWQ's scales with its defaults (Gram loss, plain scales, 20 points)


# --- Formats that fit, and their bytes ------------------------------------------------------------------------


def fitting_formats(linear: torch.nn.Linear, formats: tuple[SearchFormat, ...]) -> list[SearchFormat]:
    """The formats whose group size divides the layer's input width."""
    return [
        f
        for f in formats
        if f.weights is None or f.weights.group_size is None or linear.in_features % f.weights.group_size == 0
    ]


def format_bytes(linear: torch.nn.Linear, fmt: SearchFormat) -> int:
    """Bytes the artifact spends on this layer's weight in `fmt` (codes, scales and shape; bf16: the weight as
    held), counted as the export counts them."""
    weight = linear.weight
    if fmt == SearchFormat.bf16:
        return weight.numel() * weight.element_size()
    out_features, in_features = weight.shape
    args = fmt.weights
    groups = 1 if args is None or args.group_size is None else in_features // args.group_size
    scale = torch.empty((out_features, groups), dtype=weight.dtype, device="meta")
    if fmt == SearchFormat.fp8:
        record = QuantizedWeight(scale, None, 8, None, True, kind="float", activations="fp8")
    else:
        record = QuantizedWeight(scale, None, args.bits, args.group_size, True)
    return stored_weight_bytes((out_features, in_features), record)


def predicted_size(model: torch.nn.Module, linears: Mapping[str, torch.nn.Linear], assignment: Mapping[str, str]):
    """Tensor bytes of the artifact an assignment makes: the model as held, with each assigned weight replaced
    by its format's bytes."""
    held = state_dict_bytes(model)
    return held + sum(
        format_bytes(linears[name], SearchFormat(fmt)) - format_bytes(linears[name], SearchFormat.bf16)
        for name, fmt in assignment.items()
    )


def linear_weight_bytes(model: torch.nn.Module, linears: Mapping[str, torch.nn.Linear], assignment) -> int:
    """Weight bytes every decoded token reads from the Linears (the output head included), as stored."""
    total = 0
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear):
            fmt = SearchFormat(assignment.get(name, SearchFormat.bf16.value))
            total += format_bytes(module, fmt)
    return total


def tensor_bytes(folder: Path) -> int:
    """Bytes of tensor data in a folder's *.safetensors files (each file less its 8-byte length and header)."""
    total = 0
    for path in Path(folder).glob("*.safetensors"):
        with path.open("rb") as handle:
            (header,) = struct.unpack("<Q", handle.read(8))
        total += path.stat().st_size - 8 - header
    return total


# --- Building one candidate -----------------------------------------------------------------------------------


def round_layer_(fmt: SearchFormat, method: SearchMethod, linear: torch.nn.Linear, stats: InputStats | None):
    """Round one Linear in place to `fmt` by `method` (to nearest where there are no input statistics; fp8 by
    GPTQ's E4M3 loop under gptq, to nearest otherwise)."""
    calibrated = method in (SearchMethod.gptq, SearchMethod.awq) and stats is not None
    if fmt == SearchFormat.fp8:
        return fp8_quantize_(linear, stats if calibrated and method == SearchMethod.gptq else None)
    args = fmt.weights
    if not calibrated:
        return quantize_(linear.weight, args.bits, args.group_size, args.symmetric)
    if method == SearchMethod.awq:
        return awq_round_(linear, stats, args.bits, args.group_size, args.symmetric)
    options = GPTQ_DEFAULTS
    weight, scale, zero = gptq_quantize(
        linear.weight,
        stats.gram,
        args.bits,
        args.group_size,
        args.symmetric,
        options.block_size,
        options.dampening,
        options.act_order,
        clip_search=options.clip_search,
    )
    linear.weight.copy_(weight.to(linear.weight.dtype))
    return QuantizedWeight(scale=scale, zero_point=zero, bits=args.bits, group_size=args.group_size, symmetric=True)


def _int_args(assignment: Mapping[str, str]):
    """For AWQ's scale search: each layer's int format as (bits, group_size, symmetric), None if not int."""

    def args_of(name: str) -> tuple[int, int | None, bool] | None:
        weights = SearchFormat(assignment.get(name, SearchFormat.bf16.value)).weights
        return None if weights is None else (weights.bits, weights.group_size, weights.symmetric)

    return args_of


@torch.no_grad()
def build_(
    model: torch.nn.Module,
    linears: Mapping[str, torch.nn.Linear],
    assignment: Mapping[str, str],
    method: SearchMethod,
    calibration: torch.Tensor,
    device: torch.device,
    progress: Progress,
) -> dict[str, QuantizedWeight]:
    """Quantize the model in place as the assignment says (bf16 layers unquantized); returns the quantized
    layers' records for the export. GPTQ runs layer by layer on calibration inputs that went through the
    already quantized layers, as the `quantize:gptq` step does. AWQ first folds, in each decoder layer, scales
    searched for the formats its int layers got (an fp8 layer reading the same input takes the fold, computing
    the same function, and is then rounded to nearest), then clips and rounds each int layer, as the
    `quantize:awq` step does. bf16 layers stay untouched: no fold is made whose producer or consumer is one."""
    chosen = {name: linears[name] for name, fmt in assignment.items() if fmt != SearchFormat.bf16}
    if not chosen:
        return {}
    context = StepContext(calibration=calibration, report_progress=progress, device=device)
    untouched = tuple(linear for name, linear in linears.items() if name not in chosen)
    notes: list[str] = []

    def prepare(group: LayerGroup) -> None:  # group.linears holds only the quantized layers: bf16 consumers
        fold_awq_scales_(group, AWQ_DEFAULTS, _int_args(assignment), notes, untouched)

    result = quantize_layers(
        model,
        context,
        chosen,
        lambda name, linear, stats: round_layer_(SearchFormat(assignment[name]), method, linear, stats),
        prepare=prepare if method == SearchMethod.awq else None,
        true_sequential=method == SearchMethod.gptq and GPTQ_DEFAULTS.true_sequential,
        uses_stats=method != SearchMethod.rtn,
    )
    return result.quantized


def export_(
    model: torch.nn.Module, tokenizer, quantized: dict[str, QuantizedWeight], folder: Path, manifest: dict
) -> dict | None:
    """Write the built model as a Hugging Face folder (compressed-tensors when anything is quantized) with its
    manifest; returns the quantization_config (None when nothing was quantized). The model is spent after."""
    folder.mkdir(parents=True, exist_ok=True)
    config = save_compressed_(model, quantized, folder) if quantized else None
    if not quantized:
        model.save_pretrained(folder)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    write_manifest(folder, {**manifest, "quantization": config})
    return config


def pack(folder: Path, archive: Path) -> Path:
    """The downloadable tar of an exported folder, written beside and renamed into place whole."""
    partial = archive.with_name(archive.name + ".partial")
    partial.parent.mkdir(parents=True, exist_ok=True)
    tar_folder(folder, partial)
    partial.replace(archive)
    return archive


def measure(
    folder: Path,
    windows: torch.Tensor,
    device: torch.device,
    reference: Path,
    baseline_perplexity: float,
    progress,
    pruned: Sequence[str] = (),
    score: Callable[[torch.nn.Module, Any], list[dict]] | None = None,
) -> dict:
    """Perplexity, its increase over the baseline, the KL divergence to the baseline and the bytes on disk, of the
    artifact as transformers reloads it; for a pruned candidate also the share of exact zeros in the `pruned`
    layers' weights as reloaded; with `score`, also `tasks`: what it returns for the reloaded model and tokenizer
    (the task scores)."""
    reloaded = load_model(folder, "hf", device)
    divergence = ReferenceReader(reference)
    result = perplexity(reloaded.model, windows, device, progress, divergence)
    sparsity = reloaded_sparsity(reloaded.model, pruned) if pruned else None
    tasks = None if score is None else {"tasks": score(reloaded.model, reloaded.tokenizer)}
    del reloaded
    return {
        **(tasks or {}),
        "perplexity": result["perplexity"],
        "perplexity_increase": result["perplexity"] / baseline_perplexity - 1.0,
        "kl_divergence": divergence.result(),
        "size_bytes": sum(p.stat().st_size for p in folder.glob("*.safetensors")),
        "tensor_bytes": tensor_bytes(folder),
        "nll_increase": math.log(result["perplexity"] / baseline_perplexity),
        **({"sparsity": sparsity} if sparsity is not None else {}),
    }


@torch.no_grad()
def reloaded_sparsity(model: torch.nn.Module, names: Sequence[str]) -> float:
    """The share of exact zeros over the named Linears' weights, as the loaded model computes with them (read
    after a forward pass: compressed-tensors decompresses a layer's weight on its first one)."""
    modules = dict(model.named_modules())
    zeros = total = 0
    for name in names:
        weight = modules[name].weight
        zeros += int((weight == 0).sum())
        total += weight.numel()
    return zeros / total if total else 0.0


def format_counts(assignment: Mapping[str, str]) -> dict[str, int]:
    """How many layers got each format."""
    counts: dict[str, int] = {}
    for fmt in assignment.values():
        counts[fmt] = counts.get(fmt, 0) + 1
    return dict(sorted(counts.items()))


def candidate_key(method: SearchMethod, assignment: Mapping[str, str], pruning: SearchPruning | None = None) -> str:
    """A stable name for a (method, assignment, pruning) triple: equal ones are built once, also across attempts."""
    parts = [method.value, sorted(assignment.items())]
    if pruning is not None:
        parts.append(pruning.model_dump(mode="json"))
    text = json.dumps(parts, separators=(",", ":"), sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def pruning_key(pruning: SearchPruning) -> str:
    """A stable name for a pruning option (its sensitivity table's file)."""
    text = json.dumps(pruning.model_dump(mode="json"), separators=(",", ":"), sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]
