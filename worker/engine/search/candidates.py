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
from collections.abc import Callable, Mapping
from pathlib import Path

import torch

from modelpress.specs import GPTQQuantize, SearchFormat, SearchMethod
from worker.engine.evaluate import ReferenceReader, perplexity, state_dict_bytes
from worker.engine.export import save_compressed_, stored_weight_bytes, tar_folder, write_manifest
from worker.engine.load.checkpoint import load_model
from worker.engine.quantize import InputStats, fp8_quantize_, gptq_quantize, quantize_, quantize_layers
from worker.engine.steps import QuantizedWeight, StepContext

Progress = Callable[[float, str], None]
GPTQ_DEFAULTS = GPTQQuantize()  # a search rounds with GPTQ's default options (true sequential, clip search)


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


def _round_layer(fmt: SearchFormat, method: SearchMethod, linear: torch.nn.Linear, stats: InputStats | None):
    """Round one Linear in place to `fmt` by `method` (to nearest where there are no input statistics)."""
    use_gptq = method == SearchMethod.gptq and stats is not None
    if fmt == SearchFormat.fp8:
        return fp8_quantize_(linear, stats if use_gptq else None)
    args = fmt.weights
    if not use_gptq:
        return quantize_(linear.weight, args.bits, args.group_size, args.symmetric)
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
    """Quantize the model in place as the assignment says (bf16 layers untouched); returns the quantized
    layers' records for the export. GPTQ runs layer by layer on calibration inputs that went through the
    already quantized layers, as the `quantize:gptq` step does."""
    chosen = {name: linears[name] for name, fmt in assignment.items() if fmt != SearchFormat.bf16}
    if not chosen:
        return {}
    context = StepContext(calibration=calibration, report_progress=progress, device=device)
    result = quantize_layers(
        model,
        context,
        chosen,
        lambda name, linear, stats: _round_layer(SearchFormat(assignment[name]), method, linear, stats),
        true_sequential=method == SearchMethod.gptq and GPTQ_DEFAULTS.true_sequential,
        uses_stats=method == SearchMethod.gptq,
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
    folder: Path, windows: torch.Tensor, device: torch.device, reference: Path, baseline_perplexity: float, progress
) -> dict:
    """Perplexity, its increase over the baseline, the KL divergence to the baseline and the bytes on disk, of the
    artifact as transformers reloads it."""
    reloaded = load_model(folder, "hf", device)
    divergence = ReferenceReader(reference)
    result = perplexity(reloaded.model, windows, device, progress, divergence)
    del reloaded
    return {
        "perplexity": result["perplexity"],
        "perplexity_increase": result["perplexity"] / baseline_perplexity - 1.0,
        "kl_divergence": divergence.result(),
        "size_bytes": sum(p.stat().st_size for p in folder.glob("*.safetensors")),
        "tensor_bytes": tensor_bytes(folder),
        "nll_increase": math.log(result["perplexity"] / baseline_perplexity),
    }


def format_counts(assignment: Mapping[str, str]) -> dict[str, int]:
    """How many layers got each format."""
    counts: dict[str, int] = {}
    for fmt in assignment.values():
        counts[fmt] = counts.get(fmt, 0) + 1
    return dict(sorted(counts.items()))


def candidate_key(method: SearchMethod, assignment: Mapping[str, str]) -> str:
    """A stable name for a (method, assignment) pair: equal pairs are built once, also across attempts."""
    text = json.dumps([method.value, sorted(assignment.items())], separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]
