"""Save an RTN-quantized model in the compressed-tensors format, the way llm-compressor does.

Our step has already put fake-quantized weights in the model and kept their scales; here compressed-tensors
attaches a `QuantizationScheme` to each quantized Linear (`apply_quantization_config`), its `weight_scale` /
`weight_zero_point` are set to the step's values, check that compressed-tensors' own quantize-dequantize
reproduces our weights, and let `ModelCompressor` pack the integers and write `quantization_config`.

Formats: symmetric weight-only int schemes are saved `pack-quantized` (int4 and int8 codes packed into int32,
as llm-compressor's W4A16 / W8A16 presets). W8A8 (int8 weights, dynamic per-token int8 activations) is
`int-quantized` and FP8 (E4M3 weights per channel, dynamic per-token activations) is `float-quantized`, as
llm-compressor's W8A8 and FP8_DYNAMIC presets write them.

Asymmetric weight-only schemes are saved `int-quantized` (codes and zero points in int8: 8.62 bits per weight for
int4 g64, against 4.56 packed), because an artifact must load with a plain `from_pretrained`, and with
transformers 5.24 and compressed-tensors 0.20.1 a `pack-quantized` checkpoint with zero points does not (checked
for int4 g32, g64, g128 and per channel, and int8; the symptom reported at
https://github.com/vllm-project/llm-compressor/issues/1618).
compressed-tensors' compressor packs the zero points along the output dimension: (ceil(out * bits / 32), groups)
int32. Transformers builds the model on the meta device and compresses it there
(`CompressedTensorsHfQuantizer._process_model_before_weight_loading` calls `compress_model`), where the meta
branch of `PackedQuantizationCompressor.compress` (compressors/pack_quantized/base.py) leaves `weight_zero_point`
unpacked, (out, groups) int8; every zero point is then a size mismatch (core_model_loading.py) and loading
raises "You set `ignore_mismatched_sizes` to `False`". The checkpoint itself is right: loaded with
`quantization_config=CompressedTensorsConfig(dequantize=True)` it gives exact weights. No checkpoint within the
format as compressed-tensors writes it avoids this: strategy "block" [1, group] keeps zero points unpacked and
loads, but declares a strategy that vLLM's WNA16 selection (channel or group) does not take. A test in
tests/engine/quantize/test_quantization.py fails once plain loading works.

compressed_tensors is imported here only, lazily: the rest of the engine runs without it.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import logging
import math
from collections import defaultdict
from pathlib import Path

import torch

from worker.engine.export.sharded import write_layerwise_
from worker.engine.quantize import fake_quantize, fp8_fake_quantize
from worker.engine.steps import EngineError, QuantizedWeight

log = logging.getLogger(__name__)

SchemeKey = tuple[int, int | None, bool, str, str | None, str | None]
ACTIVATION_TYPES = {"int8": "int", "fp8": "float"}


def require_compressed_tensors() -> None:
    """Fail early, with a fix, where compressed-tensors (needed to write quantized artifacts) is missing."""
    if importlib.util.find_spec("compressed_tensors") is None:
        raise EngineError(
            "missing_dependency",
            "quantized models are saved in the compressed-tensors format, but the compressed-tensors package "
            "is not installed on this worker: pip install compressed-tensors",
        )


def storage_format(q: QuantizedWeight) -> str:
    if q.kind == "float":
        return "float-quantized"
    if q.activations is not None or not q.symmetric:
        return "int-quantized"
    return "pack-quantized"


def stored_weight_bytes(shape: tuple[int, int], q: QuantizedWeight) -> int:
    """Bytes the artifact spends on one quantized weight: codes, scales, zero points (and packed shape)."""
    out_features, in_features = shape
    scale_bytes = q.scale.numel() * q.scale.element_size()
    if storage_format(q) == "pack-quantized":
        return out_features * math.ceil(in_features * q.bits / 32) * 4 + scale_bytes + 2 * 8
    zero_bytes = q.zero_point.numel() if q.zero_point is not None else 0
    return out_features * in_features + scale_bytes + zero_bytes


def _scheme_key(q: QuantizedWeight) -> SchemeKey:
    return (q.bits, q.group_size, q.symmetric, q.kind, q.activations, q.actorder)


def _scheme(q: QuantizedWeight, targets: list[str]):
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

    weights = QuantizationArgs(
        num_bits=q.bits,
        type=q.kind,
        symmetric=q.symmetric,
        strategy="group" if q.group_size else "channel",
        group_size=q.group_size,
        actorder=q.actorder,
    )
    activations = None
    if q.activations is not None:
        activations = QuantizationArgs(
            num_bits=8, type=ACTIVATION_TYPES[q.activations], symmetric=True, strategy="token", dynamic=True
        )
    return QuantizationScheme(targets=targets, weights=weights, input_activations=activations, format=storage_format(q))


def _quantization_config(model: torch.nn.Module, quantized: dict[str, QuantizedWeight]):
    from compressed_tensors.quantization import QuantizationConfig

    by_scheme: dict[SchemeKey, list[str]] = defaultdict(list)
    examples: dict[SchemeKey, QuantizedWeight] = {}
    for name, q in quantized.items():
        by_scheme[_scheme_key(q)].append(name)
        examples[_scheme_key(q)] = q
    single = len(by_scheme) == 1
    groups = {
        f"group_{index}": _scheme(examples[key], ["Linear"] if single else names)
        for index, (key, names) in enumerate(by_scheme.items())
    }
    linears = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    ignore = [n for n in linears if n not in quantized] if single else []
    return QuantizationConfig(config_groups=groups, ignore=ignore, quantization_status="frozen")


@torch.no_grad()
def _set_qparams_(module: torch.nn.Module, q: QuantizedWeight, name: str) -> None:
    from compressed_tensors.quantization.lifecycle.forward import fake_quantize as ct_fake_quantize

    device = module.weight.device  # the step's scales may live in host memory (an onloaded model)
    q = dataclasses.replace(
        q, scale=q.scale.to(device), zero_point=None if q.zero_point is None else q.zero_point.to(device)
    )
    module.weight_scale.data.copy_(q.scale.reshape(module.weight_scale.shape))
    zero_point = getattr(module, "weight_zero_point", None)
    if q.zero_point is not None:
        zero_point.data.copy_(q.zero_point.reshape(zero_point.shape).to(zero_point.dtype))
    elif zero_point is not None:
        zero_point.data.zero_()
    theirs = ct_fake_quantize(module.weight, module.weight_scale, zero_point, module.quantization_scheme.weights)
    if q.kind == "float":
        ours = fp8_fake_quantize(module.weight, q.scale.reshape(-1, 1))
    else:
        ours = fake_quantize(module.weight, q.scale, q.zero_point, q.bits, q.group_size)
    if not (torch.equal(theirs, module.weight) and torch.equal(ours, module.weight)):
        worst = float((theirs - module.weight).abs().max())
        raise EngineError(
            "export_mismatch",
            f"compressed-tensors does not reproduce the quantized weights of {name} (max diff {worst:.3g}); "
            "the artifact would not match what was measured",
        )


def save_compressed_(
    model: torch.nn.Module, quantized: dict[str, QuantizedWeight], folder: Path, device: torch.device | None = None
) -> dict:
    """Write `model` (whose quantized Linears hold fake-quantized weights) as a compressed-tensors checkpoint,
    one decoder layer at a time (`write_layerwise_`): each layer's quantized Linears get their scales and are
    packed on `device` (default: where the model is), then written.

    The model is modified in place (compressed) and should not be used afterwards. Returns the
    `quantization_config` written to config.json.
    """
    require_compressed_tensors()
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.compressors.base import compress_module
    from compressed_tensors.quantization import QuantizationStatus, apply_quantization_config

    apply_quantization_config(model, _quantization_config(model, quantized), show_progress=False)
    compressor = ModelCompressor.from_pretrained_model(model)
    names = {id(module): name for name, module in model.named_modules()}

    def pack_(module: torch.nn.Module) -> None:
        for sub in module.modules():
            name = names.get(id(sub))
            if name in quantized:
                _set_qparams_(sub, quantized[name], name)
                compress_module(sub, compressor.force_compression_format)

    home = model.get_input_embeddings().weight.device
    write_layerwise_(model, folder, device or home, pack_)
    compressor.quantization_config.quantization_status = QuantizationStatus.COMPRESSED
    compressor.update_config(str(folder))
    log.info(
        "saved %d quantized layers as compressed-tensors (%s)", len(quantized), compressor.quantization_config.format
    )
    return compressor.quantization_config.model_dump(mode="json")
