"""The architectures modelpress accepts: only those whose jobs the engine has been shown to run.

One table serves both upload paths (a Hugging Face folder's `model_type` and a GGUF file's
`general.architecture`) and job submission (methods an architecture cannot run). Every entry is exercised by
tests/engine/test_architectures.py on a tiny random model of that architecture; docs/architectures.md shows
the same table.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Architecture:
    model_type: str
    hf_class: str
    gguf: str | None = None
    """`general.architecture` of GGUF files that transformers dequantizes into this class (None: no GGUF import)."""
    unsupported: dict[str, str] | None = None
    """Recipe step key ("prune:structured") → why it cannot run on this architecture."""


_NO_STRUCTURED = (
    "structured pruning rewrites the q/k/v/o and gate/up/down projections (or Phi-3's fused qkv and gate_up), "
    "which this model lacks"
)

_MOE_UNSUPPORTED = {
    "prune:structured": "structured pruning removes channels of one dense MLP; a mixture-of-experts layer has a "
    "router and many experts",
    "quantize:smoothquant": "its int8 W8A8 experts are saved in a layout transformers cannot merge back into its "
    "fused expert tensors, so the artifact would not load",
}

ARCHITECTURES: tuple[Architecture, ...] = (
    Architecture("llama", "LlamaForCausalLM", gguf="llama"),
    Architecture("mistral", "MistralForCausalLM", gguf="mistral"),
    Architecture("qwen2", "Qwen2ForCausalLM", gguf="qwen2"),
    Architecture("qwen3", "Qwen3ForCausalLM", gguf="qwen3"),
    Architecture("gemma", "GemmaForCausalLM"),
    Architecture("gemma2", "Gemma2ForCausalLM", gguf="gemma2"),
    Architecture("gemma3_text", "Gemma3ForCausalLM", gguf="gemma3"),
    Architecture("phi3", "Phi3ForCausalLM", gguf="phi3"),
    Architecture("opt", "OPTForCausalLM", unsupported={"prune:structured": _NO_STRUCTURED}),
    Architecture("qwen3_moe", "Qwen3MoeForCausalLM", unsupported=_MOE_UNSUPPORTED),
    Architecture("mixtral", "MixtralForCausalLM", unsupported=_MOE_UNSUPPORTED),
)

REFUSED: dict[str, str] = {
    "gpt2": "its projections are Conv1D modules (transposed weights), which no pruning or quantization method handles",
    "falcon": "its FalconLinear projections and transformer.h layer stack are not handled by the methods or the "
    "quantized export",
}
"""Causal LM families that transformers loads but the engine cannot run, with the reason shown at upload."""

SUPPORTED_ARCHITECTURES: dict[str, frozenset[str]] = {a.model_type: frozenset({a.hf_class}) for a in ARCHITECTURES}
"""`model_type` → accepted config.json `architectures`."""

GGUF_ARCHITECTURES: dict[str, tuple[str, str]] = {a.gguf: (a.hf_class, a.model_type) for a in ARCHITECTURES if a.gguf}
"""GGUF `general.architecture` → (transformers class, model_type)."""

_BY_TYPE = {a.model_type: a for a in ARCHITECTURES}


def supported_list() -> str:
    return ", ".join(sorted(SUPPORTED_ARCHITECTURES))


def refusal(model_type: object) -> str:
    """Why an upload of this model_type is refused, naming what is supported."""
    reason = REFUSED.get(model_type) if isinstance(model_type, str) else None
    because = f": {reason}" if reason else ""
    return f"model_type {model_type!r} is not supported{because}; supported model types: {supported_list()}"


def unsupported_step(model_type: object, step_keys: list[str]) -> str | None:
    """A message for the first recipe step this architecture cannot run (or the architecture itself), else None."""
    architecture = _BY_TYPE.get(model_type) if isinstance(model_type, str) else None
    if architecture is None:
        return f"{refusal(model_type)}; upload a model of a supported architecture"
    for key in step_keys:
        reason = (architecture.unsupported or {}).get(key)
        if reason:
            return f"{key} cannot run on {architecture.model_type} models: {reason}; remove that step"
    return None
