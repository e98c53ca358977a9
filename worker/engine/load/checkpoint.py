"""Load a causal LM and its tokenizer from a Hugging Face folder or a GGUF file, offline, in the checkpoint's own
dtype (bf16 and fp16 stay so; the steps do their math in float32 one layer at a time). A GGUF file is
dequantized: to bfloat16 on a CUDA worker, to float32 on a CPU one (where bf16 matmuls are slow and rough)."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from worker.engine.load.experts import unfuse_experts_
from worker.engine.steps import EngineError

log = logging.getLogger(__name__)

_SAFE = {"local_files_only": True, "trust_remote_code": False}


@dataclass
class LoadedModel:
    model: PreTrainedModel
    tokenizer: Any | None  # a transformers tokenizer, or None when the upload has none


def pick_device(device: str | None) -> torch.device:
    """The device asked for, else CUDA when available, else CPU. A CUDA device always carries its index: some
    torch.cuda calls (`mem_get_info`, the per-process memory fraction) refuse a bare "cuda"."""
    chosen = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if chosen.type == "cuda" and chosen.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return chosen


def _hf_sources(path: Path) -> tuple[Path, dict[str, Any]]:
    if not (path / "config.json").is_file():
        raise EngineError("bad_model", f"{path} is not a Hugging Face model folder: config.json is missing")
    return path, {}


def _gguf_sources(path: Path) -> tuple[Path, dict[str, Any]]:
    if not path.is_file():
        raise EngineError("bad_model", f"GGUF file {path} does not exist")
    return path.parent, {"gguf_file": path.name}


_SOURCES = {"hf": _hf_sources, "gguf": _gguf_sources}


def _forget_gguf_origin_(model: PreTrainedModel) -> None:
    """A GGUF import is dequantized to dense floats; drop the `gguf` quantization marker so saving writes a
    plain float checkpoint (and not a config that asks loaders for a GGUF file)."""
    if getattr(model.config, "quantization_config", None) is not None:
        del model.config.quantization_config
    for attr in ("hf_quantizer", "quantization_method"):
        if hasattr(model, attr):
            setattr(model, attr, None)
    if hasattr(model, "is_quantized"):
        model.is_quantized = False


def load_dtype(model_format: str, device: torch.device) -> torch.dtype | str:
    """The dtype transformers loads in: "auto" (the checkpoint's) for a Hugging Face folder; for GGUF, whose
    blocks are dequantized anyway, bfloat16 on CUDA and float32 on the CPU."""
    if model_format == "gguf":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return "auto"


def load_model(path: Path, model_format: str, device: torch.device, to_device: bool = True) -> LoadedModel:
    """Load model (its checkpoint's dtype, eval mode) and tokenizer (None when there is none). The model is read
    into host memory and moved to `device` unless `to_device` is False (the pipeline decides that from its
    execution plan: a model larger than the GPU stays in host memory and its layers visit the GPU one by one)."""
    if model_format not in _SOURCES:
        raise EngineError("bad_model", f"model format {model_format!r} is not one of {sorted(_SOURCES)}")
    folder, extra = _SOURCES[model_format](Path(path))
    log.info("loading %s model from %s", model_format, path)
    try:
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=load_dtype(model_format, device), **extra, **_SAFE)
    except (OSError, ValueError, KeyError) as exc:
        raise EngineError("bad_model", f"transformers could not load the model at {path}: {exc}") from exc
    if "gguf_file" in extra:
        _forget_gguf_origin_(model)
    unfuse_experts_(model)
    if to_device:
        model.to(device)
    model.eval()
    return LoadedModel(model=model, tokenizer=load_tokenizer(folder, extra))


def load_tokenizer(folder: Path, extra: dict[str, Any] | None = None) -> Any | None:
    """The tokenizer stored with the model, or None when the folder (or GGUF file) has none."""
    extra = extra or {}
    has_files = "gguf_file" in extra or any(
        (folder / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")
    )
    if not has_files:
        return None
    try:
        return AutoTokenizer.from_pretrained(folder, **extra, **_SAFE)
    except (OSError, ValueError, KeyError) as exc:
        log.warning("tokenizer at %s could not be loaded: %s", folder, exc)
        return None


def require_tokenizer(tokenizer: Any | None, purpose: str) -> Any:
    if tokenizer is None:
        raise EngineError(
            "no_tokenizer",
            f"{purpose} needs a tokenizer, but the model has none: upload the model folder with its tokenizer "
            "files (tokenizer.json / tokenizer_config.json), or submit the job without "
            f"{purpose}",
        )
    return tokenizer
