"""Evaluate a model: perplexity over token windows, prefill and decode speed, peak memory, generations.

Baseline and optimized models go through the same `evaluate` with the same `EvalPlan`, so they are measured on
the same windows, prompts and device.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import torch
import torch.nn.functional as F

from worker.engine.evaluate.divergence import DEFAULT_TOP_K
from worker.engine.evaluate.measure import PeakMemory, count_parameters, device_name, tensor_bytes_in_memory
from worker.engine.evaluate.onloaded import onloaded_logits
from worker.engine.speed import measure_speed
from worker.engine.steps import QuantizedWeight

log = logging.getLogger(__name__)

Progress = Callable[[float, str], None]


class LogitObserver(Protocol):
    """Sees each evaluation window's next-token logits (positions, vocabulary) once perplexity has scored them
    (`divergence.ReferenceWriter` on the baseline, `ReferenceReader` on the artifact)."""

    def observe(self, index: int, logits: torch.Tensor) -> None: ...


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
    kl_top_k: int = DEFAULT_TOP_K  # baseline log-probabilities kept per position for the KL divergence


@torch.no_grad()
def window_nll(
    model: torch.nn.Module, window: torch.Tensor, observe: Callable[[torch.Tensor], None] | None = None
) -> tuple[float, int]:
    """Summed next-token NLL of one window scored on its own (standard shifted labels), and its token count;
    `observe` also sees the scored logits."""
    logits = model(input_ids=window.unsqueeze(0), use_cache=False).logits[0, :-1]
    return scored_nll(logits, window, observe)


def scored_nll(
    logits: torch.Tensor, window: torch.Tensor, observe: Callable[[torch.Tensor], None] | None = None
) -> tuple[float, int]:
    """Summed NLL of a window's tokens after the first under its logits [positions, vocabulary] (in float32)."""
    logits = logits.float()
    nll = F.cross_entropy(logits, window[1:], reduction="sum")
    if observe is not None:
        observe(logits)
    return float(nll), window.numel() - 1


@torch.no_grad()
def _window_logits(model: torch.nn.Module, windows: torch.Tensor, device: torch.device, progress: Progress):
    for i, window in enumerate(windows):
        yield i, model(input_ids=window.unsqueeze(0).to(device), use_cache=False).logits[0, :-1]
        progress((i + 1) / len(windows), f"perplexity window {i + 1}/{len(windows)}")


def perplexity(
    model: torch.nn.Module,
    windows: torch.Tensor,
    device: torch.device,
    progress: Progress,
    observer: LogitObserver | None = None,
    onloaded: bool = False,
) -> dict:
    """exp(mean token NLL) over non-overlapping windows; `observer` sees each window's logits. `onloaded`: the
    model stays where it is (host memory) and its decoder layers visit `device` one at a time
    (`onloaded_logits`); the same figures, without the whole model on the device."""
    total_nll, total_tokens = 0.0, 0
    source = (onloaded_logits if onloaded else _window_logits)(model, windows, device, progress)
    for i, logits in source:
        observe = None if observer is None else lambda logits, i=i: observer.observe(i, logits)
        nll, tokens = scored_nll(logits, windows[i].to(device), observe)
        total_nll += nll
        total_tokens += tokens
    return {"perplexity": math.exp(total_nll / total_tokens), "tokens": total_tokens, "windows": len(windows)}


# --- Speed, through the speed room's one call ------------------------------------------------------------

SPEED_PROMPT_TOKENS = 128  # decode is timed after a prompt of at most this many of the latency ids


def speed_inputs(model: torch.nn.Module, plan: EvalPlan) -> tuple[torch.Tensor, torch.Tensor]:
    """(decode prompt, prefill ids) from the plan's latency ids, on the plan's device."""
    ids = plan.latency_ids.to(plan.device)
    limit = getattr(model.config, "max_position_embeddings", None) or ids.shape[1] + plan.decode_tokens + 1
    length = max(1, min(SPEED_PROMPT_TOKENS, ids.shape[1], limit - plan.decode_tokens - 1))
    return ids[:, :length], ids


def measure_model_speed(model: torch.nn.Module, plan: EvalPlan) -> dict:
    """The harness on `model` as it is (eager on CPU, the decode step compiled on CUDA), batch 1."""
    prompt, prefill_ids = speed_inputs(model, plan)
    return measure_speed(model, prompt, prefill_ids, plan.decode_tokens, repeats=plan.repeats)


def kernel_speed(
    model: torch.nn.Module,
    plan: EvalPlan,
    quantized: dict[str, QuantizedWeight],
    sparse_24: set[str],
    fuse: bool = True,
) -> dict:
    """The model's speed on its serving kernels (see `worker.engine.speed.measure_speed`); `model` is unchanged."""
    prompt, prefill_ids = speed_inputs(model, plan)
    return measure_speed(
        model,
        prompt,
        prefill_ids,
        plan.decode_tokens,
        repeats=plan.repeats,
        records=quantized,
        sparse_24=sparse_24,
        fuse=fuse,
    )


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


def evaluate(
    model: torch.nn.Module,
    tokenizer: Any | None,
    plan: EvalPlan,
    progress: Progress,
    speed: dict | None = None,
    observer: LogitObserver | None = None,
    onloaded: bool = False,
) -> dict:
    """All metrics of one model, except its size on disk (the caller knows how it is stored). `speed`: what the
    harness measured on this model's serving form (CUDA: see `kernel_speed`); None: measure the model as it is.
    `prefill_ms` and `decode_ms_per_token` (batch 1) come from it; the result's `speed` holds all of it.
    `observer` sees the logits of every evaluation window (the KL divergence to the baseline is built on it).

    `onloaded`: the model stays in host memory and perplexity is measured layer by layer on the device
    (`onloaded_logits`); speed and generated samples need the whole model on the device and are not measured
    (None and no samples)."""
    if not onloaded:
        warm_up_(model, plan)
    parameters, nonzero = count_parameters(model)
    with PeakMemory(plan.device) as peak:
        ppl = None
        if plan.windows is not None:
            ppl = perplexity(
                model,
                plan.windows,
                plan.device,
                lambda fraction, message: progress(0.7 * fraction, message),
                observer,
                onloaded,
            )
        if speed is None and not onloaded:
            progress(0.75, "timing prefill and decode")
            speed = measure_model_speed(model, plan)
    progress(0.9, "generating samples")
    samples = generate_samples(model, tokenizer, plan) if tokenizer is not None and not onloaded else []
    progress(1.0, "evaluated")
    return {
        "metrics": {
            "parameters": parameters,
            "nonzero_parameters": nonzero,
            "perplexity": ppl["perplexity"] if ppl else None,
            "evaluation_tokens": ppl["tokens"] if ppl else None,
            "prefill_ms": speed["prefill"]["ms"] if speed else None,
            "prefill_tokens": speed["prefill"]["tokens"] if speed else None,
            "decode_ms_per_token": speed["decode"][0]["ms_per_step"] if speed else None,
            "decode_tokens": speed["decode"][0]["steps"] if speed else None,
            "peak_memory": {
                "bytes": peak.bytes,
                "model_tensor_bytes": tensor_bytes_in_memory(model),
                "method": peak.method,
            },
            "device": device_name(plan.device),
        },
        "samples": samples,
        "speed": speed,
    }
