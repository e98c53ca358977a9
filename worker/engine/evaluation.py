"""Evaluate a model: perplexity over token windows, prefill and decode latency, peak memory, generations.

Baseline and optimized models go through the same `evaluate` with the same `EvalPlan`, so they are measured on
the same windows, prompts and device.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from worker.engine.measure import (
    PeakMemory,
    count_parameters,
    device_name,
    median_ms,
    tensor_bytes_in_memory,
)

log = logging.getLogger(__name__)

Progress = Callable[[float, str], None]

PROMPTS = ("The capital of France is", "Once upon a time, there was", "def fibonacci(n):")


@dataclass(frozen=True)
class EvalPlan:
    """What every model is measured on."""

    device: torch.device
    windows: torch.Tensor | None  # (n, seq_len) evaluation windows; None: no evaluation dataset
    latency_ids: torch.Tensor  # (1, seq_len) ids for the prefill timing
    prompts: tuple[str, ...] = PROMPTS
    decode_tokens: int = 16
    sample_tokens: int = 24
    repeats: int = 3


@torch.no_grad()
def window_nll(model: torch.nn.Module, window: torch.Tensor) -> tuple[float, int]:
    """Summed next-token NLL of one window scored on its own (standard shifted labels), and its token count."""
    logits = model(input_ids=window.unsqueeze(0), use_cache=False).logits[0, :-1].float()
    nll = F.cross_entropy(logits, window[1:], reduction="sum")
    return float(nll), window.numel() - 1


def perplexity(model: torch.nn.Module, windows: torch.Tensor, device: torch.device, progress: Progress) -> dict:
    """exp(mean token NLL) over non-overlapping windows."""
    total_nll, total_tokens = 0.0, 0
    for i, window in enumerate(windows):
        nll, tokens = window_nll(model, window.to(device))
        total_nll += nll
        total_tokens += tokens
        progress((i + 1) / len(windows), f"perplexity window {i + 1}/{len(windows)}")
    return {"perplexity": math.exp(total_nll / total_tokens), "tokens": total_tokens, "windows": len(windows)}


@torch.no_grad()
def prefill_ms(model: torch.nn.Module, ids: torch.Tensor, device: torch.device, repeats: int) -> float:
    """Median time of one forward pass over a full window (the prompt-processing step)."""
    ids = ids.to(device)
    return median_ms(lambda: model(input_ids=ids, use_cache=True), device, repeats)


def _decode_loop(
    model: torch.nn.Module, prompt: torch.Tensor, steps: int
) -> tuple[Callable[[], None], Callable[[], None]]:
    """A prefill (untimed) then a closure that decodes `steps` greedy tokens one at a time with the KV cache."""
    state: dict[str, Any] = {}

    def keep(out: Any) -> None:
        # transformers >= 5.2x names the KV cache `cache`; earlier versions `past_key_values`
        state["cache_arg"] = "cache" if "cache" in out else "past_key_values"
        state["cache"], state["next"] = out[state["cache_arg"]], out.logits[:, -1:].argmax(-1)

    @torch.no_grad()
    def prefill() -> None:
        keep(model(input_ids=prompt, use_cache=True))

    @torch.no_grad()
    def decode() -> None:
        for _ in range(steps):
            keep(model(input_ids=state["next"], use_cache=True, **{state["cache_arg"]: state["cache"]}))

    return prefill, decode


def decode_ms_per_token(model: torch.nn.Module, prompt: torch.Tensor, device: torch.device, plan: EvalPlan) -> float:
    """Median over repeats of (time of the per-token decode loop) / tokens; prefill is outside the timing."""
    prefill, decode = _decode_loop(model, prompt.to(device), plan.decode_tokens)
    times = []
    for _ in range(plan.repeats + 1):  # the first run warms up
        prefill()
        times.append(median_ms(decode, device, repeats=1, warmup=0))
    ordered = sorted(times[1:])
    return ordered[len(ordered) // 2] / plan.decode_tokens


@torch.no_grad()
def generate_samples(model: torch.nn.Module, tokenizer: Any, plan: EvalPlan) -> list[dict[str, str]]:
    """Greedy continuations of the fixed prompts."""
    samples = []
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    for prompt in plan.prompts:
        encoded = tokenizer(prompt, return_tensors="pt").to(plan.device)
        output = model.generate(
            **encoded, max_new_tokens=plan.sample_tokens, do_sample=False, pad_token_id=pad, num_beams=1
        )
        new = output[0, encoded["input_ids"].shape[1] :]
        samples.append({"prompt": prompt, "text": tokenizer.decode(new, skip_special_tokens=True)})
    return samples


def warm_up_(model: torch.nn.Module, plan: EvalPlan) -> None:
    """One small forward pass (a compressed-tensors model decompresses its weights on the first one)."""
    with torch.no_grad():
        model(input_ids=plan.latency_ids[:, :8].to(plan.device), use_cache=False)


def evaluate(model: torch.nn.Module, tokenizer: Any | None, plan: EvalPlan, progress: Progress) -> dict:
    """All metrics of one model, except its size on disk (the caller knows how it is stored)."""
    warm_up_(model, plan)
    parameters, nonzero = count_parameters(model)
    with PeakMemory(plan.device) as peak:
        ppl = None
        if plan.windows is not None:
            ppl = perplexity(
                model, plan.windows, plan.device, lambda fraction, message: progress(0.7 * fraction, message)
            )
        progress(0.75, "timing prefill")
        prefill = prefill_ms(model, plan.latency_ids, plan.device, plan.repeats)
        progress(0.85, "timing decode")
        decode = decode_ms_per_token(model, plan.latency_ids[:, :16], plan.device, plan)
    progress(0.9, "generating samples")
    samples = generate_samples(model, tokenizer, plan) if tokenizer is not None else []
    progress(1.0, "evaluated")
    return {
        "metrics": {
            "parameters": parameters,
            "nonzero_parameters": nonzero,
            "perplexity": ppl["perplexity"] if ppl else None,
            "evaluation_tokens": ppl["tokens"] if ppl else None,
            "prefill_ms": prefill,
            "prefill_tokens": int(plan.latency_ids.shape[1]),
            "decode_ms_per_token": decode,
            "decode_tokens": plan.decode_tokens,
            "peak_memory": {
                "bytes": peak.bytes,
                "model_tensor_bytes": tensor_bytes_in_memory(model),
                "method": peak.method,
            },
            "device": device_name(plan.device),
        },
        "samples": samples,
    }
